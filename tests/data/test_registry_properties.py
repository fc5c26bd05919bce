"""Property-based tests of registration: on random small AnnDatas with random bad values and
obs keys, ``register`` either succeeds on valid data or raises a RegistryError naming a problem
the data really has; a registry survives JSON and checks later AnnDatas."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scvae.data import Registry, RegistryError, register

BAD_VALUES = {"negative": -3.0, "nan": np.nan, "inf": np.inf, "fraction": 2.5}
# what the message must say for each problem the data has
MESSAGES = {
    "nan": "NaN",
    "inf": "infinite",
    "negative": "negative values",
    "fraction": "non-integer values",
    "zero_cell": "zero total counts",
    "missing_key": "is not a column of adata.obs",
    "nan_key": "missing values (NaN)",
}
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def problems_of(x: np.ndarray) -> set[str]:
    """The problems a count matrix has, computed from the matrix itself."""
    found = set()
    if np.isnan(x).any():
        found.add("nan")
    if np.isinf(x).any():
        found.add("inf")
    finite = x[np.isfinite(x)]
    if (finite < 0).any():
        found.add("negative")
    if (finite != np.round(finite)).any():
        found.add("fraction")
    if not found and (x.sum(axis=1) <= 0).any():
        found.add("zero_cell")
    return found


@st.composite
def anndatas(draw):
    n_cells, n_genes = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    x = draw(arrays(np.int64, (n_cells, n_genes), elements=st.integers(0, 40))).astype(float)
    x[:, 0] += x.sum(axis=1) == 0  # valid unless a problem is injected below
    for kind in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), max_size=3)):
        i, j = draw(st.integers(0, n_cells - 1)), draw(st.integers(0, n_genes - 1))
        x[i, j] = BAD_VALUES[kind]
    if draw(st.booleans()) and draw(st.booleans()):
        x[draw(st.integers(0, n_cells - 1))] = 0.0
    storage = draw(st.sampled_from(["float32", "float64", "int64", "csr", "csc"]))
    if storage == "int64" and not np.isfinite(x).all():
        storage = "float64"
    if storage == "int64":
        matrix = np.round(x).astype(np.int64)
        x = matrix.astype(float)  # what the model sees
    elif storage in ("csr", "csc"):
        matrix = getattr(sp, f"{storage}_matrix")(x.astype(np.float32))
        x = x.astype(np.float32).astype(float)
    else:
        matrix = x.astype(storage)
        x = matrix.astype(float)
    adata = ad.AnnData(matrix)
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    batches = draw(st.lists(st.sampled_from("abc"), min_size=n_cells, max_size=n_cells))
    column = pd.Series(batches, index=adata.obs_names, dtype=object)
    key_case = draw(st.sampled_from(["none", "batch", "absent", "nan"]))
    if key_case == "nan":
        column.iloc[draw(st.integers(0, n_cells - 1))] = np.nan
    if draw(st.booleans()) and key_case != "nan":
        column = column.astype("category")
    adata.obs["batch"] = column
    key = {"none": None, "batch": "batch", "absent": "donor", "nan": "batch"}[key_case]
    expected = problems_of(x)
    expected |= {"absent": {"missing_key"}, "nan": {"nan_key"}}.get(key_case, set())
    return adata, key, expected, x


@PROPERTY
@given(case=anndatas())
def test_register_succeeds_or_names_a_real_problem(case):
    adata, key, expected, x = case
    event(f"problems: {sorted(expected) or 'none'}")
    if not expected:
        registry = register(adata, batch_key=key)
        assert registry.var_names == list(adata.var_names)
        assert registry.n_batch == (1 if key is None else adata.obs["batch"].nunique())
        counts = registry.check(adata)
        np.testing.assert_array_equal(counts.toarray(), x.astype(np.float32))
        return
    with pytest.raises(RegistryError) as err:
        register(adata, batch_key=key)
    message = str(err.value)
    assert any(MESSAGES[p] in message for p in expected), (expected, message)


@PROPERTY
@given(case=anndatas(), data=st.data())
def test_registry_roundtrips_and_checks_later_data(case, data):
    adata, key, expected, _ = case
    if expected:
        return
    registry = register(adata, batch_key=key)
    assert Registry.from_dict(json.loads(json.dumps(registry.to_dict()))) == registry
    n_genes = adata.n_vars
    order = data.draw(st.permutations(range(n_genes)))
    if list(order) != list(range(n_genes)):
        with pytest.raises(RegistryError, match="another order.*adata\\[:, model.var_names\\]"):
            registry.check(adata[:, list(order)].copy())
    if n_genes > 1:
        with pytest.raises(RegistryError, match=r"genes are missing from this AnnData"):
            registry.check(adata[:, 1:].copy())
    if key is not None:
        other = adata.copy()
        other.obs["batch"] = pd.Categorical(["zz-new"] * other.n_obs)
        with pytest.raises(RegistryError, match=r"not trained with: 'zz-new'"):
            registry.check(other)
