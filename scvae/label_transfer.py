"""Label transfer from a reference to a query by a weighted k-nearest-neighbour vote in a shared
latent space (numpy and scikit-learn; no torch)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from scvae import _checks
from scvae.data.registry import CategoryMatcher

UNKNOWN = "Unknown"


def transfer_labels(
    reference_adata: ad.AnnData,
    query_adata: ad.AnnData,
    labels_key: str,
    *,
    use_rep: str = "X_scvae",
    n_neighbors: int = 15,
    uncertainty_threshold: float | None = None,
    key_added: str | None = None,
    unlabeled_category: str | float | None = None,
) -> pd.DataFrame:
    """Predict each query cell's label from its nearest reference cells in the latent.

    Each query cell's ``n_neighbors`` nearest reference cells (Euclidean, in
    ``obsm[use_rep]`` of both AnnDatas, which must come from the same model, e.g. a query
    model from :meth:`scvae.SCVAE.load_query_data` applied to both) vote with Gaussian weights
    ``exp(-(d / s)^2)``, ``s`` the cell's mean distance to those neighbours. The label with the
    largest share of the weight wins; the uncertainty is one minus that share (0: all
    neighbours agree; at most ``1 - 1 / n_labels``).

    The uncertainty measures disagreement among the neighbours, not distance from the
    reference: a cell type absent from the reference that lands next to one reference type
    gets that type's label with little uncertainty. It is a weak detector of new cell types
    (on CellBench, cells of cell lines the reference lacked got a mean uncertainty of
    0.09-0.17; benchmarks/README.md, reference mapping, split "novel"); look at such groups
    in the joint latent before trusting their labels.

    Parameters
    ----------
    reference_adata
        Reference cells with their labels in ``obs[labels_key]`` and the latent.
    query_adata
        Query cells with the latent.
    labels_key
        Column of the reference's ``obs`` with the labels.
    use_rep
        Key of ``obsm`` with the latent, in both AnnDatas.
    n_neighbors
        Reference cells voting for each query cell.
    uncertainty_threshold
        Call cells above this uncertainty ``"Unknown"`` (None: always the winning label); in
        [0, 1].
    key_added
        Also write the labels to ``query_adata.obs[key_added]`` and the uncertainty to
        ``query_adata.obs[key_added + "_uncertainty"]``.
    unlabeled_category
        The label of reference cells without a label (scANVI's name and convention, e.g.
        ``"Unknown"`` or ``"unlabeled"``): those cells do not vote and are never predicted.
        None: every reference cell votes.

    Returns
    -------
    DataFrame indexed by the query's cells with columns ``labels_key`` (categorical, of the
    reference's label values: integer labels stay integers; plus "Unknown" with a threshold)
    and ``uncertainty`` (float in [0, 1)).

    Examples
    --------
    >>> import anndata as ad
    >>> ref = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    >>> ref.obs["cell_type"] = ["T", "T", "B", "B"]
    >>> ref.obsm["X_scvae"] = np.array([[0.0, 0], [0, 1], [9, 9], [9, 8]])
    >>> query = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    >>> query.obsm["X_scvae"] = np.array([[0.0, 0.5], [9, 8.5]])
    >>> transfer_labels(ref, query, "cell_type", n_neighbors=2)["cell_type"].tolist()
    ['T', 'B']
    """
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(
            f"key_added must be a non-empty string (an obs column) or None, got {key_added!r}."
        )
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer):
        raise TypeError(f"n_neighbors must be an integer, got {n_neighbors!r}.")
    if n_neighbors < 1:
        raise ValueError(
            f"n_neighbors must be at least 1 (reference cells voting per query cell), got "
            f"{n_neighbors}; the default is 15."
        )
    if uncertainty_threshold is not None and not 0.0 <= uncertainty_threshold <= 1.0:
        raise ValueError(
            f"uncertainty_threshold must lie in [0, 1] (the uncertainty does), got "
            f"{uncertainty_threshold!r}; pass None to call every cell."
        )
    for name, a in (("reference_adata", reference_adata), ("query_adata", query_adata)):
        if a.n_obs == 0:
            raise ValueError(f"{name} has no cells; pass an AnnData with at least one cell.")
        if use_rep not in a.obsm:
            raise KeyError(
                f"{name}.obsm has no {use_rep!r}; store the latent of both from the same model, "
                'e.g. adata.obsm["X_scvae"] = query_model.get_latent_representation(adata).'
            )
    if labels_key not in reference_adata.obs:
        have = ", ".join(map(repr, list(reference_adata.obs.columns)[:20])) or "none"
        raise KeyError(
            f"{labels_key!r} is not a column of reference_adata.obs (columns: {have}); pass "
            "as labels_key the column that holds the reference's cell labels."
        )
    labels = reference_adata.obs[labels_key]
    ref = np.asarray(reference_adata.obsm[use_rep], dtype=np.float64)
    query = np.asarray(query_adata.obsm[use_rep], dtype=np.float64)
    for name, latent in (("reference_adata", ref), ("query_adata", query)):
        bad = ~np.isfinite(latent).all(axis=1) if latent.ndim == 2 else None
        if bad is None:
            raise ValueError(
                f"{name}.obsm[{use_rep!r}] must be cells x dimensions, got shape {latent.shape}."
            )
        if bad.any():
            raise ValueError(
                f"{name}.obsm[{use_rep!r}] has {int(bad.sum())} cells with NaN or infinite "
                "values; compute the latent again (e.g. model.get_latent_representation) or "
                "drop those cells."
            )
    if unlabeled_category is not None:
        # matched as the batches are: -1 finds the label -1.0 of a float column
        labelled = CategoryMatcher([str(unlabeled_category)]).codes(labels)[0] < 0
        if not labelled.any():
            raise ValueError(
                f"Every reference cell is labelled {unlabeled_category!r} (unlabeled_category), "
                "so none can vote; label some reference cells, or check labels_key and "
                "unlabeled_category."
            )
        labels, ref = labels[labelled], ref[labelled]
    if labels.isna().any():
        raise ValueError(
            f"reference_adata.obs[{labels_key!r}] has {int(labels.isna().sum())} missing labels; "
            "drop those cells from the reference first, or give them one label and pass it "
            "as unlabeled_category."
        )
    if uncertainty_threshold is not None and (labels.astype(str) == UNKNOWN).any():
        raise ValueError(
            f"reference_adata.obs[{labels_key!r}] has cells labelled {UNKNOWN!r}, the label "
            "uncertainty_threshold gives uncertain cells: the two could not be told apart. "
            "Rename that reference label first, or pass uncertainty_threshold=None."
        )
    if ref.shape[1] != query.shape[1]:
        raise ValueError(
            f"The latents differ in width (reference {ref.shape[1]}, query {query.shape[1]}); "
            "embed both with the same model."
        )
    # the reference's own label values (integers stay integers), the labels present only
    present = pd.Categorical(labels.to_numpy()).remove_unused_categories()
    categories = np.asarray(present.categories, dtype=object)
    codes = np.asarray(present.codes, dtype=np.int64)
    k = min(n_neighbors, ref.shape[0])
    if k < n_neighbors:
        _checks.warn_user(
            f"n_neighbors={n_neighbors} is more than the reference's {ref.shape[0]} cells: "
            f"each query cell's vote takes all {k} of them.",
        )
    dist, idx = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(query)
    scale = dist.mean(axis=1, keepdims=True)
    weights = np.exp(-((dist / np.where(scale > 0, scale, 1.0)) ** 2))
    votes = np.zeros((query.shape[0], len(categories)))
    np.add.at(votes, (np.repeat(np.arange(query.shape[0]), k), codes[idx].ravel()), weights.ravel())
    shares = votes / votes.sum(axis=1, keepdims=True)
    winner = shares.argmax(axis=1)
    uncertainty = 1.0 - shares[np.arange(len(winner)), winner]
    predicted = categories[winner].astype(object)
    names = list(categories)
    if uncertainty_threshold is not None:
        predicted[uncertainty > uncertainty_threshold] = UNKNOWN
        names.append(UNKNOWN)
    out = pd.DataFrame(
        {
            labels_key: pd.Categorical(predicted, categories=names),
            "uncertainty": uncertainty,
        },
        index=query_adata.obs_names,
    )
    if key_added is not None:
        query_adata.obs[key_added] = out[labels_key].values
        query_adata.obs[f"{key_added}_uncertainty"] = uncertainty
    return out
