"""Worker (runs in the scvi-tools environment): the job of de_worker_scvae.py, with scvi-tools.

Trains scvi-tools' ``SCVI`` with the given epochs and KL warm-up, then either runs
``differential_expression(idx1=A, idx2=B)`` for each ``cmp_*`` column of ``obs`` (cells marked
"A" and "B"; anything else is left out) and writes per-gene arrays (in ``var`` order), or
(``--groupby``) times one-vs-rest over every group and reads its peak memory. Options:
``de_common.worker_args``.
"""

from __future__ import annotations

import time

import de_common
import scvi
from _common import rss_mib


def main() -> None:
    a = de_common.worker_args()
    full, adata = de_common.read_data(a)
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
    head = {"tool": "scvi-tools", "version": scvi.__version__, "seed": a.seed}
    head["train_seconds"] = time.perf_counter() - start
    head["train_cells"] = adata.n_obs
    if full is not adata:
        model._validate_anndata(full)  # registers the cells outside the timed call
    if a.groupby:
        result = de_common.time_one_vs_rest(
            lambda: model.differential_expression(
                full, groupby=a.groupby, mode=a.mode, n_samples_overall=a.n_samples, silent=True
            ),
            full,
            head,
            rss_mib(),
        )
        de_common.write(a.out, result)
        return
    comparisons = {}
    for col, cells_a, cells_b in de_common.comparisons(full):
        start = time.perf_counter()
        res = model.differential_expression(
            full,
            idx1=cells_a,
            idx2=cells_b,
            mode=a.mode,
            delta=a.delta,
            fdr_target=0.05,
            n_samples_overall=a.n_samples,
            silent=True,
        )
        seconds = time.perf_counter() - start
        comparisons[col] = de_common.per_gene(res, full.var_names, a.mode, seconds)
    de_common.write(
        a.out, {**head, "rss_after_training_mib": rss_mib(), "comparisons": comparisons}
    )


if __name__ == "__main__":
    main()
