"""GPU training throughput with the counts on the GPU against streamed from host memory.

``train`` keeps counts whose CSR arrays take over half of the GPU's free memory in host memory
and copies each minibatch over (``scvae.data.loader.HostCSR``). This forces that path on data
that fits (``max_fraction=0``) and sets it beside the resident one, alternating, in one process.

    python benchmarks/stream_gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import scvae
import scvae.model
from scvae.data.loader import count_source

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--out", type=Path, default=HERE / "results" / "stream_gpu.json")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    adata = scvae.data.simulate(a.n_cells, 2000, n_cell_types=5, mean_library_size=350, seed=0)
    rows = []
    for batch_size in a.batch_sizes:
        for mode in ("device", "host", "device", "host"):
            fraction = 0.5 if mode == "device" else 0.0
            scvae.model.count_source = lambda m, d, f=fraction: count_source(m, d, max_fraction=f)
            model = scvae.SCVAE(adata.copy())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            model.train(
                max_epochs=a.epochs,
                batch_size=batch_size,
                train_size=1.0,
                device=a.device,
                progress_bar=False,
            )
            seconds = model.history["seconds"].tolist()[1:]
            rows.append(
                {
                    "batch_size": batch_size,
                    "mode": mode,
                    "cells_per_s": a.n_cells / float(np.median(seconds)),
                    "epoch_seconds": seconds,
                    "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "epoch_seconds"}))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
