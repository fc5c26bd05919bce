"""The queries of a model: AnnData cells into validated chunks for :mod:`scvae.inference`.

Each function takes the model first and is bound in :class:`scvae.SCVAE`'s class body, so
``model.get_latent_representation(...)`` is ``get_latent_representation(model, ...)``.
The helpers are reached through the model (``model._chunks``...), so a subclass or a test
can replace them on the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.stats
import torch

from scvae import _checks, inference
from scvae._settings import settings
from scvae.data.registry import CategoryMatcher
from scvae.module import Covariates

if TYPE_CHECKING:
    from scvae.model import SCVAE

# Bound on the elements (cells x samples x genes) held at once by sampling queries.
_SAMPLE_ELEMENTS = inference.SAMPLE_ELEMENTS
# Rows of ranked draws turned into float64 at a time for the Spearman correlation's sums.
_CORRELATION_ROWS = 4096


def _covariates(model: SCVAE, adata: ad.AnnData) -> Covariates:
    """The registered per-cell covariates of ``adata`` as CPU tensors."""
    reg = model.registry

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.as_tensor(a)

    return Covariates(
        labels=tensor(reg.label_codes(adata)),
        categorical=tensor(reg.categorical_codes(adata)),
        continuous=tensor(reg.continuous_values(adata)),
        size_factor=tensor(reg.size_factors(adata)),
    )


def cell_indices(indices: Sequence[int] | np.ndarray | None, n_obs: int) -> np.ndarray:
    """The cells a query asks for, in the asked order: integer positions or a boolean mask.

    Negative positions count from the end, as in numpy and scvi-tools (-1 is the last cell);
    a 2-D array is refused (scvi-tools raises too), not flattened.

    Examples
    --------
    >>> cell_indices([2, 0], 3).tolist(), cell_indices(np.array([True, False, True]), 3).tolist()
    ([2, 0], [0, 2])
    >>> cell_indices([-1, 0], 3).tolist()
    [2, 0]
    """
    if indices is None:
        return np.arange(n_obs)
    idx = np.asarray(indices)
    if idx.ndim > 1:
        raise IndexError(
            f"indices must be one-dimensional (positions or a boolean mask), got an array of "
            f"shape {idx.shape}; pass one position per cell asked for, e.g. np.ravel(indices) "
            "if the flattened order is what you mean."
        )
    idx = idx.ravel()  # a single position: one cell
    empty = IndexError("indices selects no cells; pass at least one cell (or None for all).")
    if idx.dtype == bool:
        if idx.size != n_obs:
            raise IndexError(
                f"indices is a boolean mask of {idx.size} entries but the AnnData has {n_obs} "
                "cells; give one entry per cell, or integer positions."
            )
        if not idx.any():
            raise empty
        return np.flatnonzero(idx)
    if idx.size == 0:
        raise empty
    if idx.dtype.kind not in "iu":
        raise IndexError(
            f"indices must be integer positions or a boolean mask, got {idx.dtype} values; for "
            "cell names use adata.obs_names.get_indexer(names)."
        )
    idx = idx.astype(np.int64)
    if idx.min() < -n_obs or idx.max() >= n_obs:
        raise IndexError(
            f"indices must lie in [-{n_obs}, {n_obs}) (negative positions count from the end: "
            f"-1 is cell {n_obs - 1}); got {idx.min()}..{idx.max()}."
        )
    return np.where(idx < 0, idx + n_obs, idx)


# Set while a query runs other queries (DE, the training loop's checks): they warn once.
_QUIET = contextvars.ContextVar("scvae_quiet_untrained", default=False)


@contextlib.contextmanager
def _untrained_warned() -> Iterator[None]:
    """Within this block, queries do not warn again that the model is untrained."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _warn_if_untrained(model: SCVAE, query: str) -> None:
    """Warn that an untrained model's encoder is random (scvi-tools refuses the query).

    Every query calls it. A query model from ``load_query_data`` carries the reference's
    encoder, so it is not warned about before its own training, unless that reference was
    never trained.
    """
    if model.is_trained or _QUIET.get():
        return
    if getattr(model, "frozen", None) is None:
        _checks.warn_user(
            f"{query} on a model that has not been trained: its encoder is random, so is the "
            "result. Call model.train() first, or load a trained model with "
            "SCVAE.load(dir_path, adata).",
        )
    elif getattr(model, "_untrained_reference", False):
        _checks.warn_user(
            f"{query} on a query model whose reference was never trained: the encoder it "
            "carries is random, so is the result. Train the reference, then map the query "
            "onto it again with load_query_data.",
        )


def _chunks(
    model: SCVAE, adata: ad.AnnData | None, indices: Sequence[int] | None, batch_size: int | None
) -> inference.Chunks:
    """Validated (counts, batch, covariates) on the model's device, chunk by chunk.

    The genes and the per-cell annotations are checked once; the counts are read and
    checked one chunk at a time (a slice of cells when the chunk is contiguous, e.g. from
    a backed AnnData on disk), so memory holds one chunk of counts, never all of them.
    """
    if adata is None:
        adata = model.registry_adata()
    else:
        _checks.anndata(
            "adata",
            adata,
            hint=" To choose cells of the model's AnnData, pass indices=[...] by keyword.",
        )
    source, rows = adata, None  # where the counts are read: rows of source (None: the same)
    if adata.isbacked and adata.is_view:  # anndata cannot take a view of this view
        found = _backed_parent(adata)
        if found is None:  # genes subset too: the view's cells, in memory
            adata = source = adata.to_memory()
        else:  # its cells' rows of the file, read chunk by chunk
            source, rows = found
    idx = cell_indices(indices, adata.n_obs)
    size = _batch_size(batch_size)
    # the per-cell annotations of all cells first (so an error counts every bad cell), then the
    # genes, layer and counts of the first chunk (before any work); later chunks as they come
    batch = torch.as_tensor(model.registry.batch_codes(adata))
    covariates = model._covariates(adata)

    def read(part: np.ndarray) -> sp.csr_matrix:
        part = part if rows is None else rows[part]
        lo, hi = int(part[0]), int(part[-1]) + 1
        if hi - lo == len(part) and np.array_equal(part, np.arange(lo, hi)):
            return model.registry.check(source[lo:hi])
        # read each cell once, in file order, then put them in the asked order
        unique, inverse = np.unique(part, return_inverse=True)
        return model.registry.check(source[unique])[inverse]

    first = read(idx[:size])
    dev = model.device
    model.module.eval()

    def chunks() -> Iterator[inference.Chunk]:
        nonlocal first
        for start in range(0, len(idx), size):
            part = idx[start : start + size]
            counts, first = (first, None) if start == 0 else (read(part), None)
            x = torch.as_tensor(counts.toarray(), device=dev)
            part_t = torch.as_tensor(part)
            yield x, batch[part_t].to(dev), covariates.take(part_t).to(dev)

    return inference.Chunks(chunks(), len(idx))


def _backed_parent(view: ad.AnnData) -> tuple[ad.AnnData, np.ndarray] | None:
    """The backed AnnData a view of it selects cells of, and their rows (None when the view
    also selects genes, or anndata's view internals are not there)."""
    parent = getattr(view, "_adata_ref", None)
    oidx, vidx = getattr(view, "_oidx", None), getattr(view, "_vidx", None)
    if parent is None or oidx is None or vidx is None or not parent.isbacked:
        return None
    genes = np.arange(parent.n_vars)[vidx]
    if genes.shape != (parent.n_vars,) or not np.array_equal(genes, np.arange(parent.n_vars)):
        return None
    return parent, np.arange(parent.n_obs)[oidx]


def _count(name: str, value: object) -> int:
    """A number of samples: a whole number >= 1 (numpy integers too), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    return int(value)


def _batch_size(batch_size: object) -> int:
    """A query's cells per chunk: a whole number >= 1 (numpy integers too), or None for
    ``scvae.settings.inference_batch_size``.

    Examples
    --------
    >>> _batch_size(64), _batch_size(None) == settings.inference_batch_size
    (64, True)
    """
    if batch_size is None:
        return settings.inference_batch_size
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be a whole number >= 1 or None, got {batch_size!r}; pass a "
            "number of cells per chunk (e.g. 1024), or None for "
            "scvae.settings.inference_batch_size."
        )
    return int(batch_size)


def _sampling_batch_size(model: SCVAE, batch_size: int | None, n_samples: int) -> int:
    """Cells per chunk (``batch_size`` checked as every query's) so that cells x samples x
    genes stays under a fixed bound."""
    per_cell = max(1, n_samples) * model.module.config.n_input
    return max(1, min(_batch_size(batch_size), _SAMPLE_ELEMENTS // per_cell))


def _batch_codes(model: SCVAE, transform_batch: str | Sequence[str] | None) -> list[int] | None:
    if transform_batch is None:
        return None
    if isinstance(transform_batch, str) or not isinstance(transform_batch, Iterable):
        names = [transform_batch]  # one batch, by name or by an integer category
    else:
        names = list(transform_batch)
    if not names:
        raise ValueError(
            "transform_batch is an empty list; pass batch names, or None for each cell's own batch."
        )
    if all(b is None for b in names):  # scvi-tools' [None]: each cell's own batch
        return None
    if any(b is None for b in names):
        raise ValueError(
            "transform_batch cannot mix None (each cell's own batch) with batch names; give "
            "batch names only, or None alone."
        )
    known = model.registry.batch_categories
    matcher = CategoryMatcher(known)  # as the cells' batches: 1.0 is the batch "1"
    codes = [matcher.code(b) for b in names]
    unknown = [str(b) for b, c in zip(names, codes, strict=True) if c < 0]
    if unknown:
        raise ValueError(f"transform_batch {unknown} is not a registered batch (batches: {known}).")
    return codes


def _gene_index(model: SCVAE, gene_list: Sequence[str] | None) -> np.ndarray | None:
    """Positions of ``gene_list`` among the model's genes, in the model's order (None: all).

    Unknown names and an empty list are refused (scvi-tools drops unknown genes silently,
    and returns no columns for an empty list in ``get_normalized_expression``).
    """
    if gene_list is None:
        return None
    if isinstance(gene_list, str):  # one gene
        gene_list = [gene_list]
    gene_list = list(gene_list)
    if not gene_list:
        raise ValueError(
            "gene_list is empty, so no gene would be returned; give at least one name of "
            "model.var_names, or gene_list=None for all genes."
        )
    names = pd.Index(model.registry.var_names)
    missing = list(dict.fromkeys(g for g in gene_list if g not in names))
    if missing:
        shown = ", ".join(repr(g) for g in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"gene_list has {len(missing)} of {len(set(gene_list))} genes the model does not "
            f"know: [{shown}]. Use genes in model.var_names (e.g. "
            "[g for g in genes if g in model.var_names]); scvi-tools would drop them silently."
        )
    # in the model's gene order, each gene once, as scvi-tools (a mask of var_names)
    return np.flatnonzero(names.isin(list(gene_list))).astype(np.int64)


def _obs_names(model: SCVAE, adata: ad.AnnData | None, indices: Sequence[int] | None) -> pd.Index:
    names = (model.registry_adata() if adata is None else adata).obs_names
    return names if indices is None else names[cell_indices(indices, len(names))]


def get_latent_representation(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    give_mean: bool = True,
    mc_samples: int = 5000,
    return_dist: bool = False,
    batch_size: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Latent representation of each cell, for ``adata.obsm["X_scvae"]``.

    Parameters
    ----------
    adata, indices
        Cells to embed (default: the registered AnnData, all cells).
    give_mean
        Posterior mean (for the ``ln`` latent: the mean of ``mc_samples`` transformed
        samples); False: one sample.
    mc_samples
        Samples for the ``ln`` posterior mean.
    return_dist
        Return the Gaussian posterior's ``(mean, variance)`` instead.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).

    Returns
    -------
    ndarray cells x n_latent (or two of them with ``return_dist``).

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0), n_latent=4)
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> model.get_latent_representation().shape
    (100, 4)
    """
    _warn_if_untrained(model, "get_latent_representation")
    give_mean = _checks.flag("give_mean", give_mean)
    return_dist = _checks.flag("return_dist", return_dist)
    mc_samples = _count("mc_samples", mc_samples)
    return inference.latent(
        model.module,
        model._chunks(adata, indices, batch_size),
        give_mean=give_mean,
        mc_samples=mc_samples,
        return_dist=return_dist,
    )


def get_elbo(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    return_mean: bool = True,
) -> float | np.ndarray:
    """ELBO per cell with KL weight 1 and one posterior sample: negative, higher is better.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).
    return_mean
        Return the mean over the cells (a float) instead of one value per cell.

    Returns
    -------
    float (a ``numpy.float64``: ``.item()`` works, as on scvi-tools' 0-d tensor), the mean
    over the cells, or with ``return_mean=False`` an ndarray with one value
    per cell.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> bool(model.get_elbo() < 0)
    True
    """
    _warn_if_untrained(model, "get_elbo")
    return_mean = _checks.flag("return_mean", return_mean)
    recon, kl = inference.loss_terms(model.module, model._chunks(adata, indices, batch_size))
    elbo = -(recon + kl)
    return np.float64(elbo.mean()) if return_mean else elbo


def get_reconstruction_error(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    return_mean: bool = True,
) -> float | np.ndarray:
    """-log p(x | z, l) per cell (one posterior sample): positive, lower is better.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).
    return_mean
        Return the mean over the cells (a float) instead of one value per cell.

    Returns
    -------
    float (a ``numpy.float64``: ``.item()`` works, as on scvi-tools' 0-d tensor), the mean
    over the cells, or with ``return_mean=False`` an ndarray with one value
    per cell. **Return type differs from scvi-tools** (fixed by scvae's contract, like
    ``get_elbo`` and ``get_marginal_ll``): scvi-tools 1.4.2 returns a dict
    ``{"reconstruction_loss": value}`` with the same value and sign; for code written for it,
    use ``{"reconstruction_loss": model.get_reconstruction_error()}``.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> bool(model.get_reconstruction_error() > 0)
    True
    """
    _warn_if_untrained(model, "get_reconstruction_error")
    return_mean = _checks.flag("return_mean", return_mean)
    recon, _ = inference.loss_terms(model.module, model._chunks(adata, indices, batch_size))
    return np.float64(recon.mean()) if return_mean else recon


def get_marginal_ll(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    n_mc_samples: int = 1000,
    batch_size: int | None = None,
    return_mean: bool = True,
) -> float | np.ndarray:
    """Importance-sampled log p(x) per cell (observed library: log p(x | l)).

    Negative, higher is better; at least the ELBO in expectation.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    n_mc_samples
        Importance samples per cell, drawn from q(z, l | x) as the proposal.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``, lowered so that a
        chunk's samples stay in bounded memory).
    return_mean
        Return the mean over the cells (a float) instead of one value per cell.

    Returns
    -------
    float (a ``numpy.float64``: ``.item()`` works, as on scvi-tools' 0-d tensor), the mean
    over the cells, or with ``return_mean=False`` an ndarray with one value
    per cell.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(50, 30, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> bool(model.get_marginal_ll(n_mc_samples=20) < 0)
    True
    """
    _warn_if_untrained(model, "get_marginal_ll")
    return_mean = _checks.flag("return_mean", return_mean)
    n_mc_samples = _count("n_mc_samples", n_mc_samples)
    # a pass holds about a dozen samples x cells x genes tensors (the generative outputs and
    # the likelihood's terms): the chunk is sized so that all of them stay under the bound
    size = model._sampling_batch_size(
        batch_size, inference.MARGINAL_LL_LIVE_TENSORS * min(n_mc_samples, 100)
    )
    values = inference.marginal_ll(model.module, model._chunks(adata, indices, size), n_mc_samples)
    return np.float64(values.mean()) if return_mean else values


def get_normalized_expression(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    transform_batch: str | Sequence[str] | None = None,
    gene_list: Sequence[str] | None = None,
    library_size: float | str = 1,
    n_samples: int = 1,
    return_mean: bool = True,
    return_numpy: bool | None = False,
    batch_size: int | None = None,
) -> pd.DataFrame | np.ndarray:
    """Denoised expression per cell and gene, as in scvi-tools.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    transform_batch
        Decode every cell as if it came from this batch (a list: averaged over those
        batches), for batch-corrected expression; None: each cell's own batch.
    gene_list
        Genes to return (default: all), in the model's gene order as in scvi-tools, not in
        the order of the list.
    library_size
        1: rho, the normalised expression (rows sum to 1 over all genes); a number: rho
        times it (e.g. 1e4 for counts per 10,000); "latent": mu, the expected counts at the
        cell's own library. A model registered with ``size_factor_key`` decodes rho with a
        softplus instead of a softmax, as scvi-tools does, so its rows do not sum to 1 and a
        number is not counts per that many.
    n_samples, return_mean
        Posterior samples of z per cell (each gives one value, as in scvi-tools), averaged
        when ``return_mean``.
    return_numpy
        Return an ndarray instead of a DataFrame. False (the default, as CONTRACT.md fixes
        it) and None give a DataFrame, but an ndarray when samples are kept
        (``n_samples > 1`` and ``return_mean=False``), which a DataFrame cannot hold. There
        False warns and None does not, as in scvi-tools, whose default is None.
    batch_size
        Cells per chunk.

    Returns
    -------
    DataFrame cells x genes (obs names x gene names), or an ndarray
    ``(n_samples, cells, genes)`` when ``n_samples > 1`` and ``return_mean=False``.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(60, 20, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> expr = model.get_normalized_expression()
    >>> expr.shape, bool(np.allclose(expr.sum(1), 1, atol=1e-4))
    ((60, 20), True)
    """
    _warn_if_untrained(model, "get_normalized_expression")
    return_mean = _checks.flag("return_mean", return_mean)
    return_numpy = _checks.flag("return_numpy", return_numpy, none=True)
    n_samples = _count("n_samples", n_samples)
    if library_size != "latent" and not _checks.positive_number(library_size):
        raise ValueError(
            f"library_size must be a finite positive number or 'latent', got "
            f"{library_size!r}; e.g. 1 for rho (rows sum to 1), 1e4 for counts per 10,000, "
            "or 'latent' for the expected counts at each cell's own library."
        )
    gene_idx = model._gene_index(gene_list)
    values = inference.normalized_expression(
        model.module,
        model._chunks(adata, indices, model._sampling_batch_size(batch_size, n_samples)),
        transform_batch=model._batch_codes(transform_batch),
        gene_idx=gene_idx,
        library_size=library_size,
        n_samples=n_samples,
        return_mean=return_mean,
    )
    if values.ndim == 3:
        if return_numpy is False:  # as scvi-tools: a DataFrame cannot hold the samples axis
            _checks.warn_user(
                "get_normalized_expression keeps n_samples posterior samples "
                "(return_mean=False), which a DataFrame cannot hold: returning an ndarray "
                "(samples, cells, genes). Pass return_numpy=True or None to silence this, "
                "or return_mean=True for a DataFrame of the mean.",
            )
        return values
    if return_numpy:
        return values
    genes = model.var_names if gene_idx is None else model.var_names[gene_idx]
    return pd.DataFrame(values, index=model._obs_names(adata, indices), columns=genes)


def get_likelihood_parameters(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Parameters of p(x | z, l) per cell and gene: ``mean``, ``dispersions``, ``dropout``.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    n_samples
        Posterior samples per cell.
    give_mean
        With ``n_samples > 1``, the mean over the samples (the dropout probability included)
        instead of a leading sample axis.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).

    Returns
    -------
    dict of ndarrays, cells x genes (``(n_samples, cells, genes)`` with ``n_samples > 1`` and
    not ``give_mean``): ``mean`` (the expected count), ``dispersions`` (the inverse dispersion
    theta; not for poisson) and ``dropout`` (zinb only: the probability that a count is a
    zero-inflation zero), as in scvi-tools.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(40, 15, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> sorted(model.get_likelihood_parameters())
    ['dispersions', 'dropout', 'mean']
    """
    _warn_if_untrained(model, "get_likelihood_parameters")
    give_mean = _checks.flag("give_mean", give_mean)
    n_samples = _count("n_samples", n_samples)
    return inference.likelihood_parameters(
        model.module,
        model._chunks(adata, indices, model._sampling_batch_size(batch_size, n_samples)),
        n_samples=n_samples,
        give_mean=give_mean,
    )


def get_latent_library_size(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    give_mean: bool = True,
    batch_size: int | None = None,
) -> np.ndarray:
    """Library size per cell, ``(cells, 1)``, on the count scale.

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    give_mean
        For a latent library, the mean of q(l | x) on the count scale; False: one sample.
        An observed library is the same either way.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).

    Returns
    -------
    ndarray ``(cells, 1)``: the latent library on the count scale, or for an observed one the
    total counts (the size factors where they were registered).

    Examples
    --------
    >>> import scvae
    >>> adata = scvae.data.simulate(30, 10, seed=0)
    >>> model = scvae.SCVAE(adata)
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> bool(np.allclose(model.get_latent_library_size()[:, 0], adata.X.sum(1).A1))
    True
    """
    _warn_if_untrained(model, "get_latent_library_size")
    give_mean = _checks.flag("give_mean", give_mean)
    return inference.latent_library_size(
        model.module, model._chunks(adata, indices, batch_size), give_mean=give_mean
    )


def posterior_predictive_sample(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    n_samples: int = 1,
    gene_list: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> sp.csr_array | sp.coo_array:
    """Counts drawn from the posterior predictive, as a scipy sparse array.

    The shapes of scvi-tools: ``(cells, genes)`` for ``n_samples=1`` (a CSR array),
    ``(cells, genes, n_samples)`` otherwise (an N-D COO array, scipy >= 1.15). scvi-tools
    returns a ``sparse.GCXS`` of the same shape; ``.todense()`` gives the dense ndarray in
    both. Draws come from torch's global generator (``scvae.settings.seed = n`` or
    ``torch.manual_seed(n)`` makes them repeat, for the same ``batch_size``: they are drawn
    chunk by chunk).

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    n_samples
        Draws per cell.
    gene_list
        Genes to return (default: all), in the model's gene order as scvi-tools, not in
        the order of the list; every name must be in ``model.var_names``.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).

    Returns
    -------
    ``scipy.sparse.csr_array`` ``(cells, genes)`` for ``n_samples=1``, else
    ``scipy.sparse.coo_array`` ``(cells, genes, n_samples)``.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(40, 15, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> model.posterior_predictive_sample().shape
    (40, 15)
    >>> model.posterior_predictive_sample(n_samples=3).todense().shape
    (40, 15, 3)
    """
    _warn_if_untrained(model, "posterior_predictive_sample")
    n_samples = _count("n_samples", n_samples)
    return inference.posterior_predictive(
        model.module,
        model._chunks(adata, indices, model._sampling_batch_size(batch_size, n_samples)),
        n_samples=n_samples,
        gene_idx=model._gene_index(gene_list),
    )


def get_feature_correlation_matrix(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    *,
    n_samples: int = 10,
    batch_size: int | None = None,
    rna_size_factor: float = 1000,
    transform_batch: str | Sequence[str] | None = None,
    correlation_type: str = "spearman",
) -> pd.DataFrame:
    """Gene-gene correlation of denoised expression, genes x genes.

    Denoised values are Gamma draws with mean ``rna_size_factor * rho`` (and the model's
    dispersion) for each posterior sample of each cell. With several batches, one matrix per
    batch and their mean, as scvi-tools (batch differences do not enter the correlation).
    Memory: "pearson" is computed from running sums (genes x genes, whatever the cells);
    "spearman" ranks every gene over all draws, so it holds them once, cells x samples x genes
    in float32 (scvi-tools holds several copies).

    Parameters
    ----------
    adata, indices
        Cells (default: the registered AnnData, all cells).
    n_samples
        Posterior samples per cell.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).
    rna_size_factor
        The library the denoised values are drawn at.
    transform_batch
        Decode the cells under this batch (a list: each of them, the matrices averaged);
        None: each cell's own batch.
    correlation_type
        "spearman" or "pearson".

    Returns
    -------
    DataFrame genes x genes, indexed and labelled by the model's gene names.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(40, 6, seed=0))
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> model.get_feature_correlation_matrix(n_samples=2).shape
    (6, 6)
    """
    _warn_if_untrained(model, "get_feature_correlation_matrix")
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError(
            f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}."
        )
    n_samples = _count("n_samples", n_samples)
    if not _checks.positive_number(rna_size_factor):
        raise ValueError(
            f"rna_size_factor must be a finite positive number (the library the denoised "
            f"values are drawn at, e.g. 1000), got {rna_size_factor!r}."
        )
    codes = model._batch_codes(transform_batch) or [None]
    size = model._sampling_batch_size(batch_size, n_samples)
    n_genes = model.registry.n_vars
    corr = np.zeros((n_genes, n_genes))
    for code in codes:
        chunks = model._chunks(adata, indices, size)
        n_draws = len(chunks) * n_samples
        if n_draws < 2:
            raise ValueError(
                "get_feature_correlation_matrix needs at least 2 draws (cells x n_samples) to "
                f"correlate genes, got {n_draws}; pass more cells or n_samples."
            )
        options = {
            "n_samples": n_samples,
            "rna_size_factor": rna_size_factor,
            "transform_batch": code,
        }
        moments = inference.Moments(n_genes)
        if correlation_type == "pearson":  # streamed: genes x genes sums, whatever the cells
            for block in inference.denoised_samples(model.module, chunks, **options):
                moments.add(block.reshape(-1, n_genes))
        else:  # ranks need whole columns: the draws once, in float32, ranked in place
            data = inference.denoised_matrix(model.module, chunks, **options)
            for g in range(n_genes):
                data[:, g] = scipy.stats.rankdata(data[:, g])
            for start in range(0, n_draws, _CORRELATION_ROWS):
                moments.add(data[start : start + _CORRELATION_ROWS])
            del data
        corr += moments.correlation() / len(codes)
    return pd.DataFrame(corr, index=model.var_names, columns=model.var_names)
