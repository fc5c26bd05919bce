"""Worker (scvi-tools environment): the same job as _run_integration_scvae.py with SCVI."""

from __future__ import annotations

import time

import anndata as ad
import scvi
from _common import integration_worker_args, write_result


def main() -> None:
    a = integration_worker_args()

    adata = ad.read_h5ad(a.h5ad)
    scvi.settings.seed = a.seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=a.batch_key)
    model = scvi.model.SCVI(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    result = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
        "seed": a.seed,
        "train_seconds": time.perf_counter() - start,
    }
    write_result(a.out, result, model.get_latent_representation())


if __name__ == "__main__":
    main()
