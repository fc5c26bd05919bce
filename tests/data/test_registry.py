"""Registration: each bad input gets an error naming the problem and the fix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scvae
from scvae.data import RegistryError, register


@pytest.fixture
def counts():
    return scvae.data.simulate(60, 20, n_batches=2, seed=3)


def build(adata, **kw):
    return scvae.SCVAE(adata, **kw)


def with_x(adata, x):
    out = adata.copy()
    out.X = x
    return out


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: with_x(a, -a.X.toarray()), "negative values"),
        (lambda a: with_x(a, a.X.toarray() + 0.5), "non-integer values"),
        (lambda a: with_x(a, np.where(np.eye(60, 20) > 0, np.nan, a.X.toarray())), "NaN"),
        (lambda a: with_x(a, np.where(np.eye(60, 20) > 0, np.inf, a.X.toarray())), "infinite"),
        (lambda a: with_x(a, np.log1p(a.X.toarray() / 3.0)), "log-normalised"),
        (lambda a: with_x(a, (a.X.toarray() * 1.37).astype(np.float64)), "allow_non_integer"),
    ],
    ids=["negative", "non-integer", "nan", "inf", "log-normalised", "float64-decimals"],
)
def test_bad_counts(counts, mutate, match):
    bad = mutate(counts)
    with pytest.raises(RegistryError, match=match):
        build(bad)


def test_fractional_counts_accepted_on_request(counts):
    frac = with_x(counts, counts.X.toarray() * 1.37)
    model = build(frac, allow_non_integer=True)
    assert model.registry.allow_non_integer


def test_zero_count_cells_refused_with_number_and_fix(counts):
    x = counts.X.toarray()
    x[[3, 7]] = 0
    with pytest.raises(RegistryError, match=r"2 cells have zero total counts.*filter_cells"):
        build(with_x(counts, sp.csr_matrix(x)))


def test_all_zero_gene_is_accepted(counts):
    x = counts.X.toarray()
    x[:, 4] = 0
    x[:, 5] += 1  # keep every cell non-empty
    model = build(with_x(counts, sp.csr_matrix(x)))
    assert model.registry.n_vars == 20


def test_empty_anndata(counts):
    with pytest.raises(RegistryError, match="empty"):
        build(counts[:0].copy())
    with pytest.raises(RegistryError, match="empty"):
        build(counts[:, :0].copy())


def test_duplicated_gene_names(counts):
    dup = counts.copy()
    dup.var_names = ["g"] * 2 + [f"x{i}" for i in range(18)]
    with pytest.raises(RegistryError, match="var_names_make_unique"):
        build(dup)


def test_missing_layer_lists_layers(counts):
    a = counts.copy()
    a.layers["raw"] = a.X.copy()
    with pytest.raises(RegistryError, match=r"Layer 'counts' is not in adata.layers.*'raw'"):
        build(a, layer="counts")
    assert build(a, layer="raw").registry.layer == "raw"


def test_missing_obs_key(counts):
    with pytest.raises(RegistryError, match=r"batch_key='donor' is not a column"):
        build(counts, batch_key="donor")
    with pytest.raises(RegistryError, match=r"labels_key='kind' is not a column"):
        build(counts, labels_key="kind")


def test_nan_in_batch_column(counts):
    a = counts.copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(RegistryError, match=r"'batch'.*1 missing values"):
        build(a, batch_key="batch")


def test_unseen_category_at_query_time(counts):
    model = build(counts, batch_key="batch")
    other = counts.copy()
    other.obs["batch"] = pd.Categorical(["new"] * other.n_obs)
    with pytest.raises(RegistryError, match=r"not trained with: 'new'"):
        model.get_latent_representation(other)


def test_not_an_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        register(np.ones((3, 3)))


def test_string_matrix_refused():
    a = ad.AnnData(np.ones((2, 2), dtype=np.float32))
    a.layers["s"] = np.array([["a", "b"], ["c", "d"]], dtype=object)
    with pytest.raises(RegistryError, match="numeric"):
        register(a, layer="s")


def test_categories_in_order_of_appearance_of_categorical(counts):
    reg = register(counts, batch_key="batch")
    assert reg.batch_categories == ["batch0", "batch1"]
    codes = reg.batch_codes(counts)
    assert (codes == counts.obs["batch"].cat.codes.to_numpy()).all()


def test_dense_integer_counts_accepted():
    a = ad.AnnData(np.array([[1, 2], [3, 0]], dtype=np.int64))
    reg = register(a)
    assert reg.n_vars == 2


def test_registry_roundtrip(counts):
    reg = register(counts, batch_key="batch")
    assert type(reg).from_dict(reg.to_dict()) == reg
    with pytest.raises(RegistryError, match="malformed"):
        type(reg).from_dict({**reg.to_dict(), "surprise": 1})


def test_query_errors_count_every_bad_cell_and_give_a_fix_that_applies(counts):
    counts = counts.copy()
    counts.obs["score"] = np.linspace(0.0, 1.0, counts.n_obs)
    model = build(counts, continuous_covariate_keys=["score"])
    other = counts.copy()
    other.obs.iloc[:20, other.obs.columns.get_loc("score")] = np.nan
    with pytest.raises(
        RegistryError, match=r"20 missing values \(NaN\). Fill them \(with a number"
    ):
        model.get_elbo(other)
    fractional = counts.copy()
    fractional.X = fractional.X * 0.5
    with pytest.raises(RegistryError, match="registered on integer counts") as err:
        model.get_elbo(fractional)
    assert "allow_non_integer=True" not in str(err.value)  # not an option of a query


def test_numeric_batches_registered_in_numeric_order_as_scvi_tools(counts):
    # scvi-tools' setup_anndata takes pandas' categories: batch 10 after batch 2
    counts = counts.copy()
    counts.obs["run"] = np.resize([10, 2, 1], counts.n_obs)
    registry = register(counts, batch_key="run")
    assert registry.batch_categories == ["1", "2", "10"]
    assert registry.batch_categories == [
        str(c) for c in counts.obs["run"].astype("category").cat.categories
    ]
    np.testing.assert_array_equal(registry.batch_codes(counts), np.resize([2, 1, 0], counts.n_obs))
