"""Bundled and simulated data: real integer counts, truth kept, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_simulate_states_its_truth_and_refuses_bad_parameters():
    adata = scvae.data.simulate(3000, 120, n_cell_types=2, seed=0)
    x = adata.X.toarray() / np.asarray(adata.X.sum(1))
    types = adata.obs["cell_type"].to_numpy()
    observed = np.log(x[types == "type0"].mean(0)) - np.log(x[types == "type1"].mean(0))
    truth = adata.varm["log_rho"][:, 0] - adata.varm["log_rho"][:, 1]
    expressed = np.exp(adata.varm["log_rho"]).min(1) > 2e-3
    assert np.corrcoef(observed[expressed], truth[expressed])[0, 1] > 0.99
    assert np.exp(adata.varm["log_rho"]).sum(0) == pytest.approx(1.0)
    # with one batch log_rho is the cells' own expression (its batch factor included)
    x = adata.X.toarray()
    for t in (0, 1):
        cells = types == f"type{t}"
        diff = np.log(x[cells].sum(0) / x[cells].sum())[expressed]
        diff -= adata.varm["log_rho"][expressed, t]
        assert np.median(np.abs(diff - np.median(diff))) < 0.05  # 0.24 without the factor
    assert adata.uns["simulation"]["n_genes"] == 120
    assert (
        scvae.data.simulate(20, 5, seed=np.random.default_rng(0)).uns["simulation"]["seed"] is None
    )  # an h5ad cannot hold the Generator
    for bad, match in (
        ({"de_fraction": 1.5}, r"de_fraction must be a finite number in \[0, 1\]"),
        ({"theta_range": (20, 2)}, r"theta_range must be \(low, high\)"),
        ({"zero_inflation": 1.0}, r"zero_inflation must be a finite number in \[0, 1\)"),
        ({"mean_library_size": 0}, r"mean_library_size must be a finite number > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            scvae.data.simulate(10, 5, **bad)
