"""Worker: scvae reference mapping on a prepared reference / query pair.

Trains the reference, saves it, maps the query with ``load_query_data`` (checking that the
saved reference is byte-identical afterwards), and writes the latents of three methods:
surgery (the query model on reference and query cells), no surgery (the reference model on
the query, each query cell encoded under every reference batch and averaged) and de novo (one
model trained on reference + query).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
from _common import ARCHES, mapping_worker_args

import scvae


def sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def main() -> None:
    a = mapping_worker_args()

    ref = ad.read_h5ad(a.reference)
    query = ad.read_h5ad(a.query)
    scvae.settings.seed = a.seed
    scvae.settings.progress_bar = False
    common = {
        "train_size": 1.0,
        "seed": a.seed,
        "device": "cpu",
        "n_epochs_kl_warmup": a.n_epochs_kl_warmup,
    }
    seconds = {}
    start = time.perf_counter()
    model = scvae.SCVAE(ref, batch_key="batch", **ARCHES)
    model.train(max_epochs=a.epochs, **common)
    seconds["reference"] = time.perf_counter() - start
    latents = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference"
        model.save(path)
        before = sha(path)
        q = scvae.SCVAE.prepare_query_anndata(query, path)
        start = time.perf_counter()
        query_model = scvae.SCVAE.load_query_data(q, path)
        query_model.train(max_epochs=a.query_epochs, weight_decay=0.0, **common)
        seconds["query"] = time.perf_counter() - start
        unchanged = sha(path) == before
    latents["surgery_reference"] = query_model.get_latent_representation(ref)
    latents["surgery_query"] = query_model.get_latent_representation(q)
    latents["nosurgery_reference"] = model.get_latent_representation(ref)
    encoded = []
    for batch in model.registry.batch_categories:
        as_batch = q.copy()
        as_batch.obs["batch"] = batch
        encoded.append(model.get_latent_representation(as_batch))
    latents["nosurgery_query"] = np.mean(encoded, axis=0)
    both = ad.concat([ref, q], index_unique=None)
    start = time.perf_counter()
    denovo = scvae.SCVAE(both, batch_key="batch", **ARCHES)
    denovo.train(max_epochs=a.epochs, **common)
    seconds["denovo"] = time.perf_counter() - start
    z = denovo.get_latent_representation()
    latents["denovo_reference"], latents["denovo_query"] = z[: ref.n_obs], z[ref.n_obs :]
    np.savez(Path(a.out).with_suffix(".npz"), **latents)
    Path(a.out).write_text(
        json.dumps(
            {
                "tool": "scvae",
                "version": scvae.__version__,
                "seed": a.seed,
                "seconds": seconds,
                "reference_files_unchanged": unchanged,
            }
        )
    )


if __name__ == "__main__":
    main()
