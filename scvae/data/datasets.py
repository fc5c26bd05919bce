"""Real count datasets that ship with an installed package (nothing is downloaded)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Largest distance from an integer accepted when recovering counts from float32 log data.
_MAX_ROUNDING = 0.25


def pbmc68k() -> ad.AnnData:
    """700 PBMCs x 765 genes of real UMI counts (Zheng et al. 2017), from scanpy's bundled file.

    scanpy ships ``pbmc68k_reduced`` with ``.raw`` = log1p(count / n_counts * 1e4) (float32)
    over 765 highly variable genes. The counts are recovered as
    ``round(expm1(raw) * n_counts / 1e4)``; the values are checked to lie within 0.25 of an
    integer before rounding (the float32 storage puts them within about 0.08), and every stored
    value to map to a count of at least 1.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR float32) and in ``layers["counts"]``;
    ``obs["cell_type"]`` (the paper's ``bulk_labels``), ``obs["louvain"]``,
    ``obs["n_counts_all_genes"]`` (the original totals) and ``obs["batch"]`` (one batch).

    Examples
    --------
    >>> adata = pbmc68k()
    >>> adata.shape
    (700, 765)
    >>> bool((adata.X.data == adata.X.data.round()).all())
    True
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(source.raw.X, dtype=np.float64)
    totals = source.obs["n_counts"].to_numpy(dtype=np.float64)
    values = np.expm1(raw.data) * np.repeat(totals, np.diff(raw.indptr)) / 1e4
    distance = np.abs(values - np.round(values))
    if distance.size and distance.max() > _MAX_ROUNDING:
        raise ValueError(
            "scanpy's pbmc68k_reduced .raw no longer holds log1p(count / n_counts * 1e4): "
            f"recovered values lie up to {distance.max():.3f} from an integer."
        )
    counts = np.round(values)
    if distance.size and counts.min() < 1:
        raise ValueError("scanpy's pbmc68k_reduced .raw holds values that map to zero counts.")
    x = sp.csr_matrix((counts.astype(np.float32), raw.indices, raw.indptr), shape=raw.shape)
    obs = pd.DataFrame(
        {
            "cell_type": source.obs["bulk_labels"].astype("category"),
            "louvain": source.obs["louvain"],
            "n_counts_all_genes": totals,
            "batch": pd.Categorical(["pbmc68k"] * source.n_obs),
        },
        # plain object indices: pandas 3's string arrays are refused by anndata 0.12's writer
        index=pd.Index(source.obs_names.astype(object)),
    )
    var = pd.DataFrame(index=pd.Index(source.raw.var_names.astype(object)))
    adata = ad.AnnData(x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    return adata
