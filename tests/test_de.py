"""Differential expression: the statistics on arrays with known answers, and the model method."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import shared_file
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

import scvae
from scvae import de, de_group

# ------------------------------------------------------------------ statistics on arrays


def test_vanilla_known_answer_and_saturation():
    s1 = np.array([[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.7, 0.1, 0.2]])
    s2 = np.array([[0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.1, 0.6, 0.3]])
    st_ = de.vanilla_statistics(s1, s2)
    np.testing.assert_allclose(st_["proba_m1"], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(st_["proba_m2"], [0.25, 0.75, 1.0])
    np.testing.assert_allclose(st_["bayes_factor"][:2], [np.log(3), -np.log(3)], atol=1e-6)
    assert st_["bayes_factor"][2] == pytest.approx(np.log(1e-8) - np.log(1 + 1e-8))  # -18.42


def test_change_probabilities_count_pairs_beyond_delta():
    # lfc of pair i, gene g is known exactly: s1 = s2 * 2**lfc with a negligible pseudocount.
    lfc = np.array([[1.0, -1.0, 0.1], [0.5, -0.3, -0.1], [0.3, -0.5, 0.2], [-0.4, 0.0, 0.0]])
    s2 = np.full_like(lfc, 0.01)
    s1 = s2 * 2.0**lfc
    three = de.change_statistics(s1, s2, delta=0.25, pseudocounts=1e-12)
    np.testing.assert_allclose(three["proba_de"], [0.75, 0.75, 0.0])  # max(up, down)
    np.testing.assert_allclose(three["proba_not_de"], [0.25, 0.25, 1.0])
    np.testing.assert_allclose(three["lfc_mean"], lfc.mean(0), atol=1e-6)
    np.testing.assert_allclose(three["lfc_median"], np.median(lfc, 0), atol=1e-6)
    np.testing.assert_allclose(three["lfc_std"], lfc.std(0), atol=1e-6)
    np.testing.assert_allclose(three["lfc_min"], lfc.min(0), atol=1e-6)
    np.testing.assert_allclose(three["lfc_max"], lfc.max(0), atol=1e-6)
    two = de.change_statistics(s1, s2, delta=0.25, pseudocounts=1e-12, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], [1.0, 0.75, 0.0])  # up + down
    assert three["delta"] == 0.25 and three["pseudocounts"] == 1e-12


def test_change_pseudocount_shrinks_lfc_of_tiny_values():
    s1 = np.full((5, 2), 1e-7)
    s2 = np.full((5, 2), 4e-7)
    big_c = de.change_statistics(s1, s2, delta=0.25, pseudocounts=1e-4)
    small_c = de.change_statistics(s1, s2, delta=0.25, pseudocounts=1e-12)
    assert (big_c["proba_de"] == 0).all() and (small_c["proba_de"] == 1).all()
    # the lfc summaries use 1e-3 * c: with c = 1e-4 they are still shrunk (c' = 1e-7)
    np.testing.assert_allclose(big_c["lfc_mean"], np.log2(2e-7 / 5e-7))
    np.testing.assert_allclose(small_c["lfc_mean"], -2.0, atol=1e-6)


def test_pseudocount_estimate_known_answer():
    rng = np.random.default_rng(0)
    s1 = rng.uniform(0, 1e-3, (50, 20))
    s2 = rng.uniform(0, 1e-3, (50, 20))
    zero1 = np.arange(20) < 5
    zero2 = np.arange(20) >= 15
    expected = max(np.quantile(s1[:, zero1].max(0), 0.9), np.quantile(s2[:, zero2].max(0), 0.9))
    got = de.estimate_pseudocounts(s1, s2, zero1, zero2)
    assert got == pytest.approx(expected / 20)
    none = np.zeros(20, dtype=bool)
    assert de.estimate_pseudocounts(s1, s2, none, none) == 1e-10


def test_fdr_rule_hand_example():
    p = np.array([0.999, 0.5, 0.99, 0.96, 0.95, 0.2])
    # sorted: .999 .99 .96 .95 .5 .2 -> running mean of 1-p: .001 .0055 .017 .025 .12 ...
    assert de.fdr_calls(p, 0.05).tolist() == [True, False, True, True, True, False]
    assert de.fdr_calls(p, 0.003).tolist() == [True, False, False, False, False, False]
    assert not de.fdr_calls(p, 1e-4).any()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=40),
    st.sampled_from([0.01, 0.05, 0.1, 0.3]),
)
def test_fdr_rule_is_the_largest_top_set(p, target):
    p = np.asarray(p)
    calls = de.fdr_calls(p, target)
    k = int(calls.sum())
    top = np.sort(p)[::-1]
    if k:
        assert p[calls].min() >= p[~calls].max(initial=-1)  # a top set by proba_de
        assert np.mean(1 - top[:k]) <= target + 1e-9
    if k < p.size:
        assert np.mean(1 - top[: k + 1]) > target  # one more gene would break the target


def test_count_statistics_match_dense_computation():
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, (300, 12)).astype(np.float32)
    dense[:, 0] = 0
    dense[dense.sum(1) == 0, 1] = 1
    comps = [
        de.Comparison("a", "b", np.arange(0, 100), np.arange(100, 300)),
        de.Comparison(
            "c", "Rest", np.array([5, 7, 250]), np.setdiff1d(np.arange(300), [5, 7, 250])
        ),
    ]
    norm = dense / dense.sum(1, keepdims=True) * 1e4
    x = sp.csr_matrix(dense)
    blocks = de.count_statistics((x[s : s + 70] for s in range(0, 300, 70)), comps)
    for whole, part in zip(de.count_statistics(x, comps), blocks, strict=True):
        for key in whole:
            np.testing.assert_allclose(whole[key], part[key])
    with pytest.raises(ValueError, match="cover 140 cells"):
        de.count_statistics((x[s : s + 70] for s in range(0, 140, 70)), comps)
    for comp, got in zip(comps, de.count_statistics(x, comps), strict=True):
        for side, cells in (("1", comp.cells1), ("2", comp.cells2)):
            np.testing.assert_allclose(got[f"raw_mean{side}"], dense[cells].mean(0), rtol=1e-6)
            np.testing.assert_allclose(
                got[f"non_zeros_proportion{side}"], (dense[cells] > 0).mean(0), rtol=1e-6
            )
            np.testing.assert_allclose(
                got[f"raw_normalized_mean{side}"], norm[cells].mean(0), rtol=1e-5
            )


def test_count_statistics_hold_one_block_of_weights_not_all_cells(monkeypatch):
    import tracemalloc

    # one-vs-rest over many groups: the weights of cells x (2 x comparisons) were 16 bytes
    # per cell and group (1 GB at a million cells and 40 groups); a block's are enough
    n, k = 200_000, 40
    x = sp.csr_matrix(np.ones((n, 3), dtype=np.float32))
    labels = np.arange(n) % k
    comps = [
        de.Comparison(str(g), "Rest", np.flatnonzero(labels == g), np.flatnonzero(labels != g))
        for g in range(k)
    ]
    tracemalloc.start()
    stats = de.count_statistics(x, comps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * 2 * k * 8 / 4, peak  # the whole weights were n x 2k float64
    assert stats[3]["raw_mean1"].tolist() == [1.0] * 3
    shuffled = de.Comparison("a", "b", np.array([9, 2, 2, 5]), np.array([0, 1]))
    assert de.count_statistics(x[:10], [shuffled])[0]["raw_mean1"].tolist() == [1.0] * 3


def test_sample_pairs_with_replacement_inside_each_group():
    rng = np.random.default_rng(0)
    cells1, cells2 = np.array([3, 9]), np.arange(10, 20)
    pairs = de.sample_pairs(cells1, cells2, 1000, 1, rng)
    ((a, b),) = pairs
    assert len(a) == len(b) == 1000
    assert set(a) == {3, 9} and set(b) <= set(cells2)  # two cells, drawn 1000 times
    assert abs((a == 3).mean() - 0.5) < 0.06
    per_batch = de.sample_pairs(cells1, cells2, 1000, 3, rng)
    assert [len(x) for x, _ in per_batch] == [333] * 3


def test_define_comparisons_and_errors():
    labels = pd.Categorical(["x", "y", "x", "z"], categories=["z", "x", "y", "w"])
    comps = de.define_comparisons(4, labels=pd.Series(labels))
    assert [c.label for c in comps] == ["z vs Rest", "x vs Rest", "y vs Rest"]  # empty w left out
    assert comps[1].cells1.tolist() == [0, 2] and comps[1].cells2.tolist() == [1, 3]
    one = de.define_comparisons(4, labels=np.array(list("xyxz")), group1=["x"], group2="z")
    assert one[0].label == "x vs z" and one[0].cells2.tolist() == [3]
    idx = de.define_comparisons(4, idx1=[True, False, False, False])
    assert idx[0].label == "group1 vs Rest" and idx[0].cells2.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="'q' is not in"):
        de.define_comparisons(4, labels=np.array(list("xyxz")), group1="q")
    with pytest.raises(ValueError, match="at least two"):
        de.define_comparisons(4, labels=np.array(list("xxxx")))
    with pytest.raises(ValueError, match="no cells"):
        de.define_comparisons(4, idx1=[0, 1], idx2=[])
    with pytest.raises(ValueError, match="boolean mask of 3"):
        de.define_comparisons(4, idx1=[True, False, True])
    with pytest.raises(IndexError):
        de.define_comparisons(4, idx1=[0, 9])
    # cluster numbers are groups, a number per cell is not (unless made categorical)
    totals = pd.Series(np.arange(101) * 7)
    with pytest.raises(ValueError, match="101 different integers"):
        de.define_comparisons(101, labels=totals, groupby="total_counts")
    assert len(de.define_comparisons(101, labels=totals.astype("category"))) == 101
    assert len(de.define_comparisons(101, labels=totals, group1=[0, 7])) == 2
    assert len(de.define_comparisons(100, labels=totals[:100])) == 100
    # what would be ignored is refused (scvi-tools ignores it): idx2 alone, groups with idx1
    with pytest.raises(ValueError, match="idx1 is not given"):
        de.define_comparisons(4, labels=np.array(list("xyxz")), group1="x", idx2=[1])
    with pytest.raises(ValueError, match="with idx1, groupby and group1 would be ignored"):
        de.define_comparisons(4, labels=np.array(list("xyxz")), group1="x", idx1=[0])


def test_comparisons_as_scvi_tools_names_them():
    labels = pd.Series(pd.Categorical([0, 1, 0, 2]))  # integer groups, as Leiden's
    assert de.define_comparisons(4, labels=labels, group1=0)[0].label == "0 vs Rest"
    assert de.define_comparisons(4, labels=labels, group1=0, group2=2)[0].label == "0 vs 2"
    # group1=None with group2: every other group against it
    against = de.define_comparisons(4, labels=labels, group2=1)
    assert [c.label for c in against] == ["0 vs 1", "2 vs 1"]
    with pytest.raises(ValueError, match="cannot be compared with itself"):
        de.define_comparisons(4, labels=labels, group1=1, group2=1)
    with pytest.raises(ValueError, match="same cells"):
        de.define_comparisons(4, idx1=[0, 1], idx2=[1, 0])
    with pytest.warns(UserWarning, match="share 1 cells"):
        de.define_comparisons(4, idx1=[0, 1], idx2=[1, 2])
    with pytest.raises(ValueError, match="continuous numbers"):
        de.define_comparisons(4, labels=pd.Series([0.1, 0.2, 0.1, 0.3]), groupby="library")


def test_integer_groups_in_numeric_order_with_their_own_labels_each_once():
    labels = pd.Series([10, 2, 0, 2, 10, 1])  # a plain integer column, as scvi-tools takes it
    comps = de.define_comparisons(6, labels=labels)
    assert [c.label for c in comps] == ["0 vs Rest", "1 vs Rest", "2 vs Rest", "10 vs Rest"]
    assert [c.value1 for c in comps] == [0, 1, 2, 10]  # not '0', '1', ...: de[de.group1 == 1]
    twice = de.define_comparisons(6, labels=labels, group1=[2, "2", 10], group2=0)
    assert [c.label for c in twice] == ["2 vs 0", "10 vs 0"]
    assert (twice[0].value1, twice[0].value2) == (2, 0)


def test_settings_refuse_values_that_would_fail_later():
    for name, value in (("seed", None), ("seed", -1), ("progress_bar", "no")):
        with pytest.raises(ValueError, match=f"settings.{name} must be"):
            setattr(scvae.settings, name, value)
    assert scvae.settings.seed == 0 and scvae.settings.progress_bar in (True, False)


def test_verbosity_takes_logging_names_and_numbers_only():
    import logging

    before = scvae.settings.verbosity
    try:
        for given, read in (("critical", "critical"), (logging.INFO, "info"), ("DEBUG", "debug")):
            scvae.settings.verbosity = given
            assert scvae.settings.verbosity == read
        # scanpy's 1 (warnings) was logging level 1, below DEBUG: everything was printed
        with pytest.raises(ValueError, match="scanpy's verbosity scale.*'warning'"):
            scvae.settings.verbosity = 1
        for bad in (True, 25, 2.5, None, "loud"):
            with pytest.raises(ValueError, match="settings.verbosity cannot be"):
                scvae.settings.verbosity = bad
        assert scvae.settings.verbosity == "debug"
    finally:
        scvae.settings.verbosity = before


def test_log_lines_are_not_printed_again_by_a_root_handler():
    import logging

    # with logging.basicConfig(...) every line came twice: scvae's handler and the root's
    assert logging.getLogger("scvae").propagate is False


def test_settings_refuse_names_they_do_not_have():
    # scvi.settings.batch_size set by habit, or a typo, was set and read by nothing
    size = scvae.settings.inference_batch_size
    with pytest.raises(AttributeError, match="no setting 'batch_size'.*inference_batch_size"):
        scvae.settings.batch_size = 7
    with pytest.raises(AttributeError, match="no setting 'inference_batchsize'"):
        scvae.settings.inference_batchsize = 7
    assert scvae.settings.inference_batch_size == size
    assert not hasattr(scvae.settings, "batch_size")


def test_sorting_and_tie_breaks():
    names = ["a", "b", "c", "d"]
    # change: a and b both have proba_de 1; b has the larger |lfc| and comes first
    s2 = np.full((20, 4), 0.1)
    s1 = s2 * np.array([2.0, 0.125, 1.0, 1.05])
    stats = {"raw_mean1": np.ones(4), "raw_mean2": np.ones(4)}
    table = de.compare(s1, s2, stats, names, de.DEOptions(mode="change", fdr_target=(0.05, 0.1)))
    assert list(table.index) == ["b", "a", "d", "c"]
    assert table["is_de_fdr_0.05"].tolist() == [True, True, False, False]
    assert "is_de_fdr_0.1" in table
    # vanilla: a saturated bayes factor ties; the larger log2(scale1/scale2) comes first
    s1 = s2 * np.array([2.0, 8.0, 1.0, 0.5])
    table = de.compare(s1, s2, stats, names, de.DEOptions(mode="vanilla"))
    assert list(table.index) == ["b", "a", "c", "d"]


def test_options_are_checked():
    with pytest.raises(ValueError, match="mode"):
        de.DEOptions(mode="bayes")
    with pytest.raises(ValueError, match="fdr_target"):
        de.DEOptions(fdr_target=1.5)
    with pytest.raises(ValueError, match="delta"):
        de.change_statistics(np.ones((2, 2)), np.ones((2, 2)), delta=0, pseudocounts=0.1)


def test_estimated_delta_follows_the_outer_components_as_scvi_tools():
    rng = np.random.default_rng(1)
    lfc = np.r_[rng.normal(0, 0.05, 800), rng.normal(3, 0.1, 100), rng.normal(-1, 0.1, 100)]
    # 0.6 x the mean size of the outer components' means (3 and -1), at least 0.1
    assert de_group.estimate_delta(lfc) == pytest.approx(0.6 * 2.0, abs=0.02)
    assert de_group.estimate_delta(rng.normal(0, 0.01, 500)) == pytest.approx(0.1, abs=0.02)
    assert de_group.estimate_delta(np.array([0.5, -0.5])) == pytest.approx(0.3)  # two genes
    s1 = np.exp(rng.normal(0, 1, (40, 30)))
    s2 = s1 * np.exp(np.r_[np.full(10, 2.0), np.zeros(20)] * np.log(2))
    st_none = de.change_statistics(s1, s2, delta=None, pseudocounts=1e-6)
    expected = de_group.estimate_delta(np.log2(s1 + 1e-6).mean(0) - np.log2(s2 + 1e-6).mean(0))
    assert st_none["delta"] == pytest.approx(expected)
    st_fixed = de.change_statistics(s1, s2, delta=st_none["delta"], pseudocounts=1e-6)
    np.testing.assert_array_equal(st_none["proba_de"], st_fixed["proba_de"])


# ---------------------------------------------------------------------- the model method

VANILLA = ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
COUNTS = [
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
]
CHANGE = [
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "pseudocounts",
    "delta",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_min",
    "lfc_max",
]
NAMES = ["comparison", "group1", "group2"]


def true_log2_ratio(adata, t1: int, t2: int) -> np.ndarray:
    """log2(rho_t1 / rho_t2) of ``simulate``'s types, single batch, from its own first draw."""
    seed = adata.uns["simulation"]["seed"]
    base = np.random.default_rng(seed).normal(0.0, 1.5, adata.n_vars)  # simulate's first draw
    lfc = adata.varm["log_fold_change"]
    rho = [np.exp(base + lfc[:, t]) for t in (t1, t2)]
    return np.log2(rho[0] / rho[0].sum()) - np.log2(rho[1] / rho[1].sum())


def test_columns_one_vs_rest_and_sorting(sim, trained):
    res = trained.differential_expression(groupby="cell_type", n_samples_overall=300)
    assert list(res.columns) == VANILLA + COUNTS + NAMES
    assert res["comparison"].unique().tolist() == [f"type{t} vs Rest" for t in range(3)]
    assert len(res) == 3 * sim.n_vars
    for _, block in res.groupby("comparison"):
        assert set(block.index) == set(sim.var_names)
        assert (np.diff(block["bayes_factor"].to_numpy()) <= 0).all()
    assert res["bayes_factor"].abs().max() <= 18.43
    np.testing.assert_allclose(res["proba_m1"] + res["proba_m2"], 1)
    ch = trained.differential_expression(
        groupby="cell_type", group1="type0", group2="type2", mode="change", n_samples_overall=300
    )
    assert list(ch.columns) == CHANGE + COUNTS + ["is_de_fdr_0.05"] + NAMES
    assert (ch["comparison"] == "type0 vs type2").all() and (ch["group2"] == "type2").all()
    p = ch["proba_de"].to_numpy()
    assert (np.diff(p) <= 0).all()
    ties = np.diff(p) == 0
    assert (np.diff(ch["lfc_mean"].abs().to_numpy())[ties] <= 1e-12).all()
    cells1 = sim.obs["cell_type"] == "type0"
    np.testing.assert_allclose(
        ch.loc[sim.var_names, "raw_mean1"],
        np.asarray(sim.X[cells1.to_numpy()].mean(0)).ravel(),
        rtol=1e-5,
    )


def test_known_de_genes_rank_first(sim, trained):
    true = true_log2_ratio(sim, 0, 1)
    # the types' own effects give |log2 ratio| >= 1.58; the other genes move by the
    # normalisation alone (0.58), so delta = 1 separates them
    truth = np.abs(true) >= 1.0
    assert 40 < truth.sum() < 60 and np.abs(true[~truth]).max() < 0.6
    ch = trained.differential_expression(
        groupby="cell_type", group1="type0", group2="type1", mode="change", delta=1.0
    )
    y = truth[sim.var_names.get_indexer(ch.index)]
    assert average_precision_score(y, ch["proba_de"]) > 0.9
    assert y[:20].all()  # the top 20 are all truly DE
    called = ch["is_de_fdr_0.05"].to_numpy()
    assert called.sum() >= 20 and y[called].mean() >= 0.9
    # vanilla ranks by the signed bayes factor: genes up in type0 first
    va = trained.differential_expression(groupby="cell_type", group1="type0", group2="type1")
    up = (true >= 1.0)[sim.var_names.get_indexer(va.index)]
    assert up[:10].all() and average_precision_score(up, va["bayes_factor"]) > 0.85


def count_chunk_rows(model, monkeypatch) -> list[int]:
    """Record the cells of every chunk the model's encoder and decoder see."""
    rows: list[int] = []
    original_chunks = model._chunks

    def chunks(adata, indices, batch_size):
        for x, b, cov in original_chunks(adata, indices, batch_size):
            rows.append(x.shape[0])
            yield x, b, cov

    monkeypatch.setattr(model, "_chunks", chunks)
    return rows


def test_expression_is_queried_only_for_sampled_cells(sim, trained, monkeypatch):
    calls = []
    original = trained.get_normalized_expression

    def spy(adata=None, indices=None, **kw):
        assert adata.n_obs <= len(indices)  # a view of the sampled cells, not all cells
        cells = sim.obs_names.get_indexer(adata.obs_names[np.asarray(indices)])
        calls.append((cells, kw.get("transform_batch")))
        return original(adata, indices, **kw)

    monkeypatch.setattr(trained, "get_normalized_expression", spy)
    rows = count_chunk_rows(trained, monkeypatch)
    n = 150
    trained.differential_expression(groupby="cell_type", n_samples_overall=n)
    assert len(calls) == 3  # one query per comparison, of the sampled cells only
    assert sum(rows) == 3 * 2 * n  # the encoder and decoder saw the sampled cells only
    types = sim.obs["cell_type"].to_numpy()
    for t, (idx, tb) in enumerate(calls):
        assert idx.shape == (2 * n,) and tb is None
        assert (types[idx[:n]] == f"type{t}").all() and (types[idx[n:]] != f"type{t}").all()
        assert len(np.unique(idx[:n])) < n  # with replacement (about 400 cells per type)
    calls.clear()
    trained.differential_expression(
        groupby="cell_type", group1="type1", n_samples_overall=n, batch_correction=True
    )
    assert [tb for _, tb in calls] == ["batch0", "batch1"]  # each batch, n split over them
    assert all(idx.shape == (2 * (n // 2),) for idx, _ in calls)


def test_repeated_indices_give_repeated_rows(trained):
    idx = [4, 4, 0, 7, 4]
    latent = trained.get_latent_representation(indices=idx, batch_size=2)
    full = trained.get_latent_representation()
    np.testing.assert_allclose(latent, full[idx], atol=1e-5)
    expr = trained.get_normalized_expression(indices=idx, return_numpy=True, batch_size=2)
    assert expr.shape == (5, trained.var_names.size)


def test_seed_reproducible_and_idx_selections(sim, trained):
    kw = {"groupby": "cell_type", "group1": "type2", "mode": "change", "n_samples_overall": 200}
    a = trained.differential_expression(**kw, seed=3)
    b = trained.differential_expression(**kw, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = trained.differential_expression(**kw, seed=4)
    assert not np.allclose(a.loc[sim.var_names, "scale1"], c.loc[sim.var_names, "scale1"])
    mask = (sim.obs["cell_type"] == "type2").to_numpy()
    by_mask = trained.differential_expression(
        idx1=mask, mode="change", n_samples_overall=200, seed=3
    )
    by_query = trained.differential_expression(
        idx1="cell_type == 'type2'", mode="change", n_samples_overall=200, seed=3
    )
    by_index = trained.differential_expression(
        idx1=np.flatnonzero(mask), mode="change", n_samples_overall=200, seed=3
    )
    assert (by_mask["comparison"] == "group1 vs Rest").all()
    cols = ["proba_de", "lfc_mean", "raw_mean1", "raw_mean2"]
    pd.testing.assert_frame_equal(by_mask[cols], by_query[cols])
    pd.testing.assert_frame_equal(by_mask[cols], by_index[cols])
    pd.testing.assert_frame_equal(by_mask[cols], a[cols])  # the same cells, the same draws
    two = trained.differential_expression(
        idx1=np.flatnonzero(mask)[:50], idx2=np.flatnonzero(~mask)[:60], n_samples_overall=50
    )
    assert (two["comparison"] == "group1 vs group2").all()
    # a missing value of a nullable column selects no cell, as obs.query
    nullable = sim.copy()
    nullable.obs["keep"] = pd.array(np.where(mask, True, None), dtype="boolean")
    by_nullable = trained.differential_expression(
        nullable, idx1="keep == True", mode="change", n_samples_overall=200, seed=3
    )
    pd.testing.assert_frame_equal(by_mask[cols], by_nullable[cols])


def test_bad_arguments_are_refused(sim, trained):
    bad = sim.copy()
    x = bad.X.toarray()
    x[1000, 3] = 0.5  # a fractional count far from the first cells
    bad.X = sp.csr_matrix(x)
    with pytest.raises(scvae.data.RegistryError, match="non-integer"):
        trained.differential_expression(bad, groupby="cell_type")
    with pytest.raises(ValueError, match="groupby 'nope'"):
        trained.differential_expression(groupby="nope")
    with pytest.raises(ValueError, match="groupby="):
        trained.differential_expression()
    with pytest.raises(ValueError, match="mode"):
        trained.differential_expression(groupby="cell_type", mode="wilcoxon")


def test_untrained_model_warns_as_the_latent_query(sim, trained):
    import warnings

    untrained = scvae.SCVAE(sim[:120].copy(), n_hidden=16)
    with pytest.warns(UserWarning, match="differential_expression on a model that has not been"):
        untrained.differential_expression(groupby="cell_type", n_samples_overall=20)
    with pytest.warns(UserWarning, match="not been trained: its encoder is random") as caught:
        scvae.tl.differential_expression(
            sim[:120].copy(), untrained, groupby="cell_type", n_samples_overall=20
        )
    assert all(w.filename == __file__ for w in caught)  # the user's line, not scvae/tl.py
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not been trained")  # trained: no warning
        trained.differential_expression(groupby="cell_type", n_samples_overall=20)


@pytest.mark.parametrize("mode", ["change", "group"])
def test_delta_none_is_estimated_per_comparison(sim, trained, mode):
    res = trained.differential_expression(
        groupby="cell_type", mode=mode, delta=None, n_samples_overall=100
    )
    deltas = res.groupby("comparison")["delta"].unique()
    assert all(len(d) == 1 and d[0] >= de_group.DELTA_MIN for d in deltas)
    fixed = trained.differential_expression(
        groupby="cell_type",
        group1="type0",
        mode=mode,
        delta=float(deltas["type0 vs Rest"][0]),
        n_samples_overall=100,
    )
    estimated = res[res["comparison"] == "type0 vs Rest"]
    pd.testing.assert_series_equal(estimated["proba_de"], fixed["proba_de"])


def test_works_after_load_with_another_adata(sim, tmp_path):
    model = scvae.SCVAE(sim[:200].copy())
    model.save(str(tmp_path / "m"))
    loaded = scvae.SCVAE.load(str(tmp_path / "m"))
    res = loaded.differential_expression(
        sim[:200].copy(), groupby="cell_type", group1="type0", n_samples_overall=20
    )
    assert res.shape[0] == sim.n_vars


# ------------------------------------------------------------------ group mode
GROUP = [
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "lfc_mean",
    "lfc_std",
    "lfc_estimate",
    "lfc_se",
    "delta",
]


def test_group_factor_recovers_known_factors_and_their_spread():
    rng = np.random.default_rng(0)
    n, theta = 300, 4.0
    mu = np.exp(rng.normal(0.0, 1.0, (n, 1))) * np.array([[0.2, 1.0, 5.0]])
    factors = np.array([2.0, 0.5, 1.0])
    betas = []
    for _ in range(200):
        lam = rng.gamma(theta, mu * factors / theta)
        beta, info = de_group.group_factor(rng.poisson(lam), mu, np.full_like(mu, theta))
        betas.append(beta)
    betas = np.array(betas)
    # unbiased up to the weak N(0, 1) prior, and the information's variance is the spread's
    np.testing.assert_allclose(betas.mean(0), np.log(factors), atol=0.03)
    np.testing.assert_allclose(betas.std(0), 1.0 / np.sqrt(info), rtol=0.2)


def test_group_factor_in_blocks_of_genes_is_the_same_fit(monkeypatch):
    # bounded memory: the genes are fitted a block at a time, with the same result
    rng = np.random.default_rng(2)
    mu = np.exp(rng.normal(0.0, 1.0, (50, 7)))
    x = rng.poisson(mu * np.exp(rng.normal(0.0, 0.5, 7))).astype(float)
    theta, weight = np.full_like(mu, 3.0), rng.uniform(0.2, 1.0, mu.shape)
    whole = de_group.group_factor(x, mu, theta, weight)
    monkeypatch.setattr(de_group, "GENE_BLOCK_ELEMENTS", 50 * 3)  # blocks of 3, 3 and 1 genes
    blocks = de_group.group_factor(x, mu, theta, weight)
    for a, b in zip(whole, blocks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [a.size for a in de_group.group_factor(x[:, :0], mu[:, :0], None)] == [0, 0]


def test_group_factor_zero_weight_discounts_zero_inflation():
    rng = np.random.default_rng(1)
    mu = np.full((2000, 1), 3.0)
    x = rng.poisson(mu * 2.0)
    x[rng.random(x.shape) < 0.5] = 0  # half the counts lost to zero-inflation
    naive, _ = de_group.group_factor(x, mu, None)
    p0 = np.exp(-6.0)
    weight = np.full(x.shape, 0.5 * p0 / (0.5 + 0.5 * p0))
    aware, _ = de_group.group_factor(x, mu, None, weight)
    assert abs(naive[0] - np.log(1.0)) < 0.1  # x2 signal, halved by the zeros
    assert abs(aware[0] - np.log(2.0)) < 0.03


def test_normal_means_posterior_null_shrinks_and_effects_stand():
    rng = np.random.default_rng(0)
    se = rng.uniform(0.1, 0.5, 2000)
    effect = np.zeros(2000)
    effect[:200] = rng.choice([-1.0, 1.0], 200)
    est = effect + se * rng.standard_normal(2000)
    post = de_group.normal_means_posterior(est, se, 0.25)
    proba = np.maximum(post["up"], post["down"])
    null = effect == 0
    assert np.median(proba[null]) < 0.05 and proba[null].mean() < 0.1
    assert np.median(proba[~null]) > 0.9
    assert (np.abs(post["mean"]) <= np.abs(est) + 1e-12).all()  # shrinkage towards zero
    called = de.fdr_calls(proba, 0.05)
    assert called.sum() > 100 and null[called].mean() <= 0.08


def test_group_mode_columns_sorting_and_bounded_queries(sim, trained, monkeypatch):
    rows = count_chunk_rows(trained, monkeypatch)
    n = 150
    res = trained.differential_expression(
        groupby="cell_type", group1="type0", mode="group", n_samples_overall=n
    )
    # two passes per side (likelihood parameters; library or rho), n cells each, never more
    assert sum(rows) == 2 * 2 * n
    assert list(res.columns) == GROUP + COUNTS + ["is_de_fdr_0.05"] + NAMES
    p = np.round(res["proba_de"].to_numpy(), 6)
    assert (np.diff(p) <= 0).all()
    ties = np.diff(p) == 0
    assert (np.diff(res["lfc_mean"].abs().to_numpy())[ties] <= 1e-12).all()
    assert ((res["proba_de"] >= 0) & (res["proba_de"] <= 1)).all()
    assert (res["lfc_mean"].abs() <= res["lfc_estimate"].abs() + 1e-9).all()
    # the known effects of type0 against the rest are found, the rest are not
    true = true_log2_ratio(sim, 0, 1)
    called = res.loc[sim.var_names, "is_de_fdr_0.05"].to_numpy()
    assert called.sum() >= 20 and (np.abs(true[called]) >= 0.25).mean() >= 0.9
    rows.clear()
    trained.differential_expression(
        groupby="cell_type", group1="type0", mode="group", batch_correction=True
    )
    assert max(rows) <= 1200  # without replacement: each side at most its own cells
    with pytest.raises(ValueError, match="'group1' has a single cell.*mode='change'"):
        trained.differential_expression(idx1=[0], mode="group")


def test_group_mode_finds_a_shift_the_latent_space_does_not_hold(sim):
    """Thinned genes in a random half of one type: invisible to change mode, found by group."""
    thinned = scvae.data.binomial_thinning(
        sim,
        cell_type="type0",
        n_de_genes=15,
        log2_fold_changes=(1.0, 2.0),
        max_fraction_of_counts=0.2,
        seed=0,
    )
    factor = np.minimum(thinned.var["thinning_factor_A"], thinned.var["thinning_factor_B"])
    truth = (factor < 1).to_numpy()
    model = scvae.SCVAE(thinned, batch_key="batch")
    model.train(max_epochs=60, seed=0)
    halves = {"idx1": thinned.obs["group"] == "A", "idx2": thinned.obs["group"] == "B"}
    group = model.differential_expression(**halves, mode="group").loc[thinned.var_names]
    change = model.differential_expression(**halves, mode="change").loc[thinned.var_names]
    called = group["is_de_fdr_0.05"].to_numpy()
    assert called.sum() >= 10 and truth[called].mean() >= 0.9
    assert average_precision_score(truth, group["proba_de"]) > 0.95
    # the two halves decode alike, so comparing pairs of cells misses the thinned genes
    assert change["is_de_fdr_0.05"].sum() < called.sum() // 2
    # the estimate follows the counts: thinned 2^-2 in one half, about -2 or +2 in log2
    strong = (factor == 0.25).to_numpy()
    sign = np.where(thinned.var["thinning_factor_A"] < 1, -1.0, 1.0)[strong]
    assert np.median(sign * group["lfc_estimate"].to_numpy()[strong]) > 1.4


# ------------------------------------------------------------------ real data: pbmc3k markers
MARKERS = {
    "B": ["MS4A1", "CD79A"],
    "CD14+ Mono": ["CD14", "LYZ"],
    "NK": ["GNLY", "NKG7"],
    "FCGR3A+ Mono": ["FCGR3A", "MS4A7"],
}
# By the declared sorts (vanilla bayes_factor, change proba_de) NKG7 and FCGR3A rank about 20th:
# both tests ask how often a random cell of the group exceeds a random cell of the rest, and
# the rest holds a type that expresses them too (97% of CD8 T cells express NKG7, 84% of NK
# cells FCGR3A), so they lose to more exclusive genes. scvi-tools ranks them alike
# (benchmarks/README.md, "Differential expression").
SHARED_WITH_REST = {"NK": ["NKG7"], "FCGR3A+ Mono": ["FCGR3A"]}


def marker_ranks(table: pd.DataFrame, group: str, genes: list[str]) -> dict[str, int | None]:
    ranked = list(table[table["group1"] == group].index)
    return {g: ranked.index(g) + 1 if g in ranked else None for g in genes}


@pytest.mark.slow
def test_pbmc3k_one_vs_rest_finds_textbook_markers():
    adata = ad.read_h5ad(shared_file("pbmc3k_seurat.h5ad"))
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", subset=True)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    model = scvae.SCVAE(adata)
    model.train(max_epochs=100, train_size=1.0, seed=0)
    # vanilla, scvi-tools' default mode, in its declared order (bayes_factor)
    vanilla = model.differential_expression(groupby="cell_type")
    assert vanilla["comparison"].nunique() == adata.obs["cell_type"].nunique()
    for group, genes in MARKERS.items():
        exclusive = [g for g in genes if g not in SHARED_WITH_REST.get(group, [])]
        ranks = marker_ranks(vanilla, group, exclusive)
        assert all(r is not None and r <= 10 for r in ranks.values()), (group, ranks)
    # change mode (defaults): genes called DE and up in the group, ranked by a conservative
    # effect size, lfc_mean - lfc_std (scvi-tools' columns): all eight markers in the top 10
    change = model.differential_expression(groupby="cell_type", mode="change")
    up = change[change["is_de_fdr_0.05"] & (change["lfc_mean"] > 0)].copy()
    up["conservative_lfc"] = up["lfc_mean"] - up["lfc_std"]
    up = up.sort_values(["group1", "conservative_lfc"], ascending=[True, False], kind="stable")
    for group, genes in MARKERS.items():
        ranks = marker_ranks(up, group, genes)
        assert all(r is not None and r <= 10 for r in ranks.values()), (group, ranks)
