"""How far the models' log fold changes fall below the truth (why change mode calls few genes).

Reads what de_calibration.py left in its work folder (the simulated h5ad files and both
workers' per-gene ``lfc_mean`` and ``proba_de``, all cells per group; scvae's change and group
modes) and reports, per true
effect (log2) and tool: the mean true |log2 ratio| of the DE genes, the mean model
``|lfc_mean|`` (sign-aligned with the truth), the share of those genes whose model LFC is below
delta (0.25) or below 2 * delta, and the mean ``proba_de``. Writes
``results/de_shrinkage.{md,json}``.

Run from the repository root after de_calibration.py::

    python benchmarks/de_shrinkage.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from de_calibration import simulate_truth, to_markdown  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/scvae_de_calibration"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--comparison", default="cmp_nall")
    a = p.parse_args()
    rows = []
    for h5ad in sorted(a.work.glob("sim_e*_r*.h5ad")):
        adata = ad.read_h5ad(h5ad)
        true = simulate_truth(adata)
        effect = adata.uns["simulation"]["de_log_fold_change"] / np.log(2)
        is_de = np.abs(true) >= a.delta
        runs = (
            ("scvae", "scvae", "comparisons"),
            ("scvae (group)", "scvae", "comparisons_group"),
            ("scvi-tools", "scvi", "comparisons"),
        )
        for tool, suffix, key in runs:
            path = h5ad.with_suffix(f".{suffix}.json")
            result = json.loads(path.read_text()) if path.exists() else {}
            if key not in result:
                continue
            cmp_ = result[key][a.comparison]
            lfc = np.asarray(cmp_["lfc_mean"]) * np.sign(true)  # > 0: the true direction
            proba = np.asarray(cmp_["proba_de"])
            rows.append(
                {
                    "true effect (log2)": round(effect, 2),
                    "tool": tool,
                    "dataset": h5ad.stem,
                    "true |lfc|": float(np.abs(true[is_de]).mean()),
                    "model lfc": float(lfc[is_de].mean()),
                    "share < delta": float((lfc[is_de] < a.delta).mean()),
                    "share < 2 delta": float((lfc[is_de] < 2 * a.delta).mean()),
                    "proba_de (DE genes)": float(proba[is_de].mean()),
                    "proba_de (null genes)": float(proba[~is_de].mean()),
                }
            )
    table = pd.DataFrame(rows)
    summary = (
        table.drop(columns="dataset")
        .groupby(["true effect (log2)", "tool"], sort=True)
        .mean()
        .reset_index()
    )
    summary.insert(2, "datasets", table.groupby(["true effect (log2)", "tool"]).size().to_numpy())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "de_shrinkage.json").write_text(json.dumps(rows, indent=1))
    text = (
        "# Model log fold changes against the truth (simulate, all cells per group)\n\n"
        f"Comparison {a.comparison}, delta {a.delta}; mean over replicate data sets.\n\n"
        + to_markdown(summary)
        + "\n"
    )
    (a.out / "de_shrinkage.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
