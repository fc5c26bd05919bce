"""Time to quality: how soon scvae (its own defaults) reaches scvi-tools' best held-out model.

scvi-tools trains with its own defaults (``SCVI.train()``: up to 400 epochs on small data,
batch 128), its weights kept every 25 epochs; scvae trains with its defaults, stopped at a list
of epochs. For every kept point: the held-out marginal log-likelihood (same cells and genes for
both, 500 importance samples) and the resolution-optimised Leiden NMI of the latent of all
cells against the known types (``scvae.metrics.leiden_nmi_ari``, the same function for both).
The target is scvi-tools' best marginal LL and best NMI over its run; each tool's time to
quality is its training time (evaluation excluded) until it has reached both (each at the
first kept point at or above it).

    .venv/bin/python benchmarks/time_to_quality.py --data ../shared/data/pbmc3k_seurat.h5ad \
        --scvi-python benchmarks/.scvi-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def prepare(args: argparse.Namespace, out: Path) -> str:
    """Write the prepared h5ad (HVGs, ``obs["split"]``); return the labels key."""
    if args.data:
        from parity import prepare as prepare_real

        prepare_real(Path(args.data), args.n_hvg, 0.1, out)
        return args.labels_key
    import scvae

    adata = scvae.data.simulate(args.n_cells, args.n_genes, n_cell_types=5, seed=0)
    held = np.random.default_rng(12345).random(adata.n_obs) < 0.1
    adata.obs["split"] = np.where(held, "held_out", "train")
    adata.write_h5ad(out)
    return "cell_type"


def reach(result: dict, mll: float, nmi: float) -> float | None:
    """Training seconds until the run has reached both targets (None: never).

    Each target is met at the first kept point at or above it (the two may be met at different
    points: scvi-tools' best NMI often comes early and its best marginal LL later); the time to
    quality is the later of the two.
    """
    times = []
    for key, target in (("mll", mll), ("nmi", nmi)):
        hits = [s for s, v in zip(result["seconds"], result[key], strict=True) if v >= target]
        if not hits:
            return None
        times.append(float(hits[0]))
    return max(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="an h5ad of counts (default: simulated)")
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scvae-epochs", type=int, nargs="+", default=[5, 10, 15, 20, 30, 40, 60])
    p.add_argument("--scvae-options", default="{}", help="JSON of scvae train() options")
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    from scvae.metrics import leiden_nmi_ari

    name = Path(a.data).stem if a.data else f"simulated_{a.n_cells}"
    with tempfile.TemporaryDirectory() as work:
        h5ad = Path(work) / "data.h5ad"
        labels_key = prepare(a, h5ad)
        labels = ad.read_h5ad(h5ad).obs[labels_key].astype(str).to_numpy()
        jobs = {
            "scvi-tools": [a.scvi_python, str(HERE / "_ttq_scvi.py")],
            "scvae": [sys.executable, str(HERE / "_ttq_scvae.py")],
        }
        results = {}
        for tool, cmd in jobs.items():
            out = Path(work) / f"{tool}.npz"
            cmd = cmd + [str(h5ad), str(out), "--seed", str(a.seed)]
            if tool == "scvae":
                cmd += ["--epochs", *map(str, a.scvae_epochs), "--train-options", a.scvae_options]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
            if run.returncode:
                sys.exit(f"{tool} failed:\n{run.stderr[-3000:]}")
            z = np.load(out)
            scores = [leiden_nmi_ari(lat, labels, seed=a.seed) for lat in z["latents"]]
            results[tool] = {
                "epochs": z["epochs"].tolist(),
                "seconds": z["seconds"].tolist(),
                "mll": z["mll"].tolist(),
                "nmi": [s["nmi"] for s in scores],
            }
            print(tool, json.dumps(results[tool]), flush=True)
    ref = results["scvi-tools"]
    target_mll, target_nmi = max(ref["mll"]), max(ref["nmi"])
    t_scvi = reach(ref, target_mll, target_nmi)
    t_scvae = reach(results["scvae"], target_mll, target_nmi)
    summary = {
        "data": name,
        "threads": a.threads,
        "seed": a.seed,
        "scvae_options": json.loads(a.scvae_options),
        "target_mll": target_mll,
        "target_nmi": target_nmi,
        "scvi_tools_seconds_to_target": t_scvi,
        "scvae_seconds_to_target": t_scvae,
        "speedup": None if t_scvae is None or t_scvi is None else t_scvi / t_scvae,
        "runs": results,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"time_to_quality_{name}.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"### Time to quality, {name}\n",
        f"Targets (scvi-tools' best over its run): marginal LL {target_mll:.2f}, "
        f"NMI {target_nmi:.3f}; {a.threads} threads, seed {a.seed}.\n",
        "| tool | epoch | training s | held-out marginal LL | NMI |",
        "|---|---|---|---|---|",
    ]
    for tool, r in results.items():
        for e, s, m, n in zip(r["epochs"], r["seconds"], r["mll"], r["nmi"], strict=True):
            lines.append(f"| {tool} | {e} | {s:.1f} | {m:.2f} | {n:.3f} |")
    lines.append(
        f"\nscvi-tools reached both at {t_scvi} s; scvae at {t_scvae} s; "
        f"speed-up {summary['speedup']}."
    )
    (a.out / f"time_to_quality_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
