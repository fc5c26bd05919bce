"""Textbook markers of pbmc3k one-vs-rest: their ranks under three rankings, scvae and scvi-tools.

Both tools train on pbmc3k_seurat (2,000 seurat_v3 HVGs, 100 epochs, ``train_size=1.0``, seed
0, as the slow test in tests/test_de.py) and run one-vs-rest on ``cell_type`` twice: vanilla
(the default; sorted by ``bayes_factor``) and change (sorted by ``proba_de``). A third ranking
keeps the genes called at fdr 0.05 with ``lfc_mean > 0`` and sorts them by ``lfc_mean -
lfc_std``. scvae also runs group mode: its own order (``proba_de``, ties ``|lfc_mean|``) and
the order ``scvae.tl.differential_expression`` writes for scanpy (``sign(lfc_mean) *
proba_de`` to 6 decimals, ties ``lfc_mean``: confidently up genes first). Writes
``results/de_markers.{md,json}``.

Run from the repository root (each tool in its own environment, one after the other)::

    python benchmarks/de_markers.py --scvi-python benchmarks/.scvi-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

HERE = Path(__file__).resolve().parent
MARKERS = {
    "B": ["MS4A1", "CD79A"],
    "CD14+ Mono": ["CD14", "LYZ"],
    "NK": ["GNLY", "NKG7"],
    "FCGR3A+ Mono": ["FCGR3A", "MS4A7"],
}
RANKINGS = ("vanilla, by bayes_factor", "change, by proba_de", "change, up, lfc_mean - lfc_std")
# scvae only (scvi-tools has no group mode)
GROUP_RANKINGS = ("group, by proba_de", "group, up first (tl scores: sign(lfc_mean) * proba_de)")


def ranks(table: pd.DataFrame) -> dict[str, dict[str, int | None]]:
    out = {}
    for group, genes in MARKERS.items():
        names = list(table[table["group1"] == group].index)
        out[group] = {g: names.index(g) + 1 if g in names else None for g in genes}
    return out


def conservative(change: pd.DataFrame) -> pd.DataFrame:
    up = change[change["is_de_fdr_0.05"].astype(bool) & (change["lfc_mean"] > 0)].copy()
    up["conservative_lfc"] = up["lfc_mean"] - up["lfc_std"]
    return up.sort_values(["group1", "conservative_lfc"], ascending=[True, False], kind="stable")


def work(tool: str, data: Path, out: Path) -> None:
    adata = ad.read_h5ad(data)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", subset=True)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    if tool == "scvae":
        sys.path.insert(0, str(HERE.parent))
        import scvae

        scvae.settings.progress_bar = False
        model = scvae.SCVAE(adata)
        model.train(max_epochs=100, train_size=1.0, seed=0)
        kw: dict = {}
    else:
        import scvi

        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata)
        model.train(max_epochs=100, train_size=1.0, accelerator="cpu", enable_progress_bar=False)
        kw = {"silent": True}
    vanilla = model.differential_expression(groupby="cell_type", **kw)
    change = model.differential_expression(groupby="cell_type", mode="change", **kw)
    tables = [vanilla, change, conservative(change)]
    names = list(RANKINGS)
    if tool == "scvae":
        group = model.differential_expression(groupby="cell_type", mode="group")
        score = np.round(np.sign(group["lfc_mean"]) * group["proba_de"], 6)  # as tl rounds
        signed = group.assign(score=score)
        signed = signed.sort_values(
            ["group1", "score", "lfc_mean"], ascending=[True, False, False], kind="stable"
        )
        tables += [group, signed]
        names += GROUP_RANKINGS
    out.write_text(json.dumps({name: ranks(t) for name, t in zip(names, tables, strict=True)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tool", choices=["scvae", "scvi-tools"], help="(internal) run one tool")
    p.add_argument("--result", type=Path, help="(internal) where --tool writes")
    a = p.parse_args()
    if a.tool:
        work(a.tool, a.data / "pbmc3k_seurat.h5ad", a.result)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for tool, python in (("scvae", sys.executable), ("scvi-tools", a.scvi_python)):
        path = a.out / f"de_markers.{tool}.tmp.json"
        cmd = [python, __file__, "--tool", tool, "--result", str(path), "--data", str(a.data)]
        subprocess.run(cmd, check=True, cwd=HERE)
        results[tool] = json.loads(path.read_text())
        path.unlink()
    (a.out / "de_markers.json").write_text(json.dumps(results, indent=1))
    head = " | ".join(f"{g}: {', '.join(genes)}" for g, genes in MARKERS.items())
    lines = [
        "# pbmc3k one-vs-rest: rank of each textbook marker in its group",
        "",
        "2,000 seurat_v3 HVGs, 100 epochs, train_size=1.0, seed 0.",
        "",
        f"| tool | ranking | {head} |",
        "|---|---|" + "---|" * len(MARKERS),
    ]
    for tool, res in results.items():
        for name in [n for n in (*RANKINGS, *GROUP_RANKINGS) if n in res]:
            cells = [", ".join(str(r) for r in res[name][g].values()) for g in MARKERS]
            lines.append(f"| {tool} | {name} | " + " | ".join(cells) + " |")
    (a.out / "de_markers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
