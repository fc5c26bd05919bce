"""Resident memory of ``posterior_predictive_sample`` against the size of its result.

Simulated counts (500 genes), an untrained default model; in a fresh process per setting,
one small call first (so that lazily loaded code does not count), then the measured call.
Reported: the result's size (its sparse arrays), and how much the process's resident memory
rose above its level before the call, at its peak during the call (``VmHWM`` of
``/proc/self/status``, reset just before the call through ``/proc/self/clear_refs``) and at the
end. Linux only.

    .venv/bin/python benchmarks/ppc_memory.py --cells 40000 --samples 1 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings


def memory_mib() -> tuple[float, float]:
    """This process's resident memory and its peak since the last reset (MiB)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def measure(cells: int, genes: int, n_samples: int) -> dict:
    """One setting, in this process."""
    import scvae

    warnings.simplefilter("ignore")  # the model is untrained on purpose
    model = scvae.SCVAE(scvae.data.simulate(cells, genes, seed=0), n_hidden=16)
    model.posterior_predictive_sample(indices=range(300), n_samples=n_samples, batch_size=256)
    before = memory_mib()[0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident memory
    out = model.posterior_predictive_sample(n_samples=n_samples, batch_size=256)
    after, peak = memory_mib()
    arrays = [out.data, out.indices, out.indptr] if n_samples == 1 else [out.data, *out.coords]
    size = sum(a.nbytes for a in arrays) / 2**20
    return {
        "cells": cells,
        "genes": genes,
        "n_samples": n_samples,
        "result_mib": round(size, 1),
        "peak_rise_mib": round(peak - before, 1),
        "peak_ratio": round((peak - before) / size, 2),
        "end_rise_mib": round(after - before, 1),
        "end_ratio": round((after - before) / size, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=40000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--samples", type=int, nargs="+", default=[1, 3])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a worker: one setting
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.cells, args.genes, args.one)))
        return
    rows = []
    for n in args.samples:
        cmd = [sys.executable, __file__, "--cells", str(args.cells), "--genes", str(args.genes)]
        done = subprocess.run([*cmd, "--one", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
