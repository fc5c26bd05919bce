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
    de_common.run_and_write(
        a, full, head, lambda adata, **kw: model.differential_expression(adata, silent=True, **kw)
    )


if __name__ == "__main__":
    main()
