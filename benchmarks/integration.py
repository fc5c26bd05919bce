"""Batch integration: scvae against scvi-tools and an uncorrected PCA, scored with scIB measures.

For each dataset: 2,000 highly variable genes (scanpy's seurat_v3 on the counts, batch-aware),
then for each seed scvae and scvi-tools (SCVI defaults with the batch registered, the same
epochs, batch size 128, all cells used for training) run in separate processes, alternating
which goes first, and the PCA of the log-normalised counts (50 components) as the uncorrected
baseline. Every latent is scored by :func:`scvae.integration.integration_scores` (scIB
measures, unscaled); datasets without cell types get batch-mixing scores only.

Run from the repository root::

    .venv/bin/python benchmarks/integration.py --scvi-python benchmarks/.scvi-venv/bin/python

Results: ``benchmarks/results/integration_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import (  # noqa: E402
    add_scvae_kl_warmup,
    scvae_kl_warmup_note,
    worker_kl_warmup,
)

from scvae.integration import BATCH_MEASURES, BIO_MEASURES, integration_scores  # noqa: E402

WORKERS = {"scvae": "_run_integration_scvae.py", "scvi-tools": "_run_integration_scvi.py"}
# dataset -> labels key (None: no cell types, batch-mixing scores only)
DATASETS = {
    "cellbench_3celllines_3protocols": "cell_type",
    "cellbench_lung_celllines": "cell_type",
    "pbmc_10x_3chemistries": None,
    "pbmc_kang_ifnb_2k": None,
}


def prepare(
    path: Path, n_hvg: int, batch_key: str, labels_key: str | None, out: Path
) -> ad.AnnData:
    """HVGs on the counts (batch-aware seurat_v3), cells left without counts dropped."""
    adata = ad.read_h5ad(path)
    for key in filter(None, (batch_key, labels_key)):  # no unused categories
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    if n_hvg and n_hvg < adata.n_vars:
        sc.pp.highly_variable_genes(
            adata, n_top_genes=n_hvg, flavor="seurat_v3", batch_key=batch_key, subset=True
        )
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    adata.write_h5ad(out)
    return adata


def pca_latent(adata: ad.AnnData, n_comps: int = 50) -> np.ndarray:
    """Uncorrected baseline: PCA of log1p(counts per 10,000)."""
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=min(n_comps, a.n_vars - 1, a.n_obs - 1), random_state=0)
    return a.obsm["X_pca"]


def run_worker(tool: str, python: str, h5ad: Path, out: Path, args, seed: int) -> dict:
    cmd = [python, str(HERE / WORKERS[tool]), str(h5ad), str(out), "--seed", str(seed)]
    cmd += ["--epochs", str(args.epochs), "--batch-key", args.batch_key]
    cmd += worker_kl_warmup(tool, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} seed {seed} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["latent"] = np.load(out.with_suffix(".latent.npy"))
    return result


def score(adata: ad.AnnData, latent: np.ndarray, labels_key: str | None, args, seed: int):
    adata.obsm["X_eval"] = latent
    return integration_scores(
        adata, batch_key=args.batch_key, labels_key=labels_key, use_rep="X_eval", seed=seed
    )


def recorded_scores(path: Path, args) -> tuple[list[dict], list[float]]:
    """scvi-tools' per-seed scores and seconds from an earlier run with the same settings."""
    rec = json.loads(path.read_text())
    setup = rec["setup"]
    for key in ("seeds", "epochs", "n_hvg", "batch_key"):
        if setup[key] != str(getattr(args, key)):
            raise SystemExit(
                f"{path} was run with {key}={setup[key]}, this run has {getattr(args, key)}: "
                "its scvi-tools scores do not compare; run scvi-tools again (drop --scvi-scores)."
            )
    theirs = rec["scvi-tools"]
    per_seed = [{k: v["values"][i] for k, v in theirs.items()} for i in range(len(args.seeds))]
    return per_seed, rec["train_seconds"]["scvi-tools"]


def summarise(scores: dict[str, list[dict]]) -> dict:
    out = {}
    for method, runs in scores.items():
        out[method] = {}
        for key in runs[0]:
            values = [float(r[key]) for r in runs]
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[method][key] = {"mean": float(np.mean(values)), "sd": sd, "values": values}
    return out


def checks(summary: dict, labelled: bool) -> dict[str, bool]:
    key = "total" if labelled else "batch_correction"
    ours, theirs, pca = (summary[m][key] for m in ("scvae", "scvi-tools", "pca"))
    return {
        f"{key}_at_least_scvi_tools_mean_minus_sd": ours["mean"] >= theirs["mean"] - theirs["sd"],
        f"{key}_above_pca": ours["mean"] > pca["mean"],
    }


def markdown(name: str, summary: dict, labelled: bool, info: str) -> str:
    keys = [*BIO_MEASURES, "bio_conservation", *BATCH_MEASURES, "batch_correction", "total"]
    if not labelled:
        keys = ["silhouette_batch", "ilisi", "batch_correction"]
    methods = ["scvae", "scvi-tools", "pca"]
    lines = [
        f"### {name}",
        "",
        info,
        "",
        "| measure | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key in keys:
        cells = [f"{summary[m][key]['mean']:.3f} ± {summary[m][key]['sd']:.3f}" for m in methods]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Checks: "
        + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in summary["checks"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=HERE.parents[1] / "shared" / "data")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument(
        "--scvi-scores",
        default=None,
        help="take scvi-tools' scores from this recorded result instead of training it again "
        "(the same data, epochs and seeds; '{dataset}' in the path is replaced by the name), "
        "e.g. benchmarks/results/integration_{dataset}.json",
    )
    add_scvae_kl_warmup(p)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pythons = {"scvae": sys.executable, "scvi-tools": args.scvi_python}

    for name in args.datasets:
        path = args.data_dir / f"{name}.h5ad"
        if not path.exists():
            print(f"{path} not found; skipped", flush=True)
            continue
        labels_key = DATASETS[name]
        with tempfile.TemporaryDirectory() as tmp:
            h5ad = Path(tmp) / "prepared.h5ad"
            adata = prepare(path, args.n_hvg, args.batch_key, labels_key, h5ad)
            info = (
                f"{adata.n_obs} cells x {adata.n_vars} genes, "
                f"{adata.obs[args.batch_key].nunique()} batches"
                + (f", {adata.obs[labels_key].nunique()} cell types" if labels_key else "")
                + f"; {args.epochs} epochs, seeds {args.seeds}"
                + scvae_kl_warmup_note(args)
            )
            print(f"{name}: {info}", flush=True)
            scores: dict[str, list[dict]] = {"scvae": [], "scvi-tools": [], "pca": []}
            seconds: dict[str, list[float]] = {"scvae": [], "scvi-tools": []}
            scores["pca"].append(score(adata, pca_latent(adata), labels_key, args, 0))
            tools = ["scvae", "scvi-tools"]
            if args.scvi_scores:
                recorded = Path(args.scvi_scores.replace("{dataset}", name))
                scores["scvi-tools"], seconds["scvi-tools"] = recorded_scores(recorded, args)
                tools = ["scvae"]
                info += f"; scvi-tools' scores from {recorded.name}"
            for i, seed in enumerate(args.seeds):
                order = tools if i % 2 == 0 else tools[::-1]
                for tool in order:
                    out = Path(tmp) / f"{tool}_{seed}.json"
                    res = run_worker(tool, pythons[tool], h5ad, out, args, seed)
                    seconds[tool].append(res["train_seconds"])
                    scores[tool].append(score(adata, res["latent"], labels_key, args, seed))
                    key = "total" if labels_key else "batch_correction"
                    print(
                        f"  seed {seed} {tool}: {key} {scores[tool][-1][key]:.3f} "
                        f"({res['train_seconds']:.0f} s training)",
                        flush=True,
                    )
        summary = summarise(scores)
        summary["checks"] = checks(summary, labels_key is not None)
        summary["train_seconds"] = seconds
        summary["setup"] = {
            "dataset": name,
            "description": info,
            "labels_key": labels_key,
            **{k: str(v) for k, v in vars(args).items()},
            "pca": "log1p(counts per 10,000), 50 components, one run (deterministic)",
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
        }
        stem = f"integration_{name}{args.tag}"
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        table = markdown(name, summary, labels_key is not None, info)
        (args.out / f"{stem}.md").write_text(table + "\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
