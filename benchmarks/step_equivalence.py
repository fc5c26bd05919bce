"""scvae's training step against scvi-tools' on identical weights, minibatches and noise.

Runs in the scvi-tools environment (``bash benchmarks/setup_scvi_env.sh``), with scvae imported
from this checkout. For each likelihood it builds scvi-tools' SCVI (seed 0) and scvae's SCVAE on
the same training cells, copies scvi-tools' initial weights into scvae, and trains both for the
same steps: the same minibatches (scvae's own minibatch gather, with the non-zeros its
likelihood uses), the same random state before each step (so the same dropout masks and the same
reparameterization noise), each tool's own KL-weight schedule and optimizer (scvi-tools'
``TrainingPlan.configure_optimizers``; scvae's fused Adam). It reports the largest difference of
the per-step losses and of the final weights, and the held-out marginal log-likelihood each tool
computes for its own trained model.

Identical trajectories mean that a gap between the tools' held-out scores over seeds comes from
the random draws (initial weights, minibatch order, noise), not from the model, the likelihood,
the optimizer or the schedule.

Run from the repository root::

    benchmarks/.scvi-venv/bin/python benchmarks/step_equivalence.py \\
        --data ../shared/data/baron_mouse1_pancreas.h5ad
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import scvi  # noqa: E402
from _common import SCVI_KL_WARMUP, read_split  # noqa: E402
from parity import prepare  # noqa: E402
from scvi.train import TrainingPlan  # noqa: E402
from scvi.train._trainingplans import _compute_kl_weight  # noqa: E402

import scvae  # noqa: E402
from scvae.data.loader import DeviceCSR  # noqa: E402
from scvae.module import Covariates  # noqa: E402
from scvae.train import TrainConfig, kl_weight  # noqa: E402
from scvae.train_step import make_optimizer  # noqa: E402


def scvi_key(key: str) -> str:
    """scvi-tools' name of one of scvae's weights (the same tensors, other module names)."""
    return key.replace("layers.0.", "fc_layers.Layer 0.").replace(
        "px_scale_decoder.", "px_scale_decoder.0."
    )


def compare(train, test, likelihood: str, epochs: int, batch_size: int, n_mc: int) -> dict:
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(train)
    theirs = scvi.model.SCVI(train, gene_likelihood=likelihood)
    scvae.settings.seed = 0
    ours = scvae.SCVAE(train, gene_likelihood=likelihood)
    source = theirs.module.state_dict()
    target = ours.module.state_dict()
    copied = {
        k: (v if k.startswith("library_") else source[scvi_key(k)].reshape(v.shape).clone())
        for k, v in target.items()
    }
    ours.module.load_state_dict(copied)

    cfg = TrainConfig(max_epochs=epochs, batch_size=batch_size, n_epochs_kl_warmup=SCVI_KL_WARMUP)
    plan = TrainingPlan(theirs.module)
    opt_theirs = plan.configure_optimizers()["optimizer"]
    opt_ours = make_optimizer(
        ours.module.parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    counts = DeviceCSR(train.X, "cpu")
    codes = torch.zeros(train.n_obs, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    theirs.module.train()
    ours.module.train()
    losses: list[tuple[float, float]] = []
    for epoch in range(epochs):
        w_theirs = float(_compute_kl_weight(epoch, len(losses), plan.n_epochs_kl_warmup, None))
        w_ours = kl_weight(epoch, cfg.n_epochs_kl_warmup)
        batches = counts.batches(
            torch.arange(train.n_obs), batch_size, shuffle=True, generator=generator
        )
        for idx, x, nonzero in batches:
            tensors = {
                "X": x.clone(),
                "batch": torch.zeros(len(idx), 1),
                "labels": torch.zeros(len(idx), 1),
            }
            state = torch.get_rng_state()
            _, _, out_theirs = theirs.module(tensors, loss_kwargs={"kl_weight": w_theirs})
            torch.set_rng_state(state)
            out_ours = ours.module(x, codes[idx], Covariates(), kl_weight=w_ours, nonzero=nonzero)
            for opt, out in ((opt_theirs, out_theirs), (opt_ours, out_ours)):
                opt.zero_grad()
                out.loss.backward()
                opt.step()
            losses.append((float(out_theirs.loss), float(out_ours.loss)))
    after_theirs = theirs.module.state_dict()
    weight_diff = max(
        float((v - after_theirs[scvi_key(k)].reshape(v.shape)).abs().max())
        for k, v in ours.module.state_dict().items()
        if not k.startswith("library_") and v.is_floating_point()
    )
    theirs.module.eval()
    theirs.is_trained_ = True
    ours.module.eval()
    ours.is_trained_ = True
    torch.manual_seed(0)
    mll_theirs = float(theirs.get_marginal_ll(test, n_mc_samples=n_mc, n_mc_samples_per_pass=50))
    torch.manual_seed(0)
    mll_ours = float(np.mean(ours.get_marginal_ll(test, n_mc_samples=n_mc, return_mean=False)))
    arr = np.asarray(losses)
    return {
        "gene_likelihood": likelihood,
        "steps": len(losses),
        "first_loss": arr[0].tolist(),
        "last_loss": arr[-1].tolist(),
        "max_abs_loss_difference": float(np.abs(arr[:, 0] - arr[:, 1]).max()),
        "max_rel_loss_difference": float((np.abs(arr[:, 0] - arr[:, 1]) / arr[:, 0]).max()),
        "max_abs_weight_difference": weight_diff,
        "held_out_marginal_ll": {"scvi-tools": mll_theirs, "scvae": mll_ours},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=HERE.parents[1] / "shared" / "data" / "baron_mouse1_pancreas.h5ad",
    )
    p.add_argument("--gene-likelihood", nargs="+", default=["zinb", "nb", "poisson"])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-mc-samples", type=int, default=200)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} not found; pass --data")
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(tmp) / "prepared.h5ad"
        prepare(args.data, 2000, 0.1, h5ad)
        _, train, test = read_split(str(h5ad))
    rows = [
        compare(train.copy(), test, lik, args.epochs, args.batch_size, args.n_mc_samples)
        for lik in args.gene_likelihood
    ]
    result = {
        "data": args.data.name,
        "scvi-tools": scvi.__version__,
        "torch": torch.__version__,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    name = f"step_equivalence_{args.data.stem}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"### {args.data.name}: scvae's step against scvi-tools' (same weights, minibatches, "
        f"noise; {args.epochs} epochs, batch {args.batch_size}, scvi-tools {scvi.__version__}, "
        f"torch {torch.__version__})",
        "",
        "| likelihood | steps | loss at step 0 | loss at last step (scvi-tools / scvae) "
        "| max rel. loss difference | max weight difference "
        "| held-out marginal LL (scvi-tools / scvae) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["held_out_marginal_ll"]
        lines.append(
            f"| {r['gene_likelihood']} | {r['steps']} | {r['first_loss'][0]:.3f} "
            f"| {r['last_loss'][0]:.3f} / {r['last_loss'][1]:.3f} "
            f"| {r['max_rel_loss_difference']:.1e} | {r['max_abs_weight_difference']:.1e} "
            f"| {m['scvi-tools']:.3f} / {m['scvae']:.3f} |"
        )
    table = "\n".join(lines)
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
