"""Reference mapping and label transfer on cellbench_lung_celllines, against three baselines.

Reference: the three CEL-seq2 plates with five cell lines (``celseq2_5cl_p1..p3``). Query: the
Drop-seq batch and the CEL-seq2 batch with three cell lines (``dropseq_3cl``,
``celseq2_3cl``), so the query holds a protocol the reference never saw and only three of the
reference's five cell lines. 2,000 HVGs are chosen on the reference alone (scanpy's seurat_v3,
batch-aware); the query keeps all its genes and each tool aligns it with its own
``prepare_query_anndata``.

``--split novel`` is a harder split: reference = the two 3-line batches (``celseq2_3cl``,
``dropseq_3cl``: H1975, H2228, HCC827, both protocols), query = the three 5-line CEL-seq2
plates, whose A549 and H838 cells belong to no reference type. Those cells can only be called
wrong, so the question is whether the uncertainty flags them (``auroc_uncertainty_novel``:
novel-type cells against the others), besides accuracy on the shared types.

Methods (all with scvi-tools' scArches architecture: ``encode_covariates=True``, layer norm,
no batch norm, 2 layers, dropout 0.2):

* ``scvae``: scvae's ``load_query_data`` on the saved reference, query trained alone;
* ``scvi-tools``: scvi-tools' ``load_query_data`` on its own reference trained the same way;
* ``de novo``: one scvae model trained on reference + query;
* ``no surgery``: the scvae reference model applied to the query as it is (each query cell
  encoded under every reference batch, latents averaged).

Scores: label transfer from the reference cells to the query cells (``transfer_labels``,
15 neighbours): accuracy (overall and per query batch), the uncertainty's calibration
(expected calibration error of the confidence ``1 - uncertainty`` over 10 bins, and the AUROC
of the uncertainty for telling wrong calls from right ones), and query-reference mixing in
the joint latent (iLISI with reference/query as the two groups, and the scIB scores with the
five batches and the cell lines).

Run from the repository root::

    .venv/bin/python benchmarks/mapping.py --scvi-python benchmarks/.scvi-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import (  # noqa: E402
    add_scvae_kl_warmup,
    scvae_kl_warmup_note,
    worker_kl_warmup,
)

from scvae.integration import ilisi, integration_scores  # noqa: E402
from scvae.label_transfer import transfer_labels  # noqa: E402

SPLITS = {  # split -> reference batches (the query is every other batch)
    "issue": ["celseq2_5cl_p1", "celseq2_5cl_p2", "celseq2_5cl_p3"],
    # harder: a 3-line reference, a query with two cell lines the reference never saw
    "novel": ["celseq2_3cl", "dropseq_3cl"],
}
WORKERS = {"scvae": "_run_mapping_scvae.py", "scvi-tools": "_run_mapping_scvi.py"}
METHODS = {  # method -> (worker, latent prefix)
    "scvae": ("scvae", "surgery"),
    "scvi-tools": ("scvi-tools", "surgery"),
    "de novo": ("scvae", "denovo"),
    "no surgery": ("scvae", "nosurgery"),
}


def _clean(adata: ad.AnnData) -> ad.AnnData:
    for key in ("batch", "cell_type"):  # drop categories of the other side
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    return adata


def prepare(path: Path, n_hvg: int, reference_batches: list[str], tmp: Path) -> tuple[Path, Path]:
    adata = ad.read_h5ad(path)
    is_ref = adata.obs["batch"].isin(reference_batches).to_numpy()
    ref = _clean(adata[is_ref].copy())
    sc.pp.highly_variable_genes(
        ref, n_top_genes=n_hvg, flavor="seurat_v3", batch_key="batch", subset=True
    )
    ref = ref[np.asarray(ref.X.sum(1)).ravel() > 0].copy()
    query = _clean(adata[~is_ref].copy())
    on_hvg = np.asarray(query[:, ref.var_names].X.sum(1)).ravel() > 0
    query = query[on_hvg].copy()
    ref.write_h5ad(tmp / "reference.h5ad")
    query.write_h5ad(tmp / "query.h5ad")
    return tmp / "reference.h5ad", tmp / "query.h5ad"


def run_worker(tool: str, python: str, files: tuple[Path, Path], out: Path, args, seed: int):
    cmd = [python, str(HERE / WORKERS[tool]), str(files[0]), str(files[1]), str(out)]
    cmd += ["--seed", str(seed), "--epochs", str(args.epochs)]
    cmd += ["--query-epochs", str(args.query_epochs)]
    cmd += worker_kl_warmup(tool, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} seed {seed} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["latents"] = dict(np.load(out.with_suffix(".npz")))
    return result


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: sum over confidence bins of |accuracy - confidence| x share."""
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in np.unique(bins):
        sel = bins == b
        error += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(error)


def evaluate(ref: ad.AnnData, query: ad.AnnData, z_ref, z_query, seed: int) -> dict[str, float]:
    ref.obsm["X_eval"], query.obsm["X_eval"] = z_ref, z_query
    pred = transfer_labels(ref, query, "cell_type", use_rep="X_eval")
    truth = query.obs["cell_type"].astype(str).to_numpy()
    correct = pred["cell_type"].astype(str).to_numpy() == truth
    uncertainty = pred["uncertainty"].to_numpy()
    out = {
        "accuracy": float(correct.mean()),
        "mean_uncertainty": float(uncertainty.mean()),
        "uncertainty_right": float(uncertainty[correct].mean()),
        "uncertainty_wrong": float(uncertainty[~correct].mean()) if (~correct).any() else np.nan,
        "calibration_error": calibration_error(1.0 - uncertainty, correct),
        "auroc_uncertainty_wrong": (
            float(roc_auc_score(~correct, uncertainty))
            if 0 < correct.sum() < len(correct)
            else np.nan
        ),
    }
    for batch in sorted(query.obs["batch"].unique()):
        sel = (query.obs["batch"] == batch).to_numpy()
        out[f"accuracy_{batch}"] = float(correct[sel].mean())
    novel = ~np.isin(truth, ref.obs["cell_type"].astype(str).unique())
    if novel.any():  # cell types the reference never saw: they can only be called wrong
        out["accuracy_shared_types"] = float(correct[~novel].mean())
        out["uncertainty_novel_types"] = float(uncertainty[novel].mean())
        out["auroc_uncertainty_novel"] = float(roc_auc_score(novel, uncertainty))
    joint = ad.concat([ref, query], index_unique="-")
    joint.obsm["X_eval"] = np.concatenate([z_ref, z_query])
    side = ["reference"] * ref.n_obs + ["query"] * query.n_obs
    out["ilisi_reference_query"] = ilisi(joint.obsm["X_eval"], side)
    scores = integration_scores(
        joint, batch_key="batch", labels_key="cell_type", use_rep="X_eval", seed=seed
    )
    out.update({f"joint_{k}": v for k, v in scores.items() if k != "leiden_resolution"})
    return out


JOINT = ["joint_ilisi", "joint_silhouette_batch", "joint_bio_conservation"]
JOINT += ["joint_batch_correction", "joint_total"]


def markdown(summary: dict, info: str, split: str) -> str:
    methods = list(METHODS)
    keys = [k for k in summary["scvae"] if not k.startswith("joint_")] + JOINT
    lines = [
        f"### Reference mapping, cellbench_lung_celllines, split {split!r}",
        "",
        info,
        "",
        "| measure | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key in keys:
        cells = []
        for m in methods:
            s = summary[m].get(key)
            cells.append("" if s is None else f"{s['mean']:.3f} ± {s['sd']:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=HERE.parents[1] / "shared" / "data" / "cellbench_lung_celllines.h5ad",
    )
    p.add_argument("--split", choices=list(SPLITS), default="issue")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--query-epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--scvi-python", type=os.path.abspath, default=str(HERE / ".scvi-venv" / "bin" / "python")
    )
    add_scvae_kl_warmup(p)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} not found; pass --data")
    args.out.mkdir(parents=True, exist_ok=True)
    pythons = {"scvae": sys.executable, "scvi-tools": args.scvi_python}
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    extra: dict[str, list] = {"seconds": [], "reference_files_unchanged": []}
    with tempfile.TemporaryDirectory() as tmp:
        reference_batches = SPLITS[args.split]
        files = prepare(args.data, args.n_hvg, reference_batches, Path(tmp))
        ref, query = ad.read_h5ad(files[0]), ad.read_h5ad(files[1])
        info = (
            f"reference {ref.n_obs} cells ({', '.join(reference_batches)}), query {query.n_obs} "
            f"cells ({', '.join(sorted(query.obs['batch'].unique()))}), {ref.n_vars} HVGs; "
            f"reference and de novo {args.epochs} epochs, query {args.query_epochs} epochs; "
            f"seeds {args.seeds}" + scvae_kl_warmup_note(args)
        )
        print(info, flush=True)
        for i, seed in enumerate(args.seeds):
            order = ["scvae", "scvi-tools"] if i % 2 == 0 else ["scvi-tools", "scvae"]
            runs = {}
            for tool in order:
                out = Path(tmp) / f"{tool}_{seed}.json"
                runs[tool] = run_worker(tool, pythons[tool], files, out, args, seed)
                extra["seconds"].append({"tool": tool, "seed": seed, **runs[tool]["seconds"]})
            extra["reference_files_unchanged"].append(runs["scvae"]["reference_files_unchanged"])
            for method, (tool, prefix) in METHODS.items():
                z = runs[tool]["latents"]
                scores = evaluate(ref, query, z[f"{prefix}_reference"], z[f"{prefix}_query"], seed)
                results[method].append(scores)
                line = f"  seed {seed} {method}: accuracy {scores['accuracy']:.3f}, "
                line += f"iLISI ref/query {scores['ilisi_reference_query']:.3f}, "
                print(line + f"joint total {scores['joint_total']:.3f}", flush=True)
    summary: dict = {}
    for method, runs in results.items():
        summary[method] = {}
        for key in runs[0]:
            values = [float(r[key]) for r in runs]
            finite = [v for v in values if np.isfinite(v)]
            summary[method][key] = {
                "mean": float(np.mean(finite)) if finite else float("nan"),
                "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
                "values": values,
            }
    summary.update(extra)
    summary["setup"] = {
        "description": info,
        **{k: str(v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    name = "mapping_cellbench_lung" + ("" if args.split == "issue" else f"_{args.split}")
    name += args.tag
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary, info, args.split)
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
