"""Count matrices kept on the compute device as CSR arrays, gathered into dense minibatches.

The whole matrix lives on the training device as three tensors (``indptr``, ``indices``,
``values``); a minibatch of rows is gathered there by index with a handful of vectorised ops, so
there is no per-minibatch scipy work, host-to-device copy or worker process. (torch 2.13 cannot
``index_select`` a sparse CSR tensor on the CPU, hence plain arrays.) Tensors only: no AnnData.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch


class DeviceCSR:
    """A cells x genes count matrix as CSR arrays on a torch device.

    Parameters
    ----------
    matrix
        A scipy sparse matrix or a dense numpy array (converted to CSR float32).
    device
        Where the arrays live.

    Examples
    --------
    >>> m = DeviceCSR(np.array([[0, 1], [2, 0], [0, 0]]), "cpu")
    >>> m.rows(torch.tensor([1, 0])).tolist()
    [[2.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, matrix: sp.spmatrix | sp.sparray | np.ndarray, device: str | torch.device):
        csr = sp.csr_matrix(matrix, dtype=np.float32)
        csr.sort_indices()
        self.shape = csr.shape
        self.device = torch.device(device)
        self.indptr = torch.as_tensor(csr.indptr.astype(np.int64), device=self.device)
        self.indices = torch.as_tensor(csr.indices.astype(np.int64), device=self.device)
        self.values = torch.as_tensor(csr.data, device=self.device)

    @property
    def n_rows(self) -> int:
        """Number of cells."""
        return int(self.shape[0])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``idx`` (int64 on the device): ``(len(idx), n_genes)``."""
        idx = idx.to(self.device)
        starts = self.indptr[idx]
        counts = self.indptr[idx + 1] - starts
        out = torch.zeros(len(idx), self.shape[1], dtype=torch.float32, device=self.device)
        total = int(counts.sum())
        if total == 0:
            return out
        row_of = torch.repeat_interleave(torch.arange(len(idx), device=self.device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(total, device=self.device) - offsets[row_of] + starts[row_of]
        out[row_of, self.indices[pos]] = self.values[pos]
        return out

    def row_sums(self) -> torch.Tensor:
        """Total counts of each cell, shape ``(n_rows,)``."""
        row_of = torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.device), self.indptr[1:] - self.indptr[:-1]
        )
        out = torch.zeros(self.n_rows, device=self.device)
        return out.index_add_(0, row_of, self.values)


def minibatches(
    indices: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last_below: int = 0,
) -> Iterator[torch.Tensor]:
    """Split cell indices into minibatches, optionally shuffled.

    Parameters
    ----------
    indices
        Cell indices (int64).
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle with ``generator`` (a CPU generator, for reproducibility) before splitting.
    drop_last_below
        Drop a last minibatch with fewer cells than this (BatchNorm needs more than one cell).

    Examples
    --------
    >>> [b.tolist() for b in minibatches(torch.arange(5), 2, shuffle=False)]
    [[0, 1], [2, 3], [4]]
    """
    if shuffle:
        order = torch.randperm(len(indices), generator=generator)
        indices = indices[order.to(indices.device)]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        if len(chunk) < drop_last_below and start > 0:
            return
        yield chunk
