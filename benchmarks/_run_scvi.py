"""Worker (runs in the scvi-tools environment): the same job as _run_scvae.py with scvi-tools."""

from __future__ import annotations

import time

import numpy as np
import scvi
from _common import peak_rss_mib, read_split, rss_mib, worker_args, write_result
from lightning.pytorch.callbacks import Callback


class EpochTimer(Callback):
    """Seconds per training epoch, as lightning sees them."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    a = worker_args()
    adata, train, test = read_split(a.h5ad)
    baseline = rss_mib()
    scvi.settings.seed = a.seed
    scvi.settings.progress_bar_style = "tqdm"
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(
        train,
        gene_likelihood=a.gene_likelihood,
        latent_distribution=a.latent_distribution,
        use_observed_lib_size=not a.latent_library,
    )
    timer = EpochTimer()
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
        callbacks=[timer],
    )
    train_seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    # the same estimator as scvi-tools' default, 50 samples per forward pass instead of 1
    mll = model.get_marginal_ll(
        test, n_mc_samples=a.n_mc_samples, return_mean=False, n_mc_samples_per_pass=50
    )
    result = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
        "seed": a.seed,
        "train_seconds": train_seconds,
        "epoch_seconds": timer.seconds,
        "peak_rss_mib": peak,
        "peak_above_baseline_mib": peak - baseline,
        "elbo_held_out": np.asarray(model.get_elbo(test, return_mean=False)).tolist(),
        "marginal_ll_held_out": np.asarray(mll).tolist(),
    }
    write_result(a.out, result, model.get_latent_representation(adata))


if __name__ == "__main__":
    main()
