"""Worker (scvi-tools environment): scvi-tools' reference mapping on the same pair of files.

The reference is trained with the same architecture, saved, and the query mapped with
``SCVI.prepare_query_anndata`` and ``SCVI.load_query_data`` (their defaults) and trained with
weight decay 0, as scvi-tools' scArches tutorial does.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
from _common import ARCHES, mapping_worker_args


def main() -> None:
    a = mapping_worker_args()

    ref = ad.read_h5ad(a.reference)
    query = ad.read_h5ad(a.query)
    scvi.settings.seed = a.seed
    common = {"train_size": 1.0, "accelerator": "cpu", "enable_progress_bar": False}
    seconds = {}
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    start = time.perf_counter()
    model = scvi.model.SCVI(ref, **ARCHES)
    model.train(max_epochs=a.epochs, **common)
    seconds["reference"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "reference")
        model.save(path)
        q = scvi.model.SCVI.prepare_query_anndata(query, path, inplace=False)
        start = time.perf_counter()
        query_model = scvi.model.SCVI.load_query_data(q, path)
        query_model.train(max_epochs=a.query_epochs, plan_kwargs={"weight_decay": 0.0}, **common)
        seconds["query"] = time.perf_counter() - start
    latents = {
        "surgery_reference": query_model.get_latent_representation(ref),
        "surgery_query": query_model.get_latent_representation(q),
    }
    np.savez(Path(a.out).with_suffix(".npz"), **latents)
    Path(a.out).write_text(
        json.dumps(
            {"tool": "scvi-tools", "version": scvi.__version__, "seed": a.seed, "seconds": seconds}
        )
    )


if __name__ == "__main__":
    main()
