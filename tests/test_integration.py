"""The scIB integration scores: each moves the right way, and they agree with scib-metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scvae import integration
from scvae.integration import integration_scores

N = 600


def _embedding(batch_shift: float, type_shift: float, seed: int = 0):
    """Three cell types in two batches; the batch moves cells by ``batch_shift`` in its own
    dimension, the type by ``type_shift`` in its own."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, N)
    batch = rng.integers(0, 2, N)
    z = rng.normal(size=(N, 5)) + type_shift * np.eye(5)[types]
    z = z + batch_shift * np.eye(5)[batch + 3]
    return z, np.array([f"t{t}" for t in types]), np.array([f"b{b}" for b in batch])


def _adata(z, types, batch) -> ad.AnnData:
    a = ad.AnnData(np.zeros((len(z), 1), dtype=np.float32))
    a.obs["cell_type"] = types
    a.obs["batch"] = batch
    a.obsm["X_scvae"] = z
    return a


@pytest.fixture(scope="module")
def mixed():
    return _embedding(batch_shift=0.0, type_shift=5.0)


@pytest.fixture(scope="module")
def unmixed():
    return _embedding(batch_shift=6.0, type_shift=5.0)


@pytest.fixture(scope="module")
def blurred():
    """Batches mixed but cell types no longer apart."""
    return _embedding(batch_shift=0.0, type_shift=0.3)


def test_batch_scores_prefer_mixed_batches(mixed, unmixed):
    zm, tm, bm = mixed
    zu, tu, bu = unmixed
    assert integration.ilisi(zm, bm) > integration.ilisi(zu, bu) + 0.5
    assert integration.silhouette_batch(zm, bm, tm) > integration.silhouette_batch(zu, bu, tu) + 0.1
    # batches split every cell type in two pieces -> lower connectivity with few neighbours
    gc_mixed = integration.graph_connectivity(zm, tm, n_neighbors=5)
    assert gc_mixed > integration.graph_connectivity(zu, tu, n_neighbors=5)
    # unlabelled batch ASW (one group) moves the same way
    assert integration.silhouette_batch(zm, bm) > integration.silhouette_batch(zu, bu) + 0.1


def test_bio_scores_prefer_separated_types(mixed, blurred):
    zm, tm, _ = mixed
    zb, tb, _ = blurred
    assert integration.silhouette_label(zm, tm) > integration.silhouette_label(zb, tb) + 0.1
    assert integration.clisi(zm, tm) > integration.clisi(zb, tb) + 0.3
    assert integration.graph_connectivity(zm, tm) >= integration.graph_connectivity(zb, tb)


def test_overall_scores_rank_the_three_embeddings(mixed, unmixed, blurred):
    res = [0.2, 0.5, 1.0]
    s = {
        name: integration_scores(
            _adata(*emb), batch_key="batch", labels_key="cell_type", resolutions=res
        )
        for name, emb in [("mixed", mixed), ("unmixed", unmixed), ("blurred", blurred)]
    }
    assert s["mixed"]["batch_correction"] > s["unmixed"]["batch_correction"]
    assert s["mixed"]["bio_conservation"] > s["blurred"]["bio_conservation"]
    assert s["mixed"]["nmi"] > 0.9 > s["blurred"]["nmi"]
    assert s["mixed"]["total"] > max(s["unmixed"]["total"], s["blurred"]["total"])
    for scores in s.values():
        bio = np.mean([scores[k] for k in integration.BIO_MEASURES])
        batch = np.mean([scores[k] for k in integration.BATCH_MEASURES])
        assert scores["total"] == pytest.approx(0.6 * bio + 0.4 * batch)
        for key in (*integration.BIO_MEASURES, *integration.BATCH_MEASURES):
            assert -0.05 <= scores[key] <= 1.0 + 1e-9, key  # ARI can dip below 0 by chance


def test_batch_only_scores(mixed, unmixed):
    a, b = _adata(*mixed), _adata(*unmixed)
    sa = integration_scores(a, batch_key="batch")
    sb = integration_scores(b, batch_key="batch")
    assert set(sa) == {"ilisi", "silhouette_batch", "batch_correction"}
    assert sa["batch_correction"] > sb["batch_correction"]


def test_lisi_is_the_effective_number_of_groups():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 2))
    assert np.median(integration.lisi(z, np.tile(["a", "b", "c", "d"], 100))) > 3.5
    far = np.r_[np.zeros((200, 2)), np.full((200, 2), 50.0)] + rng.normal(size=(400, 2))
    assert np.allclose(integration.lisi(far, ["a"] * 200 + ["b"] * 200), 1.0)


def test_agrees_with_scib_metrics_values():
    """Values computed by scib-metrics 0.5.10 (exact 90-NN, jax) on this very embedding."""
    rng = np.random.default_rng(7)
    types = rng.integers(0, 3, 400)
    batch = rng.integers(0, 2, 400)
    z = rng.normal(size=(400, 5)) + 2.0 * np.eye(5)[types] + 1.0 * np.eye(5)[batch + 3]
    assert integration.ilisi(z, batch) == pytest.approx(0.6919779777526855, abs=1e-5)
    assert integration.clisi(z, types) == pytest.approx(0.7933106422424316, abs=1e-5)
    assert integration.silhouette_label(z, types) == pytest.approx(0.5869900584220886, abs=1e-6)
    assert integration.silhouette_batch(z, batch, types) == pytest.approx(0.8735232949, abs=1e-6)
    assert integration.graph_connectivity(z, types) == pytest.approx(0.9843597262952102)


def test_clear_errors(mixed):
    a = _adata(*mixed)
    with pytest.raises(KeyError, match="X_pca"):
        integration_scores(a, batch_key="batch", use_rep="X_pca")
    with pytest.raises(KeyError, match="donor"):
        integration_scores(a, batch_key="donor")
    a.obs["one"] = "x"
    with pytest.raises(ValueError, match="one batch"):
        integration_scores(a, batch_key="one")
    with pytest.raises(ValueError, match="one label"):
        integration_scores(a, batch_key="batch", labels_key="one")


def test_missing_batch_values_are_an_error_not_a_batch():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.zeros((200, 1), dtype=np.float32))
    adata.obs["batch"] = rng.integers(0, 2, 200).astype(str).astype(object)
    adata.obs.iloc[:5, 0] = np.nan
    adata.obsm["X_scvae"] = rng.normal(size=(200, 5))
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] has 5 missing values"):
        integration.integration_scores(adata, batch_key="batch")
    # the array-level measures refuse them too, rather than count "nan" as a batch
    z, b = adata.obsm["X_scvae"], adata.obs["batch"].to_numpy()
    for call in (
        lambda: integration.ilisi(z, b),
        lambda: integration.silhouette_batch(z, b),
        lambda: integration.clisi(z, b),
        lambda: integration.silhouette_label(z, b),
        lambda: integration.graph_connectivity(z, b),
    ):
        with pytest.raises(ValueError, match="has 5 missing values"):
            call()
