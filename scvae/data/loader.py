"""Count matrices as CSR arrays, gathered into dense minibatches for training.

:class:`DeviceCSR` keeps the whole matrix on the training device as three tensors
(``indptr``, ``indices``, ``values``). On a GPU a minibatch of rows is gathered there by index
with a handful of vectorised ops: no host-to-device copy and no worker process. On the CPU the
rows are cut by scipy's compiled row gather (the same rows and non-zeros, in half the time of
the tensor ops), and the tensors share memory with a float32 CSR matrix (int32 indices are
kept as they are), so training holds no second copy of the counts. (torch 2.13 cannot
``index_select`` a sparse CSR tensor on the CPU, hence plain arrays.) :class:`HostCSR` is for
counts that do not fit the GPU: they stay in host memory and a worker thread gathers the next
minibatches' non-zeros for non-blocking copies; :func:`count_source` chooses between the two.
Tensors only: no AnnData.

A count source is anything with a ``device``, ``n_rows`` and a ``batches`` method with the
signature of :meth:`DeviceCSR.batches` (see also :class:`scvae.data.backed.BackedCSR`, which
reads row blocks from an on-disk matrix).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from scvae._settings import logger


class Minibatch(NamedTuple):
    """One minibatch of counts: cell indices, dense rows and, where known, their non-zeros.

    ``nonzero`` is ``(row, gene, value)`` of each stored count (int64, int64, float32 on the
    rows' device, rows in increasing order), taken from the CSR arrays the rows were gathered
    from, so that the likelihood need not search the dense rows for them; None when the source
    does not know them.
    """

    idx: torch.Tensor
    x: torch.Tensor
    nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class CountSource(Protocol):
    """What the training loop needs from the counts: minibatches of dense rows on a device."""

    device: torch.device

    @property
    def n_rows(self) -> int: ...

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last_below: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Minibatch]: ...


class DeviceCSR:
    """A cells x genes count matrix as CSR arrays on a torch device.

    Parameters
    ----------
    matrix
        A scipy sparse matrix or a dense numpy array (converted to CSR float32). A CSR float32
        matrix in canonical form is used as it is: on the CPU its arrays are shared, not copied.
    device
        Where the arrays live.

    Examples
    --------
    >>> m = DeviceCSR(np.array([[0, 1], [2, 0], [0, 0]]), "cpu")
    >>> m.rows(torch.tensor([1, 0])).tolist()
    [[2.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, matrix: sp.spmatrix | sp.sparray | np.ndarray, device: str | torch.device):
        if isinstance(matrix, np.ndarray) and matrix.dtype == np.float16:
            matrix = matrix.astype(np.float32)  # scipy.sparse has no float16
        csr = matrix if isinstance(matrix, sp.csr_matrix | sp.csr_array) else sp.csr_matrix(matrix)
        if csr.dtype != np.float32:
            csr = csr.astype(np.float32)
        if not csr.has_canonical_format:  # duplicates would be assigned, not summed
            csr = csr.copy()
            csr.sum_duplicates()
        self.shape = csr.shape
        self.device = torch.device(device)

        def index(a: np.ndarray) -> torch.Tensor:
            if a.dtype not in (np.int32, np.int64):
                a = a.astype(np.int64)
            return torch.as_tensor(a, device=self.device)

        # indptr is int64 so that offsets past 2**31 non-zeros stay exact
        self.indptr = torch.as_tensor(csr.indptr.astype(np.int64, copy=False), device=self.device)
        self.indices = index(csr.indices)
        self.values = torch.as_tensor(csr.data, device=self.device)
        # on the CPU, rows are cut by scipy's compiled row gather and densification (the same
        # rows, non-zeros and order, in half the time of a dozen tensor operations); HostCSR's
        # worker gathers through it too
        self._host = csr if self.device.type == "cpu" else None

    @property
    def n_rows(self) -> int:
        """Number of cells."""
        return int(self.shape[0])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The non-zeros of rows ``idx``: ``(row within idx, gene, value)``, one entry each."""
        if self._host is not None:
            return self._host_rows(idx)[1]
        idx = idx.to(self.device)
        starts = self.indptr[idx]
        counts = self.indptr[idx + 1] - starts
        total = int(counts.sum())
        row_of = torch.repeat_interleave(
            torch.arange(len(idx), device=self.device), counts, output_size=total
        )
        # position in the CSR arrays: the row's start plus the rank within the row
        shift = starts - (torch.cumsum(counts, 0) - counts)
        pos = torch.repeat_interleave(shift, counts, output_size=total)
        pos += torch.arange(total, device=self.device)
        return row_of, self.indices[pos].long(), self.values[pos]

    def _host_rows(
        self, idx: torch.Tensor
    ) -> tuple[sp.csr_matrix | sp.csr_array, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows ``idx`` cut by scipy (CPU only) and their non-zeros, as :meth:`gather` has them."""
        assert self._host is not None
        sub = self._host[idx.cpu().numpy()]
        row_of = np.repeat(np.arange(len(idx), dtype=np.int64), np.diff(sub.indptr))
        nonzero = (
            torch.from_numpy(row_of),
            torch.from_numpy(sub.indices.astype(np.int64)),
            torch.from_numpy(sub.data),
        )
        return sub, nonzero

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``idx`` (int64 on the device): ``(len(idx), n_genes)``."""
        return self.minibatch(idx).x

    def minibatch(self, idx: torch.Tensor, cells: torch.Tensor | None = None) -> Minibatch:
        """Rows ``idx`` as a :class:`Minibatch` (``cells``: the indices it reports, else idx)."""
        if self._host is not None:
            sub, nonzero = self._host_rows(idx)
            x = torch.from_numpy(sub.toarray())
        else:
            nonzero = self.gather(idx)
            x = densify(*nonzero, (len(idx), self.shape[1]))
        return Minibatch(idx.to(self.device) if cells is None else cells, x, nonzero)

    def row_sums(self) -> torch.Tensor:
        """Total counts of each cell, shape ``(n_rows,)``."""
        row_of = torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.device), self.indptr[1:] - self.indptr[:-1]
        )
        out = torch.zeros(self.n_rows, device=self.device)
        return out.index_add_(0, row_of, self.values)

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last_below: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Minibatch]:
        """Minibatches (:class:`Minibatch`) of ``indices`` for process ``rank``.

        See :func:`minibatches`; with ``world_size > 1`` each global minibatch of
        ``batch_size`` cells is split across the processes (:func:`shard_minibatches`).

        Examples
        --------
        >>> m = DeviceCSR(np.eye(4, dtype="float32"), "cpu")
        >>> [b.idx.tolist() for b in m.batches(torch.arange(4), 2, shuffle=False)]
        [[0, 1], [2, 3]]
        """
        indices = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        for idx in shard_minibatches(
            indices,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last_below=drop_last_below,
            rank=rank,
            world_size=world_size,
        ):
            yield self.minibatch(idx)


def densify(
    row_of: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Dense float32 matrix of ``shape``: ``values`` at ``(row_of, cols)``, on their device.

    Examples
    --------
    >>> densify(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([3.0, 4.0]), (2, 2))
    tensor([[0., 3.],
            [4., 0.]])
    """
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=values.device)
    out.scatter_(0, row_of * shape[1] + cols, values)
    return out.view(shape)


class HostCSR:
    """Counts kept in host memory as CSR arrays, minibatches gathered there and copied over.

    For a matrix that does not fit the training device (see :func:`count_source`). A worker
    thread gathers the non-zeros of the next ``prefetch`` minibatches on the CPU (the same
    minibatches as :class:`DeviceCSR` for the same generator) into page-locked memory; they are
    copied to ``device`` without blocking the training step that runs meanwhile, and made dense
    there. The device holds a few minibatches of counts at a time, and the copies carry only
    the non-zeros.

    Examples
    --------
    >>> m = HostCSR(np.array([[0, 1], [2, 0], [0, 0]]), "cpu")
    >>> [(b.idx.tolist(), b.x.tolist()) for b in m.batches(torch.tensor([1, 0]), 2, shuffle=False)]
    [([1, 0], [[2.0, 0.0], [0.0, 1.0]])]
    """

    def __init__(
        self,
        matrix: sp.spmatrix | sp.sparray | np.ndarray,
        device: str | torch.device,
        *,
        prefetch: int = 2,
    ):
        self.host = DeviceCSR(matrix, "cpu")
        self.shape = self.host.shape
        self.device = torch.device(device)
        self.prefetch = max(1, prefetch)

    @property
    def n_rows(self) -> int:
        """Number of cells."""
        return self.host.n_rows

    def _host_parts(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = (idx, *self.host.gather(idx))
        if self.device.type == "cuda":  # page-locked, so that the copy does not block
            parts = tuple(p.pin_memory() for p in parts)
        return parts

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last_below: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Minibatch]:
        """Minibatches (:class:`Minibatch`) on ``device``; see :meth:`DeviceCSR.batches`."""
        order = list(
            shard_minibatches(
                torch.as_tensor(indices, dtype=torch.long).cpu(),
                batch_size,
                shuffle=shuffle,
                generator=generator,
                drop_last_below=drop_last_below,
                rank=rank,
                world_size=world_size,
            )
        )
        blocking = self.device.type != "cuda"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scvae-prefetch") as pool:
            pending = deque(pool.submit(self._host_parts, i) for i in order[: self.prefetch])
            for ahead in order[self.prefetch :] + [None] * len(pending):
                parts = pending.popleft().result()
                if ahead is not None:
                    pending.append(pool.submit(self._host_parts, ahead))
                idx, *nonzero = (p.to(self.device, non_blocking=not blocking) for p in parts)
                x = densify(*nonzero, (len(idx), self.shape[1]))
                yield Minibatch(idx, x, tuple(nonzero))


def csr_nbytes(matrix: sp.spmatrix | sp.sparray | np.ndarray) -> int:
    """Bytes the matrix takes as float32 CSR arrays (int64 row pointers).

    Examples
    --------
    >>> csr_nbytes(sp.csr_matrix(np.eye(3, dtype="float32")))
    56
    """
    nnz = matrix.nnz if sp.issparse(matrix) else int(np.count_nonzero(matrix))
    index_bytes = matrix.indices.dtype.itemsize if sp.issparse(matrix) else 8
    return nnz * (4 + index_bytes) + (matrix.shape[0] + 1) * 8


def count_source(
    matrix: sp.spmatrix | sp.sparray | np.ndarray,
    device: torch.device,
    *,
    max_fraction: float = 0.5,
) -> DeviceCSR | HostCSR:
    """The counts on ``device`` when they fit, else in host memory, streamed a minibatch at a time.

    On a CUDA device the counts' CSR arrays may take at most ``max_fraction`` of the device's
    free memory (the rest is for the model, its activations and the optimizer); a larger matrix
    stays in host memory (:class:`HostCSR`) and training copies each minibatch over. On the CPU
    the counts are always used in place.

    Examples
    --------
    >>> type(count_source(np.eye(3), torch.device("cpu"))).__name__
    'DeviceCSR'
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = csr_nbytes(matrix)
        if nbytes > max_fraction * free:
            logger.info(
                "The counts (%.1f GiB as CSR) take over %.0f%% of %s's free memory: they stay "
                "in host memory and each minibatch is copied over.",
                nbytes / 2**30,
                100 * max_fraction,
                device,
            )
            return HostCSR(matrix, device)
    return DeviceCSR(matrix, device)


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
        Drop a last, partial minibatch with fewer cells than this (BatchNorm needs more than
        one cell); full minibatches are always kept, even when ``batch_size`` is below it.

    Examples
    --------
    >>> [b.tolist() for b in minibatches(torch.arange(5), 2, shuffle=False)]
    [[0, 1], [2, 3], [4]]
    >>> [b.tolist() for b in minibatches(torch.arange(5), 2, shuffle=False, drop_last_below=3)]
    [[0, 1], [2, 3]]
    """
    if shuffle:
        order = torch.randperm(len(indices), generator=generator)
        indices = indices[order.to(indices.device)]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        if start > 0 and len(chunk) < min(drop_last_below, batch_size):
            return  # only the last minibatch can be partial
        yield chunk


def shard_minibatches(
    indices: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last_below: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Process ``rank``'s part of each global minibatch (:func:`minibatches` when alone).

    Every process draws the same permutation (same ``generator`` state) and cuts the same
    global minibatches of ``batch_size`` cells; process ``rank`` takes the ``rank``-th of
    ``world_size`` near-equal slices of each (``np.array_split``). So the processes' shards
    are disjoint, together they are exactly the cells one process would train on, and every
    process takes the same number of steps. A last global minibatch is dropped when it has
    fewer than ``drop_last_below`` cells or some process would get fewer than 2 of them.

    Examples
    --------
    >>> [b.tolist() for b in shard_minibatches(torch.arange(8), 4, shuffle=False, rank=1,
    ...                                        world_size=2)]
    [[2, 3], [6, 7]]
    """
    if world_size == 1:
        yield from minibatches(
            indices,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last_below=drop_last_below,
        )
        return
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}.")
    for chunk in minibatches(
        indices, batch_size, shuffle=shuffle, generator=generator, drop_last_below=drop_last_below
    ):
        if len(chunk) < 2 * world_size and len(chunk) < batch_size:
            return
        bounds = np.linspace(0, len(chunk), world_size + 1).round().astype(int)
        part = chunk[bounds[rank] : bounds[rank + 1]]
        if len(part):
            yield part
