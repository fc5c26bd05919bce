"""Bundled and simulated data: real integer counts, truth kept, reproducible."""

from __future__ import annotations

import numpy as np
import scanpy as sc

import scvae


def test_pbmc68k_counts_match_scanpy_normalisation():
    adata = scvae.datasets.pbmc68k()
    assert adata.shape == (700, 765)
    x = adata.X
    assert np.array_equal(x.data, np.round(x.data)) and x.data.min() >= 1
    # renormalising the recovered counts reproduces scanpy's stored log data
    source = sc.datasets.pbmc68k_reduced()
    totals = source.obs["n_counts"].to_numpy()[:, None]
    again = np.log1p(x.toarray() / totals * 1e4)
    np.testing.assert_allclose(again, source.raw.X.toarray(), atol=2e-3)
    assert adata.obs["cell_type"].nunique() == 10
    scvae.SCVAE(adata)  # passes registration


def test_simulate_is_reproducible_and_keeps_truth():
    a = scvae.data.simulate(300, 40, n_cell_types=4, n_batches=3, seed=5)
    b = scvae.data.simulate(300, 40, n_cell_types=4, n_batches=3, seed=5)
    c = scvae.data.simulate(300, 40, n_cell_types=4, n_batches=3, seed=6)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert a.obs["cell_type"].nunique() == 4 and a.obs["batch"].nunique() == 3
    assert a.varm["log_fold_change"].shape == (40, 4)
    assert (np.asarray(a.X.sum(1)).ravel() > 0).all()
    # the simulated library sizes drive the observed totals
    totals = np.asarray(a.X.sum(1)).ravel()
    assert np.corrcoef(np.log(totals), np.log(a.obs["library_size"]))[0, 1] > 0.5
