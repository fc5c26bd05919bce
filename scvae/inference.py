"""Queries of a trained module, chunk by chunk, with no grad.

Tensors only (no AnnData): each function takes the module and an iterable of chunks
``(x, batch_index, covariates)`` already on the module's device, and returns numpy arrays on
the host. ``SCVAE`` builds the chunks from an AnnData; memory is bounded by the chunk size
(and, for sampling queries, by the samples kept per chunk), not by the number of cells.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scvae import _rng
from scvae.module import VAE, Covariates

Chunk = tuple[torch.Tensor, torch.Tensor, Covariates]
# Bound on the elements (cells x samples x latent dims) held at once for the ln posterior mean.
SAMPLE_ELEMENTS = 2**24
# samples x cells x genes tensors alive at once in a pass of VAE.marginal_ll (measured: a
# pass at the bound above peaked at about 12 x its 64 MiB)
MARGINAL_LL_LIVE_TENSORS = 12


class Chunks:
    """An iterable of chunks that knows how many cells it covers, so results are written into
    one array allocated once (no list of parts concatenated at the end, which would hold the
    output twice).

    Examples
    --------
    >>> len(Chunks(iter([]), n_cells=0))
    0
    """

    def __init__(self, chunks: Iterable[Chunk], n_cells: int) -> None:
        self._chunks, self.n_cells = chunks, n_cells

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self._chunks)

    def __len__(self) -> int:
        return self.n_cells


class _Rows:
    """Per-cell results gathered along ``axis`` into one preallocated host array."""

    def __init__(self, chunks: Iterable[Chunk], axis: int = 0, dtype: Any = None) -> None:
        self.n = getattr(chunks, "n_cells", None)
        self.axis, self.dtype = axis, dtype
        self.out: np.ndarray | None = None
        self.parts: list[np.ndarray] = []
        self.pos = 0

    def add(self, value: torch.Tensor | np.ndarray) -> None:
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if self.dtype is not None:
            a = a.astype(self.dtype, copy=False)
        axis = self.axis % a.ndim
        if self.n is None:
            self.parts.append(a.copy())
            return
        if self.out is None:
            shape = list(a.shape)
            shape[axis] = self.n
            self.out = np.empty(shape, dtype=a.dtype)
        where = [slice(None)] * a.ndim
        where[axis] = slice(self.pos, self.pos + a.shape[axis])
        self.out[tuple(where)] = a
        self.pos += a.shape[axis]

    def result(self, empty: np.ndarray) -> np.ndarray:
        if self.out is not None:
            return self.out
        if self.parts:
            return np.concatenate(self.parts, axis=self.axis % self.parts[0].ndim)
        return empty


@torch.no_grad()
def latent(
    module: VAE,
    chunks: Iterable[Chunk],
    *,
    give_mean: bool = True,
    mc_samples: int = 5000,
    return_dist: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Posterior mean (or one sample, or the Gaussian's mean and variance) per cell.

    The encoder draws a sample of z with every pass; where the answer needs none (the mean of
    the normal latent, or the distribution itself), the caller's generators are put back after
    the passes, so the caller's random state is left as it was (as the docs say: only
    ``give_mean=False`` and the ``ln`` latent's mean draw).
    """
    means, variances = _Rows(chunks), _Rows(chunks)
    drawless = return_dist or (give_mean and module.config.latent_distribution != "ln")
    device = next(module.parameters()).device
    with _rng.kept_generators(device) if drawless else contextlib.nullcontext():
        for x, b, cov in chunks:
            qz = module.inference(x, b, cov)["qz"]
            if return_dist:
                means.add(qz.loc)
                variances.add(qz.variance)
            elif not give_mean:
                means.add(module.transform_z(qz.sample()))
            elif module.config.latent_distribution == "ln":
                means.add(_ln_mean(module, qz, mc_samples))
            else:
                means.add(qz.loc)
    empty = np.zeros((0, module.config.n_latent), dtype=np.float32)
    out = means.result(empty)
    return (out, variances.result(empty)) if return_dist else out


def _ln_mean(module: VAE, qz: torch.distributions.Normal, mc_samples: int) -> torch.Tensor:
    total = torch.zeros_like(qz.loc)
    step = max(1, SAMPLE_ELEMENTS // max(1, qz.loc.numel()))
    done = 0
    while done < mc_samples:
        s = min(step, mc_samples - done)
        total += module.transform_z(qz.sample((s,))).sum(0)
        done += s
    return total / mc_samples


@torch.no_grad()
def loss_terms(module: VAE, chunks: Iterable[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell -log p(x | z, l) and KL (z and l), one posterior sample, KL weight 1."""
    recon, kl = _Rows(chunks, dtype=np.float64), _Rows(chunks, dtype=np.float64)
    for x, b, cov in chunks:
        out = module(x, b, cov)
        recon.add(out.reconstruction_loss)
        kl.add(out.kl_z + out.kl_l)
    empty = np.zeros(0, dtype=np.float64)
    return recon.result(empty), kl.result(empty)


@torch.no_grad()
def marginal_ll(module: VAE, chunks: Iterable[Chunk], n_mc_samples: int) -> np.ndarray:
    """Importance-sampled log p(x) per cell (see :meth:`VAE.marginal_ll`)."""
    per_pass = max(1, min(n_mc_samples, 100))
    out = _Rows(chunks, dtype=np.float64)
    for x, b, cov in chunks:
        out.add(module.marginal_ll(x, b, cov, n_mc_samples=n_mc_samples, samples_per_pass=per_pass))
    return out.result(np.zeros(0, dtype=np.float64))


@torch.no_grad()
def normalized_expression(
    module: VAE,
    chunks: Iterable[Chunk],
    *,
    transform_batch: Sequence[int] | None,
    gene_idx: np.ndarray | None,
    library_size: float | str,
    n_samples: int,
    return_mean: bool,
) -> np.ndarray:
    """rho (times ``library_size``), or mu for ``library_size="latent"``, per cell and gene.

    With ``transform_batch`` (batch codes), the decoder is run under each of those batches and
    the results averaged; else under each cell's own batch. Returns ``(cells, genes)`` or, with
    ``n_samples > 1`` and ``return_mean=False``, ``(samples, cells, genes)``.
    """
    parts = _Rows(chunks, axis=-2)
    for x, b, cov in chunks:
        inf = module.inference(x, b, cov, n_samples=n_samples)
        batches = [None] if transform_batch is None else list(transform_batch)
        acc = None
        for code in batches:
            b_t = b if code is None else torch.full_like(b, code)
            gen = module.generative(inf["z"], inf["library"], b_t, cov)
            value = gen["mu"] if library_size == "latent" else gen["rho"] * float(library_size)
            if gene_idx is not None:
                value = value[..., torch.as_tensor(gene_idx, device=value.device)]
            acc = value if acc is None else acc + value
        acc = acc / len(batches)
        if n_samples > 1 and return_mean:
            acc = acc.mean(0)
        parts.add(acc)
    n_genes = module.config.n_input if gene_idx is None else len(gene_idx)
    return parts.result(np.zeros((0, n_genes), dtype=np.float32))


@torch.no_grad()
def likelihood_parameters(
    module: VAE, chunks: Iterable[Chunk], *, n_samples: int, give_mean: bool
) -> dict[str, np.ndarray]:
    """``mean`` (mu), ``dispersions`` (theta) and ``dropout`` (zi probability) per cell and gene."""
    keys = {"mean": "mu", "dispersions": "theta", "dropout": "zi_logits"}
    parts = {k: _Rows(chunks, axis=-2) for k in keys}
    n_genes = module.config.n_input
    for x, b, cov in chunks:
        inf = module.inference(x, b, cov, n_samples=n_samples)
        gen = module.generative(inf["z"], inf["library"], b, cov)
        for key, name in keys.items():
            value = gen[name]
            if value.dim() == 1:  # per-gene theta: one row per cell
                value = value.expand(*inf["z"].shape[:-1], n_genes)
            if key == "dropout":  # the probability, as scvi-tools' px.zi_probs
                value = torch.sigmoid(value)
            if n_samples > 1 and give_mean:
                value = value.mean(0)
            parts[key].add(value)
    empty = np.zeros((0, n_genes), dtype=np.float32)
    out = {k: v.result(empty) for k, v in parts.items()}
    if module.config.gene_likelihood != "zinb":
        del out["dropout"]
    if module.config.gene_likelihood == "poisson":
        del out["dispersions"]
    return out


@torch.no_grad()
def latent_library_size(module: VAE, chunks: Iterable[Chunk], *, give_mean: bool) -> np.ndarray:
    """Library size per cell, ``(cells, 1)``: exp of the log library.

    For a latent library with ``give_mean``, the mean of the log-normal q(l | x); otherwise the
    observed totals (or size factors), or one sample of the latent library.
    """
    parts = _Rows(chunks)
    for x, b, cov in chunks:
        inf = module.inference(x, b, cov)
        ql = inf["ql"]
        if ql is not None and give_mean:
            value = torch.exp(ql.loc + 0.5 * ql.variance)
        else:
            value = torch.exp(inf["library"])
        parts.add(value)
    return parts.result(np.zeros((0, 1), dtype=np.float32))


@torch.no_grad()
def posterior_predictive(
    module: VAE, chunks: Iterable[Chunk], *, n_samples: int, gene_idx: np.ndarray | None
) -> sp.csr_array | sp.coo_array:
    """Counts drawn from p(x | z, l) with z, l from the posterior, as scvi-tools' shapes.

    ``n_samples=1``: a CSR array ``(cells, genes)``; otherwise an N-D COO array
    ``(cells, genes, n_samples)`` (scipy >= 1.15). Only the non-zero draws are kept, chunk
    by chunk, appended to the result's own arrays (:class:`_Growing`) rather than kept as
    chunks and concatenated at the end (which held the result twice).
    """
    n_genes = module.config.n_input if gene_idx is None else len(gene_idx)
    values = _Growing(np.float32)
    genes, per_row = _Growing(np.int32), _Growing(np.int64)  # CSR: indices, non-zeros per row
    # N-D COO: cell, gene and sample (int64, the type scipy keeps, so it does not copy them)
    coords = [_Growing(np.int64) for _ in range(3)]
    n_cells = 0
    for x, b, cov in chunks:
        inf = module.inference(x, b, cov, n_samples=n_samples)
        counts = module.generative(inf["z"], inf["library"], b, cov)["px"].sample()
        if gene_idx is not None:
            counts = counts[..., torch.as_tensor(gene_idx, device=counts.device)]
        if n_samples == 1:
            part = sp.csr_array(counts.cpu().numpy())
            values.extend(part.data)
            genes.extend(part.indices)
            per_row.extend(np.diff(part.indptr))
        else:  # (samples, cells, genes) -> (cells, genes, samples), as scvi-tools
            dense = counts.permute(1, 2, 0).cpu().numpy()
            cell, gene, sample = np.nonzero(dense)
            values.extend(dense[cell, gene, sample])
            for grown, new in zip(coords, (cell + n_cells, gene, sample), strict=True):
                grown.extend(new)
        n_cells += x.shape[0]
    if n_samples == 1:
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(per_row.array(), out=indptr[1:])
        index = np.int64 if indptr[-1] > np.iinfo(np.int32).max else np.int32
        indices = genes.array().astype(index, copy=False)
        data = (values.array(), indices, indptr.astype(index, copy=False))
        return sp.csr_array(data, shape=(n_cells, n_genes))
    dims = tuple(grown.array() for grown in coords)
    return sp.coo_array((values.array(), dims), shape=(n_cells, n_genes, n_samples))


class _Growing:
    """A 1-D array appended to in place, grown by ``ndarray.resize`` (``realloc``, which for
    large arrays remaps their pages instead of copying them) by a quarter at a time: numpy
    zero-fills the new capacity, so what is reserved ahead is kept small.

    Examples
    --------
    >>> g = _Growing(np.int64)
    >>> g.extend(np.array([1, 2])); g.extend(np.array([3]))
    >>> g.array().tolist()
    [1, 2, 3]
    """

    def __init__(self, dtype: type) -> None:
        self._data = np.empty(0, dtype=dtype)
        self._size = 0

    def extend(self, values: np.ndarray) -> None:
        """Append ``values``."""
        end = self._size + len(values)
        if end > len(self._data):
            self._data.resize(
                max(end, len(self._data) + len(self._data) // 4, 1024), refcheck=False
            )
        self._data[self._size : end] = values
        self._size = end

    def array(self) -> np.ndarray:
        """The values appended, trimmed to their number (the object is spent after)."""
        self._data.resize(self._size, refcheck=False)
        return self._data


def denoised_samples(
    module: VAE,
    chunks: Iterable[Chunk],
    *,
    n_samples: int,
    rna_size_factor: float,
    transform_batch: int | None,
) -> Iterator[np.ndarray]:
    """Gamma draws of the denoised expression at a fixed library, chunk by chunk.

    Yields float32 arrays ``(chunk cells, samples, genes)``.
    For each posterior sample, rate = ``rna_size_factor * rho`` and the draw is
    Gamma(theta, theta / rate) (mean ``rate``), as in scVI's gene-gene correlations.
    """
    for x, b, cov in chunks:
        with torch.no_grad():
            inf = module.inference(x, b, cov, n_samples=n_samples)
            b_t = b if transform_batch is None else torch.full_like(b, transform_batch)
            gen = module.generative(inf["z"], inf["library"], b_t, cov)
            rate = rna_size_factor * gen["rho"]
            poisson = module.config.gene_likelihood == "poisson"
            theta = None if poisson else gen["theta"].expand_as(rate)
            if theta is None:
                draw = rate
            else:
                draw = torch.distributions.Gamma(theta, theta / rate).sample()
            if n_samples == 1:
                draw = draw.unsqueeze(0)
        yield draw.transpose(0, 1).cpu().numpy()


def denoised_matrix(module: VAE, chunks: Iterable[Chunk], **options: Any) -> np.ndarray:
    """All of :func:`denoised_samples`' draws in one array allocated once, float32
    ``(cells * samples, genes)`` (each cell's samples together)."""
    rows = _Rows(chunks)
    for draws in denoised_samples(module, chunks, **options):
        rows.add(draws)
    n_genes = module.config.n_input
    out = rows.result(np.zeros((0, options["n_samples"], n_genes), dtype=np.float32))
    return out.reshape(-1, n_genes)


class Moments:
    """Running column sums and cross-products of row blocks, for a correlation matrix.

    Sums are kept in float64 around a shift (the first block's column means), so the
    covariance does not lose digits to large means. Memory: genes x genes, whatever the rows.

    Examples
    --------
    >>> rng = np.random.default_rng(0); x = rng.normal(size=(100, 3))
    >>> m = Moments(3); m.add(x[:40]); m.add(x[40:])
    >>> bool(np.allclose(m.correlation(), np.corrcoef(x, rowvar=False)))
    True
    """

    def __init__(self, n_columns: int) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(n_columns)
        self.cross = np.zeros((n_columns, n_columns))

    def add(self, rows: np.ndarray) -> None:
        """Add a block of rows."""
        rows = np.asarray(rows, dtype=np.float64)
        if self.shift is None:
            self.shift = rows.mean(axis=0) if len(rows) else np.zeros(rows.shape[1])
        centred = rows - self.shift
        self.n += len(rows)
        self.total += centred.sum(axis=0)
        self.cross += centred.T @ centred

    def correlation(self) -> np.ndarray:
        """Pearson correlation of the columns (NaN for a constant column, as ``np.corrcoef``)."""
        mean = self.total / max(self.n, 1)
        cov = self.cross / max(self.n, 1) - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.outer(sd, sd)
        return np.clip(corr, -1.0, 1.0)
