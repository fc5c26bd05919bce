"""Calibration and ranking of differential expression where the truth is known.

Three kinds of data, each analysed by scvae (change mode, and group mode on the same trained
model: "scvae (group)"), scvi-tools (change mode, in its own environment) and scanpy's
Wilcoxon test (log-normalised counts, Benjamini-Hochberg), all on the same cells and genes in
one run:

- ``simulate``: ``scvae.data.simulate`` with two cell types (10% of genes DE per type), at
  several effect sizes, ``--replicates`` data sets each; the true log2 ratio of normalised
  expression is recomputed from the simulation's own draws (checked against what it stores).
- ``thinning``: pbmc3k's 2,000 highly variable genes (seurat_v3 on all cells); the cells of one
  type (Naive CD4 T, 697 cells) split at random in two halves, 60 genes thinned in one half by
  2^-0.5, 2^-1 or 2^-2 (``scvae.data.binomial_thinning``); the models are trained on these
  cells.
- ``null``: pbmc3k unchanged; every type of at least 150 cells split at random into halves:
  nothing is DE.

Both tools train with the same epochs (``--sim-epochs``, ``--thin-epochs``, ``--null-epochs``),
batch size 128, all cells (``train_size=1.0``), and a KL warm-up of half the epochs (the
default 400-epoch warm-up would leave the KL weight well below 1 at these epoch counts).

A gene is truly DE when its true |log2 ratio of rho| is at least delta (0.25), the meaning of
change mode. Each comparison is run at several group sizes (cells drawn from each side).
Reported per method, fdr target (0.01, 0.05, 0.1) and setting: the mean observed false
discovery proportion and power (scvae and scvi-tools call by the posterior expected FDR rule,
Wilcoxon by BH-adjusted p-values at the same level), and the area under the precision-recall
curve (proba_de; Wilcoxon's |z|).

Run from the repository root (scvi-tools' environment from benchmarks/setup_scvi_env.sh)::

    python benchmarks/de_calibration.py --scvi-python benchmarks/.scvi-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import average_precision_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import scvae  # noqa: E402
from scvae.de import fdr_calls  # noqa: E402

TARGETS = (0.01, 0.05, 0.1)
WORKERS = {"scvae": "de_worker_scvae.py", "scvi-tools": "de_worker_scvi.py"}


# ----------------------------------------------------------------------------- data sets
def simulate_truth(adata: ad.AnnData) -> np.ndarray:
    """log2(rho_type0 / rho_type1), from ``simulate``'s own draws (checked against varm)."""
    p = adata.uns["simulation"]
    n_genes = adata.n_vars
    rng = np.random.default_rng(p["seed"])
    base = rng.normal(0.0, 1.5, n_genes)
    lfc = np.zeros((n_genes, p["n_cell_types"]))
    n_de = int(round(p["de_fraction"] * n_genes))
    for t in range(p["n_cell_types"]):
        genes = rng.choice(n_genes, size=n_de, replace=False)
        lfc[genes, t] = rng.choice([-1.0, 1.0], size=n_de) * p["de_log_fold_change"]
    if not np.array_equal(lfc, adata.varm["log_fold_change"]):
        raise RuntimeError("simulate() draws differently than this script assumes.")
    rho = [np.exp(base + lfc[:, t]) for t in (0, 1)]
    return np.log2(rho[0] / rho[0].sum()) - np.log2(rho[1] / rho[1].sum())


def add_comparisons(adata: ad.AnnData, key: str, sizes: list[int | None], seed: int) -> None:
    """obs columns ``cmp_n<size>``: ``size`` cells drawn from each of groups A and B."""
    rng = np.random.default_rng(seed)
    groups = adata.obs[key].astype(str).to_numpy()
    for size in sizes:
        col = np.full(adata.n_obs, "", dtype=object)
        for g in ("A", "B"):
            cells = np.flatnonzero(groups == g)
            take = cells if size is None or size >= cells.size else rng.choice(cells, size, False)
            col[take] = g
        adata.obs[f"cmp_n{'all' if size is None else size}"] = pd.Categorical(col)


def make_simulated(effect: float, rep: int, args: argparse.Namespace) -> tuple[ad.AnnData, dict]:
    seed = 1000 * rep + int(round(100 * effect))
    adata = scvae.data.simulate(
        args.sim_cells,
        args.sim_genes,
        n_cell_types=2,
        de_fraction=0.1,
        de_log_fold_change=effect,
        seed=seed,
    )
    true = simulate_truth(adata)
    adata.obs["group"] = adata.obs["cell_type"].map({"type0": "A", "type1": "B"}).astype(str)
    add_comparisons(adata, "group", [50, 200, None], seed)
    effect_class = np.where(np.abs(true) >= args.delta, f"{effect / np.log(2):.1f}", "null")
    return adata, {"true_log2fc": true, "effect_class": effect_class, "seed": seed}


def pbmc_hvg(path: Path) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", subset=True)
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def make_thinned(pbmc: ad.AnnData, rep: int, args: argparse.Namespace) -> tuple[ad.AnnData, dict]:
    """The cells of one type, split in halves, 60 genes thinned: the model sees only them."""
    adata = scvae.data.binomial_thinning(
        pbmc,
        cell_type=args.thin_type,
        n_de_genes=60,
        log2_fold_changes=(0.5, 1.0, 2.0),
        seed=rep,
    )
    add_comparisons(adata, "group", [50, None], rep)
    true = adata.var["log2_fold_change"].to_numpy()
    f = np.minimum(adata.var["thinning_factor_A"], adata.var["thinning_factor_B"]).to_numpy()
    effect_class = np.where(f < 1, np.char.mod("%.1f", -np.log2(f)), "null")
    return adata, {"true_log2fc": true, "effect_class": effect_class, "seed": rep}


def make_null(pbmc: ad.AnnData) -> tuple[ad.AnnData, dict]:
    adata = pbmc.copy()
    rng = np.random.default_rng(7)
    counts = adata.obs["cell_type"].value_counts()
    for cell_type in counts.index[counts >= 150]:
        col = np.full(adata.n_obs, "", dtype=object)
        cells = rng.permutation(np.flatnonzero(adata.obs["cell_type"] == cell_type))
        col[cells[: cells.size // 2]] = "A"
        col[cells[cells.size // 2 :]] = "B"
        adata.obs[f"cmp_{str(cell_type).replace(' ', '_')}"] = pd.Categorical(col)
    true = np.zeros(adata.n_vars)
    return adata, {"true_log2fc": true, "effect_class": np.full(adata.n_vars, "null"), "seed": 0}


# ----------------------------------------------------------------------------- methods
def run_worker(tool: str, python: str, h5ad: Path, out: Path, args, seed: int, epochs: int):
    if out.exists():
        return json.loads(out.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": "1"}
    cmd = [
        python,
        str(HERE / WORKERS[tool]),
        str(h5ad),
        str(out),
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--kl-warmup",
        str(max(1, epochs // 2)),
        "--delta",
        str(args.delta),
        "--n-samples",
        str(args.n_samples),
    ]
    if tool == "scvae":
        cmd += ["--extra-modes", "group"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} on {h5ad.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def wilcoxon(adata: ad.AnnData, col: str) -> dict[str, np.ndarray]:
    sub = adata[adata.obs[col].isin(["A", "B"])].copy()
    sub.obs[col] = sub.obs[col].astype(str)
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    sc.tl.rank_genes_groups(sub, col, groups=["A"], reference="B", method="wilcoxon")
    df = sc.get.rank_genes_groups_df(sub, "A").set_index("names").loc[adata.var_names]
    return {"score": np.abs(df["scores"].to_numpy()), "padj": df["pvals_adj"].to_numpy()}


def evaluate(truth: dict, method: str, score: np.ndarray, calls: dict[float, np.ndarray]) -> dict:
    is_de = truth["effect_class"] != "null"
    row: dict = {"method": method, "n_true": int(is_de.sum())}
    row["auprc"] = float(average_precision_score(is_de, score)) if 0 < is_de.sum() else np.nan
    for t, called in calls.items():
        n = int(called.sum())
        row[f"called_{t}"] = n
        row[f"fdp_{t}"] = float((~is_de[called]).sum() / n) if n else 0.0
        row[f"power_{t}"] = float(is_de[called].sum() / is_de.sum()) if is_de.any() else np.nan
        for cls in sorted(set(truth["effect_class"]) - {"null"}):
            sel = truth["effect_class"] == cls
            row[f"power_{t}_lfc{cls}"] = float(called[sel].mean())
    return row


def analyse(name: str, kind: str, adata: ad.AnnData, truth: dict, args, epochs: int) -> list:
    h5ad = args.work / f"{name}.h5ad"
    if not h5ad.exists():
        adata.write_h5ad(h5ad)
    seed = int(truth["seed"])
    jobs = {
        "scvae": (sys.executable, args.work / f"{name}.scvae.json"),
        "scvi-tools": (args.scvi_python, args.work / f"{name}.scvi.json"),
    }
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {
            tool: pool.submit(run_worker, tool, py, h5ad, out, args, seed, epochs)
            for tool, (py, out) in jobs.items()
        }
        results = {tool: f.result() for tool, f in futures.items()}
    rows = []
    for col in [c for c in adata.obs.columns if c.startswith("cmp_")]:
        base = {"kind": kind, "dataset": name, "comparison": col, "seed": seed}
        base["n_cells_per_group"] = int((adata.obs[col] == "A").sum())
        runs = [(tool, res, res["comparisons"][col]) for tool, res in results.items()]
        group = results["scvae"]["comparisons_group"][col]
        runs.insert(1, ("scvae (group)", results["scvae"], group))
        for tool, res, cmp_ in runs:
            proba = np.asarray(cmp_["proba_de"])
            calls = {t: fdr_calls(proba, t) for t in TARGETS}
            own = np.asarray(cmp_["is_de_fdr_0_05"])
            row = {**base, **evaluate(truth, tool, proba, calls)}
            row["own_calls_agree_0.05"] = bool((own == calls[0.05]).mean() > 0.99)
            row["de_seconds"] = cmp_["seconds"]
            row["train_seconds"] = res["train_seconds"]
            rows.append(row)
        w = wilcoxon(adata, col)
        calls = {t: np.nan_to_num(w["padj"], nan=1.0) < t for t in TARGETS}
        rows.append({**base, **evaluate(truth, "wilcoxon", w["score"], calls)})
    print(f"{name}: done at {time.strftime('%H:%M:%S')}", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table (no tabulate dependency); floats with 3 decimals."""

    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float | np.floating) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def summarise(rows: pd.DataFrame) -> str:
    lines = []
    signal = rows[rows["kind"] != "null"]
    group = ["kind", "comparison", "method"]
    cols = {f"fdp_{t}": "mean" for t in TARGETS} | {f"power_{t}": "mean" for t in TARGETS}
    cols |= {"auprc": "mean", "dataset": "nunique", "n_cells_per_group": "median"}
    table = signal.groupby(group, sort=False).agg(cols).reset_index()
    table = table.rename(columns={"dataset": "replicates", "n_cells_per_group": "cells/group"})
    table["cells/group"] = table["cells/group"].round().astype(int)
    lines.append("### Observed FDP and power (mean over replicate data sets), AUPRC\n")
    lines.append(to_markdown(table))
    effect_cols = sorted(c for c in rows.columns if c.startswith("power_0.05_lfc"))
    if effect_cols:
        lines.append("\n### Power at 0.05 by true effect (log2; empty: no such genes)\n")
        by = signal.groupby(["kind", "comparison", "method"], sort=False)[effect_cols].mean()
        by = by.astype(object).where(by.notna(), "")
        lines.append(to_markdown(by.reset_index()))
    null = rows[rows["kind"] == "null"]
    if len(null):
        lines.append("\n### Real-data null (pbmc3k types split in random halves): genes called\n")
        pivot = null.pivot_table(index="comparison", columns="method", values="called_0.05")
        lines.append("At fdr_target / BH 0.05:\n")
        lines.append(to_markdown(pivot.reset_index()))
    return "\n".join(lines)


def plot(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signal = rows[rows["kind"] != "null"]
    kinds = list(dict.fromkeys(signal["kind"]))
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8), squeeze=False)
    for j, kind in enumerate(kinds):
        part = signal[signal["kind"] == kind]
        for method, sub in part.groupby("method"):
            fdp = [sub[f"fdp_{t}"].mean() for t in TARGETS]
            power = [sub[f"power_{t}"].mean() for t in TARGETS]
            axes[0, j].plot(TARGETS, fdp, "o-", label=method)
            axes[1, j].plot(TARGETS, power, "o-", label=method)
        axes[0, j].plot([0, 0.1], [0, 0.1], "k--", lw=0.8, label="FDP = target")
        axes[0, j].set(title=f"{kind}: observed FDP", xlabel="FDR target", ylabel="mean FDP")
        axes[1, j].set(title=f"{kind}: power", xlabel="FDR target", ylabel="mean power")
        axes[0, j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/scvae_de_calibration"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--replicates", type=int, default=5)
    p.add_argument("--effects", type=float, nargs="+", default=[0.35, 0.7])
    p.add_argument("--sim-cells", type=int, default=1500)
    p.add_argument("--sim-genes", type=int, default=1000)
    p.add_argument("--sim-epochs", type=int, default=100)
    p.add_argument("--thin-epochs", type=int, default=200)
    p.add_argument("--null-epochs", type=int, default=100)
    p.add_argument("--thin-type", default="Naive CD4 T")
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2, help="workers at once (scvae, scvi-tools)")
    p.add_argument("--skip", nargs="*", default=[], choices=["simulate", "thinning", "null"])
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if "simulate" not in args.skip:
        for effect in args.effects:
            for rep in range(args.replicates):
                adata, truth = make_simulated(effect, rep, args)
                name = f"sim_e{effect}_r{rep}"
                rows += analyse(name, "simulate", adata, truth, args, args.sim_epochs)
    pbmc_path = args.data_dir / "pbmc3k_seurat.h5ad"
    if pbmc_path.exists() and not {"thinning", "null"} <= set(args.skip):
        pbmc = pbmc_hvg(pbmc_path)
        if "thinning" not in args.skip:
            for rep in range(args.replicates):
                adata, truth = make_thinned(pbmc, rep, args)
                rows += analyse(f"thin_r{rep}", "thinning", adata, truth, args, args.thin_epochs)
        if "null" not in args.skip:
            adata, truth = make_null(pbmc)
            rows += analyse("null_pbmc3k", "null", adata, truth, args, args.null_epochs)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "de_calibration.csv", index=False)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "de_calibration.json").write_text(
        json.dumps({"settings": settings, "rows": table.to_dict(orient="records")}, indent=1)
    )
    report = summarise(table)
    (args.out / "de_calibration.md").write_text(
        f"# DE calibration\n\nSettings: {json.dumps(settings)}\n\n{report}\n"
    )
    plot(table, args.out / "de_calibration.png")
    print(report)


if __name__ == "__main__":
    main()
