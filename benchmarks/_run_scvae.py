"""Worker: train scvae on the prepared training cells and evaluate on the held-out cells."""

from __future__ import annotations

import time

from _common import SCVI_KL_WARMUP, peak_rss_mib, read_split, rss_mib, worker_args, write_result

import scvae


def main() -> None:
    a = worker_args()
    adata, train, test = read_split(a.h5ad)
    baseline = rss_mib()
    scvae.settings.seed = a.seed
    model = scvae.SCVAE(
        train,
        gene_likelihood=a.gene_likelihood,
        latent_distribution=a.latent_distribution,
        use_observed_lib_size=not a.latent_library,
    )
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        seed=a.seed,
        device="cpu",
        progress_bar=False,
        precision=a.precision,
        n_epochs_kl_warmup=SCVI_KL_WARMUP,
    )
    train_seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    result = {
        "tool": "scvae",
        "version": scvae.__version__,
        "seed": a.seed,
        "train_seconds": train_seconds,
        "epoch_seconds": model.history["seconds"].tolist(),
        "peak_rss_mib": peak,
        "peak_above_baseline_mib": peak - baseline,
        "elbo_held_out": model.get_elbo(test, return_mean=False).tolist(),
        "marginal_ll_held_out": model.get_marginal_ll(
            test, n_mc_samples=a.n_mc_samples, return_mean=False
        ).tolist(),
    }
    write_result(a.out, result, model.get_latent_representation(adata))


if __name__ == "__main__":
    main()
