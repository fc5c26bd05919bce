"""Worker (runs in the scvi-tools environment): train SCVI, then its change-mode DE per comparison.

Reads an h5ad whose ``obs`` columns named ``cmp_*`` mark the cells of each comparison ("A" and
"B"; anything else is left out), trains scvi-tools' ``SCVI`` with the given epochs and KL
warm-up on all cells, runs ``differential_expression(idx1=A, idx2=B, mode="change")`` for each
comparison and writes per-gene arrays (in ``var`` order) to a JSON file. The same job as
de_worker_scvae.py, which does it with scvae.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import anndata as ad
import scvi
from _common import peak_rss_mib, rss_mib
from de_common import PeakMemory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--kl-warmup", type=int, required=True)
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mode", default="change")
    p.add_argument("--groupby", help="one-vs-rest over this column: time and memory only")
    a = p.parse_args()

    adata = ad.read_h5ad(a.h5ad)
    scvi.settings.seed = a.seed
    scvi.settings.progress_bar_style = "tqdm"
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
        plan_kwargs={"n_epochs_kl_warmup": a.kl_warmup},
    )
    train_seconds = time.perf_counter() - start
    after_training = rss_mib()
    if a.groupby:
        gc.collect()
        with PeakMemory() as mem:
            start = time.perf_counter()
            res = model.differential_expression(
                groupby=a.groupby,
                mode=a.mode,
                n_samples_overall=a.n_samples,
                silent=True,
            )
            seconds = time.perf_counter() - start
        result = {
            "tool": "scvi-tools",
            "train_seconds": train_seconds,
            "rss_after_training_mib": after_training,
            "de_seconds": seconds,
            "de_peak_rss_mib": mem.peak,
            "de_peak_above_trained_model_mib": mem.above_start,
            "n_rows": len(res),
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
        }
        with open(a.out, "w") as fh:
            json.dump(result, fh)
        return
    comparisons = {}
    for col in [c for c in adata.obs.columns if c.startswith("cmp_")]:
        values = adata.obs[col].astype(str).to_numpy()
        start = time.perf_counter()
        res = model.differential_expression(
            idx1=values == "A",
            idx2=values == "B",
            mode=a.mode,
            delta=a.delta,
            fdr_target=0.05,
            n_samples_overall=a.n_samples,
            silent=True,
        )
        seconds = time.perf_counter() - start
        res = res.loc[adata.var_names]
        row = {"seconds": seconds}
        if a.mode == "change":
            row.update(
                proba_de=res["proba_de"].tolist(),
                lfc_mean=res["lfc_mean"].tolist(),
                is_de_fdr_0_05=res["is_de_fdr_0.05"].astype(bool).tolist(),
            )
        else:
            row.update(bayes_factor=res["bayes_factor"].tolist())
        comparisons[col] = row
    result = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
        "seed": a.seed,
        "train_seconds": train_seconds,
        "rss_after_training_mib": after_training,
        "peak_rss_mib": peak_rss_mib(),
        "comparisons": comparisons,
    }
    with open(a.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
