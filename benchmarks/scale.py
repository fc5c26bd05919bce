"""Scale curve: seconds per epoch and peak memory at 10k, 100k and 1M cells, in memory and backed.

Simulated counts, 2,000 genes, about 10 % non-zero (five cell types, Poisson counts plus one),
written to an h5ad in row blocks of 10,000 cells (never a dense cells x genes array). Each
(cells, mode) point runs in a fresh process:

* ``memory``: ``anndata.read_h5ad(path)`` (the CSR counts in RAM, float32 data, int32 indices),
  then ``SCVAE(adata).train(max_epochs=1)``;
* ``backed``: ``anndata.read_h5ad(path, backed="r")``: registration, training and the
  validation pass read row blocks from the file (scvae.data.backed).

Reported: seconds of the one training epoch (``history["seconds"]``: the training pass and the
validation pass over 10 % of the cells), peak resident memory (``ru_maxrss``) above two
baselines, and the in-memory size of the count matrix. The baselines are the process's resident
memory after the imports (the interpreter baseline) and after one epoch of a 64-cell x 20-gene
model (the runtime baseline: what torch loads once per process for any training run). The
default model, batch 128, CPU.

    python benchmarks/scale.py --cells 10000 100000 1000000 --dir /tmp/scale

Writes ``benchmarks/results/scale_cpu.{json,md,png}``. Timings are wall-clock on whatever else
the machine runs at the time: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")
GENES = 2000
BLOCK = 10_000


def make(path: Path, n_cells: int, seed: int = 0) -> None:
    """Write the simulated counts to ``path`` block by block."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    means = rng.gamma(0.6, 2.0, size=(5, GENES))
    types = rng.integers(0, 5, size=n_cells)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        for start in range(0, n_cells, BLOCK):
            n = min(BLOCK, n_cells - start)
            block = sp.random(n, GENES, density=0.1, format="csr", dtype=np.float32, rng=rng)
            rows = np.repeat(np.arange(n), np.diff(block.indptr))
            lam = means[types[start + rows], block.indices]
            block.data = (1 + rng.poisson(lam)).astype(np.float32)
            if start == 0:
                ad.io.write_elem(f, "X", block)
                matrix = ad.io.sparse_dataset(f["X"])
            else:
                matrix.append(block)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type{t}" for t in types])},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        var = pd.DataFrame(index=[f"gene{g}" for g in range(GENES)])
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    os.replace(tmp, path)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Budget(Exception):
    """Raised from an optimizer hook to stop a long epoch after a fixed number of steps."""


def warm_up() -> None:
    """Train a 64-cell x 20-gene model for one epoch and drop it.

    This loads what any training run loads once per process and keeps: ``torch._dynamo``
    (imported by every ``torch.optim`` optimizer's constructor, about 67 MiB), autograd's and
    the allocator's state and the thread pools. The RSS after it is the runtime baseline.
    """
    import gc

    import anndata as ad
    import scipy.sparse as sp

    import scvae

    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(64, 20)).astype(np.float32))
    model = scvae.SCVAE(ad.AnnData(counts))
    model.train(max_epochs=1, progress_bar=False, device="cpu")
    del model
    gc.collect()


def worker(path: str, mode: str, max_steps: int) -> dict:
    """One point, in this (fresh) process."""
    import anndata as ad
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import scvae

    scvae.settings.verbosity = "warning"
    baseline = rss_bytes()
    warm_up()
    warm_baseline = rss_bytes()
    stamps: list[float] = []

    def count(*_: object) -> None:
        stamps.append(time.perf_counter())
        if max_steps and len(stamps) >= max_steps:
            raise _Budget

    register_optimizer_step_post_hook(count)
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    read_s = time.perf_counter() - t0
    if mode == "memory":
        x = adata.X
        count_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    else:
        count_bytes = None
    t0 = time.perf_counter()
    model = scvae.SCVAE(adata)
    register_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.module.parameters())
    t0 = time.perf_counter()
    n_train = int(np.ceil(0.9 * adata.n_obs))
    steps = int(np.ceil(n_train / 128))
    measured = None
    try:
        model.train(max_epochs=1, progress_bar=False, device="cpu")
        measured = float(model.history["seconds"].iloc[0])  # with the validation pass
    except _Budget:
        pass
    # the same estimate at every size: median step time x steps (no validation pass)
    epoch_s = float(np.median(np.diff(stamps))) * steps
    how = f"median of {len(stamps) - 1} step times x {steps} steps"
    total_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "cells": adata.n_obs,
        "mode": mode,
        "threads": torch.get_num_threads(),
        "read_s": read_s,
        "register_s": register_s,
        "epoch_s": epoch_s,
        "epoch_how": how,
        "measured_epoch_s": measured,
        "median_step_s": float(np.median(np.diff(stamps))),
        "train_call_s": total_s,
        "steps": steps,
        "baseline_rss": baseline,
        "peak_rss_above_baseline": peak - baseline,
        "warm_baseline_rss": warm_baseline,
        "peak_rss_above_warm_baseline": peak - warm_baseline,
        "count_matrix_bytes": count_bytes,
        "model_bytes": model_bytes,
    }


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker, color in (("memory", "o", "C0"), ("backed", "s", "C1")):
        pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["cells"])
        if not pts:
            continue
        cells = [r["cells"] for r in pts]
        axes[0].loglog(cells, [r["epoch_s"] for r in pts], marker=marker, color=color, label=mode)
        axes[1].loglog(
            cells,
            [r["peak_rss_above_baseline"] / 2**30 for r in pts],
            marker=marker,
            color=color,
            label=f"{mode}, above the imports",
        )
        if all("peak_rss_above_warm_baseline" in r for r in pts):
            axes[1].loglog(
                cells,
                [r["peak_rss_above_warm_baseline"] / 2**30 for r in pts],
                "--",
                marker=marker,
                color=color,
                label=f"{mode}, above the runtime baseline",
            )
    mem = {r["cells"]: r for r in rows if r["mode"] == "memory"}
    if mem:
        cells = sorted(mem)
        counts = [mem[c]["count_matrix_bytes"] / 2**30 for c in cells]
        axes[1].loglog(cells, counts, "k:", label="count matrix (CSR in RAM)")
        target = [
            1.5 * (mem[c]["count_matrix_bytes"] + mem[c]["model_bytes"]) / 2**30 for c in cells
        ]
        axes[1].loglog(cells, target, "k-.", label="1.5 x (counts + model)")
        first = mem[cells[0]]
        axes[0].loglog(
            cells, [first["epoch_s"] * c / cells[0] for c in cells], "k:", label="linear"
        )
    axes[0].set(xlabel="cells", ylabel="seconds per epoch", title="Time (CPU, shared machine)")
    axes[1].set(xlabel="cells", ylabel="peak RSS above baseline (GiB)", title="Memory")
    for ax in axes:
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", default=["memory", "backed"])
    parser.add_argument("--dir", default="/tmp/scvae-scale", help="where the h5ad files go")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop after this many steps and report median step time x steps (0: full epoch)",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, mode, budget = args.worker
        print(json.dumps(worker(path, mode, int(budget))))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / "scale_cpu.json"
    rows = json.loads(out_json.read_text())["runs"] if out_json.exists() else []
    for n in args.cells:
        path = folder / f"sim_{n}x{GENES}.h5ad"
        if not path.exists():
            t0 = time.perf_counter()
            make(path, n)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in args.modes:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(path), mode, str(args.max_steps)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows = [r for r in rows if (r["cells"], r["mode"]) != (n, mode)] + [row]
            print(row, flush=True)
            out_json.write_text(json.dumps({"genes": GENES, "runs": rows}, indent=2))
    plot(rows, RESULTS / "scale_cpu.png")
    write_md(rows, RESULTS / "scale_cpu.md")


def write_md(rows: list[dict], out: Path) -> None:
    mem = {r["cells"]: r for r in rows if r["mode"] == "memory"}
    lines = [
        "# Scale on CPU: one epoch, default model, batch 128, 2,000 genes, ~10 % non-zero",
        "",
        "Wall-clock on a 2-core machine that other jobs may share: compare shapes, not digits.",
        "",
        "Peak RSS above the interpreter baseline (after the imports) and above the runtime "
        "baseline (after one epoch of a 64-cell x 20-gene model); each also as a ratio to the "
        "count matrix's in-memory CSR plus the model's parameters.",
        "",
        "| cells | mode | s / epoch | cells / s | count matrix (GiB) | peak above imports (GiB) "
        "| / (counts + model) | peak above runtime baseline (GiB) | / (counts + model) | "
        "epoch time from | measured epoch with validation (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(above: float | None, counts: int | None, model: int) -> str:
        return "" if above is None or not counts else f"{above / (counts + model):.2f}"

    for r in sorted(rows, key=lambda r: (r["cells"], r["mode"] != "memory")):
        counts = mem.get(r["cells"], {}).get("count_matrix_bytes")
        warm = r.get("peak_rss_above_warm_baseline")
        measured = r.get("measured_epoch_s")
        lines.append(
            f"| {r['cells']:,} | {r['mode']} | {r['epoch_s']:.1f} | "
            f"{0.9 * r['cells'] / r['epoch_s']:,.0f} | "
            f"{counts / 2**30 if counts else float('nan'):.3f} | "
            f"{r['peak_rss_above_baseline'] / 2**30:.3f} | "
            f"{ratio(r['peak_rss_above_baseline'], counts, r['model_bytes'])} | "
            f"{'' if warm is None else f'{warm / 2**30:.3f}'} | "
            f"{ratio(warm, counts, r['model_bytes'])} | "
            f"{r.get('epoch_how', 'measured epoch')} | "
            f"{'' if measured is None else f'{measured:.1f}'} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
