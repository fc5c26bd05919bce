"""Worker: train scvae with the batch registered on a prepared h5ad; write the latent."""

from __future__ import annotations

import time

import anndata as ad
from _common import integration_worker_args, write_result

import scvae


def main() -> None:
    a = integration_worker_args()

    adata = ad.read_h5ad(a.h5ad)
    scvae.settings.seed = a.seed
    model = scvae.SCVAE(adata, batch_key=a.batch_key)
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        seed=a.seed,
        device="cpu",
        progress_bar=False,
        n_epochs_kl_warmup=a.n_epochs_kl_warmup,
    )
    result = {
        "tool": "scvae",
        "version": scvae.__version__,
        "seed": a.seed,
        "n_epochs_kl_warmup": a.n_epochs_kl_warmup,
        "train_seconds": time.perf_counter() - start,
        "epoch_seconds": model.history["seconds"].tolist(),
    }
    write_result(a.out, result, model.get_latent_representation())


if __name__ == "__main__":
    main()
