"""Out-of-core: a backed h5ad registers, trains and is queried block by block, in bounded memory."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvae
from scvae.data.backed import BackedCSR, read_rows, row_totals
from scvae.metrics import knn_accuracy


@pytest.fixture(scope="module")
def h5ad_path(tmp_path_factory):
    adata = scvae.data.simulate(1200, 80, n_cell_types=3, seed=3)
    path = tmp_path_factory.mktemp("backed") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


def test_blocks_are_read_contiguously_in_shuffled_order_within_bounded_memory(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    dense = ad.read_h5ad(h5ad_path).X.toarray()
    train = np.sort(np.random.default_rng(0).choice(1200, 1000, replace=False))
    src = BackedCSR(backed.X, "cpu", block_rows=50, buffer_blocks=4)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for idx, x, (row, gene, value) in src.batches(
        torch.as_tensor(train), 32, shuffle=True, generator=gen
    ):
        np.testing.assert_array_equal(x.numpy(), dense[idx.numpy()])  # the right rows
        assert torch.equal(x[row, gene], value) and int((x != 0).sum()) == len(value)
        seen.append(idx.numpy())
    seen = np.concatenate(seen)
    # every training cell once per epoch (1000 = 31 * 32 + 8 cells: nothing dropped)
    np.testing.assert_array_equal(np.sort(seen), train)
    # reads are whole contiguous blocks, each once, in a shuffled order
    assert all(stop - start <= 50 for start, stop in src.reads)
    assert sorted(src.reads) == [(s, min(s + 50, 1200)) for s in range(0, 1200, 50)]
    assert src.reads != sorted(src.reads)
    # never more than a buffer of rows (4 blocks) plus the carried rest of a minibatch
    assert 0 < src.max_rows_held <= 4 * 50 + 32
    # cells are mixed within a buffer: consecutive minibatch cells are not file neighbours
    assert np.mean(np.abs(np.diff(seen[:32])) == 1) < 0.5


def test_another_epoch_reads_another_block_order(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    src = BackedCSR(backed.X, "cpu", block_rows=100, buffer_blocks=2)
    gen = torch.Generator().manual_seed(1)
    orders = []
    for _ in range(2):
        list(src.batches(torch.arange(1200), 64, shuffle=True, generator=gen))
        orders.append(list(src.reads))
    assert orders[0] != orders[1]


def test_read_rows_and_totals_match_memory(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    x = ad.read_h5ad(h5ad_path).X
    for rows in (np.array([5, 3, 3, 900]), np.arange(10, 40), np.array([1199, 0])):
        np.testing.assert_array_equal(read_rows(backed.X, rows).toarray(), x[rows].toarray())
    np.testing.assert_allclose(row_totals(backed.X, block_rows=100), x.sum(1).A1)


def test_csc_on_disk_is_refused_with_the_fix(tmp_path):
    adata = ad.AnnData(sp.csc_matrix(np.ones((4, 3), dtype=np.float32)))
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSR"):
        BackedCSR(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r").X, "cpu")


def test_backed_training_matches_in_memory_quality(h5ad_path):
    memory = ad.read_h5ad(h5ad_path)
    backed = ad.read_h5ad(h5ad_path, backed="r")
    options = dict(max_epochs=15, batch_size=64, progress_bar=False, seed=0)
    scores = {}
    for name, data in (("memory", memory), ("backed", backed)):
        model = scvae.SCVAE(data, n_latent=5)
        if name == "backed":
            model.train(**options, backed_block_rows=100, backed_buffer_blocks=3)
        else:
            model.train(**options)
        latent = model.get_latent_representation()
        scores[name] = knn_accuracy(latent, memory.obs["cell_type"].to_numpy())
        assert np.isfinite(model.history["elbo_validation"]).all()
    assert scores["memory"] > 0.8, scores
    assert abs(scores["backed"] - scores["memory"]) < 0.08, scores


def test_queries_on_backed_equal_queries_in_memory(h5ad_path):
    memory = ad.read_h5ad(h5ad_path)
    model = scvae.SCVAE(memory, n_latent=4)
    model.train(max_epochs=2, progress_bar=False)
    backed = ad.read_h5ad(h5ad_path, backed="r")
    idx = np.array([7, 1100, 3, 3, 500])
    for kwargs in ({}, {"indices": idx}):
        np.testing.assert_allclose(
            model.get_latent_representation(backed, batch_size=100, **kwargs),
            model.get_latent_representation(memory, **kwargs),
            rtol=1e-5,
            atol=1e-6,
        )
    torch.manual_seed(0)
    a = model.get_normalized_expression(backed, indices=idx, return_numpy=True)
    torch.manual_seed(0)
    b = model.get_normalized_expression(memory, indices=idx, return_numpy=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_registration_and_queries_never_hold_the_whole_matrix(tmp_path):
    n, genes = 100_000, 200
    rng = np.random.default_rng(0)
    x = sp.random(n, genes, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    x.data = np.ceil(x.data * 5)
    x = x + sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), np.zeros(n, int))), (n, genes))
    ad.AnnData(sp.csr_matrix(x, dtype=np.float32)).write_h5ad(tmp_path / "big.h5ad")
    matrix_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    backed = ad.read_h5ad(tmp_path / "big.h5ad", backed="r")
    tracemalloc.start()
    try:
        model = scvae.SCVAE(backed, n_latent=4)
        _, peak_register = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        latent = model.get_latent_representation(batch_size=1000)
        _, peak_query = tracemalloc.get_traced_memory()
        model.save(tmp_path / "model")
        scvae.SCVAE.load(tmp_path / "model")  # what a first load imports (the meta device's)
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        loaded = scvae.SCVAE.load(tmp_path / "model", backed)
        peak_load = tracemalloc.get_traced_memory()[1] - before
        keep = np.ones(n, dtype=bool)
        keep[::10] = False  # a view of the backed AnnData, as scanpy users subset
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        part = loaded.get_latent_representation(backed[keep], batch_size=1000)
        peak_view = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert latent.shape == (n, 4)
    # registration holds one block of 8192 cells (and its checks' temporaries) at a time
    assert peak_register < matrix_bytes / 3, (peak_register, matrix_bytes)
    # a query holds its output, per-cell codes and one chunk: the whole matrix would be 1x
    assert peak_query - latent.nbytes < matrix_bytes / 2, (peak_query, matrix_bytes)
    # loading with the backed AnnData checks it block by block, as registration does
    assert peak_load < matrix_bytes / 3, (peak_load, matrix_bytes)
    # a view of a backed AnnData is read chunk by chunk from its rows of the file
    np.testing.assert_array_equal(part, latent[keep])
    assert peak_view - part.nbytes < matrix_bytes / 2, (peak_view, matrix_bytes)


def test_zarr_store_trains_from_disk(h5ad_path, tmp_path):
    zarr = pytest.importorskip("zarr")
    ad.read_h5ad(h5ad_path).write_zarr(tmp_path / "counts.zarr")
    group = zarr.open(tmp_path / "counts.zarr", mode="r")
    adata = ad.AnnData(
        X=ad.io.sparse_dataset(group["X"]),
        obs=ad.io.read_elem(group["obs"]),
        var=ad.io.read_elem(group["var"]),
    )
    model = scvae.SCVAE(adata, n_latent=3)
    model.train(max_epochs=2, progress_bar=False, backed_block_rows=100)
    assert np.isfinite(model.history["elbo_train"]).all()
    assert model.get_latent_representation().shape == (1200, 3)


def test_queries_honour_batch_size_and_the_setting(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    model = scvae.SCVAE(backed, n_latent=3)
    whole = model.get_latent_representation(batch_size=2000)
    library = model.get_latent_library_size(batch_size=2000)
    old = scvae.settings.inference_batch_size
    scvae.settings.inference_batch_size = 37
    try:
        np.testing.assert_allclose(model.get_latent_representation(), whole, atol=1e-5)
        np.testing.assert_allclose(model.get_latent_library_size(), library, rtol=1e-6)
    finally:
        scvae.settings.inference_batch_size = old
    for query in (
        lambda: model.get_elbo(batch_size=50, return_mean=False),
        lambda: model.get_reconstruction_error(batch_size=50, return_mean=False),
        lambda: model.get_marginal_ll(n_mc_samples=5, batch_size=50, return_mean=False),
    ):
        assert query().shape == (1200,)
    assert model.get_normalized_expression(batch_size=50, return_numpy=True).shape == (1200, 80)
    assert model.get_likelihood_parameters(batch_size=50)["mean"].shape == (1200, 80)
    assert model.posterior_predictive_sample(batch_size=50).shape == (1200, 80)
    with pytest.raises(ValueError, match="batch_size"):
        model.get_latent_representation(batch_size=0)


def test_views_of_backed_data_are_queried_and_refused_for_training(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    memory = ad.read_h5ad(h5ad_path)
    model = scvae.SCVAE(backed, n_latent=4)
    model.train(max_epochs=1)
    view = backed[backed.obs["cell_type"] == "type1"]
    np.testing.assert_allclose(
        model.get_latent_representation(view),
        model.get_latent_representation(memory[memory.obs["cell_type"] == "type1"]),
        rtol=1e-5,
        atol=1e-6,
    )
    table = model.differential_expression(groupby="cell_type", n_samples_overall=40)
    assert set(table["comparison"]) == {"type0 vs Rest", "type1 vs Rest", "type2 vs Rest"}
    with pytest.raises(ValueError, match=r"view\) of a backed AnnData.*to_memory"):
        scvae.SCVAE(backed[:100])


def test_two_processes_each_get_cells_of_a_file_smaller_than_a_buffer(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    src = BackedCSR(backed.X, "cpu")  # defaults: 1,024-row blocks, 16 per buffer
    cells = []
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(0)  # every rank draws the same plan
        batches = list(
            src.batches(torch.arange(600), 64, shuffle=True, generator=gen, rank=rank, world_size=2)
        )
        assert batches  # each process trains
        cells.append(np.concatenate([b.idx.numpy() for b in batches]))
    assert not set(cells[0]) & set(cells[1])  # and on its own cells


@pytest.mark.parametrize("n_cells", [1025, 20000])
def test_processes_share_an_epoch_of_a_file_evenly(tmp_path, n_cells):
    # buffers were dealt whole: with 20,000 cells one process had 16 blocks and the other 4,
    # the smaller share set everyone's steps, and an epoch trained on 41 % of the cells; with
    # 1,025 one process got a block of one row, a minibatch that batch norm refused
    path = tmp_path / "cells.h5ad"
    scvae.data.simulate(n_cells, 5, seed=0).write_h5ad(path)
    src = BackedCSR(ad.read_h5ad(path, backed="r").X, "cpu")
    train = torch.as_tensor(np.random.default_rng(0).permutation(n_cells)[: n_cells * 9 // 10])
    for world in (2, 3):
        gen = [torch.Generator().manual_seed(0) for _ in range(world)]
        for _epoch in range(2):  # generators stay in step over epochs
            shares = []
            for rank in range(world):
                batches = src.batches(
                    train, 128, shuffle=True, generator=gen[rank], drop_last_below=3,
                    rank=rank, world_size=world,
                )  # fmt: skip
                shares.append([b.idx.numpy() for b in batches])
            assert len({len(s) for s in shares}) == 1  # the same steps everywhere
            assert min(len(b) for s in shares for b in s) >= 3
            cells = np.concatenate([b for s in shares for b in s])
            assert len(cells) == len(set(cells)) >= len(train) - world * 3
            assert set(cells) <= set(train.tolist())


def test_how_counts_are_read_is_part_of_a_checkpointed_run(h5ad_path, tmp_path):
    from scvae.checkpoint import CheckpointError

    backed = ad.read_h5ad(h5ad_path, backed="r")
    model = scvae.SCVAE(backed, n_hidden=16)
    model.train(max_epochs=1, checkpoint_dir=tmp_path, backed_block_rows=64)
    assert model.train_config["counts_on_disk"] is True
    assert model.train_config["backed_block_rows"] == 64
    # another block size, or the same cells in memory, read another minibatch stream
    again = scvae.SCVAE(ad.read_h5ad(h5ad_path, backed="r"), n_hidden=16)
    with pytest.raises(CheckpointError, match=r"backed_block_rows \(checkpoint 64, now 128\)"):
        again.train(max_epochs=2, checkpoint_dir=tmp_path, backed_block_rows=128)
    in_memory = scvae.SCVAE(ad.read_h5ad(h5ad_path), n_hidden=16)
    with pytest.raises(CheckpointError, match=r"counts_on_disk \(checkpoint True, now False\)"):
        in_memory.train(max_epochs=2, checkpoint_dir=tmp_path)


def test_de_on_a_view_of_a_backed_anndata_names_the_way_that_works(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    model = scvae.SCVAE(backed, n_hidden=16)
    keep = np.ones(backed.n_obs, dtype=bool)
    keep[::3] = False
    with pytest.raises(ValueError, match="view of a backed AnnData.*idx1= / idx2="):
        model.differential_expression(backed[keep], groupby="cell_type", group1="type0")
    first = (backed.obs["cell_type"] == "type0").to_numpy() & keep
    table = model.differential_expression(
        backed, idx1=first, idx2=~first & keep, n_samples_overall=50
    )
    assert len(table) == backed.n_vars


def test_a_file_rewritten_under_the_model_is_named(tmp_path):
    path = tmp_path / "cells.h5ad"
    scvae.data.simulate(200, 30, seed=0).write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    model = scvae.SCVAE(adata, n_hidden=8, n_latent=2)
    adata.file.close()
    scvae.data.simulate(200, 20, seed=1).write_h5ad(path)  # the same path, fewer genes
    for call in (model.get_latent_representation, lambda: model.train(max_epochs=1)):
        with pytest.raises(scvae.data.RegistryError, match="20 genes but .* x 30 genes.*rewritten"):
            call()
    # the same genes and fewer cells: the first 60 rows were read as the model's 200 cells
    path = tmp_path / "more_cells.h5ad"
    scvae.data.simulate(200, 20, seed=0).write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    model = scvae.SCVAE(adata, n_hidden=8, n_latent=2)
    adata.file.close()
    scvae.data.simulate(60, 20, seed=2).write_h5ad(path)
    for call in (model.get_latent_representation, lambda: model.train(max_epochs=1)):
        with pytest.raises(
            scvae.data.RegistryError, match="60 cells .* lists 200 cells.*rewritten"
        ):
            call()


def test_backed_options_and_copy_are_checked_up_front(h5ad_path):
    in_memory = scvae.SCVAE(ad.read_h5ad(h5ad_path), n_hidden=8)
    with pytest.raises(ValueError, match="backed_block_rows must be a whole number >= 1"):
        in_memory.train(max_epochs=1, backed_block_rows=0)  # checked in memory too
    with pytest.raises(ValueError, match="copy=True cannot copy an AnnData opened in backed"):
        scvae.tl.fit(ad.read_h5ad(h5ad_path, backed="r"), max_epochs=1, copy=True)
