"""scvae.tl: fit and normalized_expression write into the AnnData; differential_expression
writes uns that scanpy's own readers and plots accept."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402
import torch  # noqa: E402

import scvae  # noqa: E402


@pytest.fixture(scope="module")
def adata_model(sim, trained):
    adata = sim.copy()
    return adata, trained


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_uns_structure_and_get_df(adata_model):
    adata, model = adata_model
    table = scvae.tl.differential_expression(
        adata, model, groupby="cell_type", n_samples_overall=300, key_added="de"
    )
    uns = adata.uns["de"]
    params = uns["params"]
    assert params["groupby"] == "cell_type" and params["reference"] == "rest"
    assert params["method"] == "scvae_vanilla" and params["use_raw"] is False
    groups = ["type0", "type1", "type2"]
    assert list(uns["names"].dtype.names) == groups
    for key in ("scores", "logfoldchanges", "pvals", "pvals_adj"):
        assert list(uns[key].dtype.names) == groups and len(uns[key]) == adata.n_vars
    assert np.isnan(uns["pvals"]["type0"]).all() and np.isnan(uns["pvals_adj"]["type1"]).all()
    for g in groups:
        scores = uns["scores"][g]
        assert (np.diff(scores) <= 0).all()  # ranked by score
        block = table[table["group1"] == g]
        np.testing.assert_allclose(scores, block["bayes_factor"].to_numpy(), rtol=1e-6)
        assert list(uns["names"][g]) == list(block.index)  # the table's own order
    assert uns["pts"].shape == (adata.n_vars, 3) and list(uns["pts"].index) == list(adata.var_names)
    x = adata.X.toarray() > 0
    in0 = (adata.obs["cell_type"] == "type0").to_numpy()
    np.testing.assert_allclose(uns["pts"]["type0"], x[in0].mean(0))
    np.testing.assert_allclose(uns["pts_rest"]["type0"], x[~in0].mean(0))

    df = sc.get.rank_genes_groups_df(adata, "type1", key="de")
    assert list(df.columns[:5]) == ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert {"pct_nz_group", "pct_nz_reference"} <= set(df.columns)
    assert len(df) == adata.n_vars and df["pvals"].isna().all()
    assert df["names"].iloc[0] == uns["names"]["type1"][0]
    everything = sc.get.rank_genes_groups_df(adata, None, key="de")
    assert len(everything) == 3 * adata.n_vars


@pytest.mark.parametrize("mode", ["change", "group"])
def test_change_and_group_scores_are_signed_probabilities(adata_model, mode):
    adata, model = adata_model
    table = scvae.tl.differential_expression(
        adata, model, groupby="cell_type", mode=mode, n_samples_overall=300
    )
    uns = adata.uns["rank_genes_groups"]
    assert uns["params"]["method"] == f"scvae_{mode}"
    for g in ("type0", "type2"):
        block = table[table["group1"] == g]
        scores = uns["scores"][g]
        assert (np.diff(scores) <= 1e-6).all() and np.abs(scores).max() <= 1  # ties to 6 decimals
        names = list(uns["names"][g])
        lfc = block.loc[names, "lfc_mean"].to_numpy()
        np.testing.assert_allclose(uns["logfoldchanges"][g], lfc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.abs(scores), block.loc[names, "proba_de"].to_numpy(), rtol=1e-6
        )
        assert (lfc[scores > 0.5] > 0).all() and (lfc[scores < -0.5] < 0).all()


def test_params_record_the_options_used_and_repeat_the_run(adata_model, tmp_path):
    # seed and batch_size (None: read from scvae.settings) and the test's options are recorded
    # as used, so the run can be repeated from the h5ad
    adata, model = adata_model
    table = scvae.tl.differential_expression(
        adata, model, groupby="cell_type", mode="change", n_samples_overall=50, key_added="rep"
    )
    path = tmp_path / "rep.h5ad"
    adata.write_h5ad(path)
    params = dict(sc.read_h5ad(path).uns["rep"]["params"])
    assert params["seed"] == scvae.settings.seed
    assert params["batch_size"] == scvae.settings.inference_batch_size
    assert params["pseudocounts"] == "estimated" and params["test_mode"] == "three"
    assert params["method"] == "scvae_change" and params["use_raw"] is False
    options = {k: params[k] for k in ("groupby", "mode", "n_samples_overall", "batch_correction")}
    for key in ("delta", "pseudocounts"):
        options[key] = None if params[key] == "estimated" else params[key]
    for key in ("fdr_target", "test_mode", "batch_size", "seed"):
        options[key] = params[key]
    options["reference"] = params["reference"]
    again = scvae.tl.differential_expression(adata, model, key_added="rep", **options)
    pd.testing.assert_frame_equal(again, table)


def test_scanpy_plots_draw_it(adata_model, tmp_path):
    adata, model = adata_model
    scvae.tl.differential_expression(adata, model, groupby="cell_type", n_samples_overall=300)
    sc.pl.rank_genes_groups(adata, n_genes=5, show=False)
    assert plt.gcf().axes  # one panel per group
    dot = sc.pl.rank_genes_groups_dotplot(adata, n_genes=3, show=False)
    assert "mainplot_ax" in dot
    labels = [t.get_text() for t in dot["mainplot_ax"].get_xticklabels()]
    top = [adata.uns["rank_genes_groups"]["names"][g][0] for g in ("type0", "type1", "type2")]
    assert set(top) <= set(labels)
    dot = sc.pl.rank_genes_groups_dotplot(
        adata, n_genes=3, values_to_plot="logfoldchanges", cmap="bwr", show=False
    )
    assert "mainplot_ax" in dot
    # the result survives a round trip through h5ad
    path = tmp_path / "with_de.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    assert list(sc.get.rank_genes_groups_df(back, "type0")["names"][:5]) == list(
        adata.uns["rank_genes_groups"]["names"]["type0"][:5]
    )


def test_reference_group_and_errors(adata_model):
    adata, model = adata_model
    table = scvae.tl.differential_expression(
        adata, model, groupby="cell_type", reference="type0", n_samples_overall=100
    )
    uns = adata.uns["rank_genes_groups"]
    assert list(uns["names"].dtype.names) == ["type1", "type2"] and "pts_rest" not in uns
    # as scanpy's rank_genes_groups(reference="type0", pts=True): a pts column per tested
    # group and one for the reference
    assert list(uns["pts"].columns) == ["type0", "type1", "type2"]
    in0 = (adata.obs["cell_type"] == "type0").to_numpy()
    np.testing.assert_allclose(uns["pts"]["type0"], (adata.X.toarray() > 0)[in0].mean(0))
    assert set(table["comparison"]) == {"type1 vs type0", "type2 vs type0"}
    with pytest.raises(ValueError, match="reference 'typeX'"):
        scvae.tl.differential_expression(adata, model, groupby="cell_type", reference="typeX")
    with pytest.raises(ValueError, match="groupby 'nope'"):
        scvae.tl.differential_expression(adata, model, groupby="nope")


def test_reference_is_not_tested_and_failures_keep_the_previous_result(adata_model):
    adata, model = adata_model
    adata = adata.copy()
    adata.obs["code"] = adata.obs["cell_type"].cat.codes.astype(str).astype("category")
    table = scvae.tl.differential_expression(
        adata, model, groupby="code", groups=["0", "1"], reference=1, n_samples_overall=50
    )
    assert set(table["comparison"]) == {"0 vs 1"}  # as scanpy: the reference is left out
    assert list(adata.uns["rank_genes_groups"]["names"].dtype.names) == ["0"]
    scvae.tl.differential_expression(
        adata, model, groupby="code", mode="change", fdr_target=[0.05, 0.1], n_samples_overall=50
    )
    assert adata.uns["rank_genes_groups"]["params"]["fdr_target"] == [0.05, 0.1]
    before = adata.uns["rank_genes_groups"]
    adata.obs["number"] = adata.obs["cell_type"].cat.codes.astype(int)
    with pytest.raises(ValueError, match=r"is numeric .*\.astype\(str\)"):
        scvae.tl.differential_expression(adata, model, groupby="number")
    assert adata.uns["rank_genes_groups"] is before


def test_groups_as_scanpy_takes_them(adata_model):
    adata, model = adata_model
    adata = adata.copy()
    adata.obs["code"] = pd.Categorical(adata.obs["cell_type"].cat.codes)  # integer labels
    table = scvae.tl.differential_expression(
        adata, model, groupby="code", groups=1, n_samples_overall=30
    )
    assert set(table["comparison"]) == {"1 vs Rest"}
    table = scvae.tl.differential_expression(
        adata, model, groupby="code", groups="all", n_samples_overall=30
    )
    assert list(adata.uns["rank_genes_groups"]["names"].dtype.names) == ["0", "1", "2"]
    assert table["group1"].dtype.kind == "i"  # the labels' own type, as scvi-tools
    ranked = sc.get.rank_genes_groups_df(adata, "1")
    assert len(ranked) == adata.n_vars and ranked["names"].notna().all()
    # a group named "rest" is a group; reference="rest" still means all other cells
    named = adata.obs["cell_type"].astype(str).replace({"type0": "rest"})
    adata.obs["named"] = named.astype("category")
    table = scvae.tl.differential_expression(adata, model, groupby="named", n_samples_overall=30)
    assert "rest vs Rest" in set(table["comparison"])
    assert "rest" in adata.uns["rank_genes_groups"]["names"].dtype.names


# ---------------------------------------------------------------------------- tl.fit
@pytest.fixture(scope="module")
def small():
    return scvae.data.simulate(240, 30, n_cell_types=3, n_batches=2, seed=1)


def test_fit_writes_latent_and_records_the_run(small, tmp_path):
    adata = small.copy()
    model = scvae.tl.fit(
        adata, batch_key="batch", key_added="X_mine", n_latent=4, max_epochs=3, seed=1
    )
    assert isinstance(model, scvae.SCVAE) and model.adata is adata
    assert "X_scvae" not in adata.obsm
    np.testing.assert_array_equal(adata.obsm["X_mine"], model.get_latent_representation())
    assert adata.obsm["X_mine"].shape == (240, 4)
    record = adata.uns["scvae"]
    assert record["version"] == scvae.__version__ and record["key_added"] == "X_mine"
    assert record["n_epochs"] == 3 == len(model.history)
    assert record["model"]["batch_key"] == "batch" and record["model"]["n_latent"] == 4
    assert "layer" not in record["model"]  # None options are not recorded
    assert record["train"]["max_epochs"] == 3 and record["train"]["seed"] == 1
    assert record["elbo_train"] == pytest.approx(model.history["elbo_train"].iloc[-1])
    assert record["elbo_validation"] == pytest.approx(model.history["elbo_validation"].iloc[-1])
    assert record["elbo_train"] > 0  # the history's negative ELBO, scvi-tools' convention
    # the record survives h5ad
    adata.write_h5ad(tmp_path / "fit.h5ad")
    back = sc.read_h5ad(tmp_path / "fit.h5ad")
    assert back.uns["scvae"]["n_epochs"] == 3 and back.uns["scvae"]["model"]["n_latent"] == 4
    np.testing.assert_array_equal(back.obsm["X_mine"], adata.obsm["X_mine"])


def test_fit_seed_is_the_whole_run_and_settings_are_restored(small):
    scvae.settings.seed = 0
    a = scvae.tl.fit(small.copy(), max_epochs=2, seed=7, train_size=1.0)
    b = scvae.tl.fit(small.copy(), max_epochs=2, seed=7, train_size=1.0)
    assert scvae.settings.seed == 0
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    # the same as building with settings.seed = 7 and training with seed=7
    scvae.settings.seed = 7
    try:
        manual = scvae.SCVAE(small.copy())
    finally:
        scvae.settings.seed = 0
    manual.train(max_epochs=2, seed=7, train_size=1.0)
    np.testing.assert_array_equal(a.get_latent_representation(), manual.get_latent_representation())
    assert "elbo_validation" not in a.adata.uns["scvae"]  # no validation cells
    c = scvae.tl.fit(small.copy(), max_epochs=2, seed=8, train_size=1.0)
    assert not np.array_equal(a.get_latent_representation(), c.get_latent_representation())


def test_fit_seed_fixes_a_sampled_latent_and_leaves_the_global_generator(small):
    # latent_distribution="ln" samples in the latent query: drawn from the seed too, so the
    # caller's global torch state before the call changes nothing, and it is left as it was
    latents = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        adata = small.copy()
        scvae.tl.fit(adata, latent_distribution="ln", n_hidden=8, max_epochs=1, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
        latents.append(adata.obsm["X_scvae"])
    np.testing.assert_array_equal(latents[0], latents[1])


def test_a_fit_seed_is_lent_to_its_own_thread_only(small):
    import threading

    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen["other"] = scvae.settings._seed_of_weights()
        seen["model"] = scvae.SCVAE(small.copy(), n_hidden=8)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with scvae.settings._weights_seed(7):
        inside.set()
        done.wait()
        assert scvae.settings._seed_of_weights() == 7
    thread.join()
    assert seen["other"] == 0 and scvae.settings.seed == 0  # not lent to the other thread
    own = scvae.SCVAE(small.copy(), n_hidden=8)
    for key, value in own.module.state_dict().items():
        assert torch.equal(value, seen["model"].module.state_dict()[key]), key


def test_fit_copy_leaves_the_input_alone(small):
    adata = small.copy()
    out, model = scvae.tl.fit(adata, max_epochs=2, copy=True)
    assert out is not adata and model.adata is out
    assert "X_scvae" in out.obsm and "scvae" in out.uns
    assert "X_scvae" not in adata.obsm and "scvae" not in adata.uns


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"batch_key": "nope"}, scvae.data.RegistryError, "batch_key='nope' is not a column"),
        ({"labels_key": "nope"}, scvae.data.RegistryError, "labels_key='nope' is not a column"),
        ({"layer": "counts"}, scvae.data.RegistryError, "Layer 'counts' is not in adata.layers"),
        ({"key_added": ""}, ValueError, "key_added must be a non-empty string"),
        ({"n_latent": 0}, ValueError, "n_latent must be a whole number >= 1"),
        ({"max_epochs": 0}, ValueError, "max_epochs must be a whole number >= 1"),
        ({"seed": 2**32}, ValueError, r"seed must be a whole number from 0 to 2\*\*32 - 1, got"),
    ],
    ids=["batch_key", "labels_key", "layer", "key_added", "n_latent", "max_epochs", "seed"],
)
def test_fit_bad_options_name_the_problem_and_change_nothing(small, options, error, match):
    adata = small.copy()
    with pytest.raises(error, match=match):
        scvae.tl.fit(adata, **options)
    assert "X_scvae" not in adata.obsm and "scvae" not in adata.uns


def test_fit_refuses_log_normalised_data_saying_so(small):
    adata = small.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    with pytest.raises(scvae.data.RegistryError, match="looks log-normalised.*raw counts"):
        scvae.tl.fit(adata, max_epochs=1)


# ------------------------------------------------------------ tl.normalized_expression
def test_normalized_expression_layer(adata_model):
    adata, model = adata_model
    torch.manual_seed(0)  # z is sampled from q(z|x), as in scvi-tools
    scvae.tl.normalized_expression(adata, model)
    layer = adata.layers["scvae_normalized"]
    assert layer.dtype == np.float32 and layer.shape == adata.shape
    torch.manual_seed(0)
    expected = model.get_normalized_expression(adata, library_size=1e4)
    np.testing.assert_allclose(layer, expected.to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.sum(1), 1e4, rtol=1e-3)
    # "latent": mu at the observed library, so each row sums to the cell's total count
    scvae.tl.normalized_expression(adata, model, layer_added="mu", library_size="latent")
    np.testing.assert_allclose(adata.layers["mu"].sum(1), adata.X.sum(1).A1, rtol=1e-3)
    # batch-corrected: cells of batch1 decode as before, those of batch0 do not
    torch.manual_seed(0)
    scvae.tl.normalized_expression(adata, model, layer_added="b1", transform_batch="batch1")
    in1 = (adata.obs["batch"] == "batch1").to_numpy()
    np.testing.assert_allclose(adata.layers["b1"][in1], layer[in1], rtol=1e-4)
    assert not np.allclose(adata.layers["b1"][~in1], layer[~in1], rtol=1e-2)


def test_normalized_expression_copy_and_errors(adata_model):
    adata, model = adata_model
    before = set(adata.layers)
    out = scvae.tl.normalized_expression(adata, model, layer_added="copied", copy=True)
    assert "copied" in out.layers and set(adata.layers) == before
    with pytest.raises(ValueError, match=r"transform_batch \['nope'\] is not a registered batch"):
        scvae.tl.normalized_expression(adata, model, transform_batch="nope")
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match="library_size must be a finite positive number"):
            scvae.tl.normalized_expression(adata, model, library_size=bad)
    with pytest.raises(ValueError, match="layer_added must be a non-empty string"):
        scvae.tl.normalized_expression(adata, model, layer_added="")
    with pytest.raises(scvae.data.RegistryError):
        scvae.tl.normalized_expression(adata[:, :10].copy(), model)
    assert set(adata.layers) == before
    on_layer = adata.copy()
    on_layer.layers["counts"] = on_layer.X.copy()
    counted = scvae.SCVAE(on_layer, layer="counts", batch_key="batch", n_hidden=8)
    with pytest.raises(ValueError, match="the layer the model reads its counts from"):
        scvae.tl.normalized_expression(on_layer, counted, layer_added="counts")
    assert (on_layer.layers["counts"] != on_layer.X).nnz == 0  # the raw counts left alone
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        scvae.tl.differential_expression(adata, model, groupby="cell_type", key_added="")


def test_de_seed_out_of_range_is_refused_by_name(adata_model):
    # seeds past 2**64 - 1 failed inside torch ("Overflow when unpacking long long")
    adata, model = adata_model
    with pytest.raises(ValueError, match=r"seed must be None or a whole number from 0 to 2\*\*32"):
        scvae.tl.differential_expression(
            adata, model, groupby="cell_type", n_samples_overall=20, seed=2**64, key_added="big"
        )
    assert "big" not in adata.uns


def test_groupby_bool_or_with_unused_categories_is_refused(adata_model):
    adata, model = adata_model
    marked = adata.copy()
    marked.uns.pop("rank_genes_groups", None)
    marked.obs["is_type0"] = (marked.obs["cell_type"] == "type0").to_numpy()
    with pytest.raises(ValueError, match=r"'is_type0'\] is boolean \(dtype bool\).*astype\(str\)"):
        scvae.tl.differential_expression(marked, model, groupby="is_type0")
    marked.obs["nullable"] = marked.obs["is_type0"].astype("boolean")
    with pytest.raises(ValueError, match="is boolean"):
        scvae.tl.differential_expression(marked, model, groupby="nullable")
    marked.obs["types"] = marked.obs["cell_type"].cat.add_categories(["gone", "empty"])
    with pytest.raises(
        ValueError,
        match=r"categories without cells: 'gone', 'empty'\. Remove them first: "
        r"adata.obs\['types'\] = adata.obs\['types'\].cat.remove_unused_categories\(\)",
    ):
        scvae.tl.differential_expression(marked, model, groupby="types")
    assert "rank_genes_groups" not in marked.uns  # nothing written
    with pytest.raises(ValueError, match="for groups (gone, empty|empty, gone)"):  # scanpy too
        sc.tl.rank_genes_groups(marked, groupby="types")


def test_normalized_expression_refuses_backed_copy_and_backed_views_up_front(
    adata_model, tmp_path, monkeypatch
):
    adata, model = adata_model
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = sc.read_h5ad(path, backed="r")
    calls = []
    monkeypatch.setattr(model, "get_normalized_expression", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="copy=True cannot copy an AnnData opened in backed mode"):
        scvae.tl.normalized_expression(backed, model, copy=True)
    with pytest.raises(ValueError, match=r"a view of a backed AnnData.*view.to_memory\(\)"):
        scvae.tl.normalized_expression(backed[:100], model)
    assert calls == []  # refused before any work
    monkeypatch.undo()
    scvae.tl.normalized_expression(backed, model, layer_added="n")  # the whole backed AnnData
    assert backed.layers["n"].shape == backed.shape
    backed.file.close()


def test_differential_expression_passes_its_batch_size_to_the_queries(adata_model, monkeypatch):
    adata, model = adata_model
    sizes = []
    query = type(model).get_normalized_expression

    def spy(self, *args, **kwargs):
        sizes.append(kwargs.get("batch_size"))
        return query(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "get_normalized_expression", spy)
    scvae.tl.differential_expression(
        adata.copy(), model, groupby="cell_type", groups="type0", n_samples_overall=50, batch_size=7
    )
    assert sizes and set(sizes) == {7}


def test_warnings_point_at_the_users_line_from_every_entry_point():
    # a fixed stacklevel was right for one entry point: through scvae.tl (or from a model
    # method where the check sat one frame shallower) warnings named scvae's own files
    adata = scvae.data.simulate(120, 30, seed=0)
    adata.obs["few"] = ["a"] * 118 + ["b", "c"]
    model = scvae.SCVAE(adata)
    calls = {
        "untrained, through tl": lambda: scvae.tl.normalized_expression(adata, model, copy=True),
        "few cells, through tl.fit": lambda: scvae.tl.fit(
            adata.copy(), batch_key="few", max_epochs=1
        ),
        "shared cells, model method": lambda: model.differential_expression(
            idx1=np.arange(60), idx2=np.arange(50, 120)
        ),
    }
    for name, call in calls.items():
        with pytest.warns(UserWarning) as seen:
            call()
        assert {w.filename for w in seen} == {__file__}, name


def test_fit_takes_every_model_option_of_scvae(small):
    import inspect

    # tl.fit is "SCVAE(adata, ...) then train(...)": two of SCVAE's options were missing
    model_options = set(inspect.signature(scvae.SCVAE.__init__).parameters) - {"self", "adata"}
    assert model_options <= set(inspect.signature(scvae.tl.fit).parameters)
    adata = small.copy()
    model = scvae.tl.fit(
        adata,
        batch_key="batch",
        deeply_inject_covariates=False,
        log_variational=False,
        max_epochs=1,
    )
    assert not model.module.config.deeply_inject_covariates
    assert not model.module.config.log_variational
    recorded = adata.uns["scvae"]["model"]
    assert recorded["deeply_inject_covariates"] is False and recorded["log_variational"] is False


def test_fit_records_covariate_keys_that_h5ad_can_hold(small, tmp_path):
    # keys as a tuple or adata.obs.columns[...] (accepted by registration) were recorded as
    # given, and write_h5ad failed on uns["scvae"] ("No method registered for writing tuple")
    adata = small.copy()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    adata.obs["score"] = np.linspace(0.0, 1.0, adata.n_obs)
    scvae.tl.fit(
        adata,
        categorical_covariate_keys=("donor",),
        continuous_covariate_keys=adata.obs.columns[adata.obs.columns == "score"],
        max_epochs=1,
    )
    assert adata.uns["scvae"]["model"]["categorical_covariate_keys"] == ["donor"]
    assert adata.uns["scvae"]["model"]["continuous_covariate_keys"] == ["score"]
    adata.write_h5ad(tmp_path / "fit.h5ad")
