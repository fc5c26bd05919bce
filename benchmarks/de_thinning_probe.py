"""Why scVI's test misses binomially thinned genes: can the latent tell the two halves apart?

For each setting (genes thinned, effect sizes), ``scvae.data.binomial_thinning`` splits one
pbmc3k type (Naive CD4 T) at random in halves A and B and thins genes in one half, as in
de_calibration.py; scvae is trained on these cells (same epochs and warm-up as there). Then:

- how well the halves can be told apart: 5-fold cross-validated accuracy of a 15-nearest-
  neighbour classifier on the latent (what the decoder sees) and of a logistic regression on
  the log-normalised counts (what the data hold), chance 0.5;
- change-mode DE of A vs B (delta 0.25): AUPRC for the thinned genes and the model's mean
  ``|lfc_mean|`` of the thinned genes by true effect, beside scanpy's Wilcoxon AUPRC.

Run from the repository root::

    python benchmarks/de_thinning_probe.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from de_calibration import pbmc_hvg  # noqa: E402

import scvae  # noqa: E402

# name: (genes thinned, log2 effects, max share of counts per gene)
SETTINGS = {
    "benchmark": (60, (0.5, 1.0, 2.0), 0.01),
    "300 genes x 2 log2": (300, (2.0,), 0.01),
    "400 genes x 3 log2": (400, (3.0,), 0.05),
}


def probe(pbmc, name: str, seed: int, epochs: int) -> dict:
    n_genes, effects, share = SETTINGS[name]
    adata = scvae.data.binomial_thinning(
        pbmc,
        cell_type="Naive CD4 T",
        n_de_genes=n_genes,
        log2_fold_changes=effects,
        max_fraction_of_counts=share,
        seed=seed,
    )
    half = (adata.obs["group"] == "A").to_numpy()
    truth = adata.var["is_de"].to_numpy()
    f = np.minimum(adata.var["thinning_factor_A"], adata.var["thinning_factor_B"]).to_numpy()
    model = scvae.SCVAE(adata)
    model.train(
        max_epochs=epochs, train_size=1.0, n_epochs_kl_warmup=epochs // 2, seed=seed, device="cpu"
    )
    latent = model.get_latent_representation()
    knn = cross_val_score(KNeighborsClassifier(15), latent, half, cv=5).mean()
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    x = lognorm.X.toarray()
    logreg = cross_val_score(LogisticRegression(C=0.1, max_iter=2000), x, half, cv=5).mean()
    res = model.differential_expression(idx1=half, idx2=~half, mode="change", seed=seed)
    res = res.loc[adata.var_names]
    sc.tl.rank_genes_groups(lognorm, "group", groups=["A"], reference="B", method="wilcoxon")
    w = sc.get.rank_genes_groups_df(lognorm, "A").set_index("names").loc[adata.var_names]
    row = {
        "setting": name,
        "seed": seed,
        "cells": adata.n_obs,
        "genes_thinned": int(truth.sum()),
        "share_of_counts_removed": float(1 - adata.X.sum() / pbmc[adata.obs_names].X.sum()),
        "knn_accuracy_latent": float(knn),
        "logreg_accuracy_counts": float(logreg),
        "auprc_scvae": float(average_precision_score(truth, res["proba_de"])),
        "auprc_wilcoxon": float(average_precision_score(truth, np.abs(w["scores"]))),
        "called_scvae_0.05": int(res["is_de_fdr_0.05"].sum()),
        "called_wilcoxon_0.05": int((w["pvals_adj"] < 0.05).sum()),
        "abs_lfc_null_genes": float(res["lfc_mean"].abs()[~truth].mean()),
    }
    for e in sorted(set(np.round(-np.log2(f[truth]), 1))):
        sel = truth & np.isclose(-np.log2(f), e, atol=0.05)
        row[f"abs_lfc_true_{e:g}"] = float(res["lfc_mean"].abs()[sel].mean())
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", type=Path, default=HERE.parent.parent / "shared/data/pbmc3k_seurat.h5ad"
    )
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", type=Path, default=HERE / "results" / "de_thinning_probe")
    a = p.parse_args()
    scvae.settings.progress_bar = False
    pbmc = pbmc_hvg(a.data)
    rows = [probe(pbmc, name, seed, a.epochs) for name in a.settings for seed in a.seeds]
    table = pd.DataFrame(rows)
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# Thinned pbmc3k halves: latent separability and scVI DE", ""]
    lines += [f"scvae, {a.epochs} epochs (KL warm-up {a.epochs // 2}), seeds {a.seeds}.", ""]
    cols = list(table.columns)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in table.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
