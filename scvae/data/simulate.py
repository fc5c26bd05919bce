"""Simulated ZINB counts with known cell types, batches and truth, for tests and tutorials."""

from __future__ import annotations

import numbers

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvae import _checks


def simulate(
    n_cells: int = 1000,
    n_genes: int = 200,
    *,
    n_cell_types: int = 3,
    n_batches: int = 1,
    de_fraction: float = 0.2,
    de_log_fold_change: float = 1.5,
    batch_effect: float = 0.3,
    mean_library_size: float = 1500.0,
    library_log_sd: float = 0.3,
    theta_range: tuple[float, float] = (2.0, 20.0),
    zero_inflation: float = 0.05,
    seed: int = 0,
) -> ad.AnnData:
    """Draw a cells x genes AnnData of zero-inflated negative binomial counts.

    Each cell type has its own normalised expression rho (a shared baseline with
    ``de_fraction`` of the genes shifted up or down by ``de_log_fold_change`` in natural log
    units); each batch multiplies every gene by exp(N(0, ``batch_effect``)); library sizes are
    log-normal; counts are ZINB(mu = library * rho, theta per gene, dropout per gene).

    Parameters
    ----------
    n_cells, n_genes
        Size of the matrix.
    n_cell_types, n_batches
        Number of cell types (``obs["cell_type"]``) and batches (``obs["batch"]``); cells are
        assigned uniformly at random, independently.
    de_fraction, de_log_fold_change
        Fraction of genes differentially expressed per cell type and their effect (ln scale).
    batch_effect
        Standard deviation of the per-batch, per-gene log factor.
    mean_library_size, library_log_sd
        Median of the log-normal library sizes and its log-scale spread.
    theta_range
        Gene-wise inverse dispersions are log-uniform in this range.
    zero_inflation
        Mean dropout probability (per gene, Beta-distributed around it).
    seed
        Random seed, 0 to 2**32 - 1 (or a numpy Generator); the same seed gives the same data.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR float32), the truth in ``obs`` (``cell_type``,
    ``batch``, ``library_size``), ``var`` (``theta``, ``dropout``), ``varm["log_fold_change"]``
    (genes x cell types, ln scale, of the logits against the baseline), ``varm["log_rho"]``
    (each cell type's normalised expression, ln: the truth of a comparison between types is
    the difference of two columns, which is not 0 for genes without a logit shift, since rho
    is renormalised; with one batch, the cells' own, its factor included; with several,
    without batch factors), ``varm["batch_log_factor"]`` (genes x batches) and
    ``uns["simulation"]`` (every parameter; ``seed`` is None where a numpy Generator or
    SeedSequence was passed).
    Cells that draw zero counts in total get one count in a random gene, so every cell is
    usable.

    Examples
    --------
    >>> adata = simulate(200, 50, n_batches=2, seed=1)
    >>> adata.shape, list(adata.obs["batch"].cat.categories)
    ((200, 50), ['batch0', 'batch1'])
    """
    for name, value in (
        ("n_cells", n_cells),
        ("n_genes", n_genes),
        ("n_cell_types", n_cell_types),
        ("n_batches", n_batches),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a whole number, got {value!r}.")
    if n_cells < 1 or n_genes < 1 or n_cell_types < 1 or n_batches < 1:
        raise ValueError("n_cells, n_genes, n_cell_types and n_batches must all be at least 1.")
    # what numpy's default_rng takes: None (fresh randomness), a Generator, a SeedSequence,
    # or a whole number >= 0
    generators = (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)
    if seed is not None and not isinstance(seed, generators):
        _checks.seed("seed", seed, why=", None or a numpy Generator")
    for name, value, ok, allowed in (
        ("de_fraction", de_fraction, 0 <= de_fraction <= 1, "in [0, 1]"),
        ("de_log_fold_change", de_log_fold_change, de_log_fold_change >= 0, ">= 0"),
        ("batch_effect", batch_effect, batch_effect >= 0, ">= 0"),
        ("mean_library_size", mean_library_size, mean_library_size > 0, "> 0"),
        ("library_log_sd", library_log_sd, library_log_sd >= 0, ">= 0"),
        ("zero_inflation", zero_inflation, 0 <= zero_inflation < 1, "in [0, 1)"),
    ):
        if not (np.isfinite(value) and ok):
            raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}.")
    low, high = theta_range
    if not (np.isfinite(high) and 0 < low <= high):
        raise ValueError(
            f"theta_range must be (low, high) with 0 < low <= high, got {theta_range}."
        )
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, n_genes)
    lfc = np.zeros((n_genes, n_cell_types))
    n_de = int(round(de_fraction * n_genes))
    for t in range(n_cell_types):
        genes = rng.choice(n_genes, size=n_de, replace=False)
        lfc[genes, t] = rng.choice([-1.0, 1.0], size=n_de) * de_log_fold_change
    batch_log = rng.normal(0.0, batch_effect, (n_batches, n_genes))
    theta = np.exp(rng.uniform(np.log(theta_range[0]), np.log(theta_range[1]), n_genes))
    concentration = 20.0
    dropout = rng.beta(
        zero_inflation * concentration + 1e-3, (1 - zero_inflation) * concentration, n_genes
    )

    cell_type = rng.integers(n_cell_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    library = mean_library_size * np.exp(rng.normal(0.0, library_log_sd, n_cells))
    logits = base[None, :] + lfc[:, cell_type].T + batch_log[batch]
    rho = np.exp(logits - logits.max(axis=1, keepdims=True))
    rho /= rho.sum(axis=1, keepdims=True)
    mu = library[:, None] * rho
    gamma = rng.gamma(shape=theta[None, :], scale=mu / theta[None, :])
    counts = rng.poisson(gamma).astype(np.float32)
    counts[rng.random(counts.shape) < dropout[None, :]] = 0.0
    for cell in np.flatnonzero(counts.sum(axis=1) == 0):
        counts[cell, rng.integers(n_genes)] = 1.0

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(
                [f"type{t}" for t in cell_type],
                categories=[f"type{t}" for t in range(n_cell_types)],
            ),
            "batch": pd.Categorical(
                [f"batch{b}" for b in batch], categories=[f"batch{b}" for b in range(n_batches)]
            ),
            "library_size": library,
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"theta": theta, "dropout": dropout}, index=[f"gene{g}" for g in range(n_genes)]
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)
    adata.varm["log_fold_change"] = lfc
    type_logits = base[:, None] + lfc  # genes x types
    if n_batches == 1:  # every cell has that batch's factor: the truth of these cells has it
        type_logits = type_logits + batch_log[0][:, None]
    adata.varm["log_rho"] = type_logits - np.logaddexp.reduce(type_logits, axis=0, keepdims=True)
    adata.varm["batch_log_factor"] = batch_log.T
    adata.uns["simulation"] = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "de_fraction": de_fraction,
        "de_log_fold_change": de_log_fold_change,
        "batch_effect": batch_effect,
        "mean_library_size": mean_library_size,
        "library_log_sd": library_log_sd,
        "theta_range": list(theta_range),
        "zero_inflation": zero_inflation,
        # a whole number, else None: an h5ad cannot hold a Generator
        "seed": int(seed) if isinstance(seed, numbers.Integral) else None,
    }
    return adata
