"""Wrong argument types and values across the public functions: each gets an error naming the
argument (and, where the mistake is a common one, what to do), never a silent wrong result, a
traceback from inside pandas, numpy or torch, or a half-done change.

Found by an audit of the query, tl, pl, data and mapping functions on 2026-12-07; the bad
counts, keys and files are in tests/test_bad_input.py.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import scvae
from scvae.data import RegistryError
from scvae.integration import integration_scores
from scvae.label_transfer import transfer_labels


@pytest.fixture(scope="module")
def adata():
    return scvae.data.simulate(120, 20, n_batches=2, seed=3)


@pytest.fixture(scope="module")
def model(adata):
    model = scvae.SCVAE(adata, batch_key="batch", n_hidden=16, n_latent=3)
    model.train(max_epochs=2, device="cpu")
    return model


# ------------------------------------------------------------------ flags: "no" is not False
FLAGS = [
    ("get_latent_representation", "give_mean"),
    ("get_latent_representation", "return_dist"),
    ("get_elbo", "return_mean"),
    ("get_reconstruction_error", "return_mean"),
    ("get_marginal_ll", "return_mean"),
    ("get_normalized_expression", "return_mean"),
    ("get_normalized_expression", "return_numpy"),
    ("get_likelihood_parameters", "give_mean"),
    ("get_latent_library_size", "give_mean"),
]


@pytest.mark.parametrize(("method", "flag"), FLAGS)
def test_query_flags_refuse_strings(model, method, flag):
    with pytest.raises(TypeError, match=f"{flag} must be True(, False or None| or False)"):
        getattr(model, method)(**{flag: "False"})


def test_save_overwrite_must_be_a_bool_and_keeps_the_old_model(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    before = {name: os.stat(path / name).st_mtime_ns for name in os.listdir(path)}
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
        model.save(path, overwrite="no")
    assert {name: os.stat(path / name).st_mtime_ns for name in os.listdir(path)} == before


def test_tl_copy_must_be_a_bool(adata, model):
    target = adata.copy()
    with pytest.raises(TypeError, match="copy must be True or False"):
        scvae.tl.fit(target, copy="no", max_epochs=1)
    with pytest.raises(TypeError, match="copy must be True or False"):
        scvae.tl.normalized_expression(target, model, copy="no")
    assert "X_scvae" not in target.obsm and "scvae_normalized" not in target.layers


def test_load_query_data_freeze_flags_must_be_bools(adata, model):
    query = adata[:20].copy()
    query.obs["batch"] = "new"
    with pytest.raises(TypeError, match="unfrozen must be True or False"):
        scvae.SCVAE.load_query_data(query, model, unfrozen="no")


# ------------------------------------------------------------- arguments in the wrong place
def test_cells_passed_where_the_anndata_goes(model, adata):
    for wrong in ([0, 1, 2], np.array([0, 1]), adata.to_df()):
        with pytest.raises(TypeError, match=r"adata must be an AnnData.*indices=\[\.\.\.\]"):
            model.get_elbo(wrong)
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        model.differential_expression([0, 1], groupby="cell_type")


def test_swapped_model_and_anndata(model, adata, tmp_path):
    with pytest.raises(TypeError, match=r"adata must be an AnnData, got SCVAE.*\(adata, model\)"):
        scvae.tl.normalized_expression(model, adata)
    with pytest.raises(TypeError, match=r"model must be an scvae model, got str"):
        scvae.tl.differential_expression(adata, "model", groupby="cell_type")
    with pytest.raises(TypeError, match="scvae.pl.history takes the model"):
        scvae.pl.history(adata)
    with pytest.raises(TypeError, match="scvae.pl.volcano takes a DE table"):
        scvae.pl.volcano(model)
    model.save(tmp_path / "m")
    with pytest.raises(TypeError, match="adata must be an AnnData, got str"):
        scvae.SCVAE.load(tmp_path / "m", "cells.h5ad")
    with pytest.raises(TypeError, match=r"adata must be an AnnData, got SCVAE.*\(adata, refer"):
        scvae.SCVAE.load_query_data(model, adata)
    with pytest.raises(TypeError, match="adata must be an AnnData, got SCVAE"):
        scvae.SCVAE.prepare_query_anndata(model, adata)
    with pytest.raises(TypeError, match="reference_model must be a model or the directory"):
        scvae.SCVAE.prepare_query_anndata(adata, adata)


# ------------------------------------------------------------------------- values and types
def test_feature_correlation_checks_rna_size_factor_and_draws(model):
    for wrong in (-1, 0, float("nan"), "1e3", True):
        with pytest.raises(ValueError, match="rna_size_factor must be a finite positive number"):
            model.get_feature_correlation_matrix(rna_size_factor=wrong, n_samples=2)
    with pytest.raises(ValueError, match="needs at least 2 draws"):
        model.get_feature_correlation_matrix(indices=[0], n_samples=1)


def test_empty_transform_batch_is_refused(model):
    with pytest.raises(ValueError, match="transform_batch is an empty list"):
        model.get_normalized_expression(transform_batch=[])


def test_integration_scores_checks_resolutions_and_keys(adata):
    scored = adata.copy()
    scored.obsm["X_pca"] = np.random.default_rng(0).normal(size=(scored.n_obs, 3))
    for wrong in ([], [-1.0], [0.5, "1"], "0.5"):
        with pytest.raises(ValueError, match="resolutions must be a non-empty list"):
            integration_scores(
                scored, batch_key="batch", labels_key="cell_type", use_rep="X_pca",
                resolutions=wrong,
            )  # fmt: skip
    with pytest.raises(ValueError, match="batch_key and labels_key are the same column"):
        integration_scores(scored, batch_key="batch", labels_key="batch", use_rep="X_pca")


def test_de_string_selection_that_pandas_cannot_evaluate(model, adata):
    with pytest.raises(ValueError, match=r"idx1=\"celltype == 'type0'\" could not be evaluated"):
        model.differential_expression(adata, idx1="celltype == 'type0'")
    with pytest.raises(ValueError, match="columns: .*'cell_type'"):
        model.differential_expression(adata, idx1="cell_type ===")
    with pytest.raises(TypeError, match="groupby must be the name of a column"):
        model.differential_expression(adata, groupby=["cell_type"])


def test_volcano_n_labels(model, adata):
    table = model.differential_expression(adata, groupby="cell_type", n_samples_overall=50)
    for wrong in (-1, 2.5, "5"):
        with pytest.raises(ValueError, match="n_labels must be a whole number >= 0"):
            scvae.pl.volcano(table, comparison=table["comparison"].iloc[0], n_labels=wrong)


def test_read_timeout(tmp_path):
    for wrong in (0, -1, "10"):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            scvae.data.read(tmp_path / "missing.h5ad", timeout=wrong)


def test_simulate_types_and_seed():
    with pytest.raises(TypeError, match="n_cells must be a whole number, got '10'"):
        scvae.data.simulate("10", 5)
    with pytest.raises(TypeError, match="n_cells must be a whole number, got 10.5"):
        scvae.data.simulate(10.5, 5)
    message = r"seed must be a whole number from 0 to 2\*\*32 - 1, None or a numpy Generator"
    for wrong in (-1, 1.5, "1", 2**32, 2**64):  # 2**64: accepted, then no h5ad could hold it
        with pytest.raises(ValueError, match=message):
            scvae.data.simulate(10, 5, seed=wrong)
    assert scvae.data.simulate(10, 5, seed=2**32 - 1).uns["simulation"]["seed"] == 2**32 - 1
    assert scvae.data.simulate(np.int64(10), 5, seed=None).shape == (10, 5)
    a = scvae.data.simulate(10, 5, seed=np.random.default_rng(0)).X.toarray()
    b = scvae.data.simulate(10, 5, seed=np.random.SeedSequence(0)).X.toarray()
    assert np.array_equal(a, b)


def test_transfer_labels_key_added(adata):
    ref, query = adata[:60].copy(), adata[60:].copy()
    for a in (ref, query):
        a.obsm["X_scvae"] = np.asarray(a.X.todense())[:, :3]
    for wrong in ("", 3):
        with pytest.raises(ValueError, match="key_added must be a non-empty string"):
            transfer_labels(ref, query, "cell_type", key_added=wrong)
    assert list(query.obs.columns) == list(adata.obs.columns)


def test_binomial_thinning_arguments(adata, tmp_path):
    cases = [
        ({"log2_fold_changes": (np.nan,)}, "log2_fold_changes must be finite positive"),
        ({"log2_fold_changes": (0.0, 1.0)}, "log2_fold_changes must be finite positive"),
        ({"n_de_genes": -1}, "n_de_genes must be a whole number >= 0"),
        ({"n_de_genes": "5"}, "n_de_genes must be a whole number >= 0"),
        ({"group_sizes": (10,)}, "group_sizes must be two whole numbers"),
        ({"group_sizes": (10.5, 10)}, "group_sizes must be two whole numbers"),
        ({"group_sizes": 10}, "group_sizes must be two whole numbers"),
        ({"log2_fold_changes": ("a",)}, "log2_fold_changes must be finite positive"),
        ({"seed": None}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got None"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got -1"),
        ({"seed": 2**32}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got 4294967296"),
        ({"min_fraction_expressing": np.nan}, r"min_fraction_expressing must be a fraction"),
        ({"max_fraction_of_counts": "0.1"}, r"max_fraction_of_counts must be a fraction"),
        ({"max_fraction_of_counts": -1.0}, r"max_fraction_of_counts must be a fraction"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            scvae.data.binomial_thinning(adata, cell_type_key=None, **{"n_de_genes": 2, **kwargs})
    grouped = adata.copy()
    grouped.obs["group"] = "x"
    with pytest.raises(ValueError, match=r"already has a 'group' column"):
        scvae.data.binomial_thinning(grouped, cell_type_key=None, n_de_genes=2)
    out = scvae.data.binomial_thinning(
        adata, cell_type_key=None, n_de_genes=2, log2_fold_changes=1.0, min_fraction_expressing=0
    )
    assert out.var["is_de"].sum() == 2
    record = out.uns["thinning"]
    assert record["cell_type"] == "" and record["group_sizes"] == [adata.n_obs // 2] * 2
    out.write_h5ad(tmp_path / "thinned.h5ad")  # the record is what an h5ad holds


def test_missing_registered_column_names_the_registration(model, adata):
    other = adata.copy()
    del other.obs["batch"]
    with pytest.raises(RegistryError, match=r"registered with batch_key='batch'.*'batch0'"):
        model.get_latent_representation(other)


def test_de_table_still_sorts_as_before(model, adata):
    """The checks change no result: a valid call gives the same table as before them."""
    table = model.differential_expression(
        adata, idx1="cell_type == 'type0'", n_samples_overall=50, seed=0
    )
    again = model.differential_expression(
        adata, idx1=(adata.obs["cell_type"] == "type0").to_numpy(), n_samples_overall=50, seed=0
    )
    pd.testing.assert_frame_equal(table, again)
