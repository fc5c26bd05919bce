"""Counts that stay on disk: row blocks read from a backed h5ad, shuffled within a buffer.

``anndata.read_h5ad(path, backed="r")`` leaves ``X`` in the file as anndata's ``CSRDataset``
(or an ``h5py.Dataset`` when dense), whose contiguous row slices ``X[a:b]`` are cheap reads of
three HDF5 ranges. :class:`BackedCSR` trains from such a matrix in bounded memory:

* the rows are cut into contiguous blocks of ``block_rows`` rows; each epoch the blocks are
  visited in a random order (one permutation from the training generator), ``buffer_blocks``
  at a time;
* a buffer's training cells are shuffled among themselves and cut into minibatches; the few
  cells left at its end are carried into the next buffer, so minibatches are full;
* a buffer is moved to the training device as one CSR matrix (:class:`DeviceCSR`) and dense
  minibatches are gathered there, so on a GPU only a buffer at a time crosses from host to
  device (data larger than GPU memory streams).

At most ``buffer_blocks * block_rows`` rows plus one minibatch of carried cells are held at
once (``max_rows_held`` records the most), whatever the number of cells. Tensors and matrices
only: no AnnData (the blockwise validation is in :mod:`scvae.data.registry`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import torch

from scvae.data.loader import DeviceCSR, Minibatch

# Rows per contiguous read and blocks per shuffle buffer (defaults of BackedCSR).
BLOCK_ROWS = 1024
BUFFER_BLOCKS = 16


def is_on_disk(matrix: Any) -> bool:
    """Whether ``matrix`` is a backed (on-disk) matrix: anndata's sparse dataset or h5py's.

    Examples
    --------
    >>> is_on_disk(np.ones((2, 2)))
    False
    """
    return isinstance(matrix, ad.abc.CSRDataset | ad.abc.CSCDataset | h5py.Dataset)


def _shares(
    blocks: list[tuple[int, int, int, int]], idx: np.ndarray, world_size: int
) -> list[list[tuple[int, int, int, int]]]:
    """``blocks`` (in visiting order) cut into ``world_size`` consecutive shares of equal
    numbers of cells; a block on a boundary is split, each part read over its own rows.

    Examples
    --------
    >>> idx = np.arange(10)
    >>> _shares([(0, 4, 0, 4), (4, 10, 4, 10)], idx, 2)
    [[(0, 4, 0, 4), (4, 5, 4, 5)], [(5, 10, 5, 10)]]
    """
    if world_size == 1:
        return [list(blocks)]
    total = sum(b - a for *_, a, b in blocks)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    shares: list[list[tuple[int, int, int, int]]] = [[] for _ in range(world_size)]
    seen = 0  # cells in the blocks before this one
    for start, stop, a, b in blocks:
        for r in range(world_size):
            lo, hi = max(bounds[r], seen), min(bounds[r + 1], seen + b - a)
            if hi <= lo:
                continue
            first, end = a + lo - seen, a + hi - seen
            if (first, end) == (a, b):
                shares[r].append((start, stop, a, b))
            else:  # the rows of this part only
                shares[r].append((int(idx[first]), int(idx[end - 1]) + 1, first, end))
        seen += b - a
    return shares


def read_block(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of any row-sliceable matrix as CSR float32 (one contiguous read).

    Examples
    --------
    >>> read_block(np.eye(3), 1, 3).toarray().tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    block = matrix[start:stop]
    csr = block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)
    return csr.astype(np.float32, copy=False)


def read_rows(matrix: Any, idx: np.ndarray, *, max_span: int = 4) -> sp.csr_matrix:
    """Rows ``idx`` (any order) of an in-memory or on-disk matrix, as CSR float32.

    On disk, the rows are read in sorted order: as one contiguous slice when they span at most
    ``max_span`` times their number of rows, else by a sorted fancy read.

    Examples
    --------
    >>> read_rows(np.eye(3), np.array([2, 0])).toarray().tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    idx = np.asarray(idx, dtype=np.int64)
    if not is_on_disk(matrix):
        return sp.csr_matrix(matrix[idx] if sp.issparse(matrix) else np.asarray(matrix)[idx])
    if len(idx) == 0:
        return sp.csr_matrix((0, matrix.shape[1]), dtype=np.float32)
    unique, inverse = np.unique(idx, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo == len(unique) or hi - lo <= max_span * len(unique):
        block = read_block(matrix, lo, hi)[unique - lo]
    else:
        block = _fancy(matrix, unique)
    return block[inverse]


def _fancy(matrix: Any, sorted_rows: np.ndarray) -> sp.csr_matrix:
    block = matrix[sorted_rows]
    return (block if sp.issparse(block) else sp.csr_matrix(block)).astype(np.float32).tocsr()


def row_totals(matrix: Any, block_rows: int = 8 * BLOCK_ROWS) -> np.ndarray:
    """Total counts of each row, read block by block (float64).

    Examples
    --------
    >>> row_totals(np.array([[1, 2], [0, 3]])).tolist()
    [3.0, 3.0]
    """
    n = matrix.shape[0]
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        out[start:stop] = np.asarray(matrix[start:stop].sum(axis=1)).ravel()
    return out


def check_read_options(block_rows: object, buffer_blocks: object, prefix: str = "") -> None:
    """Refuse ``block_rows`` or ``buffer_blocks`` that are not whole numbers >= 1; the
    message names them with ``prefix`` (``"backed_"``: ``SCVAE.train``'s names).

    Examples
    --------
    >>> check_read_options(1024, 16)
    >>> check_read_options(0, 16, "backed_")
    Traceback (most recent call last):
    ...
    ValueError: backed_block_rows must be a whole number >= 1, got 0.
    """
    for name, value in (("block_rows", block_rows), ("buffer_blocks", buffer_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{prefix}{name} must be a whole number >= 1, got {value!r}.")


class BackedCSR:
    """A count source read from disk in shuffled row blocks (see the module's description).

    Parameters
    ----------
    matrix
        Cells x genes counts sliceable by row ranges: anndata's backed ``CSRDataset``
        (``adata.X`` of ``read_h5ad(path, backed="r")``), an ``h5py.Dataset``, or an in-memory
        scipy/numpy matrix.
    device
        Where minibatches are delivered.
    block_rows
        Rows per contiguous read.
    buffer_blocks
        Blocks shuffled together; memory holds about ``block_rows * buffer_blocks`` rows.

    Examples
    --------
    >>> src = BackedCSR(np.arange(20.0).reshape(10, 2), "cpu", block_rows=2, buffer_blocks=2)
    >>> gen = torch.Generator().manual_seed(0)
    >>> sorted(i for b in src.batches(torch.arange(10), 4, shuffle=True, generator=gen)
    ...        for i in b.idx.tolist())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(
        self,
        matrix: Any,
        device: str | torch.device,
        *,
        block_rows: int = BLOCK_ROWS,
        buffer_blocks: int = BUFFER_BLOCKS,
    ) -> None:
        if isinstance(matrix, ad.abc.CSCDataset):
            raise ValueError(
                "The on-disk counts are stored by column (CSC), so reading blocks of cells would "
                "read the whole matrix each time. Rewrite the file with CSR counts: "
                "adata = anndata.read_h5ad(path); adata.X = scipy.sparse.csr_matrix(adata.X); "
                "adata.write_h5ad(new_path)."
            )
        check_read_options(block_rows, buffer_blocks)
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.device = torch.device(device)
        self.block_rows = block_rows
        self.buffer_blocks = buffer_blocks
        self.max_rows_held = 0
        self.reads: list[tuple[int, int]] = []

    @property
    def n_rows(self) -> int:
        """Number of cells."""
        return int(self.shape[0])

    def _plan(
        self,
        idx: np.ndarray,
        shuffle: bool,
        generator: torch.Generator | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[list[list[tuple[int, int, int, int]]], np.ndarray | None, list[int]]:
        """This process's buffers of blocks ``(row start, row stop, first cell, end cell)`` in
        visiting order, a shuffling seed per buffer, and every process's number of cells.

        The blocks are visited in one random order. With ``world_size > 1`` that sequence of
        cells is cut into ``world_size`` consecutive shares of equal size (to a cell), process
        ``r`` reading only share ``r`` (a block on a boundary is read in part by each side),
        so every process steps over nearly all its cells. Every process computes every
        share and draws every seed, so their generators stay in step.
        """
        blocks = self._blocks(idx, self.block_rows)
        if shuffle:
            order = torch.randperm(len(blocks), generator=generator).tolist()
            blocks = [blocks[i] for i in order]
        shares = _shares(blocks, idx, world_size)
        size = self.buffer_blocks
        buffers = [[share[i : i + size] for i in range(0, len(share), size)] for share in shares]
        seeds = (
            torch.randint(0, 2**62, (sum(map(len, buffers)),), generator=generator).numpy()
            if shuffle
            else None
        )
        if seeds is not None:
            first = sum(len(b) for b in buffers[:rank])
            seeds = seeds[first : first + len(buffers[rank])]
        cells = [sum(b - a for *_, a, b in share) for share in shares]
        return buffers[rank], seeds, cells

    def _blocks(self, idx: np.ndarray, block_rows: int) -> list[tuple[int, int, int, int]]:
        """Row blocks of ``block_rows`` that hold some of the cells ``idx`` (sorted)."""
        starts = np.arange(0, self.n_rows, block_rows)
        stops = np.minimum(starts + block_rows, self.n_rows)
        lo, hi = np.searchsorted(idx, starts), np.searchsorted(idx, stops)
        return [
            (int(s), int(e), int(a), int(b))
            for s, e, a, b in zip(starts, stops, lo, hi, strict=True)
            if b > a
        ]

    @staticmethod
    def _n_steps(n_cells: int, batch_size: int, drop_last_below: int) -> int:
        full, rest = divmod(n_cells, batch_size)
        return full + int(rest > 0 and (rest >= drop_last_below or full == 0))

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
        """Minibatches (:class:`~scvae.data.loader.Minibatch`) of the cells ``indices``.

        With ``world_size > 1`` the shuffled sequence of blocks is cut into equal shares of
        cells, one per process (see :meth:`_plan`), so each reads only its own rows, and each
        takes ``batch_size // world_size`` cells per step (``batch_size`` stays the cells per
        optimizer step); every process takes the same number of steps (the smallest share
        decides, which is at most one cell smaller than the others).
        """
        idx = np.sort(torch.as_tensor(indices).cpu().numpy().astype(np.int64))
        per_rank_batch = max(1, batch_size // world_size)  # batch_size: cells per step, all ranks
        buffers, seeds, per_rank = self._plan(idx, shuffle, generator, rank, world_size)
        steps = min(self._n_steps(n, per_rank_batch, drop_last_below) for n in per_rank)
        self.reads = []  # this pass's reads only
        carry_rows = np.zeros(0, dtype=np.int64)
        carry = sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        done = 0
        for j in range(len(buffers)):
            parts, cells = [carry], [carry_rows]
            for start, stop, a, b in buffers[j]:
                block = read_block(self.matrix, start, stop)
                self.reads.append((start, stop))
                parts.append(block[idx[a:b] - start])
                cells.append(idx[a:b])
            held = sp.vstack(parts, format="csr")
            del parts
            rows = np.concatenate(cells)
            self.max_rows_held = max(self.max_rows_held, held.shape[0])
            order = (
                np.random.default_rng(int(seeds[j])).permutation(len(rows))
                if seeds is not None
                else np.arange(len(rows))
            )
            last = j == len(buffers) - 1
            usable = len(rows) if last else (len(rows) // per_rank_batch) * per_rank_batch
            on_device = DeviceCSR(held, self.device)  # shares the arrays on the CPU
            for s in range(0, usable, per_rank_batch):
                if done >= steps:
                    return
                pos = order[s : min(s + per_rank_batch, usable)]
                yield on_device.minibatch(
                    torch.as_tensor(pos, device=self.device),
                    cells=torch.as_tensor(rows[pos], device=self.device),
                )
                done += 1
            rest = order[usable:]
            carry, carry_rows = held[rest], rows[rest]
            del on_device, held
