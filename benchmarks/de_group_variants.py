"""Group mode's two parts: ways to combine them, and what each buys and costs (issue 8).

Group mode (``scvae/de_group.py``) estimates each gene's log2 fold change as the model's part,
``d_rho = log2(rho_bar1 / rho_bar2)`` (variance ``v_rho``), plus the count factor's
difference ``d_beta = (beta1 - beta2) / ln 2`` (Fisher variance ``v_beta``), and shrinks the
sum by an empirical-Bayes normal-means prior. With 50-200 cells per group ``v_beta`` is large
and group mode ranks simulated genes below change mode. This script reruns group mode on the
calibration benchmark's data (``de_calibration.py``'s simulated and thinned sets, same seeds,
epochs and KL warm-up) and scores, from the same fitted parts, alternatives that shrink
``d_beta`` before the sum or rescale the parts' variances:

- ``sum`` (what group mode does): ``d_rho + d_beta``, variance ``v_rho + v_beta``;
- ``rho only``: ``d_rho``, variance ``v_rho`` (no count factor);
- ``sum, zeros unweighted``: the sum, with the count factor fitted without the zero weights
  (every zero counted as a negative binomial zero, none discounted as zero-inflation);
- ``ash on beta``: ``d_beta`` first shrunk by its own normal-means prior (the same fit as the
  final step), then added to ``d_rho`` with its posterior variance;
- ``normal prior on beta``: ``d_beta``'s prior N(0, tau^2), tau^2 by moments over genes;
- ``regression on d_rho``: ``d_beta ~ N(lambda d_rho, tau^2 + v_beta)``, lambda and tau^2 by
  maximum likelihood over genes (an attenuation of the model's fold changes).
- ``empirical-null v_beta``: the sum, with ``v_beta`` scaled by the squared robust standard
  deviation (MAD) of the z-scores ``d_beta / sqrt(v_beta)`` (Efron's empirical null), since
  the Fisher variance overstates the factor's noise;
- ``rho only, empirical null``: ``d_rho`` with ``v_rho`` scaled up by the squared robust
  spread of its z-scores (never down), since the spread over cells misses how far the decoder
  moves genes without an effect;
- ``two empirical nulls, ash on beta``: ``v_rho`` scaled up and ``v_beta`` scaled down (never
  up) to their z-scores' spreads, ``d_beta`` shrunk by its own normal-means prior, then added
  to ``d_rho``; ``... (informative genes)``: the same with ``v_beta``'s spread taken only over
  the genes whose factor the counts inform (Fisher variance under half the prior's in both
  groups), not over genes without counts, whose z-scores the prior holds near zero.

Each then goes through the same final normal-means step. Reported: AUPRC of ``proba_de`` and
the observed FDP and power of the posterior expected FDR calls at 0.05, mean over data sets.

    .venv/bin/python benchmarks/de_group_variants.py --sim-reps 0 1 2 3 4 --thin-reps 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.metrics import average_precision_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import de_calibration as dc  # noqa: E402

import scvae  # noqa: E402
import scvae.de as sde  # noqa: E402
import scvae.de_group as dg  # noqa: E402
from scvae.de import fdr_calls  # noqa: E402

DELTA = 0.25


class Parts:
    """Records each group's parts (``scvae.de_group.group_parts``) as group mode fits them."""

    def __init__(self) -> None:
        self.fits: list[dg.GroupParts] = []
        self.unweighted: list[dg.GroupParts] = []  # the factor fitted without zero weights

    def fit_group(self, inputs: dg.GroupInputs) -> dg.GroupFit:
        parts = dg.group_parts(inputs)
        self.fits.append(parts)
        beta, info = dg.group_factor(inputs.counts, inputs.mean, inputs.theta)  # no zero weights
        self.unweighted.append(parts._replace(beta=beta, var_beta=1.0 / info))
        return parts.fit()


def proba(estimate: np.ndarray, variance: np.ndarray) -> np.ndarray:
    post = dg.normal_means_posterior(estimate, np.sqrt(variance), DELTA)
    return np.maximum(post["up"], post["down"])


def null_spread(estimate: np.ndarray, variance: np.ndarray) -> float:
    """Robust standard deviation (MAD / 0.6745) of the z-scores: Efron's empirical null."""
    z = estimate / np.sqrt(variance)
    return float(np.median(np.abs(z - np.median(z))) / 0.6745)


def differences(
    f1: dg.GroupParts, f2: dg.GroupParts
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``d_rho``, ``v_rho``, ``d_beta``, ``v_beta`` of two groups' parts (log2 scale)."""
    return (
        (f1.log_rho - f2.log_rho) / dg.LOG2,
        (f1.var_rho + f2.var_rho) / dg.LOG2**2,
        (f1.beta - f2.beta) / dg.LOG2,
        (f1.var_beta + f2.var_beta) / dg.LOG2**2,
    )


def variants(
    f1: dg.GroupParts, f2: dg.GroupParts, u1: dg.GroupParts, u2: dg.GroupParts
) -> dict[str, np.ndarray]:
    """``proba_de`` of every variant from two groups' parts (log2 scale); ``u1``, ``u2``: the
    same with the count factor fitted without zero weights."""
    d_rho, v_rho, d_beta, v_beta = differences(f1, f2)
    out = {"sum": proba(d_rho + d_beta, v_rho + v_beta), "rho only": proba(d_rho, v_rho)}
    _, _, d_beta_u, v_beta_u = differences(u1, u2)
    out["sum, zeros unweighted"] = proba(d_rho + d_beta_u, v_rho + v_beta_u)
    s0 = null_spread(d_beta, v_beta)
    out["empirical-null v_beta"] = proba(d_rho + d_beta, v_rho + s0**2 * v_beta)
    s_rho = max(null_spread(d_rho, v_rho), 1.0)
    out["rho only, empirical null"] = proba(d_rho, s_rho**2 * v_rho)
    informed = (f1.var_beta < 0.5 * dg.BETA_PRIOR_SD**2) & (f2.var_beta < 0.5 * dg.BETA_PRIOR_SD**2)
    for name, genes in (("", slice(None)), (" (informative genes)", informed)):
        s_beta = min(null_spread(d_beta[genes], v_beta[genes]), 1.0)
        shrunk = dg.normal_means_posterior(d_beta, s_beta * np.sqrt(v_beta), DELTA)
        out[f"two empirical nulls, ash on beta{name}"] = proba(
            d_rho + shrunk["mean"], s_rho**2 * v_rho + shrunk["std"] ** 2
        )
    post = dg.normal_means_posterior(d_beta, np.sqrt(v_beta), DELTA)
    out["ash on beta"] = proba(d_rho + post["mean"], v_rho + post["std"] ** 2)
    tau2 = max(float(np.mean(d_beta**2 - v_beta)), 1e-4)
    k = tau2 / (tau2 + v_beta)
    out["normal prior on beta"] = proba(d_rho + k * d_beta, v_rho + k * v_beta)

    def nll(p: np.ndarray) -> float:
        v = np.exp(p[1]) + v_beta
        return float(0.5 * np.sum(np.log(v) + (d_beta - p[0] * d_rho) ** 2 / v))

    lam, log_t2 = minimize(nll, [0.0, np.log(0.01)], method="Nelder-Mead").x
    k = np.exp(log_t2) / (np.exp(log_t2) + v_beta)
    mean = lam * d_rho + k * (d_beta - lam * d_rho)
    out["regression on d_rho"] = proba(d_rho + mean, v_rho + k * v_beta)
    return out


def run(name: str, kind: str, adata, truth: dict, epochs: int, parts: Parts) -> list[dict]:
    seed = int(truth["seed"])
    model = scvae.SCVAE(adata)
    model.train(
        max_epochs=epochs,
        batch_size=128,
        train_size=1.0,
        n_epochs_kl_warmup=epochs // 2,
        seed=seed,
        device="cpu",
    )
    is_de = truth["effect_class"] != "null"
    rows = []
    for col in [c for c in adata.obs.columns if c.startswith("cmp_")]:
        side = adata.obs[col].astype(str).to_numpy()
        parts.fits.clear()
        parts.unweighted.clear()
        res = model.differential_expression(
            adata, idx1=side == "A", idx2=side == "B", mode="group", seed=seed
        ).loc[adata.var_names]
        scores = variants(*parts.fits, *parts.unweighted)
        if not np.allclose(scores["sum"], res["proba_de"], atol=1e-9):
            raise RuntimeError("the 'sum' variant does not reproduce group mode's proba_de")
        for variant, p in scores.items():
            calls = fdr_calls(p, 0.05)
            rows.append(
                {
                    "data": kind,
                    "dataset": name,
                    "cells per group": col.removeprefix("cmp_n"),
                    "variant": variant,
                    "auprc": float(average_precision_score(is_de, p)),
                    "fdp_0.05": float((calls & ~is_de).sum() / max(calls.sum(), 1)),
                    "power_0.05": float((calls & is_de).sum() / is_de.sum()),
                }
            )
    print(f"{name} done", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sim-reps", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--thin-reps", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    data = argparse.Namespace(sim_cells=1500, sim_genes=1000, delta=DELTA, thin_type="Naive CD4 T")
    scvae.settings.progress_bar = False
    parts = Parts()
    sde.fit_group = parts.fit_group  # group mode's own code, with its parts recorded
    rows: list[dict] = []
    for effect in (0.35, 0.7):
        for rep in args.sim_reps:
            adata, truth = dc.make_simulated(effect, rep, data)
            rows += run(f"sim_e{effect}_r{rep}", "simulate", adata, truth, 100, parts)
    pbmc_path = args.data_dir / "pbmc3k_seurat.h5ad"
    if args.thin_reps and pbmc_path.exists():
        pbmc = dc.pbmc_hvg(pbmc_path)
        for rep in args.thin_reps:
            adata, truth = dc.make_thinned(pbmc, rep, data)
            rows += run(f"thin_r{rep}", "thinning", adata, truth, 200, parts)
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(table["variant"]))
    summary = (
        table.groupby(["data", "cells per group", "variant"], sort=False)[
            ["auprc", "fdp_0.05", "power_0.05"]
        ]
        .mean()
        .reset_index()
    )
    summary["variant"] = pd.Categorical(summary["variant"], order)
    sizes = sorted(summary["cells per group"].unique(), key=lambda s: (s == "all", len(s), s))
    summary["cells per group"] = pd.Categorical(summary["cells per group"], sizes)
    summary = summary.sort_values(["data", "cells per group", "variant"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "de_group_variants"
    stem.with_suffix(".json").write_text(
        json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )
    lines = [
        "# Group mode: ways to combine the model's part and the count factor (mean over data sets)",
        "",
        f"Data sets: {', '.join(sorted(table['dataset'].unique()))}.",
        "",
        dc.to_markdown(summary),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
