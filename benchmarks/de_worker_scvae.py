"""Worker (runs in the project's environment): the job of de_worker_scvi.py, with scvae.

Trains ``scvae.SCVAE`` (scvi-tools' defaults) with the same epochs, KL warm-up, batch size and
cells, then either runs ``differential_expression(idx1=A, idx2=B)`` for each ``cmp_*`` column
of ``obs`` and writes per-gene arrays (in ``var`` order), or (``--groupby``) times one-vs-rest
over every group and reads its peak memory. Options: ``de_common.worker_args``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import de_common  # noqa: E402

import scvae  # noqa: E402


def main() -> None:
    a = de_common.worker_args()
    full, adata = de_common.read_data(a)
    scvae.settings.progress_bar = False
    scvae.settings.seed = a.seed
    model = scvae.SCVAE(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        train_size=1.0,
        n_epochs_kl_warmup=a.kl_warmup,
        seed=a.seed,
        device="cpu",
    )
    head = {"tool": "scvae", "version": scvae.__version__, "seed": a.seed}
    head["train_seconds"] = time.perf_counter() - start
    head["train_cells"] = adata.n_obs
    de_common.run_and_write(
        a, full, head, lambda adata, **kw: model.differential_expression(adata, seed=a.seed, **kw)
    )


if __name__ == "__main__":
    main()
