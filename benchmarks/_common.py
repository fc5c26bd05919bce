"""Helpers shared by the benchmark workers: memory readings and result files.

Workers run in their own processes (scvae in the project's environment, scvi-tools in one of
its own), read the same prepared h5ad and split, and write one JSON file each.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

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
