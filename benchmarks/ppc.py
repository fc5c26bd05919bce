"""Posterior predictive check of zinb, nb and poisson on held-out cells of real data.

For each dataset: 2,000 HVGs (seurat_v3 on counts), 10% of cells held out; scvae is trained on
the rest with each likelihood; for the held-out cells, posterior predictive samples are drawn
and, per gene, the coefficient of variation and the fraction of zeros of the samples (pooled
over cells and samples) are compared with the observed ones. Reported per likelihood: the
median over genes of CV_predicted / CV_observed, the median |log(CV ratio)|, and the mean
absolute error of the zero fraction, with the held-out marginal log-likelihood.

    .venv/bin/python benchmarks/ppc.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from _common import SCVI_KL_WARMUP

import scvae

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
DATASETS = ["pbmc3k_seurat.h5ad", "cellbench_lung_celllines.h5ad"]


def gene_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene coefficient of variation and fraction of zeros of a cells x genes array."""
    mean = x.mean(0)
    cv = np.divide(x.std(0), mean, out=np.full_like(mean, np.nan), where=mean > 0)
    return cv, (x == 0).mean(0)


def check(path: Path, likelihood: str, epochs: int, n_samples: int, seed: int) -> dict:
    adata = ad.read_h5ad(path)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", subset=True)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(12345)
    held = np.zeros(adata.n_obs, dtype=bool)
    held[rng.choice(adata.n_obs, adata.n_obs // 10, replace=False)] = True
    train, test = adata[~held].copy(), adata[held].copy()
    scvae.settings.seed = seed
    model = scvae.SCVAE(train, gene_likelihood=likelihood)
    model.train(
        max_epochs=epochs,
        train_size=1.0,
        seed=seed,
        progress_bar=False,
        n_epochs_kl_warmup=SCVI_KL_WARMUP,  # as recorded (results/ppc.*)
    )
    torch.manual_seed(seed)
    samples = model.posterior_predictive_sample(test, n_samples=n_samples).todense()
    if samples.ndim == 3:  # (cells, genes, samples): the draws one sample after another
        samples = np.moveaxis(samples, 2, 0).reshape(-1, samples.shape[1])
    predicted = samples
    observed = test.X.toarray()
    cv_obs, zeros_obs = gene_stats(observed)
    cv_pred, zeros_pred = gene_stats(predicted)
    ok = np.isfinite(cv_obs) & np.isfinite(cv_pred)
    ratio = cv_pred[ok] / cv_obs[ok]
    return {
        "dataset": path.name,
        "likelihood": likelihood,
        "cells_held_out": int(test.n_obs),
        "cv_ratio_median": float(np.median(ratio)),
        "abs_log_cv_ratio_median": float(np.median(np.abs(np.log(ratio)))),
        "frac_genes_cv_under_0.8": float(np.mean(ratio < 0.8)),
        "zero_fraction_mae": float(np.abs(zeros_pred - zeros_obs).mean()),
        "zero_fraction_observed_mean": float(zeros_obs.mean()),
        "zero_fraction_predicted_mean": float(zeros_pred.mean()),
        "marginal_ll_held_out": model.get_marginal_ll(test, n_mc_samples=200),
    }


def contrasts(rows: list[dict]) -> list[str]:
    """One line per dataset: how far poisson is from nb on each statistic."""
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by = {r["likelihood"]: r for r in rows if r["dataset"] == name}
        if "nb" not in by or "poisson" not in by:
            continue
        nb, po = by["nb"], by["poisson"]
        out.append(
            f"- {name}: median CV ratio poisson {po['cv_ratio_median']:.3f} vs nb "
            f"{nb['cv_ratio_median']:.3f}; genes with CV under-predicted by more than 20 %: "
            f"{po['frac_genes_cv_under_0.8']:.1%} vs {nb['frac_genes_cv_under_0.8']:.1%}; "
            f"zero-fraction MAE {po['zero_fraction_mae']:.4f} vs {nb['zero_fraction_mae']:.4f} "
            f"({po['zero_fraction_mae'] / nb['zero_fraction_mae']:.1f}x); held-out marginal LL, "
            "poisson minus nb: "
            f"{po['marginal_ll_held_out'] - nb['marginal_ll_held_out']:+.1f} nats per cell."
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in DATASETS:
        if not (args.data_dir / name).exists():
            print(f"skipping {name}: not in {args.data_dir}")
            continue
        for likelihood in ("zinb", "nb", "poisson"):
            row = check(args.data_dir / name, likelihood, args.epochs, args.n_samples, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "ppc.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| dataset | likelihood | CV ratio (median) | median abs log CV ratio | "
        "genes with CV ratio < 0.8 | zero-fraction MAE | zeros observed / predicted | "
        "held-out marginal LL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['likelihood']} | {r['cv_ratio_median']:.3f} | "
            f"{r['abs_log_cv_ratio_median']:.3f} | {r['frac_genes_cv_under_0.8']:.1%} | "
            f"{r['zero_fraction_mae']:.4f} | "
            f"{r['zero_fraction_observed_mean']:.3f} / {r['zero_fraction_predicted_mean']:.3f} | "
            f"{r['marginal_ll_held_out']:.1f} |"
        )
    lines += ["", *contrasts(rows)]
    table = "\n".join(lines)
    (args.out / "ppc.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
