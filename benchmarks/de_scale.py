"""One-vs-rest differential expression at scale: time and peak memory, scvae vs scvi-tools.

Simulates ``--cells`` cells x ``--genes`` genes of ``--groups`` cell types (negative binomial
counts, drawn in blocks so the generator itself stays small), writes one h5ad, then in
separate processes, one after the other, trains scvae and scvi-tools briefly (the DE cost does
not depend on how well the model is trained: ``--epochs``, default 1, on the first
``--train-cells`` cells, default 20,000) and times ``differential_expression(adata,
groupby="cell_type")`` on all cells (one-vs-rest over every group, default options). Peak
memory is the resident memory during the DE call above that before it, with the trained model
and all cells loaded (``de_common.PeakMemory``).

Run from the repository root::

    python benchmarks/de_scale.py --scvi-python benchmarks/.scvi-venv/bin/python
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
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
WORKERS = {"scvae": "de_worker_scvae.py", "scvi-tools": "de_worker_scvi.py"}


def simulate_blocks(n_cells: int, n_genes: int, n_groups: int, seed: int) -> ad.AnnData:
    """NB counts (theta 5) of ``n_groups`` types, 10% of genes shifted by +-1 (ln) per type."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, n_genes)
    lfc = np.zeros((n_groups, n_genes))
    for t in range(n_groups):
        genes = rng.choice(n_genes, n_genes // 10, replace=False)
        lfc[t, genes] = rng.choice([-1.0, 1.0], genes.size)
    rho = np.exp(base + lfc)
    rho /= rho.sum(1, keepdims=True)
    types = rng.integers(n_groups, size=n_cells)
    blocks = []
    for start in range(0, n_cells, 10_000):
        t = types[start : start + 10_000]
        library = 1500 * np.exp(rng.normal(0, 0.3, t.size))
        mu = library[:, None] * rho[t]
        x = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
        x[x.sum(1) == 0, 0] = 1
        blocks.append(sp.csr_matrix(x))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{i}" for i in types])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(
        sp.vstack(blocks, format="csr"),
        obs=obs,
        var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-cells", type=int, default=20_000, help="0: train on all cells")
    p.add_argument("--mode", default="vanilla")
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tools", nargs="+", default=list(WORKERS))
    p.add_argument("--rerun", nargs="*", default=[], help="tools whose cached result to redo")
    p.add_argument("--work", type=Path, default=Path("/tmp/scvae_de_scale"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    h5ad = a.work / f"scale_{a.cells}x{a.genes}_{a.groups}.h5ad"
    if not h5ad.exists():
        simulate_blocks(a.cells, a.genes, a.groups, seed=0).write_h5ad(h5ad)
    pythons = {"scvae": sys.executable, "scvi-tools": a.scvi_python}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    results = {}
    for tool in a.tools:
        out = a.work / f"{h5ad.stem}.{a.mode}.train{a.train_cells}.{tool}.json"
        if out.exists() and tool not in a.rerun:
            results[tool] = json.loads(out.read_text())
            continue
        cmd = [pythons[tool], str(HERE / WORKERS[tool]), str(h5ad), str(out), "--seed", "0"]
        cmd += ["--epochs", str(a.epochs), "--kl-warmup", "1", "--groupby", "cell_type"]
        cmd += ["--mode", a.mode, "--n-samples", str(a.n_samples)]
        cmd += ["--train-cells", str(a.train_cells)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed:\n{proc.stderr[-4000:]}")
        results[tool] = json.loads(out.read_text())
        print(tool, results[tool], flush=True)
    name = f"de_scale_{a.cells}x{a.genes}_{a.groups}groups"
    name += "" if a.mode == "vanilla" else f"_{a.mode}"  # vanilla: the file name it always had
    (a.out / f"{name}.json").write_text(
        json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "results": results})
    )
    lines = [
        f"# One-vs-rest DE, {a.cells:,} cells x {a.genes:,} genes, {a.groups} groups",
        "",
        f"mode={a.mode}, n_samples_overall={a.n_samples}, {a.threads} CPU threads, model "
        f"trained {a.epochs} epoch(s) on {a.train_cells or a.cells:,} cells; DE on all cells. "
        "Check the machine's load when reading the times; the tools ran one after the other.",
        "",
        "| tool | DE seconds | DE peak RSS above trained model (MiB) | rows |",
        "|---|---|---|---|",
    ]
    for tool, r in results.items():
        lines.append(
            f"| {tool} | {r['de_seconds']:.1f} | {r['de_peak_above_trained_model_mib']:.0f} | "
            f"{r['n_rows']} |"
        )
    (a.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
