"""scvae.pl draws what it says (real matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import scvae


def test_history_draws_train_and_validation(trained):
    ax = scvae.pl.history(trained, show=False)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["elbo_train", "elbo_validation"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), trained.history["elbo_train"])


def test_history_refuses_untrained(sim):
    with pytest.raises(ValueError, match="no training history"):
        scvae.pl.history(scvae.SCVAE(sim[:50].copy()), show=False)


def test_volcano_labels_top_genes_and_needs_a_comparison():
    table = pd.DataFrame(
        {
            "lfc_mean": [3.0, -2.0, 0.1, 0.0],
            "proba_de": [0.99, 0.98, 0.1, 0.2],
            "comparison": ["A vs Rest"] * 2 + ["B vs Rest"] * 2,
        },
        index=["g1", "g2", "g3", "g4"],
    )
    with pytest.raises(ValueError, match="several comparisons"):
        scvae.pl.volcano(table, show=False)
    ax = scvae.pl.volcano(table, comparison="A vs Rest", n_labels=1, show=False)
    assert [t.get_text() for t in ax.texts] == ["g1"]
    with pytest.raises(ValueError, match="'lfc_max' is not in"):
        scvae.pl.volcano(table, x="lfc_max", comparison="A vs Rest", show=False)


def test_volcano_of_a_vanilla_table_uses_the_scale_ratio():
    table = pd.DataFrame(
        {
            "bayes_factor": [3.0, -2.0, 0.1],
            "scale1": [4e-3, 1e-4, 1e-3],
            "scale2": [1e-3, 4e-4, 1e-3],
        },
        index=["g1", "g2", "g3"],
    )
    ax = scvae.pl.volcano(table, show=False)
    assert ax.get_xlabel() == "log2(scale1 / scale2)" and ax.get_ylabel() == "|bayes_factor|"
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 0], [2.0, -2.0, 0.0])


def test_history_keys_and_scanpy_save_and_show(trained, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import scanpy as sc

    ax = scvae.pl.history(trained, keys="elbo_train", show=False)  # one key as a string
    assert [line.get_label() for line in ax.get_lines()] == ["elbo_train"]
    with pytest.raises(ValueError, match=r"\['elb_train'\] not in model.history"):
        scvae.pl.history(trained, keys=("elb_train",), show=False)
    figdir = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        scvae.pl.history(trained, show=False, save="_run1.png")  # scanpy: figdir/name + save
        scvae.pl.history(trained, show=False, save=True)  # scanpy's default format
    finally:
        sc.settings.figdir = figdir
    default = f"scvae_history.{sc.settings.file_format_figs}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([default, "scvae_history_run1.png"])
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    assert scvae.pl.history(trained, show=True) is None  # shown: nothing returned, as scanpy


def test_volcano_of_a_scanpy_table_and_its_messages():
    table = pd.DataFrame(
        {
            "names": ["CD79A", "NKG7", "LYZ"],
            "scores": [0.99, -0.9, 0.1],
            "logfoldchanges": [3.0, -2.0, 0.1],
        }
    )  # as sc.get.rank_genes_groups_df gives it: genes in a column, a range index
    with pytest.raises(ValueError, match=r"pass x='logfoldchanges', y='scores'"):
        scvae.pl.volcano(table, show=False)
    ax = scvae.pl.volcano(table, x="logfoldchanges", y="scores", n_labels=1, show=False)
    assert [t.get_text() for t in ax.texts] == ["CD79A"]
    with pytest.raises(ValueError, match="no 'comparison' column"):
        scvae.pl.volcano(table, x="logfoldchanges", y="scores", comparison="A", show=False)
    two = pd.DataFrame(
        {"lfc_mean": [1.0, 2.0], "proba_de": [0.5, 0.9], "comparison": ["A vs Rest", "B vs Rest"]}
    )
    with pytest.raises(ValueError, match="the table's comparisons: A vs Rest, B vs Rest"):
        scvae.pl.volcano(two, comparison="C vs Rest", show=False)


def test_history_of_one_epoch_draws_markers(sim):
    model = scvae.SCVAE(sim[:100].copy())
    model.train(max_epochs=1, seed=0)
    ax = scvae.pl.history(model, show=False)
    assert [line.get_marker() for line in ax.get_lines()] == ["o", "o"]  # one point each
    assert all(len(line.get_xdata()) == 1 for line in ax.get_lines())


def test_history_of_many_epochs_draws_lines_only(trained):
    ax = scvae.pl.history(trained, show=False)  # 40 epochs
    assert {line.get_marker() for line in ax.get_lines()} == {"None"}


@pytest.fixture
def scanpy_figures(tmp_path, monkeypatch):
    """scanpy's figure settings pointed at tmp_path, restored afterwards; plt.show a no-op."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    saved = {k: getattr(sc.settings, k) for k in ("figdir", "autosave", "autoshow", "plot_suffix")}
    sc.settings.figdir = tmp_path
    yield tmp_path
    for key, value in saved.items():
        setattr(sc.settings, key, value)
    plt.close("all")


@pytest.mark.parametrize("autoshow", [True, False])
@pytest.mark.parametrize("show", [None, True, False])
@pytest.mark.parametrize("save", [None, False, True, "_x.png"])
def test_returns_what_scanpy_plots_return(trained, scanpy_figures, autoshow, show, save):
    import scanpy as sc

    sc.settings.autoshow = autoshow
    cells = sc.AnnData(np.ones((3, 2), dtype=np.float32))
    cells.obsm["X_a"] = np.arange(6, dtype=float).reshape(3, 2)
    expected = sc.pl.embedding(cells, basis="a", show=show, save=save)
    got = scvae.pl.history(trained, show=show, save=save)
    assert (got is None) == (expected is None)
    table = pd.DataFrame({"lfc_mean": [1.0, -1.0], "proba_de": [0.9, 0.2]}, index=["g1", "g2"])
    assert (scvae.pl.volcano(table, show=show, save=save) is None) == (expected is None)


def test_save_follows_scanpy_settings_and_closes_the_figure(trained, scanpy_figures):
    import matplotlib.pyplot as plt
    import scanpy as sc

    sc.settings.plot_suffix = "_v2"
    before = plt.get_fignums()
    assert scvae.pl.history(trained, show=False, save="_run.png") is not None
    assert plt.get_fignums() == before  # saved, then closed: no figure left open in a loop
    assert (scanpy_figures / "scvae_history_run_v2.png").is_file()
    sc.settings.plot_suffix = ""
    sc.settings.autosave = True  # save=None follows scanpy's autosave
    scvae.pl.history(trained, show=False)
    assert (scanpy_figures / f"scvae_history.{sc.settings.file_format_figs}").is_file()
    assert plt.get_fignums() == before


def test_ax_draws_into_the_given_figure_and_saves_that_one(trained, scanpy_figures):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    other = plt.figure(figsize=(1, 1))  # the current figure is another one
    assert scvae.pl.history(trained, ax=left, show=False) is left
    assert len(left.get_lines()) == 2 and not right.get_lines()
    scvae.pl.history(trained, ax=right, show=False, save="_pair.png")
    image = mpimg.imread(scanpy_figures / "scvae_history_pair.png")
    assert image.shape[1] > 2 * image.shape[0]  # the wide two-panel figure, not `other`
    assert not plt.fignum_exists(fig.number) and plt.fignum_exists(other.number)
    from matplotlib.figure import Figure

    unmanaged = Figure().subplots()
    with pytest.raises(ValueError, match="save= needs a figure made through pyplot"):
        scvae.pl.history(trained, ax=unmanaged, show=False, save=True)
    assert scvae.pl.history(trained, ax=unmanaged, show=False) is unmanaged


def test_volcano_of_every_group_of_scanpy_needs_a_group(adata_de):
    import scanpy as sc

    table = sc.get.rank_genes_groups_df(adata_de, None)  # a `group` column, every group
    xy = {"x": "logfoldchanges", "y": "scores"}
    with pytest.raises(ValueError, match=r"several groups \(type0, type1, type2\); pass group="):
        scvae.pl.volcano(table, show=False, **xy)
    ax = scvae.pl.volcano(table, group="type1", show=False, **xy)
    one = sc.get.rank_genes_groups_df(adata_de, "type1")
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 0], one["logfoldchanges"])
    assert ax.get_title() == "type1"
    with pytest.raises(ValueError, match=r"No rows with group == 'type9'; the table's groups"):
        scvae.pl.volcano(table, group="type9", show=False, **xy)
    with pytest.raises(ValueError, match="no 'group' column"):
        scvae.pl.volcano(one, group="type1", show=False, **xy)


@pytest.fixture
def adata_de(sim, trained):
    adata = sim.copy()
    scvae.tl.differential_expression(adata, trained, groupby="cell_type", n_samples_overall=50)
    return adata
