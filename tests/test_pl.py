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
