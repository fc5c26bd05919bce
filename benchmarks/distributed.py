"""Two processes (DistributedDataParallel, gloo, CPU) against one: held-out ELBO over seeds.

The same cells are held out in every run (``train_size=0.8, validation_size=0.1`` with the same
split seed); each run trains the same number of epochs with the same global minibatch of
``--batch-size`` cells per optimizer step (each of the two processes takes half of it, so the
optimisation is the same as in one process: same steps per epoch, same learning rate). The
question is whether two processes land within the seed-to-seed spread of one.

    python benchmarks/distributed.py --seeds 0 1 2 --epochs 40

Writes ``benchmarks/results/scale_distributed.{json,md}``. Timings on a shared machine are
not the point here (two processes on two cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

import scvae

RESULTS = Path(__file__).with_name("results")


def held_out_elbo(adata: ad.AnnData, seed: int, n_processes: int, epochs: int, batch: int):
    scvae.settings.seed = seed  # initial weights
    model = scvae.SCVAE(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch,
        train_size=0.8,
        validation_size=0.1,
        seed=seed,
        progress_bar=False,
        n_processes=n_processes,
        n_epochs_kl_warmup=400,  # scvi-tools' warm-up, as recorded (results/scale_distributed.*)
    )
    seconds = time.perf_counter() - start
    used = np.concatenate([model.train_indices, model.validation_indices])
    held = np.setdiff1d(np.arange(adata.n_obs), used)
    return model.get_elbo(indices=held), held, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="an h5ad of counts (default: simulated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    scvae.settings.verbosity = "warning"
    if args.data:
        adata = ad.read_h5ad(args.data)
        name = Path(args.data).stem
    else:
        adata = scvae.data.simulate(3000, 500, n_cell_types=5, seed=7)
        name = "simulated_3000x500"
    rows = []
    for seed in args.seeds:
        for n in (1, 2):
            elbo, held, seconds = held_out_elbo(adata, seed, n, args.epochs, args.batch_size)
            rows.append({"seed": seed, "n_processes": n, "held_out_elbo": elbo, "seconds": seconds})
            print(rows[-1], flush=True)
    out = {"data": name, "epochs": args.epochs, "batch_size": args.batch_size, "runs": rows}
    one = np.array([r["held_out_elbo"] for r in rows if r["n_processes"] == 1])
    two = np.array([r["held_out_elbo"] for r in rows if r["n_processes"] == 2])
    out["summary"] = {
        "one_mean": one.mean(),
        "one_min": one.min(),
        "one_max": one.max(),
        "one_sd": one.std(ddof=1),
        "two_mean": two.mean(),
        "two_min": two.min(),
        "two_max": two.max(),
        "two_sd": two.std(ddof=1),
        "two_mean_within_one_range": bool(one.min() <= two.mean() <= one.max()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_distributed.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# One process vs two (DDP, gloo, CPU) on {name}: held-out ELBO",
        "",
        f"{args.epochs} epochs, global minibatch {args.batch_size} cells (two processes: half "
        f"each), {len(held)} held-out cells, the same in every run.",
        "",
        "| seed | 1 process | 2 processes |",
        "|---|---|---|",
    ]
    for seed in args.seeds:
        a = next(r for r in rows if r["seed"] == seed and r["n_processes"] == 1)
        b = next(r for r in rows if r["seed"] == seed and r["n_processes"] == 2)
        lines.append(f"| {seed} | {a['held_out_elbo']:.2f} | {b['held_out_elbo']:.2f} |")
    s = out["summary"]
    lines += [
        f"| mean (sd) | {s['one_mean']:.2f} ({s['one_sd']:.2f}) | "
        f"{s['two_mean']:.2f} ({s['two_sd']:.2f}) |",
        "",
        f"Two-process mean within the one-process range: {s['two_mean_within_one_range']}.",
    ]
    (RESULTS / "scale_distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
