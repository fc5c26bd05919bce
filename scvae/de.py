"""Differential expression: scVI's Bayesian test (as in scvi-tools), in bounded memory.

Arrays only (numpy and scipy; no AnnData): :meth:`scvae.SCVAE.differential_expression` turns
an AnnData into the cell sets and an expression function, and :func:`run` does the rest.

The test compares rho, the normalised expression of cells drawn from two groups. For each
comparison, cells are sampled first (with replacement, ``n_samples`` per group, split evenly
over the batches when the expression is batch-corrected), then one posterior sample of rho is
drawn for each sampled cell, and the i-th sample of group 1 is paired with the i-th of group 2
(under the same batch). Only the sampled cells are ever decoded, so memory is
O(samples x genes), whatever the number of cells. scvi-tools decodes every cell of each group
(``n_samples // n_cells + 1`` times) before it subsamples, a dense cells x genes array.

``mode="vanilla"`` (Lopez et al. 2018): ``proba_m1 = P(rho1 > rho2)``, ``proba_m2 = 1 -
proba_m1``, ``bayes_factor = log(proba_m1 + 1e-8) - log(proba_m2 + 1e-8)``.

``mode="change"`` (Boyeau et al. 2019): ``lfc = log2(rho1 + c) - log2(rho2 + c)`` per pair,
with the pseudocount ``c`` estimated from genes that are nearly unexpressed in the raw counts
(:func:`estimate_pseudocounts`) unless given; ``proba_de = max(P(lfc >= delta), P(lfc <=
-delta))`` (``test_mode="three"``) or ``P(|lfc| >= delta)`` (``"two"``); the ``lfc_*`` summaries
use ``1e-3 * c`` so that they estimate the log fold change itself, as scvi-tools does. Genes are
called DE by the posterior expected FDR (:func:`fdr_calls`). The test gives no p-values.

``mode="group"`` (scvae's own) compares the groups' mean expression instead of pairs of cells:
each side is subsampled to at most ``n_samples`` cells without replacement and handed to
:mod:`scvae.de_group` (:func:`compare_groups`); its ``proba_de`` and FDR calls have the same
form as change mode's.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> s1 = rng.dirichlet(np.ones(5), size=200).astype(np.float32)
>>> s2 = s1[:, ::-1].copy()
>>> vanilla_statistics(s1, s2)["proba_m1"].shape
(5,)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvae import _checks
from scvae.de_group import (
    EPS,
    GroupInputs,
    check_test_options,
    estimate_delta,
    fit_group,
    group_statistics,
    proba_columns,
)

# Genes per block when per-pair statistics are computed (bounds the temporaries).
_GENE_BLOCK = 256
# Cells per block when count statistics are accumulated from the CSR matrix.
_CELL_BLOCK = 8192

MODES = ("vanilla", "change", "group")

Selection = np.ndarray | Sequence[int] | Sequence[bool]
ExpressionFn = Callable[[np.ndarray, int | None], np.ndarray]
GroupInputsFn = Callable[[np.ndarray], GroupInputs]


@dataclass(frozen=True)
class Comparison:
    """Two cell sets (indices into the cells) and their names.

    The second set is either given, or (``given2=None``) all other cells of ``n_obs``, built
    when asked for: one-vs-rest over many groups does not hold every group's rest at once.

    Examples
    --------
    >>> Comparison("B", "Rest", np.array([0, 1]), np.array([2])).label
    'B vs Rest'
    >>> Comparison("B", "Rest", np.array([0, 1]), None, n_obs=4).cells2
    array([2, 3])
    """

    name1: str
    name2: str
    cells1: np.ndarray
    given2: np.ndarray | None
    # the groups' labels as the groupby column holds them (e.g. integers), for the group1 and
    # group2 columns; None: the names
    value1: Any = None
    value2: Any = None
    n_obs: int | None = None

    def __post_init__(self) -> None:
        if self.given2 is None and self.n_obs is None:
            raise ValueError("A comparison with the rest of the cells needs n_obs.")

    @property
    def cells2(self) -> np.ndarray:
        """The second cell set (sorted, for the rest)."""
        if self.given2 is not None:
            return self.given2
        rest = np.ones(self.n_obs, dtype=bool)
        rest[self.cells1] = False
        return np.flatnonzero(rest)

    @property
    def label(self) -> str:
        """``"A vs B"`` (or ``"A vs Rest"``), the ``comparison`` column."""
        return f"{self.name1} vs {self.name2}"


def as_indices(selection: Selection, n_obs: int, what: str) -> np.ndarray:
    """Sorted unique cell indices from a boolean mask or a list of integer indices.

    Negative positions count from the end, as in numpy, scvi-tools and scvae's queries
    (-1 is the last cell); the selection is flattened, as scvi-tools' DE does.

    Examples
    --------
    >>> as_indices([True, False, True], 3, "idx1")
    array([0, 2])
    >>> as_indices([2, 0, 2], 3, "idx1")
    array([0, 2])
    >>> as_indices([-1, 0], 3, "idx1")
    array([0, 2])
    """
    arr = np.asarray(selection).ravel()
    if arr.dtype == bool:
        if arr.size != n_obs:
            raise ValueError(f"{what} is a boolean mask of {arr.size} entries; expected {n_obs}.")
        return np.flatnonzero(arr)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a boolean mask or integer indices, got {arr.dtype}.")
    arr = np.unique(arr.astype(np.int64))
    if arr.size and (arr[0] < -n_obs or arr[-1] >= n_obs):
        raise IndexError(
            f"{what} must lie in [-{n_obs}, {n_obs}) (negative positions count from the end: "
            f"-1 is cell {n_obs - 1}); got {arr[0]}..{arr[-1]}."
        )
    return np.unique(np.where(arr < 0, arr + n_obs, arr))


#: One-vs-rest over a non-categorical integer column with more values than this is refused.
MAX_INTEGER_GROUPS = 100


def define_comparisons(
    n_obs: int,
    *,
    labels: pd.Series | np.ndarray | None = None,
    groupby: str = "groupby",
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: Selection | None = None,
    idx2: Selection | None = None,
) -> list[Comparison]:
    """The comparisons asked for, as cell index sets.

    ``idx1`` (with ``idx2``, or against all other cells) or ``labels``, not both (scvi-tools
    ignores the groups when given both; here that is an error, as is ``idx2`` alone); with
    labels, each of ``group1`` (None: every group, in category order) is compared with
    ``group2`` (None: all other cells, named "Rest").

    Examples
    --------
    >>> labels = np.array(["a", "b", "a", "c"])
    >>> [c.label for c in define_comparisons(4, labels=labels)]
    ['a vs Rest', 'b vs Rest', 'c vs Rest']
    >>> define_comparisons(4, labels=labels, group1="a", group2="c")[0].cells2
    array([3])
    """
    if idx1 is None and idx2 is not None:
        raise ValueError(
            "idx2 is the second cell set of an idx1 / idx2 comparison, but idx1 is not given: "
            "pass idx1= too, or compare groups with groupby= / group1= / group2=."
        )
    if idx1 is not None and (group1 is not None or group2 is not None or labels is not None):
        pairs = (("groupby", labels), ("group1", group1), ("group2", group2))
        given = [name for name, value in pairs if value is not None]
        raise ValueError(
            f"Pass either cell sets (idx1= / idx2=) or groups (groupby= / group1= / group2=), "
            f"not both: with idx1, {' and '.join(given)} would be ignored."
        )
    if idx1 is not None:
        cells1 = as_indices(idx1, n_obs, "idx1")
        if idx2 is None:
            cells2 = None  # the rest, built when needed
            name2 = "Rest"
        else:
            cells2 = as_indices(idx2, n_obs, "idx2")
            name2 = "group2"
            shared = np.intersect1d(cells1, cells2).size
            if shared == cells1.size == cells2.size and shared:
                raise ValueError(
                    "idx1 and idx2 are the same cells: a group cannot be compared with itself."
                )
            if shared:
                _checks.warn_user(
                    f"idx1 and idx2 share {shared} cells; they count in both groups.",
                )
        comps = [Comparison("group1", name2, cells1, cells2, n_obs=n_obs)]
    else:
        if labels is None:
            raise ValueError("Pass groupby= (a column of adata.obs) or idx1= (the cells).")
        series = pd.Series(np.asarray(labels)) if not isinstance(labels, pd.Series) else labels
        series = series.reset_index(drop=True)
        if series.dtype.kind == "f":
            raise ValueError(
                f"{groupby!r} holds continuous numbers (dtype {series.dtype}), not groups. Pass "
                "a column of groups (e.g. clusters); to use these values as groups, make them "
                f"categorical first: adata.obs[{groupby!r}] = adata.obs[{groupby!r}]"
                ".astype('category')."
            )
        # groups in category order (numbers in numeric order), as scvi-tools; each group's
        # label kept as the column holds it
        categories = series.astype("category").cat.categories
        n_values = series.nunique()
        if series.dtype.kind in "iu" and group1 is None and n_values > MAX_INTEGER_GROUPS:
            # cluster numbers are groups; a number per cell (its total counts) is not
            raise ValueError(
                f"{groupby!r} holds {n_values} different integers (dtype {series.dtype}): a "
                "number per cell, not groups, so one-vs-rest would make as many comparisons. "
                "Pass a column of groups (e.g. clusters); to use these values as groups, make "
                f"them categorical first: adata.obs[{groupby!r}] = adata.obs[{groupby!r}]"
                ".astype('category')."
            )
        present = set(series.dropna().astype(str))
        label_of = {str(c): c for c in categories if str(c) in present}
        known = list(label_of)
        values = series.astype(str).to_numpy()
        if group1 is None:
            if len(known) < 2:
                raise ValueError(
                    f"{groupby!r} has {len(known)} group(s); one-vs-rest needs at least two."
                )
            # every group, against the rest or against group2 (group2 itself left out)
            groups = [g for g in known if group2 is None or g != str(group2)]
        elif isinstance(group1, str) or not isinstance(group1, Iterable):
            groups = [str(group1)]  # one group, by name or by an integer label
        else:
            groups = list(dict.fromkeys(str(g) for g in group1))  # each group once
            if not groups:
                raise ValueError(
                    "group1 is an empty list: pass a group, a list of groups, or None for "
                    "every group against the rest."
                )
        for g in [*groups, *([] if group2 is None else [group2])]:
            if str(g) not in known:
                raise ValueError(f"Group {g!r} is not in {groupby!r} (groups: {known}).")
        if group2 is not None and str(group2) in groups:
            raise ValueError(
                f"group1 and group2 are both {str(group2)!r}: a group cannot be compared with "
                "itself. Pass two different groups, or group2=None for the rest of the cells."
            )
        comps = []
        for g in groups:
            cells1 = np.flatnonzero(values == str(g))
            # the rest (every other cell, unlabelled ones too) is built when needed
            cells2 = None if group2 is None else np.flatnonzero(values == str(group2))
            name2 = "Rest" if group2 is None else str(group2)
            value2 = "Rest" if group2 is None else label_of[str(group2)]
            comps.append(
                Comparison(str(g), name2, cells1, cells2, label_of[str(g)], value2, n_obs=n_obs)
            )
    for c in comps:
        n2 = c.n_obs - c.cells1.size if c.given2 is None else c.given2.size
        for name, size in ((c.name1, c.cells1.size), (c.name2, n2)):
            if size == 0:
                raise ValueError(f"Comparison {c.label!r}: {name!r} has no cells.")
    return comps


def sample_pairs(
    cells1: np.ndarray,
    cells2: np.ndarray,
    n_samples: int,
    n_batches: int,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cells drawn with replacement: ``n_samples // n_batches`` per group, for each batch.

    The i-th cell of group 1 is paired with the i-th of group 2 in each batch's draw.

    Examples
    --------
    >>> pairs = sample_pairs(np.arange(3), np.arange(3, 10), 100, 2, np.random.default_rng(0))
    >>> [(len(a), len(b)) for a, b in pairs]
    [(50, 50), (50, 50)]
    """
    if n_samples < 1:
        raise ValueError(f"n_samples_overall must be at least 1, got {n_samples}.")
    per_batch = max(1, n_samples // n_batches)
    return [
        (rng.choice(cells1, size=per_batch), rng.choice(cells2, size=per_batch))
        for _ in range(n_batches)
    ]


def count_statistics(
    counts: sp.spmatrix | Iterable[sp.spmatrix], comparisons: Sequence[Comparison]
) -> list[dict[str, np.ndarray]]:
    """Raw-count summaries of both sides of each comparison, in one pass over the cells.

    Per gene: ``raw_mean``, ``non_zeros_proportion`` and ``raw_normalized_mean`` (the mean of
    counts per 10,000 of the cell's total), suffixed 1 and 2 for the two sides.

    Parameters
    ----------
    counts
        Cells x genes counts: one sparse matrix, or its consecutive blocks of rows (in order),
        so that the caller need never hold all of it at once.
    comparisons
        The cell sets.

    Memory: one block of rows at a time, and that block's cells x (2 * comparisons) weights.

    Examples
    --------
    >>> x = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0]]))
    >>> st = count_statistics(x, [Comparison("a", "b", np.array([0, 1]), np.array([2]))])[0]
    >>> st["raw_mean1"].tolist(), st["non_zeros_proportion2"].tolist()
    ([2.0, 0.5], [0.0, 1.0])
    """
    if sp.issparse(counts):
        matrix = sp.csr_matrix(counts)
        counts = (matrix[s : s + _CELL_BLOCK] for s in range(0, matrix.shape[0], _CELL_BLOCK))
    # each side's sorted cells; None: the rest of the first side's comparison (its n_obs)
    sides = [
        _sorted_unique(cells) if cells is not None else None
        for c in comparisons
        for cells in (c.cells1, c.given2)
    ]
    n_obs = max(
        int(c.n_obs) if c.given2 is None else 1 + int(max(c.cells1.max(), c.given2.max()))
        for c in comparisons
    )
    sums = nonzero = normalised = None
    start = 0
    for raw in counts:
        block = sp.csr_matrix(raw)
        stop = start + block.shape[0]
        # this block's members of each side (sorted cells: a slice of each), never all cells'
        w = np.zeros((block.shape[0], len(sides)))
        for j, cells in enumerate(sides):
            if cells is None:  # the rest: this block's cells (below n_obs) not in side 1
                rest_of = comparisons[j // 2].n_obs
                w[: max(0, min(stop, rest_of) - start), j] = 1.0
                w[:, j] -= w[:, j - 1]
                continue
            lo, hi = np.searchsorted(cells, [start, stop])
            w[cells[lo:hi] - start, j] = 1.0
        start = stop
        totals = np.asarray(block.sum(axis=1)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros(totals.shape), where=totals > 0)
        ones = sp.csr_matrix((np.ones_like(block.data), block.indices, block.indptr), block.shape)
        parts = (block.T @ w, ones.T @ w, block.T @ (w * scale[:, None]))
        if sums is None:
            sums, nonzero, normalised = (np.asarray(p, dtype=np.float64) for p in parts)
        else:
            sums += parts[0]
            nonzero += parts[1]
            normalised += parts[2]
    if sums is None or start < n_obs:
        raise ValueError(f"The count blocks cover {start} cells; the comparisons need {n_obs}.")
    n = np.array(
        [
            cells.size if cells is not None else comparisons[j // 2].n_obs - sides[j - 1].size
            for j, cells in enumerate(sides)
        ],
        dtype=np.float64,
    )
    out = []
    for k in range(len(comparisons)):
        st = {}
        for name, values in (
            ("raw_mean", sums),
            ("non_zeros_proportion", nonzero),
            ("raw_normalized_mean", normalised),
        ):
            st[f"{name}1"] = values[:, 2 * k] / n[2 * k]
            st[f"{name}2"] = values[:, 2 * k + 1] / n[2 * k + 1]
        out.append(st)
    return out


def _sorted_unique(cells: np.ndarray) -> np.ndarray:
    """``cells`` itself when sorted without repeats (as comparisons hold them), else a copy."""
    cells = np.asarray(cells)
    return cells if bool(np.all(cells[1:] > cells[:-1])) else np.unique(cells)


def _blocks(n_genes: int) -> list[slice]:
    return [slice(s, min(s + _GENE_BLOCK, n_genes)) for s in range(0, n_genes, _GENE_BLOCK)]


def vanilla_statistics(s1: np.ndarray, s2: np.ndarray) -> dict[str, np.ndarray]:
    """``proba_m1 = P(rho1 > rho2)`` over paired samples, ``proba_m2`` and ``bayes_factor``.

    Parameters
    ----------
    s1, s2
        Paired samples of rho, ``(n_samples, n_genes)``.

    Examples
    --------
    >>> s1 = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    >>> vanilla_statistics(s1, s1[:, ::-1])["proba_m1"].tolist()
    [0.75, 0.25]
    """
    _check_pairs(s1, s2)
    p = np.empty(s1.shape[1])
    for b in _blocks(s1.shape[1]):
        p[b] = np.mean(s1[:, b] > s2[:, b], axis=0)
    return {
        "proba_m1": p,
        "proba_m2": 1.0 - p,
        "bayes_factor": np.log(p + EPS) - np.log(1.0 - p + EPS),
    }


def estimate_pseudocounts(
    s1: np.ndarray,
    s2: np.ndarray,
    where_zero1: np.ndarray,
    where_zero2: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """The pseudocount of change mode, from genes that are (nearly) unexpressed, as in scVI.

    For each group, the largest sampled rho of each gene whose raw mean count in that group
    is below the threshold (``where_zero``); the ``quantile`` of those over genes; the larger of
    the two groups' values, divided by the number of genes (at least 1e-10). It shrinks the
    log fold changes of genes that neither group expresses towards zero.

    Examples
    --------
    >>> s = np.full((4, 100), 1e-3)
    >>> zero = np.zeros(100, dtype=bool); zero[:10] = True
    >>> round(estimate_pseudocounts(s, s, zero, zero), 10)
    1e-05
    """
    _check_pairs(s1, s2)
    values = []
    for s, zero in ((s1, where_zero1), (s2, where_zero2)):
        zero = np.asarray(zero, dtype=bool)
        if zero.shape != (s.shape[1],):
            raise ValueError(f"where_zero has shape {zero.shape}; expected ({s.shape[1]},).")
        values.append(float(np.quantile(s[:, zero].max(axis=0), quantile)) if zero.any() else 1e-10)
    return max(1e-10, max(values) / s1.shape[1])


def change_statistics(
    s1: np.ndarray,
    s2: np.ndarray,
    *,
    delta: float | None,
    pseudocounts: float,
    test_mode: Literal["three", "two"] = "three",
) -> dict[str, np.ndarray | float]:
    """Posterior probability that ``|LFC| >= delta`` and summaries of the LFC samples.

    ``delta=None``: estimated from the genes' mean LFC, as scvi-tools does
    (:func:`scvae.de_group.estimate_delta`).

    ``lfc = log2(s1 + c) - log2(s2 + c)`` per pair with ``c = pseudocounts``; ``proba_de`` is
    ``max(P(lfc >= delta), P(lfc <= -delta))`` for ``test_mode="three"`` and their sum for
    ``"two"``; ``lfc_mean/median/std/min/max`` summarise ``log2(s1 + c') - log2(s2 + c')`` with
    ``c' = 1e-3 * c`` (nearly the LFC itself, as in scvi-tools).

    Examples
    --------
    >>> s1 = np.tile([0.4, 0.1, 0.5], (10, 1)); s2 = np.tile([0.1, 0.1, 0.8], (10, 1))
    >>> st = change_statistics(s1, s2, delta=0.25, pseudocounts=1e-6)
    >>> st["proba_de"].tolist(), np.round(st["lfc_mean"], 3).tolist()
    ([1.0, 0.0, 1.0], [2.0, 0.0, -0.678])
    """
    _check_pairs(s1, s2)
    check_test_options(delta, test_mode)
    n_genes = s1.shape[1]
    out = {k: np.empty(n_genes) for k in ("up", "down", "mean", "median", "std", "min", "max")}
    if delta is None:  # one more pass over the genes, for the mean LFC of each
        means = np.empty(n_genes)
        for b in _blocks(n_genes):
            a, c = s1[:, b].astype(np.float64), s2[:, b].astype(np.float64)
            means[b] = (np.log2(a + pseudocounts) - np.log2(c + pseudocounts)).mean(axis=0)
        delta = estimate_delta(means)
    small = 1e-3 * pseudocounts
    for b in _blocks(n_genes):
        a, c = s1[:, b].astype(np.float64), s2[:, b].astype(np.float64)
        lfc = np.log2(a + pseudocounts) - np.log2(c + pseudocounts)
        out["up"][b] = np.mean(lfc >= delta, axis=0)
        out["down"][b] = np.mean(lfc <= -delta, axis=0)
        lfc = np.log2(a + small) - np.log2(c + small)
        out["mean"][b] = lfc.mean(axis=0)
        out["median"][b] = np.median(lfc, axis=0)
        out["std"][b] = lfc.std(axis=0)
        out["min"][b] = lfc.min(axis=0)
        out["max"][b] = lfc.max(axis=0)
    return {
        **proba_columns(out["up"], out["down"], test_mode),
        "pseudocounts": float(pseudocounts),
        "delta": float(delta),
        **{f"lfc_{k}": out[k] for k in ("mean", "median", "std", "min", "max")},
    }


def fdr_calls(proba_de: np.ndarray, fdr_target: float) -> np.ndarray:
    """Genes called DE by the posterior expected FDR rule.

    With genes sorted by decreasing ``proba_de`` (ties in the given order), the largest top
    set whose mean of ``1 - proba_de`` is at most ``fdr_target`` is called DE.

    Examples
    --------
    >>> fdr_calls(np.array([0.99, 0.2, 0.97, 0.9]), 0.05).tolist()
    [True, False, True, True]
    """
    p = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    expected_fdr = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    n_called = int(np.sum(expected_fdr <= fdr_target + 1e-12))
    calls = np.zeros(p.size, dtype=bool)
    calls[order[:n_called]] = True
    return calls


def fdr_column(fdr_target: float) -> str:
    """Name of the FDR call column, as in scvi-tools.

    Examples
    --------
    >>> fdr_column(0.05)
    'is_de_fdr_0.05'
    """
    return f"is_de_fdr_{fdr_target}"


def fdr_target_values(fdr_target: float | Sequence[float]) -> tuple[float, ...]:
    """The FDR targets as floats; numpy floats by their shortest repr (``np.float32(0.1)`` is
    0.1, as written, and names the column ``is_de_fdr_0.1``).

    Examples
    --------
    >>> fdr_target_values([np.float32(0.1), 0.05])
    (0.1, 0.05)
    """
    values = _fdr_items(fdr_target)
    return tuple(float(str(x)) if isinstance(x, np.floating) else float(x) for x in values)


def _fdr_items(fdr_target: object) -> list:
    """The targets of ``fdr_target`` (one number, a list or any other collection, an array),
    unconverted; a string, anything else, or no target is refused."""
    if _is_real(fdr_target):
        return [fdr_target]
    if isinstance(fdr_target, np.ndarray):
        items = list(np.ravel(fdr_target))
    elif isinstance(fdr_target, Iterable) and not isinstance(fdr_target, str | bytes):
        items = list(fdr_target)
    else:
        items = []
    if not items:
        raise ValueError(
            f"fdr_target must be a number in (0, 1) or a non-empty list of them, got "
            f"{fdr_target!r}."
        )
    return items


def _is_real(x: object) -> bool:
    """A real number (Python or numpy), not a bool or a string (as the training options')."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class DEOptions:
    """Options of :func:`run` (see :meth:`scvae.SCVAE.differential_expression`).

    Examples
    --------
    >>> DEOptions(mode="change").delta
    0.25
    """

    mode: Literal["vanilla", "change", "group"] = "vanilla"
    delta: float | None = 0.25
    fdr_target: float | tuple[float, ...] = 0.05
    n_samples: int = 5000
    pseudocounts: float | None = None
    test_mode: Literal["three", "two"] = "three"
    threshold_counts: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.delta is not None and (not _is_real(self.delta) or not 0 < self.delta < np.inf):
            raise ValueError(
                f"delta must be a positive, finite number (log2) or None (estimated from the "
                f"genes' LFCs, as scvi-tools), got {self.delta!r}."
            )
        targets = _fdr_items(self.fdr_target)
        for x in targets:
            if not _is_real(x) or not 0 < x < 1:
                raise ValueError(f"fdr_target must lie in (0, 1), got {x!r}.")
        if not _is_real(self.fdr_target):  # a list or an array, kept as a tuple
            object.__setattr__(self, "fdr_target", tuple(targets))
        n = self.n_samples
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n_samples_overall must be a positive integer, got {n!r}.")
        c = self.pseudocounts
        if c is not None and (not _is_real(c) or not 0 <= c < np.inf):
            raise ValueError(
                f"pseudocounts must be None (estimated) or a non-negative number, got {c!r}."
            )

    @property
    def fdr_targets(self) -> tuple[float, ...]:
        return fdr_target_values(self.fdr_target)


def compare(
    s1: np.ndarray,
    s2: np.ndarray,
    stats: dict[str, np.ndarray],
    gene_names: Sequence[str],
    options: DEOptions,
) -> pd.DataFrame:
    """One comparison's table from paired samples and count statistics, sorted.

    Vanilla: sorted by ``bayes_factor``, ties by ``log2(scale1 / scale2)``, both decreasing.
    Change: sorted by ``proba_de``, ties by ``|lfc_mean|``, both decreasing. Remaining ties keep
    the gene order.

    Examples
    --------
    >>> s1 = np.tile([0.4, 0.1, 0.5], (10, 1)); s2 = np.tile([0.1, 0.1, 0.8], (10, 1))
    >>> st = {f"raw_mean{i}": np.ones(3) for i in "12"}
    >>> list(compare(s1, s2, st, ["a", "b", "c"], DEOptions(mode="change")).index)
    ['a', 'c', 'b']
    """
    scale1 = s1.mean(axis=0, dtype=np.float64)
    scale2 = s2.mean(axis=0, dtype=np.float64)
    if options.mode == "vanilla":
        res: dict = vanilla_statistics(s1, s2)
        res.update(scale1=scale1, scale2=scale2)
        keys = (res["bayes_factor"], np.log2(scale1 + EPS) - np.log2(scale2 + EPS))
    else:
        c = options.pseudocounts
        if c is None:
            c = estimate_pseudocounts(
                s1,
                s2,
                stats["raw_mean1"] < options.threshold_counts,
                stats["raw_mean2"] < options.threshold_counts,
            )
        ch = change_statistics(
            s1, s2, delta=options.delta, pseudocounts=c, test_mode=options.test_mode
        )
        res = {k: ch[k] for k in ("proba_de", "proba_not_de", "bayes_factor")}
        res.update(scale1=scale1, scale2=scale2)
        res.update({k: v for k, v in ch.items() if k not in res})
        keys = (res["proba_de"], np.abs(res["lfc_mean"]))
    res.update(stats)
    return _sorted_table(res, keys, gene_names, options)


def subsample(cells: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n_samples`` of the cells, drawn without replacement, sorted.

    Examples
    --------
    >>> subsample(np.arange(10), 3, np.random.default_rng(0)).size
    3
    >>> subsample(np.arange(4), 10, np.random.default_rng(0)).tolist()
    [0, 1, 2, 3]
    """
    if n_samples < 1:
        raise ValueError(f"n_samples_overall must be at least 1, got {n_samples}.")
    if cells.size <= n_samples:
        return cells
    return np.sort(rng.choice(cells, size=n_samples, replace=False))


def compare_groups(
    comp: Comparison,
    stats: dict[str, np.ndarray],
    group_inputs: GroupInputsFn,
    gene_names: Sequence[str],
    options: DEOptions,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """One comparison's table in ``mode="group"`` (:mod:`scvae.de_group`), sorted.

    Sorted by ``proba_de`` rounded to 6 decimals (the posterior is computed in closed form, so
    genes beyond any doubt differ only by rounding), ties by ``|lfc_mean|``, both decreasing;
    FDR calls as in change mode.

    Examples
    --------
    >>> from scvae.de_group import GroupInputs
    >>> rng = np.random.default_rng(0)
    >>> rho = np.tile([0.25, 0.25, 0.5], (60, 1)); rho[:30, 0] *= 4; rho /= rho.sum(1)[:, None]
    >>> x = rng.poisson(rho * 200.0).astype(float)
    >>> fn = lambda cells: GroupInputs(rho[cells], x[cells], rho[cells] * 200.0, None, None)
    >>> comp = Comparison("a", "b", np.arange(30), np.arange(30, 60))
    >>> compare_groups(comp, {}, fn, list("xyz"), DEOptions(mode="group"), rng).index[0]
    'x'
    """
    for name, cells in ((comp.name1, comp.cells1), (comp.name2, comp.cells2)):
        if np.unique(cells).size < 2:  # no spread over one cell: the test would be certain
            raise ValueError(
                f"Comparison {comp.label!r}: {name!r} has a single cell. mode='group' "
                "estimates each group's mean expression and its spread over the group's cells, "
                "so each group needs at least 2; compare single cells with mode='change'."
            )
    fits = []
    for cells in (comp.cells1, comp.cells2):
        chosen = subsample(cells, options.n_samples, rng)
        inputs = group_inputs(chosen)
        if inputs.rho.shape != (chosen.size, len(gene_names)):
            raise ValueError(
                f"group_inputs returned rho of shape {inputs.rho.shape}; expected "
                f"({chosen.size}, {len(gene_names)})."
            )
        fits.append(fit_group(inputs))
        del inputs  # cells x genes arrays: not kept while the other group's are built
    res: dict = group_statistics(fits[0], fits[1], delta=options.delta, test_mode=options.test_mode)
    res.update(stats)
    keys = (np.round(res["proba_de"], 6), np.abs(res["lfc_mean"]))
    return _sorted_table(res, keys, gene_names, options)


def run(
    comparisons: Sequence[Comparison],
    counts: sp.spmatrix | Iterable[sp.spmatrix],
    expression: ExpressionFn,
    *,
    batch_codes: Sequence[int | None],
    gene_names: Sequence[str],
    options: DEOptions,
    rng: np.random.Generator,
    group_inputs: GroupInputsFn | None = None,
) -> pd.DataFrame:
    """All comparisons: sample cells, query their expression, compare, concatenate.

    Parameters
    ----------
    comparisons
        The cell sets (:func:`define_comparisons`).
    counts
        Raw counts, cells x genes, or its consecutive row blocks (for the count statistics
        and the pseudocounts; see :func:`count_statistics`).
    expression
        ``expression(cells, batch_code)`` -> one posterior sample of rho per listed cell,
        ``(len(cells), n_genes)``, decoded under ``batch_code`` (None: each cell's own batch).
        Cells may repeat. It is called once per comparison and batch code, with
        ``2 * (n_samples // len(batch_codes))`` cells: only the sampled ones.
    batch_codes
        ``[None]`` (no batch correction) or the batch codes to decode under.
    gene_names
        Row labels.
    options
        :class:`DEOptions`.
    rng
        Draws the cells.
    group_inputs
        ``mode="group"`` only: ``group_inputs(cells)`` -> :class:`scvae.de_group.GroupInputs`
        of the listed (distinct) cells; each side of a comparison is subsampled to
        ``n_samples`` cells without replacement first.

    Returns
    -------
    DataFrame with one row per gene and comparison (see
    :meth:`scvae.SCVAE.differential_expression` for the columns).

    Examples
    --------
    >>> x = sp.random(30, 4, density=0.5, format="csr", random_state=0) * 10
    >>> comps = [Comparison("a", "b", np.arange(10), np.arange(10, 30))]
    >>> def expr(cells, code):
    ...     return np.tile([0.1, 0.2, 0.3, 0.4], (len(cells), 1)) * (1 + (cells[:, None] < 10))
    >>> run(comps, x, expr, batch_codes=[None], gene_names=list("wxyz"),
    ...     options=DEOptions(n_samples=20), rng=np.random.default_rng(0)).shape
    (4, 14)
    """
    stats = count_statistics(counts, comparisons)
    if options.mode == "group" and group_inputs is None:
        raise ValueError("mode='group' needs group_inputs.")
    tables = []
    for comp, st in zip(comparisons, stats, strict=True):
        if options.mode == "group":
            table = compare_groups(comp, st, group_inputs, gene_names, options, rng)
        else:
            s1, s2 = _paired_samples(comp, expression, batch_codes, len(gene_names), options, rng)
            table = compare(s1, s2, st, gene_names, options)
        table["comparison"] = comp.label
        table["group1"] = comp.name1 if comp.value1 is None else comp.value1
        table["group2"] = comp.name2 if comp.value2 is None else comp.value2
        tables.append(table)
    return pd.concat(tables, axis=0)


def _sorted_table(
    columns: dict,
    keys: tuple[np.ndarray, np.ndarray],
    gene_names: Sequence[str],
    options: DEOptions,
) -> pd.DataFrame:
    """One comparison's table sorted by ``keys`` (both decreasing, then gene order), with the
    FDR call columns in change and group modes."""
    table = pd.DataFrame(columns, index=pd.Index(list(gene_names), name=None))
    table = table.iloc[np.lexsort((np.arange(len(table)), -keys[1], -keys[0]))]
    if options.mode != "vanilla":
        for t in options.fdr_targets:
            table[fdr_column(t)] = fdr_calls(table["proba_de"].to_numpy(), t)
    return table


def _paired_samples(
    comp: Comparison,
    expression: ExpressionFn,
    batch_codes: Sequence[int | None],
    n_genes: int,
    options: DEOptions,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Vanilla and change modes: rho of the cells drawn for each side, paired by position."""
    pairs = sample_pairs(comp.cells1, comp.cells2, options.n_samples, len(batch_codes), rng)
    s1_parts, s2_parts = [], []
    for code, (a, b) in zip(batch_codes, pairs, strict=True):
        values = np.asarray(expression(np.concatenate([a, b]), code))
        if values.shape != (len(a) + len(b), n_genes):
            raise ValueError(
                f"expression returned shape {values.shape}; expected "
                f"({len(a) + len(b)}, {n_genes})."
            )
        s1_parts.append(values[: len(a)])
        s2_parts.append(values[len(a) :])
    s1 = s1_parts[0] if len(s1_parts) == 1 else np.concatenate(s1_parts)
    s2 = s2_parts[0] if len(s2_parts) == 1 else np.concatenate(s2_parts)
    return s1, s2


def _check_pairs(s1: np.ndarray, s2: np.ndarray) -> None:
    if s1.ndim != 2 or s1.shape != s2.shape:
        raise ValueError(
            f"Paired samples must be two arrays of the same (samples, genes) shape; got "
            f"{s1.shape} and {s2.shape}."
        )
