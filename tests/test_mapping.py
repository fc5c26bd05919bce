"""Reference mapping (prepare_query_anndata, load_query_data) and label transfer."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvae
from scvae.data.registry import RegistryError
from scvae.label_transfer import transfer_labels

ARCHES = {"encode_covariates": True, "use_layer_norm": "both", "use_batch_norm": "none"}
# for tests that map onto an untrained reference on purpose (speed): its warnings are expected
UNTRAINED_REFERENCE = pytest.mark.filterwarnings(
    "ignore:The reference .* has not been trained:UserWarning",
    "ignore:.*whose reference was never trained:UserWarning",
)


@pytest.fixture(scope="module")
def split():
    """Two reference batches; the query is half of batch0's cells (so the reference knows
    where they belong) renamed to a new batch, plus cells of batch1 under their own name."""
    data = scvae.data.simulate(900, 60, n_batches=2, n_cell_types=3, batch_effect=0.5, seed=0)
    held = np.zeros(data.n_obs, dtype=bool)
    held[np.flatnonzero(data.obs["batch"] == "batch0")[::2]] = True
    held[np.flatnonzero(data.obs["batch"] == "batch1")[:30]] = True
    reference, query = data[~held].copy(), data[held].copy()
    query.obs["batch"] = np.where(query.obs["batch"] == "batch0", "lab2", "batch1")
    return reference, query


@pytest.fixture(scope="module")
def reference_model(split):
    scvae.settings.progress_bar = False
    model = scvae.SCVAE(split[0], batch_key="batch", **ARCHES)
    model.train(max_epochs=40, seed=0, n_epochs_kl_warmup=10)
    return model


def _sha(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# ------------------------------------------------------------------ prepare_query_anndata
def test_prepare_query_reorders_pads_and_reports(split, reference_model, caplog):
    _, query = split
    genes = list(reference_model.var_names)
    sub = query[:, genes[::-1]][:, 3:]  # reversed order, the last three genes missing
    novel = sp.random(query.n_obs, 2, density=0.5, format="csr", random_state=0) * 10
    x = sp.hstack([sub.X, novel.ceil()]).tocsr()
    shuffled = ad.AnnData(x, obs=query.obs.copy())
    shuffled.var_names = [*sub.var_names, "novel0", "novel1"]
    shuffled.layers["counts"] = x.copy()
    before = shuffled.copy()
    with caplog.at_level(logging.INFO, logger="scvae"):
        prepared = scvae.SCVAE.prepare_query_anndata(shuffled, reference_model)
    assert "3 padded with zeros, 2 query genes not in the reference dropped" in caplog.text
    assert list(prepared.var_names) == genes
    missing = genes[-3:]
    assert prepared[:, missing].X.nnz == 0
    kept = genes[:-3]
    np.testing.assert_array_equal(prepared[:, kept].X.toarray(), query[:, kept].X.toarray())
    np.testing.assert_array_equal(prepared.layers["counts"].toarray(), prepared.X.toarray())
    assert sp.issparse(prepared.X)
    # the input is left as it was (a new AnnData is returned)
    assert list(shuffled.var_names) == list(before.var_names)
    assert (shuffled.X != before.X).nnz == 0


def test_prepare_query_from_a_saved_reference_and_dense_data(split, reference_model, tmp_path):
    reference_model.save(tmp_path / "ref")
    query = split[1][:, list(reference_model.var_names)[::-1]].copy()
    query.X = query.X.toarray()
    prepared = scvae.SCVAE.prepare_query_anndata(query, tmp_path / "ref")
    assert isinstance(prepared.X, np.ndarray)
    np.testing.assert_array_equal(
        prepared.X, split[1][:, list(reference_model.var_names)].X.toarray()
    )


def test_prepare_query_errors(split, reference_model, caplog):
    query = split[1].copy()
    few = query[:, :10].copy()
    with caplog.at_level(logging.WARNING, logger="scvae"):
        scvae.SCVAE.prepare_query_anndata(few, reference_model)
    assert "the mapping may be poor" in caplog.text
    query.var_names = [f"other{i}" for i in range(query.n_vars)]
    with pytest.raises(RegistryError, match="None of the reference's genes"):
        scvae.SCVAE.prepare_query_anndata(query, reference_model)
    query.var_names = ["same"] * query.n_vars
    with pytest.raises(RegistryError, match="var_names_make_unique"):
        scvae.SCVAE.prepare_query_anndata(query, reference_model)


# ------------------------------------------------------------------------ load_query_data
@pytest.mark.parametrize("genes", ["reversed", "missing", "extra"])
def test_load_query_refuses_unaligned_genes_then_works_after_prepare(split, reference_model, genes):
    query = split[1]
    if genes == "reversed":
        query = query[:, ::-1].copy()
    elif genes == "missing":
        query = query[:, 3:].copy()
    else:
        extra = split[1][:, :2].copy()
        extra.var_names = ["novel0", "novel1"]
        query = ad.concat([query, extra], axis=1, merge="first")
    with pytest.raises(RegistryError, match="prepare_query_anndata"):
        scvae.SCVAE.load_query_data(query, reference_model)
    prepared = scvae.SCVAE.prepare_query_anndata(query, reference_model)
    model = scvae.SCVAE.load_query_data(prepared, reference_model)
    assert model.get_latent_representation().shape == (query.n_obs, 10)


@UNTRAINED_REFERENCE
def test_reference_that_cannot_move_the_query_is_refused(split):
    reference = scvae.SCVAE(split[0], batch_key="batch")  # encode_covariates=False
    with pytest.raises(ValueError, match="encode_covariates=True"):
        scvae.SCVAE.load_query_data(split[1], reference)
    no_batch = scvae.SCVAE(split[0], encode_covariates=True)
    with pytest.raises(RegistryError, match="without a batch_key"):
        scvae.SCVAE.load_query_data(split[1], no_batch)


def test_query_without_the_batch_column_is_refused(split, reference_model):
    query = split[1].copy()
    del query.obs["batch"]
    with pytest.raises(RegistryError, match="batch_key"):
        scvae.SCVAE.load_query_data(query, reference_model)


def test_batch_already_in_reference_keeps_its_code(split, reference_model):
    _, query = split
    model = scvae.SCVAE.load_query_data(query, reference_model)
    assert model.registry.batch_categories == ["batch0", "batch1", "lab2"]
    codes = model.registry.batch_codes(query)
    assert set(codes[query.obs["batch"] == "batch1"]) == {1}
    assert set(codes[query.obs["batch"] == "lab2"]) == {2}
    known = query[query.obs["batch"] == "batch1"].copy()
    expected = reference_model.get_latent_representation(known)
    np.testing.assert_array_equal(model.get_latent_representation(known), expected)
    model.train(max_epochs=3, seed=0)  # the reference batch's columns stay frozen
    np.testing.assert_allclose(model.get_latent_representation(known), expected, atol=1e-6)


def test_query_of_reference_batches_only_is_mapped_as_the_reference(split, reference_model, caplog):
    """No new batch: nothing is added, nothing trains, the query lands where the reference
    puts it (documented: cells of a batch the reference knows keep that batch's code)."""
    known = split[1][split[1].obs["batch"] == "batch1"].copy()
    with (
        caplog.at_level(logging.INFO, logger="scvae"),
        pytest.warns(UserWarning, match="None of the query's batches is new") as record,
    ):
        model = scvae.SCVAE.load_query_data(known, reference_model)
    # layer norm, no batch norm, observed library: no parameter is left to train
    message = str(record[0].message)
    assert "fits nothing (every weight is frozen), and the query's latent stays" in message
    assert "scvi-tools trains" in message and "new batch name" in message
    assert "0 new batch(es)" in caplog.text
    assert model.registry.batch_categories == ["batch0", "batch1"]
    expected = reference_model.get_latent_representation(known)
    model.train(max_epochs=2, seed=0)
    np.testing.assert_allclose(model.get_latent_representation(), expected, atol=1e-6)


def test_query_with_missing_reordered_genes_and_a_known_batch_end_to_end(split, reference_model):
    """The three awkward cases at once, through prepare -> load -> train -> transfer_labels."""
    _, query = split
    genes = list(reference_model.var_names)
    messy = query[:, genes[::-1][2:]].copy()  # reversed, two reference genes missing
    prepared = scvae.SCVAE.prepare_query_anndata(messy, reference_model)
    assert list(prepared.var_names) == genes and prepared[:, genes[-2:]].X.nnz == 0
    model = scvae.SCVAE.load_query_data(prepared, reference_model)
    assert model.registry.batch_categories == ["batch0", "batch1", "lab2"]
    model.train(max_epochs=5, seed=0)
    reference = split[0].copy()
    reference.obsm["X_scvae"] = model.get_latent_representation(reference)
    prepared.obsm["X_scvae"] = model.get_latent_representation(prepared)
    out = transfer_labels(reference, prepared, "cell_type")
    truth = prepared.obs["cell_type"].astype(str).to_numpy()
    assert (out["cell_type"].astype(str).to_numpy() == truth).mean() > 0.8
    assert out.index.equals(prepared.obs_names)


def test_reference_and_its_files_are_unchanged(split, reference_model, tmp_path):
    path = tmp_path / "reference"
    reference_model.save(path)
    files = _sha(path)
    state = {k: v.clone() for k, v in reference_model.module.state_dict().items()}
    for ref in (reference_model, path):
        model = scvae.SCVAE.load_query_data(split[1], ref)
        assert model is not reference_model and model.module is not reference_model.module
        model.train(max_epochs=3, seed=0)  # default weight decay included
        assert model.adata is split[1]
    assert _sha(path) == files
    for key, value in reference_model.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert reference_model.registry.batch_categories == ["batch0", "batch1"]


@UNTRAINED_REFERENCE
def test_library_prior_of_new_batches_comes_from_the_query(split):
    reference, query = split
    ref = scvae.SCVAE(reference, batch_key="batch", use_observed_lib_size=False, **ARCHES)
    model = scvae.SCVAE.load_query_data(query, ref)
    new = query[query.obs["batch"] == "lab2"]
    log_totals = np.log(np.asarray(new.X.sum(1)).ravel())
    assert model.module.library_log_means[2].item() == pytest.approx(log_totals.mean(), rel=1e-5)
    assert model.module.library_log_vars[2].item() == pytest.approx(log_totals.var(), rel=1e-4)
    assert torch.equal(model.module.library_log_means[:2], ref.module.library_log_means)


def test_query_moves_toward_its_cell_types(split, reference_model):
    """From a misplaced start, training the new columns brings the query's cells toward the
    place the reference gives the same cells under their true batch (batch0)."""
    _, query = split
    lab2 = query[query.obs["batch"] == "lab2"].copy()
    truth_data = lab2.copy()
    truth_data.obs["batch"] = "batch0"
    truth = reference_model.get_latent_representation(truth_data)
    model = scvae.SCVAE.load_query_data(lab2, reference_model)
    weight = model.module.z_encoder.encoder.layers[0][0].weight
    with torch.no_grad():  # a random start for the new column, as scvi-tools draws it
        weight[:, -1] += torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(0))
    start = np.linalg.norm(model.get_latent_representation() - truth, axis=1).mean()
    elbo = model.get_elbo()
    model.train(max_epochs=20, lr=3e-2, seed=0, n_epochs_kl_warmup=None)
    end = np.linalg.norm(model.get_latent_representation() - truth, axis=1).mean()
    assert end < 0.7 * start
    assert model.get_elbo() > elbo
    reference = split[0].copy()
    reference.obsm["X_scvae"] = model.get_latent_representation(reference)
    lab2.obsm["X_scvae"] = model.get_latent_representation(lab2)
    predicted = transfer_labels(reference, lab2, "cell_type")["cell_type"]
    assert (predicted.astype(str).to_numpy() == lab2.obs["cell_type"].astype(str)).mean() > 0.9


def test_query_model_saves_and_loads(split, reference_model, tmp_path):
    model = scvae.SCVAE.load_query_data(split[1], reference_model)
    model.train(max_epochs=2, seed=0)
    model.save(tmp_path / "query")
    loaded = scvae.SCVAE.load(tmp_path / "query", split[1])
    assert loaded.registry.batch_categories == ["batch0", "batch1", "lab2"]
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


@UNTRAINED_REFERENCE
def test_reference_labels_are_not_needed_in_the_query(split):
    reference, query = split
    ref = scvae.SCVAE(reference, batch_key="batch", labels_key="cell_type", **ARCHES)
    query = query.copy()
    del query.obs["cell_type"]
    model = scvae.SCVAE.load_query_data(query, ref)
    assert model.get_latent_representation().shape == (query.n_obs, 10)


# --------------------------------------------------------------------------- transfer_labels
def _latent_pair(seed: int = 0):
    """Three overlapping Gaussian clusters: reference with labels, query with the truth."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 2.5]])

    def make(n):
        y = rng.integers(0, 3, n)
        a = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
        a.obs["cell_type"] = np.array(["A", "B", "C"])[y]
        a.obsm["X_scvae"] = centres[y] + rng.normal(size=(n, 2))
        return a

    return make(600), make(400)


def test_transfer_labels_uncertainty_is_higher_on_wrong_calls():
    ref, query = _latent_pair()
    out = transfer_labels(ref, query, "cell_type", key_added="predicted")
    wrong = out["cell_type"].astype(str).to_numpy() != query.obs["cell_type"].to_numpy()
    assert 0.6 < 1 - wrong.mean() < 0.99
    assert out.loc[wrong, "uncertainty"].mean() > out.loc[~wrong, "uncertainty"].mean() + 0.1
    assert ((out["uncertainty"] >= 0) & (out["uncertainty"] <= 2 / 3)).all()
    assert list(query.obs["predicted"]) == list(out["cell_type"])
    np.testing.assert_array_equal(query.obs["predicted_uncertainty"], out["uncertainty"])
    unknown = transfer_labels(ref, query, "cell_type", uncertainty_threshold=0.3)
    called = unknown["cell_type"] != "Unknown"
    assert (unknown.loc[~called, "uncertainty"] > 0.3).all()
    assert (
        unknown.loc[called, "cell_type"].astype(str) == out.loc[called, "cell_type"].astype(str)
    ).all()


def test_transfer_labels_vote_by_hand():
    ref = ad.AnnData(np.zeros((3, 1), dtype=np.float32))
    ref.obs["cell_type"] = ["A", "A", "B"]
    ref.obsm["X_scvae"] = np.array([[1.0], [-1.0], [2.0]])
    query = ad.AnnData(np.zeros((1, 1), dtype=np.float32))
    query.obsm["X_scvae"] = np.array([[0.0]])
    out = transfer_labels(ref, query, "cell_type", n_neighbors=3)
    d = np.array([1.0, 1.0, 2.0])
    w = np.exp(-((d / d.mean()) ** 2))
    assert out["cell_type"].iloc[0] == "A"
    assert out["uncertainty"].iloc[0] == pytest.approx(w[2] / w.sum())
    ref.obs["cell_type"] = [7, 7, 9]  # integer labels come back as the same integers
    out = transfer_labels(ref, query, "cell_type", n_neighbors=3)
    assert out["cell_type"].iloc[0] == 7 and out["cell_type"].cat.categories.tolist() == [7, 9]
    # more neighbours than reference cells: all of them vote, and the user is told so
    with pytest.warns(UserWarning, match=r"n_neighbors=50 is more than the reference's 3 cells"):
        wide = transfer_labels(ref, query, "cell_type", n_neighbors=50)
    pd.testing.assert_frame_equal(wide, out)


def test_transfer_labels_errors():
    ref, query = _latent_pair()
    with pytest.raises(KeyError, match="labels"):
        transfer_labels(ref, query, "labels")
    unknown = ref.copy()
    unknown.obs["cell_type"] = unknown.obs["cell_type"].astype(str)
    unknown.obs.iloc[0, unknown.obs.columns.get_loc("cell_type")] = "Unknown"
    with pytest.raises(ValueError, match="labelled 'Unknown', the label uncertainty_threshold"):
        transfer_labels(unknown, query, "cell_type", uncertainty_threshold=0.3)
    transfer_labels(unknown, query, "cell_type")  # without a threshold, a label like any other
    del query.obsm["X_scvae"]
    with pytest.raises(KeyError, match="query_adata.obsm"):
        transfer_labels(ref, query, "cell_type")


def test_query_training_keeps_the_library_prior_of_load_query_data(split):
    reference, query = split
    ref = scvae.SCVAE(reference, batch_key="batch", use_observed_lib_size=False, **ARCHES)
    ref.train(max_epochs=2)
    model = scvae.SCVAE.load_query_data(query, ref)
    means = model.module.library_log_means.clone()
    variances = model.module.library_log_vars.clone()
    model.train(max_epochs=2, weight_decay=0.0)
    assert torch.equal(model.module.library_log_means, means)  # reference batches: their own
    assert torch.equal(model.module.library_log_vars, variances)


def test_ldvae_reference_with_encoded_batches_maps_a_query(split):
    reference, query = split
    ref = scvae.LDVAE(reference, batch_key="batch", encode_covariates=True, n_latent=3)
    ref.train(max_epochs=2)
    model = scvae.LDVAE.load_query_data(query, ref)
    model.train(max_epochs=2, weight_decay=0.0)
    assert model.get_loadings().shape == (reference.n_vars, 3)


@UNTRAINED_REFERENCE
def test_query_batches_match_the_reference_as_numbers(split):
    """A float query column's 1.0 is the reference's integer batch 1 (as in scvi-tools, whose
    categorical dtype compares numbers), not a new batch "1.0"."""
    reference, query = split
    reference = reference.copy()
    reference.obs["batch"] = np.where(reference.obs["batch"] == "batch0", 1, 2)
    ref = scvae.SCVAE(reference, batch_key="batch", **ARCHES)
    query = query.copy()
    query.obs["batch"] = np.where(query.obs["batch"] == "batch1", 2.0, 3.0)
    model = scvae.SCVAE.load_query_data(query, ref)
    assert model.registry.batch_categories == ["1", "2", "3.0"]
    codes = model.registry.batch_codes(query)
    np.testing.assert_array_equal(codes, np.where(query.obs["batch"] == 2.0, 1, 2))
    # the reference itself reads a float column of its integer batches
    as_float = reference[:20].copy()
    as_float.obs["batch"] = as_float.obs["batch"].astype(float)
    np.testing.assert_array_equal(
        ref.registry.batch_codes(as_float), ref.registry.batch_codes(reference[:20])
    )


def test_category_matching_is_exact_for_large_integers_and_leaves_padded_text_alone():
    # run ids beyond float precision stay apart; "01" is text, as pandas' categorical
    matcher = scvae.data.registry.CategoryMatcher(["20240101120000122", "20240101120000123"])
    assert matcher.code(20240101120000124) == -1
    assert matcher.code(np.int64(20240101120000123)) == 1
    assert scvae.data.registry.CategoryMatcher(["01", "02"]).code(1) == -1
    assert pd.Categorical([1], categories=["01", "02"]).codes.tolist() == [-1]


def test_prepare_query_copies_uns_deeply(split, reference_model):
    query = split[1].copy()
    query.uns["nested"] = {"inner": {"value": 1}, "list": [1, 2]}
    prepared = scvae.SCVAE.prepare_query_anndata(query, reference_model)
    prepared.uns["nested"]["inner"]["value"] = 2
    prepared.uns["nested"]["list"].append(3)
    assert query.uns["nested"] == {"inner": {"value": 1}, "list": [1, 2]}


# ------------------------------------------ new categorical covariate values (a new donor)
@pytest.fixture(scope="module")
def donors(split):
    """The reference's cells come from donors d1 and d2 (a covariate, not the batch); the
    query's new batch lab2 from a new donor d3, its batch1 cells from d1 (no d2 cells)."""
    reference, query = split[0].copy(), split[1].copy()
    reference.obs["donor"] = np.where(np.arange(reference.n_obs) % 2, "d1", "d2")
    query.obs["donor"] = np.where(query.obs["batch"] == "lab2", "d3", "d1")
    model = scvae.SCVAE(
        reference, batch_key="batch", categorical_covariate_keys=["donor"], **ARCHES
    )
    model.train(max_epochs=10, seed=0)
    return reference, query, model


def test_new_donor_is_added_and_only_its_columns_train(donors, caplog):
    reference, query, ref = donors
    state = {k: v.clone() for k, v in ref.module.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="scvae"):
        model = scvae.SCVAE.load_query_data(query, ref)
    assert "Categorical covariate 'donor': 1 new value(s) ['d3'] added" in caplog.text
    assert model.registry.categorical_covariate_categories == {"donor": ["d1", "d2", "d3"]}
    assert model.module.config.n_cats_per_cov == (3,)
    assert ref.registry.categorical_covariate_categories == {"donor": ["d1", "d2"]}
    codes = model.registry.categorical_codes(query)[:, 0]
    np.testing.assert_array_equal(codes, np.where(query.obs["donor"] == "d3", 2, 0))
    # the columns that train: the new batch lab2 (batch block: 3 columns) and the new donor
    for name, (_, offset, widths) in scvae.surgery.categorical_layers(model.module).items():
        mask = model.frozen.masked[f"{name}.weight"]
        assert widths == [3, 3]
        assert torch.nonzero(mask[0]).ravel().tolist() == [offset + 2, offset + 5], name
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=3, seed=0)  # the default weight decay included
    end = model.module.state_dict()
    for name, value in end.items():
        mask = model.frozen.masked.get(name)
        if mask is None:
            assert torch.equal(value, start[name]), name  # layer norm: nothing else trains
        else:
            assert torch.equal(value[~mask], start[name][~mask]), name
            assert not torch.equal(value[mask], start[name][mask]), name
    for key, value in ref.module.state_dict().items():  # the reference is untouched
        assert torch.equal(value, state[key]), key


def test_reference_latent_is_reproduced_through_a_query_model_with_a_new_donor(donors):
    reference, query, ref = donors
    expected = ref.get_latent_representation(reference)
    model = scvae.SCVAE.load_query_data(query, ref)
    np.testing.assert_array_equal(model.get_latent_representation(reference), expected)
    known = query[query.obs["donor"] == "d1"].copy()  # a reference batch and donor
    known_expected = ref.get_latent_representation(known)
    model.train(max_epochs=3, seed=0)
    np.testing.assert_array_equal(model.get_latent_representation(reference), expected)
    np.testing.assert_array_equal(model.get_latent_representation(known), known_expected)


def test_query_model_with_a_new_donor_saves_and_loads(donors, tmp_path):
    _, query, ref = donors
    model = scvae.SCVAE.load_query_data(query, ref)
    model.train(max_epochs=2, seed=0)
    model.save(tmp_path / "query")
    description = json.loads((tmp_path / "query" / "model.json").read_text())
    assert description["registry"]["categorical_covariate_categories"] == {
        "donor": ["d1", "d2", "d3"]
    }
    loaded = scvae.SCVAE.load(tmp_path / "query", query)
    assert loaded.registry.categorical_covariate_categories == {"donor": ["d1", "d2", "d3"]}
    assert loaded.module.config.n_cats_per_cov == (3,)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    # the reference's model cannot read the new donor, and says which value
    new_donor = query[query.obs["donor"] == "d3"].copy()
    new_donor.obs["batch"] = "batch1"
    with pytest.raises(RegistryError, match="'d3'"):
        ref.get_latent_representation(new_donor)


def _repeat(values: list | pd.Categorical, n: int) -> list | pd.Categorical:
    repeated = [values[i % len(values)] for i in range(n)]
    if isinstance(values, pd.Categorical):
        return pd.Categorical(repeated, categories=values.categories)
    return repeated


def _order_data(n: int, batches: list, donors: list, plates: list) -> ad.AnnData:
    adata = ad.AnnData(np.ones((n, 4), dtype=np.float32))
    adata.var_names = [f"g{i}" for i in range(4)]
    for key, values in (("batch", batches), ("donor", donors), ("plate", plates)):
        adata.obs[key] = _repeat(values, n)
    return adata


@UNTRAINED_REFERENCE
@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("donor", ["d5", "d1", "d3", "d10"], ["d1", "d2", "d10", "d3", "d5"]),
        ("plate", [10, 2, 3, 1], ["1", "3", "2", "10"]),
        ("donor", pd.Categorical(["zz", "d1", "aa"], ["zz", "d1", "aa"]), ["d1", "d2", "aa", "zz"]),
        ("donor", ["d4"], ["d1", "d2", "d4"]),
        ("batch", ["zz", "b10", "b3", "b1"], ["b1", "b2", "b10", "b3", "zz"]),
        ("batch", pd.Categorical(["zz", "aa", "b1"], ["zz", "aa", "b1"]), ["b1", "b2", "aa", "zz"]),
    ],
)
def test_new_categories_come_in_scvi_tools_order(column, values, expected):
    """The categories scvi-tools 1.4.2 gives the same query (pinned, as for scib-metrics):
    ``SCVI.setup_anndata(ref, batch_key="batch", categorical_covariate_keys=["donor",
    "plate"])`` on a reference of batches b1, b2, donors d2, d1 and plates 3, 1, then
    ``SCVI.load_query_data(query, ref_model)``; its registry's ``categorical_mapping``
    (batch) or ``extra_categorical_covs`` mappings: the new values sorted by value
    (``np.unique``), numbers as numbers, a categorical column's own order ignored."""
    ref_data = _order_data(60, ["b1", "b2"], ["d2", "d1"], [3, 1])
    ref = scvae.SCVAE(
        ref_data, batch_key="batch", categorical_covariate_keys=["donor", "plate"], **ARCHES
    )
    assert ref.registry.categorical_covariate_categories == {
        "donor": ["d1", "d2"],
        "plate": ["1", "3"],
    }
    query = _order_data(30, ["b1"], ["d1"], [1])
    query.obs[column] = _repeat(values, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a query of no new batch warns
        model = scvae.SCVAE.load_query_data(query, ref)
    registry = model.registry
    got = (
        registry.batch_categories
        if column == "batch"
        else registry.categorical_covariate_categories[column]
    )
    assert got == expected
    codes = (
        registry.batch_codes(query)
        if column == "batch"
        else registry.categorical_codes(query)[:, ["donor", "plate"].index(column)]
    )
    np.testing.assert_array_equal(np.asarray(got)[codes], query.obs[column].astype(str))


@UNTRAINED_REFERENCE
def test_query_lacking_reference_donors_and_gene_label_dispersion(donors):
    """A query of some reference values only keeps the reference's categories and codes;
    labels (per gene-label dispersion) are the reference's, unchanged by a new donor."""
    reference, query, _ = donors
    only_d2 = reference[reference.obs["donor"] == "d2"].copy()
    ref = scvae.SCVAE(
        reference,
        batch_key="batch",
        labels_key="cell_type",
        dispersion="gene-label",
        categorical_covariate_keys=["donor"],
        **ARCHES,
    )
    with pytest.warns(UserWarning, match="nor any value of its categorical covariates"):
        model = scvae.SCVAE.load_query_data(only_d2, ref)
    assert model.registry.categorical_covariate_categories == {"donor": ["d1", "d2"]}
    assert set(model.registry.categorical_codes(only_d2)[:, 0]) == {1}
    model = scvae.SCVAE.load_query_data(query, ref)
    assert model.registry.categorical_covariate_categories == {"donor": ["d1", "d2", "d3"]}
    assert model.registry.label_categories == ref.registry.label_categories
    assert model.module.config.n_labels == ref.module.config.n_labels
    assert torch.equal(model.module.px_r, ref.module.px_r)
    assert "px_r" not in model.frozen.masked and not model.module.px_r.requires_grad
    relabelled = query.copy()  # a label the reference lacks has no dispersion: named
    relabelled.obs["cell_type"] = "a new type"
    with pytest.raises(RegistryError, match=r"labels the reference does not know: 'a new type'"):
        scvae.SCVAE.load_query_data(relabelled, ref)


@UNTRAINED_REFERENCE
def test_query_of_reference_batches_only_names_what_still_trains(split):
    """With the decoder's batch norm (default options), that is what train() fits."""
    ref = scvae.SCVAE(split[0], batch_key="batch", encode_covariates=True)
    known = split[1][split[1].obs["batch"] == "batch1"].copy()
    with pytest.warns(UserWarning, match="None of the query's batches is new") as record:
        scvae.SCVAE.load_query_data(known, ref)
    message = next(str(w.message) for w in record if "None of" in str(w.message))
    assert "fits only decoder.px_decoder.layers.0.1, and the query's latent stays" in message
    with pytest.warns(UserWarning, match="None of the query") as record:
        scvae.SCVAE.load_query_data(known, ref, freeze_expression=False)
    message = next(str(w.message) for w in record if "None of" in str(w.message))
    assert "z_encoder.encoder.layers.0.0" in message and "latent stays" not in message
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "None of the query", UserWarning)  # new batches
        scvae.SCVAE.load_query_data(split[1], ref, unfrozen=True)
        scvae.SCVAE.load_query_data(known, ref, unfrozen=True)  # everything trains


def test_untrained_reference_warns_at_mapping_and_until_the_query_is_trained(
    split, reference_model
):
    """scvi-tools raises at get_latent_representation of such a query model; scvae warns."""
    untrained = scvae.SCVAE(split[0], batch_key="batch", **ARCHES)
    with pytest.warns(UserWarning, match="has not been trained.*Train the reference first"):
        model = scvae.SCVAE.load_query_data(split[1], untrained)
    with pytest.warns(UserWarning, match="whose reference was never trained"):
        model.get_latent_representation()
    model.train(max_epochs=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.get_latent_representation()
        # a trained reference: no warning at mapping nor before the query's training
        scvae.SCVAE.load_query_data(split[1], reference_model).get_latent_representation()


def test_load_query_refuses_a_view_of_a_backed_query_in_scvae_words(
    split, reference_model, tmp_path
):
    split[1].write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=r"subset \(view\) of a backed AnnData"):
            scvae.SCVAE.load_query_data(backed[:20], reference_model)
    finally:
        backed.file.close()


def test_ldvae_reference_messages_name_ldvae(split, tmp_path):
    reference, query = split
    ref = scvae.LDVAE(reference, batch_key="batch", encode_covariates=True, n_latent=3)
    ref.train(max_epochs=1)
    ref.save(tmp_path / "ldvae")
    for given in (ref, tmp_path / "ldvae"):
        with pytest.raises(TypeError, match=r"use scvae\.LDVAE\.load_query_data"):
            scvae.SCVAE.load_query_data(query, given)
    # prepare_query_anndata reads only the genes: any scvae model directory will do
    shuffled = query[:, ::-1].copy()
    prepared = scvae.SCVAE.prepare_query_anndata(shuffled, tmp_path / "ldvae")
    assert list(prepared.var_names) == list(ref.var_names)
    # an SCVAE directory given to LDVAE.load_query_data is named the other way round
    scvae.SCVAE(reference, batch_key="batch", **ARCHES).save(tmp_path / "scvae")
    with pytest.raises(TypeError, match=r"use scvae\.SCVAE\.load_query_data"):
        scvae.LDVAE.load_query_data(query, tmp_path / "scvae")
    plain = scvae.LDVAE(reference, batch_key="batch")  # encode_covariates=False
    with pytest.raises(ValueError, match="encode_covariates=False") as info:
        scvae.LDVAE.load_query_data(query, plain)
    assert "scvae.LDVAE(adata, batch_key=..., encode_covariates=True)" in str(info.value)
    assert "use_layer_norm" not in str(info.value)


def test_transfer_labels_unlabeled_reference_cells_do_not_vote():
    """scANVI's convention: reference cells of ``unlabeled_category`` have no label."""
    ref = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    ref.obs["cell_type"] = ["unlabeled", "unlabeled", "A", "B"]
    ref.obsm["X_scvae"] = np.array([[0.0], [0.1], [1.0], [5.0]])
    query = ad.AnnData(np.zeros((1, 1), dtype=np.float32))
    query.obsm["X_scvae"] = np.array([[0.0]])
    assert (
        transfer_labels(ref, query, "cell_type", n_neighbors=2)["cell_type"].iloc[0] == "unlabeled"
    )
    out = transfer_labels(ref, query, "cell_type", n_neighbors=2, unlabeled_category="unlabeled")
    assert out["cell_type"].iloc[0] == "A"
    assert out["cell_type"].cat.categories.tolist() == ["A", "B"]
    ref.obs["code"] = [-1.0, -1.0, 1.0, 2.0]  # a float column, the placeholder given as -1
    out = transfer_labels(ref, query, "code", n_neighbors=2, unlabeled_category=-1)
    assert out["code"].iloc[0] == 1.0
    ref.obs["cell_type"] = "unlabeled"
    with pytest.raises(ValueError, match="Every reference cell is labelled 'unlabeled'"):
        transfer_labels(ref, query, "cell_type", unlabeled_category="unlabeled")


def test_transfer_labels_refuses_bad_options_by_name():
    ref, query = _latent_pair()
    with pytest.raises(KeyError, match="columns: 'cell_type'.*pass as labels_key"):
        transfer_labels(ref, query, "labels")
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"n_neighbors must be at least 1.*got {bad}"):
            transfer_labels(ref, query, "cell_type", n_neighbors=bad)
    with pytest.raises(TypeError, match="n_neighbors must be an integer"):
        transfer_labels(ref, query, "cell_type", n_neighbors=2.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="uncertainty_threshold must lie in \\[0, 1\\]"):
            transfer_labels(ref, query, "cell_type", uncertainty_threshold=bad)
    with pytest.raises(ValueError, match="query_adata has no cells"):
        transfer_labels(ref, query[:0].copy(), "cell_type")
    nan_query = query.copy()
    nan_query.obsm["X_scvae"][3, 1] = np.nan
    with pytest.raises(ValueError, match="query_adata.obsm\\['X_scvae'\\] has 1 cells with NaN"):
        transfer_labels(ref, nan_query, "cell_type")
    inf_ref = ref.copy()
    inf_ref.obsm["X_scvae"][:2, 0] = np.inf
    with pytest.raises(ValueError, match="reference_adata.obsm\\['X_scvae'\\] has 2 cells"):
        transfer_labels(inf_ref, query, "cell_type")
