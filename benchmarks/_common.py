"""Helpers shared by the benchmark workers: memory readings and result files.

Workers run in their own processes (scvae in the project's environment, scvi-tools in one of
its own), read the same prepared h5ad and split, and write one JSON file each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

import anndata as ad
import numpy as np


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(path: str | Path, result: dict, latent: np.ndarray) -> None:
    """Write ``result`` as JSON and the latent beside it as ``.npy``."""
    path = Path(path)
    np.save(path.with_suffix(".latent.npy"), latent.astype(np.float32))
    path.write_text(json.dumps(result))


def worker_args() -> argparse.Namespace:
    """The command line both parity workers take."""
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-mc-samples", type=int, default=1000)
    p.add_argument("--gene-likelihood", default="zinb")
    p.add_argument("--latent-distribution", default="normal", choices=["normal", "ln"])
    p.add_argument(
        "--latent-library",
        action="store_true",
        help="learn the library size (use_observed_lib_size=False) instead of observing it",
    )
    p.add_argument("--precision", default="32", help="scvae's train(precision=...)")
    return p.parse_args()


def read_split(path: str) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """The prepared AnnData and its training and held-out cells (``obs["split"]``)."""
    adata = ad.read_h5ad(path)
    held = adata.obs["split"].to_numpy() == "held_out"
    return adata, adata[~held].copy(), adata[held].copy()


# scvi-tools' KL warm-up (its default; scvae's default is 10 epochs): the workers that compare
# the two tools' models under the same settings pass it to scvae.
SCVI_KL_WARMUP = 400


def add_worker_kl_warmup(p: argparse.ArgumentParser) -> None:
    """A worker's ``--n-epochs-kl-warmup`` (read by the scvae workers only)."""
    p.add_argument(
        "--n-epochs-kl-warmup",
        type=int,
        default=SCVI_KL_WARMUP,
        help="scvae only: its KL warm-up (default: scvi-tools' 400, the same settings)",
    )


def add_scvae_kl_warmup(p: argparse.ArgumentParser) -> None:
    """A driver's options to train scvae with another KL warm-up and keep those results apart."""
    p.add_argument(
        "--scvae-kl-warmup",
        type=int,
        default=SCVI_KL_WARMUP,
        help="scvae's KL warm-up in epochs, for every scvae model (default: scvi-tools' 400, "
        "the same settings; scvae's own default is scvae.train.KL_WARMUP_EPOCHS)",
    )
    p.add_argument("--tag", default="", help="suffix of the result files' names")


def worker_kl_warmup(tool: str, args: argparse.Namespace) -> list[str]:
    """The worker command line's KL warm-up option: scvae's workers take the driver's."""
    return ["--n-epochs-kl-warmup", str(args.scvae_kl_warmup)] if tool == "scvae" else []


def scvae_kl_warmup_note(args: argparse.Namespace) -> str:
    """The run description's note of a KL warm-up other than scvi-tools'."""
    if args.scvae_kl_warmup == SCVI_KL_WARMUP:
        return ""
    return f"; scvae's KL warm-up {args.scvae_kl_warmup} epochs"


def integration_worker_args() -> argparse.Namespace:
    """The command line both integration workers take."""
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--batch-size", type=int, default=128)
    add_worker_kl_warmup(p)
    return p.parse_args()


# The scArches-style architecture both mapping workers train (the same options in both tools).
ARCHES = {
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "n_layers": 2,
    "dropout_rate": 0.2,
}


def mapping_worker_args() -> argparse.Namespace:
    """The command line both mapping workers take."""
    p = argparse.ArgumentParser()
    p.add_argument("reference")
    p.add_argument("query")
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--query-epochs", type=int, required=True)
    add_worker_kl_warmup(p)
    return p.parse_args()
