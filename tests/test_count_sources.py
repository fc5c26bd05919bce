"""Where the counts live during training: on the device, or in host memory streamed over."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvae
import scvae.model
from scvae.data.loader import DeviceCSR, HostCSR, count_source, csr_nbytes

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _counts() -> sp.csr_matrix:
    return scvae.data.simulate(300, 40, seed=2).X


@pytest.mark.parametrize("world_size", [1, 2])
def test_host_source_gives_the_device_source_minibatches(world_size):
    counts = _counts()
    dev, host = DeviceCSR(counts, "cpu"), HostCSR(counts, "cpu")
    gens = [torch.Generator().manual_seed(4) for _ in range(2)]
    kw = dict(shuffle=True, drop_last_below=2, rank=world_size - 1, world_size=world_size)
    a = list(dev.batches(torch.arange(300), 64, generator=gens[0], **kw))
    b = list(host.batches(torch.arange(300), 64, generator=gens[1], **kw))
    assert len(a) == len(b) > 2
    for (ia, xa, nza), (ib, xb, nzb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
        assert all(torch.equal(u, v) for u, v in zip(nza, nzb, strict=True))
    np.testing.assert_array_equal(b[0].x.numpy(), counts[b[0].idx.numpy()].toarray())


def test_minibatch_non_zeros_are_those_of_its_rows():
    """The (row, gene, value) a source hands the likelihood are exactly the rows' non-zeros."""
    counts = _counts()
    counts.data[::7] = 0  # stored zeros, as a CSR matrix may hold: listed, and harmless
    for src in (DeviceCSR(counts, "cpu"), HostCSR(counts, "cpu")):
        idx, x, (row, gene, value) = next(src.batches(torch.arange(300), 50, shuffle=True))
        assert row.dtype == gene.dtype == torch.long
        assert torch.equal(x[row, gene], value)
        stored = {(int(r), int(g)) for r, g in zip(row, gene, strict=True)}
        assert {(int(r), int(g)) for r, g in x.nonzero()} <= stored
        assert len(stored) == len(value) == counts[idx.numpy()].nnz


def test_csr_bytes():
    counts = _counts()
    expected = counts.data.nbytes + counts.indices.nbytes + 8 * (counts.shape[0] + 1)
    assert csr_nbytes(counts) == expected
    assert csr_nbytes(counts.toarray()) == counts.nnz * 12 + 8 * (counts.shape[0] + 1)


def test_training_from_host_memory_equals_training_on_the_device(monkeypatch):
    """The streamed path trains the same model (CPU, same seeds, bit for bit)."""
    adata = scvae.data.simulate(300, 40, seed=2)
    options = dict(max_epochs=3, batch_size=64, seed=1, device="cpu", progress_bar=False)
    made: list[HostCSR] = []

    def host_source(matrix, device, **_):
        made.append(HostCSR(matrix, device))
        return made[-1]

    threads, seed = torch.get_num_threads(), scvae.settings.seed
    torch.set_num_threads(1)  # bit-identity needs the same reduction order
    try:
        scvae.settings.seed = 0
        direct = scvae.SCVAE(adata.copy(), n_hidden=16, n_latent=3)
        direct.train(**options)
        monkeypatch.setattr(scvae.model, "count_source", host_source)
        scvae.settings.seed = 0
        streamed = scvae.SCVAE(adata.copy(), n_hidden=16, n_latent=3)
        streamed.train(**options)
    finally:
        torch.set_num_threads(threads)
        scvae.settings.seed = seed
    assert len(made) == 1
    for (name, a), b in zip(
        direct.module.state_dict().items(), streamed.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@CUDA
def test_counts_larger_than_the_gpu_budget_stay_in_host_memory(monkeypatch, caplog):
    adata = scvae.data.simulate(300, 40, seed=2)
    cuda = torch.device("cuda")
    assert isinstance(count_source(adata.X, cuda), DeviceCSR)
    src = count_source(adata.X, cuda, max_fraction=0.0)
    assert isinstance(src, HostCSR) and src.host.values.device.type == "cpu"
    idx, x, nonzero = next(src.batches(torch.arange(300), 64, shuffle=False))
    assert idx.is_cuda and x.is_cuda and all(t.is_cuda for t in nonzero)
    np.testing.assert_array_equal(x.cpu().numpy(), adata.X[:64].toarray())
    # training on the GPU from host memory, as when the counts do not fit
    monkeypatch.setattr(
        scvae.model, "count_source", lambda m, d: count_source(m, d, max_fraction=0.0)
    )
    model = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    with caplog.at_level("INFO", logger="scvae"):
        model.train(max_epochs=2, batch_size=64, device="cuda", progress_bar=False)
    assert "stay in host memory" in caplog.text
    assert model.is_trained and model.device.type == "cuda"
    assert np.isfinite(model.get_latent_representation()).all()


def test_scipy_row_gather_on_the_cpu_equals_the_tensor_gather():
    """On the CPU rows are cut by scipy; the tensor gather (used on GPUs) gives the same."""
    counts = _counts()
    counts.data[::5] = 0  # stored zeros are listed by both
    fast, tensor = DeviceCSR(counts, "cpu"), DeviceCSR(counts, "cpu")
    tensor._host = None
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:70]
    a, b = fast.minibatch(idx), tensor.minibatch(idx)
    assert torch.equal(a.x, b.x)
    assert all(torch.equal(u, v) for u, v in zip(a.nonzero, b.nonzero, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(fast.gather(idx), tensor.gather(idx), strict=True))
