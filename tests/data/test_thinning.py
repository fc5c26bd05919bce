"""Binomial thinning: the truth it records is the truth of the counts it returns."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scvae
from scvae.data import binomial_thinning as _binomial_thinning


def binomial_thinning(adata, **kw):
    """60 genes only: each carries more than the default 1% of the counts."""
    return _binomial_thinning(adata, **{"max_fraction_of_counts": 0.2, **kw})


@pytest.fixture(scope="module")
def real():
    """Counts of one population with known means: Poisson, 4,000 cells x 60 genes."""
    rng = np.random.default_rng(0)
    means = np.exp(rng.normal(1.0, 1.0, 60))
    counts = rng.poisson(means, (4000, 60)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs["cell_type"] = np.where(np.arange(4000) < 3000, "T", "B")
    adata.var["mean"] = means
    return adata


def test_groups_split_the_chosen_cells_at_random(real):
    out = binomial_thinning(real, cell_type="T", n_de_genes=0, seed=1)
    assert out.n_obs == 3000 and (out.obs["cell_type"] == "T").all()
    assert out.obs["group"].value_counts().to_dict() == {"A": 1500, "B": 1500}
    # a null data set: the counts are untouched and nothing is DE
    np.testing.assert_array_equal(out.X.toarray(), real[out.obs_names].X.toarray())
    assert not out.var["is_de"].any() and np.allclose(out.var["log2_fold_change"], 0)
    other = binomial_thinning(real, cell_type="T", n_de_genes=0, seed=2)
    assert (other.obs["group"].to_numpy() != out.obs["group"].to_numpy()).any()
    sized = binomial_thinning(real, cell_type="T", group_sizes=(100, 300), n_de_genes=0)
    assert sized.obs["group"].value_counts().to_dict() == {"A": 100, "B": 300}


def test_thinned_means_match_the_recorded_factors(real):
    out = binomial_thinning(
        real, cell_type="T", n_de_genes=20, log2_fold_changes=(1.0, 2.0), seed=3
    )
    var = out.var
    assert var["is_de"].sum() == 20
    fa, fb = var["thinning_factor_A"].to_numpy(), var["thinning_factor_B"].to_numpy()
    assert ((fa == 1) | (fb == 1)).all()  # each gene thinned in one group at most
    assert abs((fa < 1).sum() - (fb < 1).sum()) <= 4  # both directions, about equally
    assert sorted(np.unique(np.minimum(fa, fb))) == [0.25, 0.5, 1.0]
    x = out.X.toarray()
    in_a = (out.obs["group"] == "A").to_numpy()
    mean = real.var["mean"].to_numpy()
    for factor, cells in ((fa, in_a), (fb, ~in_a)):
        expected = factor * mean
        se = np.sqrt(expected / cells.sum())
        assert (np.abs(x[cells].mean(0) - expected) < 5 * se + 1e-9).all()
    # the counts are still integers, never above the originals
    orig = real[out.obs_names].X.toarray()
    assert (x <= orig).all() and np.array_equal(x, np.round(x))
    untouched = ~var["is_de"].to_numpy()
    np.testing.assert_array_equal(x[:, untouched], orig[:, untouched])


def test_recorded_log2_fold_change_is_that_of_normalised_expression(real):
    out = binomial_thinning(real, cell_type="T", n_de_genes=30, log2_fold_changes=(2.0,), seed=4)
    x = out.X.toarray()
    in_a = (out.obs["group"] == "A").to_numpy()
    rho = [x[c].sum(0) / x[c].sum() for c in (in_a, ~in_a)]
    observed = np.log2(rho[0] / rho[1])
    truth = out.var["log2_fold_change"].to_numpy()
    de = out.var["is_de"].to_numpy()
    assert np.abs(np.abs(truth[de]) - 2.0).max() < 0.5  # +-2 up to the library shift
    big = x.sum(0) > 2000  # enough counts for a sharp empirical ratio
    assert np.abs(observed[big] - truth[big]).max() < 0.15
    shift = truth[~de]
    assert np.allclose(shift, shift[0]) and abs(shift[0]) < 0.02  # balanced libraries


def test_balancing_keeps_the_shift_small_with_an_abundant_gene(real):
    skewed = real.copy()
    x = skewed.X.toarray()
    x[:, 0] += 200  # one gene carries about half of all counts
    skewed.X = sp.csr_matrix(x)
    for seed in range(5):
        out = binomial_thinning(skewed, n_de_genes=20, log2_fold_changes=(2.0,), seed=seed)
        assert not out.var["is_de"].iloc[0]  # too abundant to be chosen
        shift = out.var["log2_fold_change"][~out.var["is_de"]]
        assert abs(shift.iloc[0]) < 0.02
    wide = binomial_thinning(skewed, n_de_genes=59, max_fraction_of_counts=1.0, seed=0)
    assert wide.var["is_de"].iloc[0]


def test_only_expressed_genes_are_chosen_and_errors(real):
    sparse = real.copy()
    x = sparse.X.toarray()
    x[:, :50] = 0
    x[:, 50:] += 1
    sparse.X = sp.csr_matrix(x)
    out = binomial_thinning(sparse, cell_type="T", n_de_genes=10, seed=0)
    assert out.var["is_de"].to_numpy()[50:].all()
    with pytest.raises(ValueError, match="only 10 genes"):
        binomial_thinning(sparse, cell_type="T", n_de_genes=11)
    with pytest.raises(ValueError, match="No cell has"):
        binomial_thinning(real, cell_type="NK")
    with pytest.raises(ValueError, match="group_sizes"):
        binomial_thinning(real, cell_type="B", group_sizes=(900, 200))
    with pytest.raises(ValueError, match="positive"):
        binomial_thinning(real, n_de_genes=3, log2_fold_changes=(-1.0,))


def test_usable_by_the_model(real):
    out = binomial_thinning(real, cell_type="B", n_de_genes=5, seed=0)
    model = scvae.SCVAE(out, n_latent=2)
    res = model.differential_expression(
        groupby="group", group1="A", group2="B", n_samples_overall=30
    )
    assert len(res) == out.n_vars
