"""A ground truth for differential expression made of real counts: binomial thinning.

Real cells of one type are split at random into two groups, so no gene differs between them
but by chance; then chosen genes are thinned in one group by known factors (each count x
becomes Binomial(x, f)), which lowers their expected count by exactly the factor f while
keeping the real noise of the data, not the model's own family.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvae import _checks
from scvae.data.registry import get_counts


def binomial_thinning(
    adata: ad.AnnData,
    *,
    cell_type_key: str | None = "cell_type",
    cell_type: str | None = None,
    n_de_genes: int = 100,
    log2_fold_changes: Sequence[float] = (0.5, 1.0, 2.0),
    group_sizes: tuple[int, int] | None = None,
    min_fraction_expressing: float = 0.1,
    max_fraction_of_counts: float = 0.01,
    layer: str | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Two random groups of real cells of one type, with chosen genes thinned in one group.

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layers[layer]``), cells x genes.
    cell_type_key, cell_type
        Take the cells with ``obs[cell_type_key] == cell_type`` (None: all cells).
    n_de_genes
        Genes given an effect, drawn at random among the eligible genes (see below; 0: a
        null data set).
    log2_fold_changes
        Effect sizes (log2, positive): the DE genes are given them in turn, so each size gets
        an equal share. Each DE gene is thinned in group "A" or in "B", chosen so that the
        expected fraction of counts removed is balanced between the groups (largest first,
        each to the group that has lost less so far): both directions occur and the
        libraries of the two groups shrink alike, so the genes without an effect stay
        (nearly) unchanged in normalised expression.
    group_sizes
        Cells in groups "A" and "B", drawn without replacement (None: a random half each).
    min_fraction_expressing, max_fraction_of_counts
        Genes eligible for an effect are non-zero in at least ``min_fraction_expressing`` of
        the chosen cells and carry at most ``max_fraction_of_counts`` of all their counts
        (thinning a very abundant gene would shift the normalised expression of every gene).
    layer
        Layer with the counts (None: ``X``).
    seed
        Random seed of the split, the genes and the thinning, 0 to 2**32 - 1.

    Returns
    -------
    AnnData of the chosen cells with the thinned counts in ``X`` (CSR float32), ``obs`` of the
    input plus ``obs["group"]`` ("A"/"B"), and the truth in ``var``:

    - ``thinning_factor_A``, ``thinning_factor_B``: the factor applied in each group (1: none);
    - ``is_de``: the gene was given an effect;
    - ``log2_fold_change``: the true log2 ratio of the normalised expression (rho) of group A
      over group B: ``log2(f_A / f_B) - log2(S_A / S_B)``, where ``S`` is the expected fraction
      of counts kept in that group (the thinning lowers every cell's library a little, which
      shifts the normalised expression of all genes; this term is usually tiny).

    ``uns["thinning"]`` records the parameters (``cell_type_key``, ``cell_type`` and
    ``layer`` as "" where None; ``group_sizes`` as drawn) and the number of cells dropped because
    thinning left them with no counts (rare).

    Examples
    --------
    >>> import scvae
    >>> real = scvae.data.simulate(300, 50, n_cell_types=2, seed=0)
    >>> out = binomial_thinning(real, cell_type="type0", n_de_genes=6,
    ...                         max_fraction_of_counts=0.1, seed=1)
    >>> int(out.var["is_de"].sum()), sorted(out.obs["group"].unique())
    (6, ['A', 'B'])
    """
    if (
        isinstance(n_de_genes, bool)
        or not isinstance(n_de_genes, numbers.Integral)
        or n_de_genes < 0
    ):
        raise ValueError(f"n_de_genes must be a whole number >= 0, got {n_de_genes!r}.")
    try:
        sizes = np.atleast_1d(np.asarray(log2_fold_changes, dtype=np.float64))
    except (TypeError, ValueError):
        sizes = np.array([np.nan])  # not numbers: refused below
    if sizes.ndim != 1 or (
        n_de_genes and (sizes.size == 0 or not np.isfinite(sizes).all() or (sizes <= 0).any())
    ):
        raise ValueError(
            f"log2_fold_changes must be finite positive numbers (e.g. (0.5, 1.0, 2.0)), got "
            f"{log2_fold_changes!r}."
        )
    if group_sizes is not None:
        given = list(group_sizes) if isinstance(group_sizes, Iterable) else [group_sizes]
        whole = [isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in given]
        if len(whole) != 2 or not all(whole):
            raise ValueError(
                f"group_sizes must be two whole numbers (cells in groups A and B) or None, got "
                f"{group_sizes!r}."
            )
    seed = _checks.seed("seed", seed)
    for name, value in (
        ("min_fraction_expressing", min_fraction_expressing),
        ("max_fraction_of_counts", max_fraction_of_counts),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0.0 <= value <= 1.0  # NaN fails this too
        ):
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}.")
    if "group" in adata.obs:
        raise ValueError(
            "adata.obs already has a 'group' column, which the result's obs['group'] (the "
            "A / B split) would replace: rename it first."
        )
    rng = np.random.default_rng(seed)
    if cell_type is None:
        cells = np.arange(adata.n_obs)
    else:
        if cell_type_key is None or cell_type_key not in adata.obs:
            raise ValueError(f"cell_type_key {cell_type_key!r} is not a column of adata.obs.")
        cells = np.flatnonzero(adata.obs[cell_type_key].astype(str).to_numpy() == str(cell_type))
        if cells.size == 0:
            known = sorted(adata.obs[cell_type_key].astype(str).unique())
            raise ValueError(f"No cell has {cell_type_key} == {cell_type!r} (types: {known}).")
    if group_sizes is None:
        n_a = cells.size // 2
        n_b = cells.size - n_a
    else:
        n_a, n_b = (int(s) for s in group_sizes)
    if min(n_a, n_b) < 1 or n_a + n_b > cells.size:
        raise ValueError(
            f"group_sizes {n_a} + {n_b} do not fit the {cells.size} cells available (each >= 1)."
        )
    cells = np.sort(rng.choice(cells, size=n_a + n_b, replace=False))
    in_a = np.zeros(cells.size, dtype=bool)
    in_a[rng.choice(cells.size, size=n_a, replace=False)] = True

    counts = get_counts(adata, layer)[cells]
    n_genes = counts.shape[1]
    expressing = np.asarray((counts > 0).mean(axis=0)).ravel()
    proportions = np.asarray(counts.sum(axis=0)).ravel() / counts.sum()
    eligible = np.flatnonzero(
        (expressing >= min_fraction_expressing) & (proportions <= max_fraction_of_counts)
    )
    if n_de_genes > eligible.size:
        raise ValueError(
            f"n_de_genes={n_de_genes}, but only {eligible.size} genes are non-zero in at least "
            f"{min_fraction_expressing:.0%} of the cells and carry at most "
            f"{max_fraction_of_counts:.1%} of the counts; lower n_de_genes or widen those."
        )
    de_genes = rng.choice(eligible, size=n_de_genes, replace=False)
    factors = np.ones((2, n_genes))  # rows: group A, group B
    magnitude = np.resize(sizes, n_de_genes) if n_de_genes else sizes[:0]
    thinned_group = _balanced_sides(proportions[de_genes] * (1 - 2.0 ** (-magnitude)), rng)
    factors[thinned_group, de_genes] = 2.0 ** (-magnitude)

    thinned = _thin(counts, factors, np.where(in_a, 0, 1), rng)
    kept = factors @ proportions  # expected fraction of counts kept, per group
    log2fc = np.log2(factors[0] / factors[1]) - np.log2(kept[0] / kept[1])

    totals = np.asarray(thinned.sum(axis=1)).ravel()
    keep = totals > 0
    obs = adata.obs.iloc[cells].copy()
    obs["group"] = pd.Categorical(np.where(in_a, "A", "B"), categories=["A", "B"])
    var = adata.var.copy()
    var["thinning_factor_A"] = factors[0]
    var["thinning_factor_B"] = factors[1]
    var["is_de"] = factors[0] != factors[1]
    var["log2_fold_change"] = log2fc
    out = ad.AnnData(thinned[keep], obs=obs.iloc[keep], var=var)
    out.uns["thinning"] = {
        # None (all cells) is stored as "": an h5ad cannot hold None
        "cell_type_key": "" if cell_type is None else str(cell_type_key),
        "cell_type": "" if cell_type is None else str(cell_type),
        "group_sizes": [int(n_a), int(n_b)],
        "layer": "" if layer is None else str(layer),
        "n_de_genes": int(n_de_genes),
        "log2_fold_changes": [float(s) for s in sizes],
        "min_fraction_expressing": float(min_fraction_expressing),
        "max_fraction_of_counts": float(max_fraction_of_counts),
        "seed": int(seed),
        "n_cells_dropped_empty": int((~keep).sum()),
    }
    return out


def _balanced_sides(removed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0 (thin in A) or 1 (thin in B) per gene, balancing the summed ``removed`` greedily."""
    sides = np.zeros(removed.size, dtype=np.int64)
    totals = np.zeros(2)
    for i in np.argsort(-removed + 1e-15 * rng.random(removed.size), kind="stable"):
        side = int(totals[1] < totals[0]) if totals[0] != totals[1] else int(rng.integers(2))
        sides[i] = side
        totals[side] += removed[i]
    return sides


def _thin(
    counts: sp.csr_matrix, factors: np.ndarray, group: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Each count x of cell i, gene g becomes Binomial(x, factors[group[i], g])."""
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    f = factors[group[rows], counts.indices]
    touched = f < 1
    counts.data[touched] = rng.binomial(counts.data[touched].astype(np.int64), f[touched])
    counts.eliminate_zeros()
    return counts
