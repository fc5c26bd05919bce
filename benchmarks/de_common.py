"""What the two DE workers share: command line, data loading, peak memory, result files.

``de_worker_scvae.py`` (project environment) and ``de_worker_scvi.py`` (scvi-tools'
environment) import it, so it needs only the standard library, numpy and anndata (both
environments have them).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from _common import peak_rss_mib, rss_mib


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak resident memory during a ``with`` block, in MiB above the RSS at its start.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) where allowed and also
    samples the RSS every 20 ms, reporting the larger of the two readings.
    """

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _status_mib("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status_mib("VmRSS"))
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_mib("VmHWM") if self.reset else 0.0
        self.peak = max(self.sampled, hwm)
        self.above_start = self.peak - self.start


def worker_args() -> argparse.Namespace:
    """The command line both DE workers take."""
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--kl-warmup", type=int, required=True)
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mode", default="change")
    p.add_argument(
        "--extra-modes",
        nargs="*",
        default=[],
        help="scvae only: more modes on the same trained model, stored as comparisons_<mode>",
    )
    p.add_argument("--groupby", help="one-vs-rest over this column: time and memory only")
    p.add_argument(
        "--train-cells",
        type=int,
        default=0,
        help="train on the first N cells only (0: all); DE still runs on every cell",
    )
    return p.parse_args()


def read_data(a: argparse.Namespace) -> tuple[ad.AnnData, ad.AnnData]:
    """All cells, and the cells to train on (the first ``--train-cells``; all by default)."""
    full = ad.read_h5ad(a.h5ad)
    if 0 < a.train_cells < full.n_obs:
        return full, full[: a.train_cells].copy()
    return full, full


def comparisons(adata: ad.AnnData) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(column, cells A, cells B)`` for each ``cmp_*`` column of ``obs``."""
    for col in [c for c in adata.obs.columns if c.startswith("cmp_")]:
        values = adata.obs[col].astype(str).to_numpy()
        yield col, values == "A", values == "B"


def per_gene(res: Any, var_names: Any, mode: str, seconds: float) -> dict:
    """The per-gene columns the calibration benchmark reads, in ``var`` order."""
    res = res.loc[var_names]
    row: dict = {"seconds": seconds}
    if mode in ("change", "group"):
        row.update(
            proba_de=res["proba_de"].tolist(),
            lfc_mean=res["lfc_mean"].tolist(),
            is_de_fdr_0_05=res["is_de_fdr_0.05"].astype(bool).tolist(),
        )
    else:
        row.update(bayes_factor=res["bayes_factor"].tolist())
    return row


def time_one_vs_rest(
    run: Callable[[], Any], adata: ad.AnnData, head: dict, after_training: float
) -> dict:
    """Time ``run()`` (the one-vs-rest call) and read its peak memory above the trained model."""
    import gc

    gc.collect()
    with PeakMemory() as mem:
        start = time.perf_counter()
        res = run()
        seconds = time.perf_counter() - start
    return {
        **head,
        "rss_after_training_mib": after_training,
        "de_seconds": seconds,
        "de_peak_rss_mib": mem.peak,
        "de_peak_above_trained_model_mib": mem.above_start,
        "n_rows": len(res),
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
    }


def write(path: str, result: dict) -> None:
    """Write one worker's result (adds the process's peak RSS)."""
    result.setdefault("peak_rss_mib", peak_rss_mib())
    Path(path).write_text(json.dumps(result))


def run_and_write(a: argparse.Namespace, full: ad.AnnData, head: dict, de: Callable) -> None:
    """Both workers' job after training, written to ``a.out``.

    ``de(adata, **options)`` is the tool's ``model.differential_expression`` with its own
    extra options bound (scvae's seed, scvi-tools' silent). With ``--groupby``: one-vs-rest
    timed with its peak memory; otherwise one call per ``cmp_*`` column and mode (``--mode``,
    then each of ``--extra-modes``, stored as ``comparisons_<mode>``), per-gene arrays.
    """
    if a.groupby:
        run = lambda: de(full, groupby=a.groupby, mode=a.mode, n_samples_overall=a.n_samples)  # noqa: E731
        write(a.out, time_one_vs_rest(run, full, head, rss_mib()))
        return
    out = {**head, "rss_after_training_mib": rss_mib()}
    for mode in [a.mode, *a.extra_modes]:
        results = {}
        for col, cells_a, cells_b in comparisons(full):
            start = time.perf_counter()
            res = de(
                full,
                idx1=cells_a,
                idx2=cells_b,
                mode=mode,
                delta=a.delta,
                fdr_target=0.05,
                n_samples_overall=a.n_samples,
            )
            results[col] = per_gene(res, full.var_names, mode, time.perf_counter() - start)
        out["comparisons" if mode == a.mode else f"comparisons_{mode}"] = results
    write(a.out, out)
