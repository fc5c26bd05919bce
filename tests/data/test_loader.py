"""DeviceCSR gathers the same rows as scipy, and minibatches cover every cell once."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from scvae.data.loader import DeviceCSR, minibatches


def test_rows_match_scipy():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, (50, 17)).astype(np.float32)
    dense[5] = 0  # an empty row
    m = DeviceCSR(sp.csr_matrix(dense), "cpu")
    idx = torch.tensor([5, 0, 49, 3, 3, 12])
    np.testing.assert_array_equal(m.rows(idx).numpy(), dense[idx.numpy()])
    np.testing.assert_allclose(m.row_sums().numpy(), dense.sum(1))
    assert m.rows(torch.tensor([5])).abs().sum() == 0


def test_minibatches_cover_all_cells_once_and_drop_tiny_last():
    idx = torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    parts = list(minibatches(idx, 4, shuffle=True, generator=gen, drop_last_below=3))
    assert [len(p) for p in parts] == [4, 4]  # the last batch of 2 is dropped
    parts = list(minibatches(idx, 4, shuffle=True, generator=gen))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert torch.cat(parts).tolist() != list(range(10))
