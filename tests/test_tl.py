"""scvae.tl.differential_expression writes uns that scanpy's own readers and plots accept."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402

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


def test_change_mode_scores_are_signed_probabilities(adata_model):
    adata, model = adata_model
    table = scvae.tl.differential_expression(
        adata, model, groupby="cell_type", mode="change", n_samples_overall=300
    )
    uns = adata.uns["rank_genes_groups"]
    assert uns["params"]["method"] == "scvae_change"
    for g in ("type0", "type2"):
        block = table[table["group1"] == g]
        scores = uns["scores"][g]
        assert (np.diff(scores) <= 0).all() and np.abs(scores).max() <= 1
        names = list(uns["names"][g])
        lfc = block.loc[names, "lfc_mean"].to_numpy()
        np.testing.assert_allclose(uns["logfoldchanges"][g], lfc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.abs(scores), block.loc[names, "proba_de"].to_numpy(), rtol=1e-6
        )
        assert (lfc[scores > 0.5] > 0).all() and (lfc[scores < -0.5] < 0).all()


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
    assert set(table["comparison"]) == {"type1 vs type0", "type2 vs type0"}
    with pytest.raises(ValueError, match="reference 'typeX'"):
        scvae.tl.differential_expression(adata, model, groupby="cell_type", reference="typeX")
    with pytest.raises(ValueError, match="groupby 'nope'"):
        scvae.tl.differential_expression(adata, model, groupby="nope")
