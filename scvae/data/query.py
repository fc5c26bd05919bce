"""A query AnnData for reference mapping: its genes put in the reference's order, its batches
and categorical covariate values added to the reference's registry. AnnData and numpy only
(the surgery is in scvae.surgery)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvae._settings import logger
from scvae.data.registry import CategoryMatcher, Registry, RegistryError

# Below this share of the reference's genes present in the query, mapping is unreliable.
MIN_GENE_SHARE = 0.8


def _reorder(matrix, pos: np.ndarray):
    """Columns ``pos`` of ``matrix`` (-1: a column of zeros), keeping sparse / dense."""
    present = pos >= 0
    if sp.issparse(matrix):
        csc = sp.csc_matrix(matrix)[:, np.where(present, pos, 0)]
        out = sp.csr_matrix(csc @ sp.diags(present.astype(csc.dtype)))
        out.eliminate_zeros()
        return out
    dense = np.asarray(matrix)[:, np.where(present, pos, 0)].copy()
    dense[:, ~present] = 0
    return dense


def pad_query_genes(adata: ad.AnnData, var_names: Sequence[str]) -> ad.AnnData:
    """A new AnnData with ``var_names`` as its genes, in that order; genes the query lacks are
    zero in ``X`` and in every layer, genes the reference lacks are dropped.

    ``obs``, ``obsm`` and ``uns`` are copied (``uns`` deeply: nested dictionaries are new
    too, so editing the result leaves the input as it was); ``var`` keeps the query's columns
    for the genes it has (missing genes get NaN). Logs how many genes were padded and dropped.
    A backed query is read into memory (the result is an in-memory AnnData).

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> q = ad.AnnData(np.array([[1.0, 2.0]], dtype=np.float32))
    >>> q.var_names = ["b", "a"]
    >>> pad_query_genes(q, ["a", "b", "c"]).X.tolist()
    [[2.0, 1.0, 0.0]]
    """
    if not adata.var_names.is_unique:
        raise RegistryError(
            "The query's gene names (var_names) are not unique; run adata.var_names_make_unique() "
            "first."
        )
    reference = pd.Index(list(map(str, var_names)))
    pos = pd.Index(adata.var_names.astype(str)).get_indexer(reference)
    n_present = int((pos >= 0).sum())
    if n_present == 0:
        raise RegistryError(
            "None of the reference's genes are in the query (e.g. reference "
            f"{', '.join(reference[:3])}; query {', '.join(map(str, adata.var_names[:3]))}). "
            "Use the same gene identifiers (symbols or Ensembl IDs) as the reference."
        )
    n_padded = len(reference) - n_present
    n_dropped = adata.n_vars - n_present
    logger.info(
        "Query genes: %d of the reference's %d present, %d padded with zeros, %d query genes "
        "not in the reference dropped.",
        n_present,
        len(reference),
        n_padded,
        n_dropped,
    )
    if n_present < MIN_GENE_SHARE * len(reference):
        logger.warning(
            "Only %.0f%% of the reference's genes are in the query; the mapping may be poor.",
            100 * n_present / len(reference),
        )
    if adata.isbacked:  # the padded copy is a new in-memory AnnData either way
        adata = adata.to_memory()
    var = adata.var.copy()
    var.index = pd.Index(var.index.astype(str))
    var = var.reindex(reference)
    out = ad.AnnData(
        X=None if adata.X is None else _reorder(adata.X, pos),
        obs=adata.obs.copy(),
        var=var,
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        uns=copy.deepcopy(dict(adata.uns)),
        layers={k: _reorder(v, pos) for k, v in adata.layers.items()},
    )
    return out


def new_categories(column: pd.Series, known: list[str]) -> list[str]:
    """The values of ``column`` that match none of the ``known`` categories, as text.

    Values are matched as :class:`~scvae.data.registry.CategoryMatcher` does (numbers as
    numbers: a float 1.0 is the known integer category "1"). New ones come sorted by value,
    once each, the order in which scvi-tools' ``load_query_data`` appends them
    (``np.unique``): numbers in numeric order, text in text order (a categorical column's
    category order is not used, as there), values of mixed types by their text.

    Examples
    --------
    >>> new_categories(pd.Series([1.0, 3.0, 3.0]), ["1", "2"])
    ['3.0']
    >>> new_categories(pd.Series([10, 2, 1]), ["1"]), new_categories(pd.Series(["d10", "d3"]), [])
    (['2', '10'], ['d10', 'd3'])
    """
    matcher = CategoryMatcher(known)
    _, unmatched = matcher.codes(column)
    try:
        unmatched.sort()
    except TypeError:  # e.g. numbers and text in one object column
        unmatched.sort(key=str)
    new: list[str] = []
    for value in unmatched:
        if matcher.code(value) < 0:  # e.g. 3 and "3" in one object column: one category
            matcher.add(str(value), len(known) + len(new))
            new.append(str(value))
    return new


def query_registry(
    reference: Registry, adata: ad.AnnData, *, keep_labels: bool
) -> tuple[Registry, list[str]]:
    """The reference's registry with the query's new batches and new categorical covariate
    values appended; and the new batches.

    Query cells of a batch the reference knows keep its code. Each categorical covariate
    keeps the reference's categories, in order, and gets the query's values the reference
    lacks after them (scvi-tools' ``extend_categories=True``), in scvi-tools' order (see
    :func:`new_categories`); a query may lack some of the reference's values. Labels are kept
    only when ``keep_labels`` (they enter the model only with per gene-label dispersion);
    otherwise the query model does not read them, so the query may lack them or have new
    ones.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> q = ad.AnnData(np.ones((2, 1), dtype=np.float32))
    >>> q.obs["b"] = ["x", "z"]
    >>> q.obs["donor"] = ["d3", "d1"]
    >>> ref = Registry(None, "b", None, ["x", "y"], ["0"], ["0"])
    >>> ref.categorical_covariate_keys = ["donor"]
    >>> ref.categorical_covariate_categories = {"donor": ["d1", "d2"]}
    >>> reg, new = query_registry(ref, q, keep_labels=False)
    >>> reg.batch_categories, new, reg.categorical_covariate_categories
    (['x', 'y', 'z'], ['z'], {'donor': ['d1', 'd2', 'd3']})
    """
    key = reference.batch_key
    if key is None:
        raise RegistryError(
            "The reference was registered without a batch_key, so it has no batch to add the "
            "query to. Train the reference with batch_key=... (and encode_covariates=True)."
        )
    if key not in adata.obs:
        raise RegistryError(
            f"The query has no column adata.obs[{key!r}] (the reference's batch_key); add one "
            "naming each query cell's batch (a new name for a new batch)."
        )
    if adata.obs[key].isna().any():
        raise RegistryError(f"adata.obs[{key!r}] has missing values; name every cell's batch.")
    new = new_categories(adata.obs[key], reference.batch_categories)
    covariate_categories = dict(reference.categorical_covariate_categories)
    for cov in reference.categorical_covariate_keys:
        if cov not in adata.obs or adata.obs[cov].isna().any():
            continue  # the registry's check names a missing column or value
        known = reference.categorical_covariate_categories[cov]
        covariate_categories[cov] = [*known, *new_categories(adata.obs[cov], known)]
    labels = reference.labels_key
    if keep_labels and labels in adata.obs and not adata.obs[labels].isna().any():
        unseen = new_categories(adata.obs[labels], reference.label_categories)
        if unseen:  # each label has its own dispersion, fitted to the reference's cells
            raise RegistryError(
                f"adata.obs[{labels!r}] has labels the reference does not know: "
                f"{', '.join(map(repr, unseen[:5]))} (reference: "
                f"{', '.join(map(repr, reference.label_categories[:10]))}). The reference "
                "has a dispersion per label (dispersion='gene-label'), and mapping does not add "
                "labels. Give those cells one of the reference's labels, or map onto a "
                "reference trained with another dispersion (its query may carry any labels)."
            )
    registry = replace(
        reference,
        batch_categories=[*reference.batch_categories, *new],
        labels_key=reference.labels_key if keep_labels else None,
        categorical_covariate_categories=covariate_categories,
    )
    return registry, new


def library_prior(
    counts: sp.csr_matrix | np.ndarray, codes: np.ndarray, batches: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the log library of the cells of each of ``batches`` (variance 1
    for a batch of one cell), as float32 arrays. ``counts``: the cells' counts, or their
    totals (one value per cell).

    Examples
    --------
    >>> counts = sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0]]))
    >>> m, v = library_prior(counts, np.array([0, 1, 1]), [1])
    >>> bool(np.isclose(m[0], (np.log(2) + np.log(7)) / 2))
    True
    """
    totals = counts if isinstance(counts, np.ndarray) and counts.ndim == 1 else counts.sum(axis=1)
    log_totals = np.log(np.asarray(totals, dtype=np.float64).ravel())
    means, variances = [], []
    for b in batches:
        sel = log_totals[codes == b]
        means.append(sel.mean())
        variances.append(sel.var() if len(sel) > 1 else 1.0)
    return np.asarray(means, dtype=np.float32), np.asarray(variances, dtype=np.float32)
