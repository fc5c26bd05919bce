"""Scores of a latent space against known labels: kNN accuracy and Leiden NMI/ARI.

The resolution-optimised NMI/ARI follows scIB (Luecken et al. 2022): Leiden clusterings of the
latent's kNN graph over resolutions 0.1, 0.2, ..., 2.0; the best NMI and the ARI at that
resolution are reported.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import anndata as ad
import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

from scvae._checks import positive_number

RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))


def knn_accuracy(latent: np.ndarray, labels: Sequence, *, n_neighbors: int = 15) -> float:
    """Leave-one-out k-nearest-neighbour label accuracy in a latent space.

    Each cell's label is predicted by a majority vote of its ``n_neighbors`` nearest other
    cells (Euclidean); the score is the fraction predicted right.

    Examples
    --------
    >>> noise = np.random.default_rng(0).normal(0, 0.1, (40, 2))
    >>> z = np.r_[np.zeros((20, 2)), np.ones((20, 2))] + noise
    >>> knn_accuracy(z, ["a"] * 20 + ["b"] * 20, n_neighbors=5)
    1.0
    """
    codes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    k = min(n_neighbors, len(y) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)
    votes = y[idx[:, 1:]]
    counts = np.zeros((len(y), len(codes)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(y)), k), votes.ravel()), 1)
    return float((counts.argmax(1) == y).mean())


def check_resolutions(resolutions: Any) -> list[float]:
    """``resolutions`` as a non-empty list of finite positive numbers, or a ValueError.

    Examples
    --------
    >>> check_resolutions((0.5, 1))
    [0.5, 1.0]
    """
    one = isinstance(resolutions, numbers.Real) and not isinstance(resolutions, bool)
    values = [resolutions] if one else resolutions
    if isinstance(values, str) or not isinstance(values, Iterable):
        values = None
    else:
        values = list(values)
    ok = bool(values) and all(positive_number(r) for r in values)
    if not ok:
        raise ValueError(
            "resolutions must be a non-empty list of positive numbers (Leiden resolutions, "
            f"e.g. [0.5, 1.0]), got {resolutions!r}."
        )
    return [float(r) for r in values]


def leiden_nmi_ari(
    latent: np.ndarray,
    labels: Sequence,
    *,
    resolutions: Sequence[float] = RESOLUTIONS,
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """Resolution-optimised NMI and ARI of Leiden clusters of the latent against ``labels``.

    Returns ``{"nmi", "ari", "resolution"}``: the best NMI over ``resolutions`` and the ARI and
    resolution where it was reached.

    Examples
    --------
    >>> z = np.r_[np.zeros((30, 2)), np.ones((30, 2)) * 5]
    >>> z = z + np.random.default_rng(0).normal(0, .1, (60, 2))
    >>> leiden_nmi_ari(z, ["a"] * 30 + ["b"] * 30, resolutions=[0.1])["nmi"]
    1.0
    """
    import scanpy as sc

    resolutions = check_resolutions(resolutions)
    adata = ad.AnnData(np.zeros((latent.shape[0], 1), dtype=np.float32))
    adata.obsm["X_latent"] = np.asarray(latent, dtype=np.float32)
    sc.pp.neighbors(adata, use_rep="X_latent", n_neighbors=n_neighbors, random_state=seed)
    truth = np.asarray(labels).astype(str)
    best = {"nmi": -1.0, "ari": float("nan"), "resolution": float("nan")}
    for res in resolutions:
        sc.tl.leiden(
            adata,
            resolution=res,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added="_leiden",
        )
        clusters = adata.obs["_leiden"].to_numpy()
        nmi = normalized_mutual_info_score(truth, clusters)
        if nmi > best["nmi"]:
            best = {
                "nmi": float(nmi),
                "ari": float(adjusted_rand_score(truth, clusters)),
                "resolution": float(res),
            }
    return best
