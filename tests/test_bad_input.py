"""Bad input across the Python API: each gets an error naming the problem (the option, key,
value or path) and the fix, or a documented handling, and leaves nothing half-done behind: no
model changed, no file written.

The bad counts, keys and categories at registration are in tests/data/test_registry.py and
tests/data/test_registry_properties.py; unreadable data files in tests/data/test_read.py;
planted pickles and killed saves in tests/test_safe_files.py; checkpoints in
tests/test_checkpoint.py; divergence in tests/test_train.py; wrong argument types and values
in tests/test_bad_arguments.py.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import scvae
from scvae.data import RegistryError
from scvae.io import ModelFileError


@pytest.fixture(scope="module")
def adata():
    return scvae.data.simulate(80, 15, n_batches=2, seed=2)


@pytest.fixture(scope="module")
def saved_dir(adata, tmp_path_factory):
    model = scvae.SCVAE(adata, batch_key="batch", n_hidden=16, n_latent=3)
    model.train(max_epochs=2, device="cpu")
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return path


@pytest.fixture
def model_dir(saved_dir, tmp_path):
    """A fresh copy of a valid model directory, to damage."""
    path = tmp_path / "model"
    shutil.copytree(saved_dir, path)
    return path


def state(model: scvae.SCVAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def assert_unchanged(model: scvae.SCVAE, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.is_trained and model.history.empty


# ----------------------------------------------------------------- model options
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"n_latent": 0}, ValueError, r"n_latent must be a whole number >= 1, got 0"),
        ({"n_hidden": 12.5}, ValueError, r"n_hidden must be a whole number >= 1, got 12.5"),
        ({"n_layers": True}, ValueError, r"n_layers must be a whole number"),
        ({"dropout_rate": 1.5}, ValueError, r"dropout_rate must be a number in \[0, 1\)"),
        ({"gene_likelihood": "zinbb"}, ValueError, r"gene_likelihood='zinbb' is not one of 'zinb'"),
        ({"dispersion": "per-gene"}, ValueError, r"dispersion='per-gene' is not one of 'gene'"),
        ({"latent_distribution": "lognormal"}, ValueError, r"latent_distribution='lognormal'"),
        (
            {"latent_distribution": "ln", "n_latent": 1},
            ValueError,
            r'latent_distribution="ln" needs n_latent >= 2',
        ),
        ({"batch_key": ["batch"]}, TypeError, r"batch_key must be a column/layer name \(str\)"),
        (
            {"categorical_covariate_keys": "batch"},
            TypeError,
            r"categorical_covariate_keys must be a list of obs columns, e\.g\. \['batch'\]",
        ),
        ({"log_variational": "yes"}, TypeError, r"log_variational must be True or False"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else "",
)
def test_bad_model_options(adata, options, error, match):
    with pytest.raises(error, match=match):
        scvae.SCVAE(adata, **options)


def test_malformed_sparse_matrix_is_refused_and_not_modified(adata):
    bad = adata.copy()
    x = sp.csr_matrix(bad.X)
    x.indices = x.indices.astype(np.int64)
    x.indices[5] = 10_000  # a gene index past the last gene, as a corrupted file can hold
    bad.X = x
    with pytest.raises(RegistryError, match=r"adata\.X is a malformed sparse matrix.*indices"):
        scvae.SCVAE(bad)
    assert bad.X.indices[5] == 10_000 and bad.X.indices.dtype == np.int64  # left as it was
    # a decreasing indptr ending at 0 passes scipy's own full check (found by the h5ad fuzz)
    falling = sp.csr_matrix(
        (np.ones(3, np.float32), np.array([0, 1, 2]), np.array([0, 2, 3, 0])), shape=(3, 4)
    )
    with pytest.raises(RegistryError, match="malformed sparse matrix.*indptr does not rise"):
        scvae.SCVAE(ad.AnnData(falling))


def test_x_none_without_layer(adata):
    empty = adata.copy()
    empty.layers["counts"] = empty.X.copy()
    empty.X = None
    with pytest.raises(RegistryError, match=r"adata\.X is empty \(None\)\. Pass layer="):
        scvae.SCVAE(empty)
    assert scvae.SCVAE(empty, layer="counts").registry.layer == "counts"


# -------------------------------------------------------------- training options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_epochs": 0}, r"max_epochs must be a whole number >= 1, got 0"),
        ({"max_epochs": 2.5}, r"max_epochs must be a whole number >= 1, got 2\.5"),
        ({"batch_size": 1}, r"batch_size must be a whole number >= 2 \(BatchNorm"),
        ({"lr": -0.001}, r"lr must be a finite number > 0, got -0\.001"),
        ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"eps": 0.0}, r"eps must be a finite number > 0"),
        ({"early_stopping_patience": 0}, r"early_stopping_patience must be a whole number >= 1"),
        ({"n_epochs_kl_warmup": -5}, r"n_epochs_kl_warmup must be a whole number >= 0"),
        ({"train_size": 1.5}, r"train_size must be in \(0, 1\], got 1\.5"),
        ({"train_size": 0.0}, r"train_size must be in \(0, 1\], got 0\.0"),
        ({"train_size": "0.9"}, r"train_size must be a number, got '0\.9'"),
        ({"validation_size": float("nan")}, r"validation_size must be a number in \[0, 1\)"),
        ({"train_size": 0.8, "validation_size": 0.5}, r"train_size \+ validation_size must be"),
        ({"device": "tpu"}, r"device='tpu' is not a torch device"),
        ({"device": "meta"}, r"device='meta': scvae runs on 'cpu', 'cuda'"),
        ({"reduce_lr_on_plateau": True, "train_size": 1.0}, r"needs validation cells"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got -1"),
        ({"seed": 2**32}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got 4294967296"),
        ({"seed": 2**64 - 1}, r"seed must be a whole number from 0 to 2\*\*32 - 1"),
        ({"checkpoint_every": "2"}, r"checkpoint_every must be a whole number"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_training_options_leave_the_model_untouched(adata, options, match):
    model = scvae.SCVAE(adata, n_hidden=16)
    before = state(model)
    with pytest.raises(ValueError, match=match):
        model.train(**{"max_epochs": 1, **options})
    assert_unchanged(model, before)


def test_batch_size_larger_than_the_data_is_one_minibatch(adata):
    """Documented handling: one minibatch of all training cells per epoch."""
    model = scvae.SCVAE(adata, n_hidden=16)
    steps = []
    hook = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        model.train(max_epochs=3, batch_size=10_000, device="cpu")
    finally:
        hook.remove()
    assert len(steps) == 3 and len(model.history) == 3
    assert np.isfinite(model.history["elbo_train"]).all()


def test_one_cell_cannot_train_but_can_be_queried(adata):
    one = adata[:1].copy()
    model = scvae.SCVAE(one, n_hidden=16)
    before = state(model)
    with pytest.raises(ValueError, match=r"Only 1 training cell\(s\): training needs at least 2,"):
        model.train(max_epochs=1, train_size=1.0)
    assert_unchanged(model, before)
    trained = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    trained.train(max_epochs=2, device="cpu")
    latent = trained.get_latent_representation(one)
    assert latent.shape == (1, 3) and np.isfinite(latent).all()
    assert np.isfinite(trained.get_elbo(one))


def test_one_gene_trains_and_queries(adata):
    one_gene = adata[:, :1].copy()
    one_gene = one_gene[np.asarray(one_gene.X.sum(1)).ravel() > 0].copy()
    model = scvae.SCVAE(one_gene, n_hidden=16, n_latent=2)
    model.train(max_epochs=3, device="cpu")
    expr = model.get_normalized_expression()
    assert expr.shape == (one_gene.n_obs, 1)
    np.testing.assert_allclose(expr.to_numpy(), 1.0, rtol=1e-6)  # rho of the only gene
    assert np.isfinite(model.get_elbo())


# ------------------------------------------------------------ counts: the right fix
def test_normalised_counts_point_to_the_raw_counts_not_to_allow_non_integer(adata):
    norm = adata.copy()
    norm.layers["counts"] = norm.X.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)  # not logged: values well above the log range
    with pytest.raises(RegistryError) as err:
        scvae.SCVAE(norm)
    message = str(err.value)
    assert "normalised to the same total in every cell (each sums to about 10000" in message
    assert "layer='counts' if that layer holds them" in message
    assert "allow_non_integer" not in message
    scaled = adata.copy()
    scaled.X = scaled.X * 1.5  # fractional, cells' totals differ: maybe intended
    with pytest.raises(RegistryError, match=r"pass allow_non_integer=True \(scvae fit: "):
        scvae.SCVAE(scaled)


def test_query_errors_say_where_the_model_reads_counts(adata, saved_dir):
    model = scvae.SCVAE.load(saved_dir, adata)  # registered on adata.X
    logged = adata.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    with pytest.raises(RegistryError) as err:
        model.get_latent_representation(logged)
    assert "reads every AnnData's counts in adata.X" in str(err.value)
    assert "layer=" not in str(err.value)  # queries take no layer option
    with_layer = adata.copy()
    with_layer.layers["counts"] = with_layer.X.copy()
    on_layer = scvae.SCVAE(with_layer, layer="counts", batch_key="batch")
    with pytest.raises(RegistryError) as err:
        on_layer.get_latent_representation(adata)
    assert "registered with layer='counts'" in str(err.value)
    assert "layer=None" not in str(err.value)


# ------------------------------------------------------------- DE options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mode": "change", "delta": "0.5"}, r"delta must be a positive, finite number.*'0\.5'"),
        ({"mode": "change", "delta": np.inf}, r"delta must be a positive, finite number"),
        ({"n_samples_overall": "100"}, r"n_samples_overall must be a positive integer, got '100'"),
        ({"n_samples_overall": 100.5}, r"n_samples_overall must be a positive integer"),
        ({"n_samples_overall": True}, r"n_samples_overall must be a positive integer"),
        ({"fdr_target": "0.05"}, r"fdr_target must be a number in \(0, 1\) or a non-empty list"),
        ({"fdr_target": []}, r"fdr_target must be a number in \(0, 1\) or a non-empty list"),
        ({"mode": "change", "pseudocounts": "1e-4"}, r"pseudocounts must be None \(estimated\)"),
        ({"seed": "1"}, r"seed must be None or a whole number from 0 to 2\*\*32 - 1, got '1'"),
        ({"seed": -5}, r"seed must be None or a whole number from 0 to 2\*\*32 - 1, got -5"),
        ({"seed": 2**64}, r"seed must be None or a whole number from 0 to 2\*\*32 - 1, got 1844"),
        ({"batch_correction": "yes"}, r"batch_correction must be True or False, got 'yes'"),
        ({"group1": []}, r"group1 is an empty list"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}" for k in v)[:40] if isinstance(v, dict) else "",
)
def test_bad_de_options_name_the_option(adata, saved_dir, options, match):
    model = scvae.SCVAE.load(saved_dir, adata)
    with pytest.raises(ValueError, match=match):
        model.differential_expression(groupby="cell_type", **options)


def test_de_takes_numpy_numbers(adata, saved_dir):
    model = scvae.SCVAE.load(saved_dir, adata)
    table = model.differential_expression(
        groupby="cell_type",
        group1="type0",
        mode="change",
        delta=np.float32(0.5),
        fdr_target=np.float32(0.1),
        n_samples_overall=np.int64(50),
        seed=np.int64(1),
    )
    assert "is_de_fdr_0.1" in table and table["delta"].eq(0.5).all()


# ---------------------------------------------------------------------- queries
def test_bad_query_inputs(adata, saved_dir):
    model = scvae.SCVAE.load(saved_dir, adata)
    with pytest.raises(
        IndexError, match=r"indices must lie in \[-80, 80\) .*-1 is cell 79\); got 0\.\.80"
    ):
        model.get_latent_representation(indices=[0, 80])
    with pytest.raises(IndexError, match=r"got -81\.\.3"):
        model.get_elbo(indices=[-81, 3])
    no_key = adata.copy()
    del no_key.obs["batch"]
    with pytest.raises(RegistryError, match=r"batch_key='batch', but this AnnData has no column"):
        model.get_latent_representation(no_key)
    with pytest.raises(
        ValueError,
        match=r"has 1 of 1 genes the model does not know: \['nope'\]\. Use genes in model.var",
    ):
        model.get_normalized_expression(gene_list=["nope"])
    known = list(model.var_names[:2])
    many = known + [f"x{i}" for i in range(7)] + ["x0"]
    for query in (model.get_normalized_expression, model.posterior_predictive_sample):
        with pytest.raises(
            ValueError, match=r"has 7 of 9 genes .*\['x0', 'x1', 'x2', 'x3', 'x4', \.\.\.\]"
        ):
            query(gene_list=many)
        for empty in ([], (), np.array([], dtype=str)):
            with pytest.raises(ValueError, match=r"gene_list is empty.*gene_list=None for all"):
                query(gene_list=empty)
    for bad in (-1, 0, float("inf"), float("nan"), np.float32(np.inf), True, "1e4"):
        with pytest.raises(
            ValueError, match=r"library_size must be a finite positive number or 'latent', got"
        ):
            model.get_normalized_expression(indices=[0], library_size=bad)
    with pytest.raises(ValueError, match=r"transform_batch \['b9'\] is not a registered batch"):
        model.get_normalized_expression(transform_batch="b9")
    with pytest.raises(RegistryError, match=r"genes differ.*another order"):
        model.get_elbo(adata[:, ::-1].copy())
    for empty in ([], np.zeros(adata.n_obs, dtype=bool)):
        with pytest.raises(IndexError, match="indices selects no cells"):
            model.get_elbo(indices=empty)


def test_negative_positions_count_from_the_end_in_every_query_and_2d_is_refused(adata, saved_dir):
    # as numpy and scvi-tools: -1 is the last cell
    model = scvae.SCVAE.load(saved_dir, adata)
    np.testing.assert_array_equal(
        model.get_latent_representation(indices=[-1, 0]),
        model.get_latent_representation(indices=[79, 0]),
    )
    expr = model.get_normalized_expression(indices=[-2, -1])
    assert expr.index.tolist() == adata.obs_names[[78, 79]].tolist()
    torch.manual_seed(0)
    a = model.get_elbo(indices=[-1, 3], return_mean=False)
    torch.manual_seed(0)
    np.testing.assert_array_equal(a, model.get_elbo(indices=[79, 3], return_mean=False))
    assert model.get_latent_library_size(indices=[-80]).shape == (1, 1)
    table = model.differential_expression(idx1=[-1, -2, -3], idx2=[0, 1, 2], seed=0)
    same = model.differential_expression(idx1=[79, 78, 77], idx2=[0, 1, 2], seed=0)
    pd.testing.assert_frame_equal(table, same)
    for query in (
        model.get_latent_representation,
        model.get_elbo,
        model.get_normalized_expression,
        model.posterior_predictive_sample,
    ):
        for flat_by_mistake in (np.array([[0, 1], [2, 3]]), np.ones((80, 1), dtype=bool)):
            with pytest.raises(IndexError, match=r"indices must be one-dimensional.*shape \("):
                query(indices=flat_by_mistake)


def test_return_numpy_false_default_warns_where_none_does_not(adata, saved_dir):
    # as scvi-tools: kept samples force an ndarray, with a warning for False (CONTRACT.md's
    # default) and silently for None (scvi-tools' default)
    model = scvae.SCVAE.load(saved_dir, adata)
    assert isinstance(model.get_normalized_expression(indices=[0, 1]), pd.DataFrame)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = model.get_normalized_expression(
            indices=[0, 1], n_samples=3, return_mean=False, return_numpy=None
        )
    assert isinstance(kept, np.ndarray) and kept.shape == (3, 2, adata.n_vars)
    with pytest.warns(UserWarning, match="a DataFrame cannot hold"):
        model.get_normalized_expression(indices=[0, 1], n_samples=3, return_mean=False)
    assert isinstance(model.get_normalized_expression(indices=[0], return_numpy=True), np.ndarray)


def test_every_query_checks_batch_size_the_same_way(adata, saved_dir):
    model = scvae.SCVAE.load(saved_dir, adata)
    queries = {
        "get_latent_representation": {},
        "get_elbo": {},
        "get_reconstruction_error": {},
        "get_marginal_ll": {"n_mc_samples": 2},
        "get_normalized_expression": {"n_samples": 2},
        "get_likelihood_parameters": {},
        "get_latent_library_size": {},
        "posterior_predictive_sample": {},
        "get_feature_correlation_matrix": {"n_samples": 2},
    }
    for name, options in queries.items():
        query = getattr(model, name)
        for bad in (0, -5, True, "100", 1.5):
            with pytest.raises(
                ValueError,
                match=rf"batch_size must be a whole number >= 1 or None, got {bad!r}; pass",
            ):
                query(indices=[0, 1], batch_size=bad, **options)
        query(indices=[0, 1, 2], batch_size=np.int64(2), **options)  # numpy integers are fine


def test_queries_check_the_cells_asked_for_and_count_every_bad_one(adata, saved_dir):
    model = scvae.SCVAE.load(saved_dir, adata)
    some = adata[:6].copy()
    x = some.X.toarray()
    x[0] = 0  # a cell without counts that is not asked for
    some.X = sp.csr_matrix(x)
    assert model.get_latent_representation(some, indices=[1, 2, 3]).shape[0] == 3
    none = adata[:5].copy()
    none.X = sp.csr_matrix(none.shape, dtype=np.float32)
    with pytest.raises(RegistryError, match="5 cells have zero total counts"):
        model.get_elbo(none)


def test_float16_counts_train(adata):
    half = adata.copy()
    half.X = half.X.toarray().astype(np.float16)
    model = scvae.SCVAE(half, n_hidden=16)
    model.train(max_epochs=1)
    assert model.is_trained


def test_size_factors_beyond_the_count_scale_are_refused(adata):
    huge = adata.copy()
    huge.obs["sf"] = 1e300
    with pytest.raises(RegistryError, match=r"size_factor_key\) has 80 values above"):
        scvae.SCVAE(huge, size_factor_key="sf")


# ------------------------------------------------------------------------ saving
def test_save_under_a_regular_file_names_the_path(adata, tmp_path):
    model = scvae.SCVAE(adata, n_hidden=16)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for target in (blocker / "model", blocker / "deeper" / "model"):
        with pytest.raises(NotADirectoryError, match=r"notes\.txt is a file, not a directory"):
            model.save(target)
    with pytest.raises(FileExistsError, match=r"notes\.txt exists and is not a directory"):
        model.save(blocker, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_save_into_read_only_folder(adata, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"Cannot write the model to .*ro/model"):
            scvae.SCVAE(adata, n_hidden=16).save(folder / "model")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------- loading
def edit_json(path: Path, change) -> None:
    meta = json.loads((path / "model.json").read_text())
    change(meta)
    (path / "model.json").write_text(json.dumps(meta))


def test_load_missing_or_wrong_paths(tmp_path):
    with pytest.raises(ModelFileError, match=r"No model directory at .*nowhere.*does not exist"):
        scvae.SCVAE.load(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"is a file, not a model directory"):
        scvae.SCVAE.load(tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"model\.json is missing.*model\.save\(\)"):
        scvae.SCVAE.load(tmp_path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda p: (p / "model.json").write_text((p / "model.json").read_text()[:200]),
            r"model\.json is corrupted or truncated",
        ),
        (
            lambda p: (p / "model.json").write_bytes(b"\xff\xfe\x00garbage"),
            r"model\.json is corrupted or truncated",
        ),
        (
            lambda p: (p / "model.json").write_text('{"format": "anndata"}'),
            r"not a scvae model description",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(format_version=99, scvae_version="9.0")),
            r"saved by a newer scvae \(9\.0, model format 99\).*Upgrade scvae-torch",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(format_version="1")),
            r"no valid format_version",
        ),
        (
            lambda p: (p / "model.safetensors").unlink(),
            r"incomplete: model\.safetensors is missing",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(b""),
            r"does not match the checksum.*Restore it",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(registry=5)),
            r"model\.json is malformed",
        ),
        (
            lambda p: edit_json(p, lambda m: m["module_config"].update(n_hidden=32)),
            r"weights do not fit the saved configuration",
        ),
        (
            # a million layers: millions of module objects (minutes, gigabytes) before
            lambda p: edit_json(p, lambda m: m["module_config"].update(n_layers=10**6)),
            r"malformed: n_layers is 1000000, but the weights hold \d+ tensors",
        ),
        (
            lambda p: (p / "model.json").write_text(
                (p / "model.json").read_text().rstrip()[:-1] + ', "x": ' + "1" * 5000 + "}"
            ),
            r"model\.json is corrupted or truncated \(Exceeds the limit",
        ),
        (
            lambda p: edit_json(p, lambda m: m["module_config"].update(n_hidden=10**9)),
            r"weights do not fit the saved configuration",
        ),
        (
            lambda p: edit_json(p, lambda m: m["module_config"].update(dispersion="x")),
            r"model\.json is malformed.*dispersion='x'",
        ),
        (
            lambda p: edit_json(p, lambda m: m["registry"]["var_names"].pop()),
            r"registry .* does not match its module configuration",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(history={"epoch": [0, 1], "elbo": [1]})),
            r"model\.json is malformed",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(model_class="LDVAE")),
            r"holds a LDVAE model; load it with scvae\.LDVAE\.load",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(is_trained="false")),
            r"model\.json is malformed: is_trained must be true or false",
        ),
        (
            lambda p: edit_json(p, lambda m: m["module_config"].update(log_variational="no")),
            r"model\.json is malformed: log_variational must be true or false",
        ),
        (
            lambda p: edit_json(p, lambda m: m["registry"].update(allow_non_integer="false")),
            r"malformed.*allow_non_integer must be true or false",
        ),
        (
            lambda p: edit_json(p, lambda m: m["registry"].update(batch_key=3)),
            r"malformed.*batch_key must be a string or null",
        ),
        (
            lambda p: edit_json(p, lambda m: m["registry"].update(batch_categories=["b0", "b0"])),
            r"malformed.*batch_categories repeats an entry",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(history=[1, 2])),
            r"malformed.*history must map each column",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(history={"epoch": ["0"], "elbo": [1.0]})),
            r"malformed.*history's epochs must be integers",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(train_indices=[1.5])),
            r"malformed.*train_indices must be a list of non-negative integers",
        ),
        (
            lambda p: edit_json(p, lambda m: m.update(validation_indices=[10**6])),
            r"malformed.*validation_indices holds a position at or past the \d+ cells",
        ),
    ],
    ids=[
        "truncated-json",
        "binary-json",
        "foreign-json",
        "newer-format",
        "format-version-str",
        "no-weights",
        "empty-weights",
        "registry-not-dict",
        "config-mismatch",
        "config-many-layers",
        "json-huge-integer",
        "config-huge",
        "config-bad-choice",
        "registry-mismatch",
        "history-ragged",
        "other-class",
        "is-trained-str",
        "flag-str",
        "registry-flag-str",
        "registry-key-int",
        "registry-repeated-category",
        "history-list",
        "history-epoch-str",
        "indices-float",
        "indices-past-cells",
    ],
)
def test_damaged_model_directory(model_dir, adata, damage, match):
    damage(model_dir)
    with pytest.raises(ModelFileError, match=match):
        scvae.SCVAE.load(model_dir, adata)


def test_load_with_no_cells_is_refused(model_dir, adata):
    with pytest.raises(RegistryError, match=r"The AnnData is empty \(0 cells"):
        scvae.SCVAE.load(model_dir, adata[:0])


def test_weights_truncated_with_matching_checksum(model_dir):
    """A truncated weights file whose checksum was also rewritten still fails cleanly."""
    import hashlib

    data = (model_dir / "model.safetensors").read_bytes()[:-100]
    (model_dir / "model.safetensors").write_bytes(data)
    edit_json(model_dir, lambda m: m.update(weights_sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(ModelFileError, match="cannot be read as safetensors"):
        scvae.SCVAE.load(model_dir)


def test_load_ignores_leftover_temporary_siblings(model_dir, adata):
    leftover = model_dir.parent / ".model.tmp-1234abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert scvae.SCVAE.load(model_dir, adata).is_trained


def test_fuzz_model_json(model_dir, adata):
    """Random edits of model.json: every failure is a ModelFileError or a RegistryError."""
    text = (model_dir / "model.json").read_text()
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "ModelFileError": 0, "RegistryError": 0}
    alphabet = list('0123456789-.,:{}[]"eE truefalsnNIy')
    for _ in range(150):
        chars = list(text)
        for pos in rng.integers(0, len(chars), size=rng.integers(1, 4)):
            chars[pos] = str(rng.choice(alphabet))
        (model_dir / "model.json").write_text("".join(chars))
        try:
            scvae.SCVAE.load(model_dir, adata)
            outcomes["loaded"] += 1
        except (ModelFileError, RegistryError) as err:
            outcomes[type(err).__name__] += 1
    assert outcomes["ModelFileError"] > 20 and outcomes["loaded"] > 5, outcomes
