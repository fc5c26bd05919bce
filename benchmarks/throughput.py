"""Training throughput (cells per second), scvae against scvi-tools, same data, one run.

Simulated counts (``scvae.data.simulate``; 20,000 cells x 2,000 genes by default) or an h5ad;
both tools train the same default model (scvi-tools' SCVI defaults) with the same batch size on
all cells (``train_size=1.0``) for a few epochs, alternating tool order over repeats; the
median seconds per epoch after the first epoch gives cells per second. Tools run in-process
one after the other when both import here (a GPU machine with both installed), otherwise
scvi-tools runs through ``--scvi-python`` in a subprocess.

    .venv/bin/python benchmarks/throughput.py --device cpu --batch-sizes 128 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

HERE = Path(__file__).resolve().parent


def load(args: argparse.Namespace) -> ad.AnnData:
    if args.h5ad:
        return ad.read_h5ad(args.h5ad)
    import scvae

    return scvae.data.simulate(args.n_cells, args.n_genes, n_cell_types=5, seed=0)


def time_scvae(adata: ad.AnnData, batch_size: int, epochs: int, device: str) -> list[float]:
    import scvae

    model = scvae.SCVAE(adata)
    model.train(
        max_epochs=epochs, batch_size=batch_size, train_size=1.0, device=device, progress_bar=False
    )
    return model.history["seconds"].tolist()


def time_scvi(adata: ad.AnnData, batch_size: int, epochs: int, device: str) -> list[float]:
    import scvi
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    timer = Timer()
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        accelerator=accelerator,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    return timer.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--h5ad", default=None)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tools", nargs="+", default=["scvae", "scvi-tools"])
    p.add_argument("--scvi-python", default=None, help="run scvi-tools with this interpreter")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "results" / "throughput.json")
    args = p.parse_args()
    adata = load(args)
    timers = {"scvae": time_scvae, "scvi-tools": time_scvi}
    if args.worker:  # subprocess mode: one tool, one batch size, print the epoch seconds
        print(json.dumps(timers[args.worker](adata, args.batch_sizes[0], args.epochs, args.device)))
        return
    rows = []
    for batch_size in args.batch_sizes:
        seconds: dict[str, list[float]] = {t: [] for t in args.tools}
        for r in range(args.repeats):
            order = args.tools if r % 2 == 0 else list(reversed(args.tools))
            for tool in order:
                if tool == "scvi-tools" and args.scvi_python:
                    cmd = [
                        args.scvi_python,
                        __file__,
                        "--worker",
                        tool,
                        "--epochs",
                        str(args.epochs),
                        "--batch-sizes",
                        str(batch_size),
                        "--device",
                        args.device,
                        "--n-cells",
                        str(args.n_cells),
                        "--n-genes",
                        str(args.n_genes),
                    ] + (["--h5ad", args.h5ad] if args.h5ad else [])
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    epoch_seconds = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    epoch_seconds = timers[tool](adata, batch_size, args.epochs, args.device)
                seconds[tool] += epoch_seconds[1:]
        row = {
            "batch_size": batch_size,
            "device": args.device,
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
        }
        for tool, s in seconds.items():
            row[f"{tool}_cells_per_s"] = adata.n_obs / float(np.median(s))
            row[f"{tool}_epoch_seconds"] = s
        if len(args.tools) == 2:
            row["ratio"] = row["scvae_cells_per_s"] / row["scvi-tools_cells_per_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if "epoch_seconds" not in k}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
