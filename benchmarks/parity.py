"""scvae against scvi-tools on the same cells, genes, split, epochs and seeds.

Prepares one h5ad (highly variable genes by scanpy's seurat_v3 on the counts, a fixed set of
held-out cells), then for each seed trains scvae and scvi-tools (SCVI defaults, the same epochs,
batch size and KL warm-up) in separate processes, alternating which goes first, and reports side
by side: median seconds per epoch (first epoch excluded), peak memory, held-out ELBO and marginal
log-likelihood (per-cell values kept, paired differences), resolution-optimised Leiden NMI/ARI
and kNN label accuracy of the latent of all cells. Marginal LL is non-inferior when scvae's mean
over seeds is not below scvi-tools' mean minus 1.5 times its standard deviation over seeds.

``--latent-library`` (use_observed_lib_size=False) and ``--latent-distribution ln`` change the
model on both sides; ``--tools scvae`` runs scvae alone (for rows that are reported, not
compared: with a latent library the marginal LL is log p(x), not log p(x | l), and scvi-tools
evaluates the ln latent's densities at the transformed z). ``--precision bf16-mixed --tools
scvae`` trains scvae with bf16 matmuls (its effect on held-out quality).

Run from the repository root after ``make setup`` and ``bash benchmarks/setup_scvi_env.sh``::

    .venv/bin/python benchmarks/parity.py --data ../shared/data/pbmc3k_seurat.h5ad
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
import scanpy as sc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scvae.metrics import knn_accuracy, leiden_nmi_ari  # noqa: E402

TOOLS = {"scvae": "_run_scvae.py", "scvi-tools": "_run_scvi.py"}
DEFAULT_SEEDS = [0, 1, 2, 3, 4]


def prepare(path: Path, n_hvg: int, held_out: float, out: Path, split_seed: int = 12345) -> None:
    """Select HVGs on the counts and mark a fixed random set of held-out cells."""
    adata = ad.read_h5ad(path)
    if n_hvg and n_hvg < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_hvg, flavor="seurat_v3", subset=True)
    rng = np.random.default_rng(split_seed)
    held = np.zeros(adata.n_obs, dtype=bool)
    held[rng.choice(adata.n_obs, size=int(round(held_out * adata.n_obs)), replace=False)] = True
    totals = np.asarray(adata.X.sum(1)).ravel()
    keep = totals > 0  # HVG subsetting can empty a cell; both tools get the same cells
    adata = adata[keep].copy()
    adata.obs["split"] = np.where(held[keep], "held_out", "train")
    adata.write_h5ad(out)


def run_worker(
    tool: str, python: str, h5ad: Path, out: Path, args: argparse.Namespace, seed: int
) -> dict:
    cmd = [
        python,
        str(HERE / TOOLS[tool]),
        str(h5ad),
        str(out),
        "--seed",
        str(seed),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--n-mc-samples",
        str(args.n_mc_samples),
        "--gene-likelihood",
        args.gene_likelihood,
        "--latent-distribution",
        args.latent_distribution,
    ]
    if args.latent_library:
        cmd.append("--latent-library")
    if tool == "scvae":
        cmd += ["--precision", args.precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} seed {seed} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["latent"] = np.load(out.with_suffix(".latent.npy"))
    return result


def summarise(runs: dict[str, list[dict]], labels: np.ndarray | None) -> dict:
    rows: dict[str, dict[str, list[float]]] = {}
    for tool, results in runs.items():
        r = rows.setdefault(tool, {})
        for res in results:
            r.setdefault("sec_per_epoch", []).append(float(np.median(res["epoch_seconds"][1:])))
            r.setdefault("peak_rss_mib", []).append(res["peak_rss_mib"])
            r.setdefault("peak_above_baseline_mib", []).append(res["peak_above_baseline_mib"])
            r.setdefault("elbo", []).append(float(np.mean(res["elbo_held_out"])))
            r.setdefault("marginal_ll", []).append(float(np.mean(res["marginal_ll_held_out"])))
            if labels is not None:
                scores = leiden_nmi_ari(res["latent"], labels, seed=res["seed"])
                r.setdefault("nmi", []).append(scores["nmi"])
                r.setdefault("ari", []).append(scores["ari"])
                r.setdefault("knn_accuracy", []).append(knn_accuracy(res["latent"], labels))
    summary: dict = {
        tool: {
            k: {
                "mean": float(np.mean(v)),
                "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "values": v,
            }
            for k, v in r.items()
        }
        for tool, r in rows.items()
    }
    if "scvae" not in runs or "scvi-tools" not in runs:
        return summary
    paired = [
        np.asarray(a["marginal_ll_held_out"]) - np.asarray(b["marginal_ll_held_out"])
        for a, b in zip(runs["scvae"], runs["scvi-tools"], strict=True)
    ]
    summary["paired_marginal_ll_difference"] = {
        "per_seed_mean": [float(d.mean()) for d in paired],
        "per_seed_sd_over_cells": [float(d.std(ddof=1)) for d in paired],
        "mean": float(np.mean([d.mean() for d in paired])),
    }
    ours, theirs = summary["scvae"], summary["scvi-tools"]
    threshold = theirs["marginal_ll"]["mean"] - 1.5 * theirs["marginal_ll"]["sd"]
    summary["marginal_ll_threshold"] = threshold
    checks = {
        "marginal_ll_non_inferior": ours["marginal_ll"]["mean"] >= threshold,
        "sec_per_epoch_no_slower": ours["sec_per_epoch"]["mean"] <= theirs["sec_per_epoch"]["mean"],
    }
    if labels is not None:
        checks["nmi_within_0.02"] = ours["nmi"]["mean"] >= theirs["nmi"]["mean"] - 0.02
        checks["knn_within_0.02"] = (
            ours["knn_accuracy"]["mean"] >= theirs["knn_accuracy"]["mean"] - 0.02
        )
    summary["checks"] = checks
    return summary


def markdown(summary: dict, title: str) -> str:
    if "scvi-tools" not in summary or "scvae" not in summary:
        return markdown_single(summary, title)
    ours, theirs = summary["scvae"], summary["scvi-tools"]
    lines = [
        f"### {title}",
        "",
        "| measure | scvae | scvi-tools | ratio scvi-tools/scvae |",
        "|---|---|---|---|",
    ]
    for key, label in [
        ("sec_per_epoch", "median s/epoch"),
        ("peak_above_baseline_mib", "peak memory above baseline (MiB)"),
        ("peak_rss_mib", "peak RSS (MiB)"),
        ("elbo", "held-out ELBO"),
        ("marginal_ll", "held-out marginal LL"),
        ("nmi", "Leiden NMI (best)"),
        ("ari", "Leiden ARI (at best NMI)"),
        ("knn_accuracy", "kNN accuracy"),
    ]:
        if key not in ours:
            continue
        a, b = ours[key], theirs[key]
        ratio = (
            f"{b['mean'] / a['mean']:.2f}"
            if key in ("sec_per_epoch", "peak_rss_mib", "peak_above_baseline_mib")
            else ""
        )
        lines.append(
            f"| {label} | {a['mean']:.3f} ± {a['sd']:.3f} | "
            f"{b['mean']:.3f} ± {b['sd']:.3f} | {ratio} |"
        )
    d = summary["paired_marginal_ll_difference"]
    lines += [
        "",
        "Paired per-cell marginal LL difference (scvae - scvi-tools), per seed: "
        + ", ".join(
            f"{m:+.2f} (sd over cells {s:.2f})"
            for m, s in zip(d["per_seed_mean"], d["per_seed_sd_over_cells"], strict=True)
        )
        + f"; mean {d['mean']:+.2f} nats.",
        "",
        f"Non-inferiority in marginal LL: scvae {ours['marginal_ll']['mean']:.2f} against "
        f"threshold {summary['marginal_ll_threshold']:.2f} (scvi-tools mean - 1.5 sd): "
        + ("pass" if summary["checks"]["marginal_ll_non_inferior"] else "FAIL"),
        "",
        "Checks: "
        + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in summary["checks"].items()),
    ]
    return "\n".join(lines)


def markdown_single(summary: dict, title: str) -> str:
    """The table of a run with one tool: values only, no comparison."""
    (tool,) = (k for k in summary if k in TOOLS)
    lines = [f"### {title}", "", f"| measure | {tool} |", "|---|---|"]
    for key, label in [
        ("elbo", "held-out ELBO"),
        ("marginal_ll", "held-out marginal LL"),
        ("nmi", "Leiden NMI (best)"),
        ("ari", "Leiden ARI (at best NMI)"),
        ("knn_accuracy", "kNN accuracy"),
    ]:
        if key in summary[tool]:
            v = summary[tool][key]
            lines.append(f"| {label} | {v['mean']:.3f} ± {v['sd']:.3f} |")
    values = ", ".join(f"{v:.2f}" for v in summary[tool]["marginal_ll"]["values"])
    lines += ["", f"Marginal LL per seed: {values}. Reported, not compared."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "pbmc3k_seurat.h5ad"
    )
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--held-out", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    p.add_argument("--n-mc-samples", type=int, default=1000)
    p.add_argument("--gene-likelihood", default="zinb", choices=["zinb", "nb", "poisson"])
    p.add_argument("--latent-distribution", default="normal", choices=["normal", "ln"])
    p.add_argument(
        "--latent-library",
        action="store_true",
        help="learn the library size (use_observed_lib_size=False) on both sides",
    )
    p.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16-mixed"],
        help="scvae's training precision (bf16-mixed: bf16 matmuls; scvae alone)",
    )
    p.add_argument(
        "--tools",
        nargs="+",
        default=list(TOOLS),
        choices=list(TOOLS),
        help="which tools to run (scvae alone for rows that are reported, not compared)",
    )
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    if not args.data.exists():
        sys.exit(f"{args.data} not found; pass --data")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"parity_{args.data.stem}_{args.gene_likelihood}"
    variant = ""
    if args.latent_library:
        name += "_latentlib"
        variant += ", latent library"
    if args.latent_distribution != "normal":
        name += f"_{args.latent_distribution}"
        variant += f", {args.latent_distribution} latent"
    if args.precision != "32":
        if args.tools != ["scvae"]:
            sys.exit("--precision other than 32 is scvae's option: add --tools scvae")
        name += "_bf16"
        variant += ", bf16 matmuls"
    if args.seeds != DEFAULT_SEEDS:  # more or other seeds: a file beside the 5-seed one
        contiguous = args.seeds == list(range(args.seeds[0], args.seeds[-1] + 1))
        name += (
            f"_seeds{args.seeds[0]}-{args.seeds[-1]}"
            if contiguous
            else "_seeds" + "-".join(map(str, args.seeds))
        )
    pythons = {"scvae": sys.executable, "scvi-tools": args.scvi_python}
    runs: dict[str, list[dict]] = {tool: [] for tool in args.tools}
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(tmp) / "prepared.h5ad"
        prepare(args.data, args.n_hvg, args.held_out, h5ad)
        prepared = ad.read_h5ad(h5ad)
        labels = (
            prepared.obs[args.labels_key].astype(str).to_numpy()
            if args.labels_key in prepared.obs
            else None
        )
        print(
            f"{args.data.name}: {prepared.n_obs} cells x {prepared.n_vars} genes, "
            f"{int((prepared.obs['split'] == 'held_out').sum())} held out",
            flush=True,
        )
        if labels is None:
            print(f"no obs[{args.labels_key!r}]: clustering scores skipped", flush=True)
        for i, seed in enumerate(args.seeds):
            order = list(args.tools) if i % 2 == 0 else list(reversed(args.tools))
            for tool in order:
                res = run_worker(
                    tool, pythons[tool], h5ad, Path(tmp) / f"{tool}_{seed}.json", args, seed
                )
                runs[tool].append(res)
                print(
                    f"seed {seed} {tool}: {np.median(res['epoch_seconds'][1:]):.3f} s/epoch, "
                    f"held-out marginal LL {np.mean(res['marginal_ll_held_out']):.2f}",
                    flush=True,
                )
        for tool in runs:
            runs[tool].sort(key=lambda r: r["seed"])
        summary = summarise(runs, labels)
    summary["setup"] = {k: str(v) for k, v in vars(args).items()}
    summary["per_cell"] = {
        tool: [r["marginal_ll_held_out"] for r in res] for tool, res in runs.items()
    }
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    table = markdown(
        summary,
        f"{args.data.name}, {args.gene_likelihood}{variant}, {args.epochs} epochs, "
        f"batch {args.batch_size}, seeds {args.seeds}",
    )
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
