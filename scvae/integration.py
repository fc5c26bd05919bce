"""Scores of batch integration in a latent space: the scIB measures (Luecken et al. 2022).

Numpy, scanpy and scikit-learn only (no torch, no jax). Each measure follows the definition of
scib-metrics 0.5 (the maintained implementation of the scIB benchmark), computed with exact
nearest neighbours from scikit-learn:

* bio conservation: ``silhouette_label`` (cell-type ASW, rescaled to [0, 1]), ``nmi`` and
  ``ari`` (Leiden clusters at the resolution with the best NMI, from
  :func:`scvae.metrics.leiden_nmi_ari`), ``clisi`` (cell-type LISI, scaled to [0, 1]);
* batch correction: ``silhouette_batch`` (1 - |batch silhouette| within each cell type),
  ``ilisi`` (integration LISI, scaled to [0, 1]), ``graph_connectivity`` (per cell type, the
  share of its cells in the largest strongly connected component of the directed 15-NN graph).

``bio_conservation`` and ``batch_correction`` are the means of their measures and ``total`` is
``0.6 * bio_conservation + 0.4 * batch_correction``. No score is min-max scaled across methods,
so a number means the same thing whatever else it is compared with. Higher is better for all.

Examples
--------
>>> import anndata as ad
>>> rng = np.random.default_rng(0)
>>> types = np.repeat([0, 1], 100)
>>> a = ad.AnnData(np.zeros((200, 1), dtype=np.float32))
>>> a.obs["batch"] = np.tile(["b0", "b1"], 100)
>>> a.obs["cell_type"] = types.astype(str)
>>> a.obsm["X_scvae"] = rng.normal(0, 0.3, (200, 2)) + 4 * types[:, None]
>>> s = integration_scores(a, batch_key="batch", labels_key="cell_type", resolutions=[0.1])
>>> s["total"] > 0.8
True
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import silhouette_samples, silhouette_score
from sklearn.neighbors import NearestNeighbors

from scvae.metrics import RESOLUTIONS, check_resolutions, leiden_nmi_ari

BIO_MEASURES = ("silhouette_label", "nmi", "ari", "clisi")
BATCH_MEASURES = ("silhouette_batch", "ilisi", "graph_connectivity")
# Neighbours for LISI (perplexity = n // 3 = 30) and for the graph measures, as in scib-metrics.
N_NEIGHBORS_LISI = 90
N_NEIGHBORS_GRAPH = 15


def _groups(values: Sequence | np.ndarray, name: str = "labels") -> np.ndarray:
    """Batches or labels as strings; a missing value (NaN, None) is refused, not made a
    group of its own ("nan")."""
    missing = int(pd.isna(pd.Series(np.asarray(values, dtype=object))).sum())
    if missing:
        raise ValueError(
            f"{name} has {missing} missing values (NaN or None): drop those cells or give "
            "them a group first."
        )
    return np.asarray(values).astype(str)


def _codes(values: Sequence | np.ndarray, name: str = "labels") -> np.ndarray:
    return np.asarray(pd.Categorical(_groups(values, name)).codes, dtype=np.int64)


def _knn(latent: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean neighbours of every cell, the cell itself included (as scib-metrics)."""
    x = np.asarray(latent, dtype=np.float64)
    k = min(n_neighbors, x.shape[0])
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return dist, idx


def _simpson(dist: np.ndarray, idx: np.ndarray, codes: np.ndarray, perplexity: float) -> np.ndarray:
    """Simpson index of each cell's neighbourhood, Gaussian weights calibrated to ``perplexity``.

    The bandwidth of each cell is found by bisection so that the entropy of its neighbour
    weights is ``log(perplexity)`` (tolerance 1e-5, at most 50 steps), as in Harmony's LISI.
    Distances are shifted by each row's minimum first, which leaves the weights and their
    entropy unchanged but avoids underflow far from all neighbours.
    """
    n = dist.shape[0]
    not_self = idx != np.arange(n)[:, None]
    d = np.where(not_self, dist, np.inf)
    d = d - np.min(d, axis=1, keepdims=True)
    d = np.where(not_self, d, 0.0)
    target = np.log(perplexity)

    def entropy(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.where(not_self, np.exp(-d * beta[:, None]), 0.0)
        total = p.sum(axis=1)
        h = np.log(total) + beta * (d * p).sum(axis=1) / total
        return h, p / total[:, None]

    beta = np.ones(n)
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    h, p = entropy(beta)
    diff = h - target
    for _ in range(50):
        active = np.abs(diff) >= 1e-5
        if not active.any():
            break
        up = diff > 0
        lo = np.where(active & up, beta, lo)
        hi = np.where(active & ~up, beta, hi)
        grow = np.where(np.isinf(hi), beta * 2, (beta + hi) / 2)
        shrink = np.where(np.isinf(lo), beta / 2, (beta + lo) / 2)
        beta = np.where(active, np.where(up, grow, shrink), beta)
        h_new, p_new = entropy(beta)
        h = np.where(active, h_new, h)
        p = np.where(active[:, None], p_new, p)
        diff = h - target
    n_groups = int(codes.max()) + 1
    shares = np.zeros((n, n_groups))
    np.add.at(shares, (np.repeat(np.arange(n), idx.shape[1]), codes[idx].ravel()), p.ravel())
    return (shares**2).sum(axis=1)


def lisi(
    latent: np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_neighbors: int = N_NEIGHBORS_LISI,
    perplexity: float | None = None,
) -> np.ndarray:
    """Local inverse Simpson index of each cell (Korsunsky et al. 2019): effective number of groups.

    Between 1 (all weighted neighbours in one group) and the number of groups.

    Parameters
    ----------
    latent
        Cells x dimensions.
    groups
        Group (batch or cell type) of each cell.
    n_neighbors
        Neighbours considered, the cell itself included (90 as in scib-metrics).
    perplexity
        Effective neighbourhood size (None: ``n_neighbors // 3``).

    Examples
    --------
    >>> z = np.random.default_rng(0).normal(size=(300, 2))
    >>> bool(np.median(lisi(z, np.tile(["a", "b"], 150))) > 1.8)
    True
    """
    dist, idx = _knn(latent, n_neighbors)
    perplexity = float(np.floor(idx.shape[1] / 3)) if perplexity is None else perplexity
    return 1.0 / _simpson(dist, idx, _codes(groups, "groups"), perplexity)


def ilisi(latent: np.ndarray, batch: Sequence | np.ndarray, *, n_neighbors: int = 90) -> float:
    """Integration LISI: median LISI over batches, scaled to [0, 1] (1: batches fully mixed).

    ``(median - 1) / (n_batches - 1)``, as in scib-metrics.

    Examples
    --------
    >>> z = np.random.default_rng(0).normal(size=(300, 2))
    >>> ilisi(z, np.tile(["a", "b"], 150)) > 0.8
    True
    """
    n_batches = len(np.unique(_groups(batch, "batch")))
    if n_batches < 2:
        raise ValueError("iLISI needs at least two batches.")
    value = float(np.nanmedian(lisi(latent, batch, n_neighbors=n_neighbors)))
    return (value - 1.0) / (n_batches - 1)


def clisi(latent: np.ndarray, labels: Sequence | np.ndarray, *, n_neighbors: int = 90) -> float:
    """Cell-type LISI: median LISI over labels, scaled to [0, 1] (1: cell types kept apart).

    ``(n_labels - median) / (n_labels - 1)``, as in scib-metrics.

    Examples
    --------
    >>> z = np.r_[np.zeros((100, 2)), np.full((100, 2), 9.0)]
    >>> z = z + np.random.default_rng(0).normal(size=(200, 2))
    >>> clisi(z, ["a"] * 100 + ["b"] * 100) > 0.95
    True
    """
    n_labels = len(np.unique(_groups(labels)))
    if n_labels < 2:
        raise ValueError("cLISI needs at least two labels.")
    value = float(np.nanmedian(lisi(latent, labels, n_neighbors=n_neighbors)))
    return (n_labels - value) / (n_labels - 1)


def silhouette_label(latent: np.ndarray, labels: Sequence | np.ndarray) -> float:
    """Cell-type average silhouette width, rescaled to [0, 1]: ``(ASW + 1) / 2``.

    Examples
    --------
    >>> z = np.r_[np.zeros((50, 2)), np.full((50, 2), 5.0)]
    >>> z = z + np.random.default_rng(0).normal(0, 0.5, (100, 2))
    >>> silhouette_label(z, ["a"] * 50 + ["b"] * 50) > 0.9
    True
    """
    asw = silhouette_score(np.asarray(latent, dtype=np.float64), _groups(labels))
    return float((asw + 1.0) / 2.0)


def silhouette_batch(
    latent: np.ndarray,
    batch: Sequence | np.ndarray,
    labels: Sequence | np.ndarray | None = None,
) -> float:
    """Batch ASW: ``1 - |silhouette of the batch|`` per cell, within each cell type (1: mixed).

    For each label with at least two batches (and fewer batches than cells), the absolute batch
    silhouette of its cells is taken, ``1 - |s|`` averaged within the label, then over labels
    (scib-metrics' ``silhouette_batch``). Without ``labels`` all cells form one group (a
    batch-only score for data without cell types).

    Examples
    --------
    >>> z = np.random.default_rng(0).normal(size=(200, 2))
    >>> silhouette_batch(z, np.tile(["a", "b"], 100)) > 0.9
    True
    """
    x = np.asarray(latent, dtype=np.float64)
    b = _groups(batch, "batch")
    y = np.zeros(len(b), dtype=str) if labels is None else _groups(labels)
    means = []
    for group in np.unique(y):
        mask = y == group
        n_batches = len(np.unique(b[mask]))
        if n_batches == 1 or n_batches == mask.sum():
            continue
        means.append(np.mean(1.0 - np.abs(silhouette_samples(x[mask], b[mask]))))
    if not means:
        raise ValueError("Batch ASW needs a cell type (or all cells) spread over two batches.")
    return float(np.mean(means))


def graph_connectivity(
    latent: np.ndarray, labels: Sequence | np.ndarray, *, n_neighbors: int = N_NEIGHBORS_GRAPH
) -> float:
    """Mean over cell types of the share of its cells in its largest connected component.

    The graph is the directed ``n_neighbors``-NN graph of the latent (the cell itself
    included), restricted to the cells of one label; components are strongly connected
    (scib-metrics' definition). 1: every cell type forms one connected piece.

    Examples
    --------
    >>> z = np.r_[np.zeros((30, 2)), np.full((30, 2), 9.0)]
    >>> z = z + np.random.default_rng(0).normal(size=(60, 2))
    >>> graph_connectivity(z, ["a"] * 30 + ["b"] * 30)
    1.0
    """
    _, idx = _knn(latent, n_neighbors)
    return _graph_connectivity(idx, _groups(labels))


def _graph_connectivity(idx: np.ndarray, labels: np.ndarray) -> float:
    n, k = idx.shape
    graph = sp.csr_matrix((np.ones(n * k), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    shares = []
    for label in np.unique(labels):
        mask = labels == label
        sub = graph[mask][:, mask]
        _, comps = connected_components(sub, directed=True, connection="strong")
        shares.append(np.bincount(comps).max() / mask.sum())
    return float(np.mean(shares))


def integration_scores(
    adata: ad.AnnData,
    *,
    batch_key: str,
    labels_key: str | None = None,
    use_rep: str = "X_scvae",
    resolutions: Sequence[float] = RESOLUTIONS,
    seed: int = 0,
) -> dict[str, float]:
    """Score the batch integration of a latent with the scIB measures, unscaled.

    Parameters
    ----------
    adata
        Cells with the latent in ``obsm[use_rep]``.
    batch_key
        Column of ``obs`` with the batch.
    labels_key
        Column of ``obs`` with the cell types (None: batch-mixing scores only).
    use_rep
        Key of ``obsm`` with the latent (``"X_scvae"``, ``"X_pca"``, ...).
    resolutions
        Leiden resolutions searched for the best NMI.
    seed
        Seed of the Leiden clusterings.

    Returns
    -------
    dict of floats, higher is better for each. With labels: ``silhouette_label``, ``nmi``,
    ``ari``, ``clisi``, ``bio_conservation`` (their mean), ``silhouette_batch``, ``ilisi``,
    ``graph_connectivity``, ``batch_correction`` (their mean), ``total`` (0.6 bio + 0.4
    batch) and ``leiden_resolution``. Without labels: ``silhouette_batch`` (all cells as one
    group), ``ilisi`` and ``batch_correction`` (their mean); graph connectivity and the bio
    measures need cell types and are left out.

    Notes
    -----
    The measures follow scib-metrics 0.5 (LISI with 90 neighbours and perplexity 30, graph
    connectivity on the directed 15-NN graph), with exact neighbours; NMI/ARI come from
    Leiden clusterings over ``resolutions`` (scIB's resolution-optimised clustering) instead
    of scib-metrics' default k-means. scib-metrics' kBET, PCR comparison and isolated-label
    scores are not computed. Scores are not min-max scaled across methods.

    Examples
    --------
    >>> import anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(np.zeros((200, 1), dtype=np.float32))
    >>> a.obs["batch"] = np.repeat(["b0", "b1"], 100)
    >>> a.obsm["X_pca"] = rng.normal(size=(200, 3))
    >>> sorted(integration_scores(a, batch_key="batch", use_rep="X_pca"))
    ['batch_correction', 'ilisi', 'silhouette_batch']
    """
    if use_rep not in adata.obsm:
        have = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm (keys: {have}). Store the latent first, "
            'e.g. adata.obsm["X_scvae"] = model.get_latent_representation().'
        )
    resolutions = check_resolutions(resolutions)
    if labels_key is not None and labels_key == batch_key:
        raise ValueError(
            f"batch_key and labels_key are the same column ({batch_key!r}); labels_key names "
            "the cell types (or None to score batch mixing only)."
        )
    for key in (batch_key, labels_key):
        if key is not None and key not in adata.obs:
            raise KeyError(f"{key!r} is not a column of adata.obs.")
        if key is not None and adata.obs[key].isna().any():
            raise ValueError(
                f"adata.obs[{key!r}] has {int(adata.obs[key].isna().sum())} missing values "
                "(NaN); every cell needs one. Fill them or score the cells that have one: "
                f"integration_scores(adata[adata.obs[{key!r}].notna()], ...)."
            )
    latent = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    batch = adata.obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batch)) < 2:
        raise ValueError(f"adata.obs[{batch_key!r}] has one batch; batch scores need two or more.")
    dist, idx = _knn(latent, N_NEIGHBORS_LISI)
    perplexity = float(np.floor(idx.shape[1] / 3))
    n_batches = len(np.unique(batch))
    ilisi_value = float(np.nanmedian(1.0 / _simpson(dist, idx, _codes(batch), perplexity)))
    scores: dict[str, float] = {"ilisi": (ilisi_value - 1.0) / (n_batches - 1)}
    if labels_key is None:
        scores["silhouette_batch"] = silhouette_batch(latent, batch)
        scores["batch_correction"] = float(np.mean([scores["silhouette_batch"], scores["ilisi"]]))
        return scores
    labels = adata.obs[labels_key].astype(str).to_numpy()
    n_labels = len(np.unique(labels))
    if n_labels < 2:
        raise ValueError(f"adata.obs[{labels_key!r}] has one label; bio scores need two or more.")
    clisi_value = float(np.nanmedian(1.0 / _simpson(dist, idx, _codes(labels), perplexity)))
    clusters = leiden_nmi_ari(latent, labels, resolutions=resolutions, seed=seed)
    scores.update(
        silhouette_label=silhouette_label(latent, labels),
        nmi=clusters["nmi"],
        ari=clusters["ari"],
        clisi=(n_labels - clisi_value) / (n_labels - 1),
        silhouette_batch=silhouette_batch(latent, batch, labels),
        graph_connectivity=_graph_connectivity(idx[:, :N_NEIGHBORS_GRAPH], labels),
    )
    scores["bio_conservation"] = float(np.mean([scores[k] for k in BIO_MEASURES]))
    scores["batch_correction"] = float(np.mean([scores[k] for k in BATCH_MEASURES]))
    scores["total"] = 0.6 * scores["bio_conservation"] + 0.4 * scores["batch_correction"]
    scores["leiden_resolution"] = clusters["resolution"]
    return scores
