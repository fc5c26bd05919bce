"""Training throughput (cells per second), scvae against scvi-tools, same data, one run.

Simulated counts (``scvae.data.simulate``; 20,000 cells x 2,000 genes by default) or an h5ad
(``--h5ad``, reduced to ``--n-hvg`` seurat_v3 genes); every tool trains the same default model
(scvi-tools' SCVI defaults, float32 unless a variant says otherwise) with the same batch size on
all cells (``train_size=1.0``) for a few epochs, each run in a fresh process with the same
thread count, the tools alternating over repeats; the median seconds per epoch after the first
epoch (which holds compilation and warm-up) gives cells per second.

Tools: ``scvi-tools`` (through ``--scvi-python``), ``scvae`` (eager, float32, fused Adam),
``scvae-compile`` (``compile=True``), ``scvae-bf16`` (``precision="bf16-mixed"``) and
``scvae-compile-bf16``.

    .venv/bin/python benchmarks/throughput.py --scvi-python benchmarks/.scvi-venv/bin/python \
        --batch-sizes 128 1024 --tools scvi-tools scvae scvae-compile
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "scvae": {},
    "scvae-compile": {"compile": True},
    "scvae-bf16": {"precision": "bf16-mixed"},
    "scvae-compile-bf16": {"compile": True, "precision": "bf16-mixed"},
}


def load(args: argparse.Namespace) -> ad.AnnData:
    """The benchmark's counts: the h5ad's HVGs, or simulated data."""
    if args.h5ad:
        import scanpy as sc

        adata = ad.read_h5ad(args.h5ad)
        if "counts" in adata.layers:
            adata.X = adata.layers["counts"]
        sc.pp.highly_variable_genes(adata, n_top_genes=args.n_hvg, flavor="seurat_v3", subset=True)
        return ad.AnnData(adata.X.astype(np.float32), obs=adata.obs[[]], var=adata.var[[]])
    import scvae

    return scvae.data.simulate(
        args.n_cells,
        args.n_genes,
        n_cell_types=5,
        mean_library_size=args.library_size,
        seed=0,
    )


def time_scvae(adata: ad.AnnData, batch_size: int, epochs: int, device: str, variant: str):
    import scvae

    model = scvae.SCVAE(adata)
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        device=device,
        progress_bar=False,
        **VARIANTS[variant],
    )
    return model.history["seconds"].tolist()


def time_scvi(adata: ad.AnnData, batch_size: int, epochs: int, device: str, variant: str):
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
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument(
        "--library-size",
        type=float,
        default=1500.0,
        help="mean counts per simulated cell (1500: ~27%% non-zero at 2,000 genes; 350: ~10%%)",
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every tool")
    p.add_argument("--tools", nargs="+", default=["scvi-tools", "scvae"])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "results" / "throughput.json")
    args = p.parse_args()
    if args.worker:  # one tool, one batch size, in this process: print the epoch seconds
        import torch

        torch.set_num_threads(args.threads)
        adata = ad.read_h5ad(args.data)  # written by the driver: no scvae import needed
        timer = time_scvi if args.worker == "scvi-tools" else time_scvae
        seconds = timer(adata, args.batch_sizes[0], args.epochs, args.device, args.worker)
        print(json.dumps({"seconds": seconds, "n_cells": adata.n_obs, "n_genes": adata.n_vars}))
        return
    work = Path(tempfile.mkdtemp(prefix="scvae_throughput_"))
    data = work / "counts.h5ad"
    if hasattr(ad.settings, "allow_write_nullable_strings"):  # pandas 3 names are string arrays
        ad.settings.allow_write_nullable_strings = True
    load(args).write_h5ad(data)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for batch_size in args.batch_sizes:
        seconds: dict[str, list[float]] = {t: [] for t in args.tools}
        shape = None
        for r in range(args.repeats):
            order = args.tools if r % 2 == 0 else list(reversed(args.tools))
            for tool in order:
                python = args.scvi_python if tool == "scvi-tools" else sys.executable
                cmd = [python, __file__, "--worker", tool, "--epochs", str(args.epochs)]
                cmd += ["--batch-sizes", str(batch_size), "--device", args.device]
                cmd += ["--threads", str(args.threads), "--data", str(data)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{tool} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[tool] += result["seconds"][1:]
                shape = (result["n_cells"], result["n_genes"])
        assert shape is not None
        row = {
            "batch_size": batch_size,
            "device": args.device,
            "threads": args.threads,
            "data": args.h5ad or "simulated",
            "n_cells": shape[0],
            "n_genes": shape[1],
        }
        for tool, s in seconds.items():
            row[f"{tool}_cells_per_s"] = shape[0] / float(np.median(s))
            row[f"{tool}_epoch_seconds"] = s
        if "scvi-tools" in args.tools:
            for tool in args.tools:
                if tool != "scvi-tools":
                    row[f"ratio_{tool}"] = (
                        row[f"{tool}_cells_per_s"] / row["scvi-tools_cells_per_s"]
                    )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if "epoch_seconds" not in k}), flush=True)
    shutil.rmtree(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
