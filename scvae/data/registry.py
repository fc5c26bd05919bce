"""What in an AnnData is what: the registered layer, keys, categories and genes, validated.

``register`` checks an AnnData once, when a model is built, and records what it found in a
:class:`Registry`; every later AnnData (queries, ``load``) is checked against that record with
:meth:`Registry.check`. Each refusal names the problem (layer, key, gene, value) and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvae import _checks

# Non-integer data whose largest value is below this looks log-normalised, not like counts.
_LOG_DATA_MAX = 30.0
# Cells per block when the counts are checked: each block's copy and its temporaries (about
# 40 bytes per non-zero) are the checks' whole memory, about 15 MiB at 200 non-zeros per cell.
CHECK_BLOCK = 2048


class RegistryError(ValueError):
    """The AnnData does not fit what the model needs or what it was registered with."""


@dataclass
class Registry:
    """The record of a registered AnnData.

    Attributes
    ----------
    layer, batch_key, labels_key
        Where the counts, batches and labels were read from (None: ``X`` / a single batch /
        a single label).
    batch_categories, label_categories
        The categories in registration order; a cell's code is its category's position.
    var_names
        The genes, in order.
    allow_non_integer
        Whether fractional counts were accepted.
    size_factor_key
        Column of ``obs`` with positive per-cell size factors (used as the library).
    categorical_covariate_keys, categorical_covariate_categories
        Other categorical columns of ``obs`` entering the decoder, and their categories.
    continuous_covariate_keys
        Numeric columns of ``obs`` entering the decoder.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> reg = register(ad.AnnData(np.ones((3, 2), dtype=np.float32)))
    >>> reg.n_batch, reg.var_names
    (1, ['0', '1'])
    """

    layer: str | None
    batch_key: str | None
    labels_key: str | None
    batch_categories: list[str]
    label_categories: list[str]
    var_names: list[str]
    allow_non_integer: bool = False
    size_factor_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: dict[str, list[str]] = field(default_factory=dict)
    continuous_covariate_keys: list[str] = field(default_factory=list)

    @property
    def n_batch(self) -> int:
        """Number of batches (1 when no batch key is registered)."""
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """Number of labels (1 when no labels key is registered)."""
        return len(self.label_categories)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var_names)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registry:
        """Inverse of :meth:`to_dict`; refuses unknown or missing fields and wrong types.

        A hand-edited ``"false"`` would otherwise read as True, a number as a key, and a
        repeated category would shift every later cell's code.
        """
        try:
            reg = cls(**d)
        except TypeError as err:
            raise RegistryError(f"The saved registry is malformed ({err}).") from None
        problems = reg._type_problems()
        if problems:
            raise RegistryError(f"The saved registry is malformed: {'; '.join(problems)}.")
        return reg

    def _type_problems(self) -> list[str]:
        """What in this record has the wrong type, or repeats a gene or category."""

        def str_list(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(v, str) for v in x)

        problems = [
            f"{name} must be a string or null"
            for name in ("layer", "batch_key", "labels_key", "size_factor_key")
            if not isinstance(getattr(self, name), str | None)
        ]
        if not isinstance(self.allow_non_integer, bool):
            problems.append("allow_non_integer must be true or false")
        for name in (
            "batch_categories",
            "label_categories",
            "var_names",
            "categorical_covariate_keys",
            "continuous_covariate_keys",
        ):
            value = getattr(self, name)
            if not str_list(value):
                problems.append(f"{name} must be a list of strings")
            elif len(set(value)) != len(value):
                problems.append(f"{name} repeats an entry")
        cats = self.categorical_covariate_categories
        if not isinstance(cats, dict) or not str_list(self.categorical_covariate_keys):
            problems.append("categorical_covariate_categories must map each key to its categories")
        elif set(cats) != set(self.categorical_covariate_keys):
            problems.append("categorical_covariate_categories must have one entry per key")
        else:
            for key, values in cats.items():
                if not str_list(values) or len(set(values)) != len(values):
                    problems.append(f"the categories of {key!r} must be distinct strings")
        return problems

    # ------------------------------------------------------------------ checks
    def check(self, adata: ad.AnnData) -> sp.csr_matrix:
        """Check a later AnnData against this record and return its validated counts.

        Genes must be the registered ones in the same order; batch and label categories must
        be among the registered ones.
        """
        _check_not_empty(adata)
        names = list(map(str, adata.var_names))
        if names != self.var_names:
            missing = [g for g in self.var_names if g not in set(names)]
            if missing:
                raise RegistryError(
                    f"{len(missing)} of the model's {self.n_vars} genes are missing from this "
                    f"AnnData (e.g. {', '.join(missing[:5])}). Use an AnnData with the genes "
                    "the model was trained on."
                )
            extra = len(names) - self.n_vars
            how = f"it has {extra} extra genes" if extra else "they are in another order"
            raise RegistryError(
                f"This AnnData's genes differ from the model's: {how}. Subset and reorder it "
                "first: adata = adata[:, model.var_names].copy()."
            )
        self.batch_codes(adata)
        self.label_codes(adata)
        self.categorical_codes(adata)
        self.continuous_values(adata)
        self.size_factors(adata)
        counts = get_counts(
            adata, self.layer, allow_non_integer=self.allow_non_integer, registered=True
        )
        if counts.shape != (adata.n_obs, self.n_vars):  # a backed file rewritten since opened
            where = f" (file {adata.filename})" if adata.isbacked else ""
            raise RegistryError(
                f"The counts have {counts.shape[0]} cells x {counts.shape[1]} genes but the "
                f"AnnData lists {adata.n_obs} cells (obs_names) x {self.n_vars} genes "
                f"(var_names){where}: its matrix no longer matches its annotations, e.g. the "
                "file was rewritten after it was opened. Open the file again."
            )
        return counts

    def check_blocks(self, adata: ad.AnnData, block: int = CHECK_BLOCK) -> Iterator[sp.csr_matrix]:
        """:meth:`check` ``block`` cells at a time, yielding each block's validated counts.

        Memory holds one block's counts at a time; a backed AnnData is read block by block.
        An AnnData without cells is refused, as by :meth:`check`.
        """
        _check_not_empty(adata)
        for start in range(0, adata.n_obs, block):
            yield self.check(adata[start : start + block])

    def batch_codes(self, adata: ad.AnnData) -> np.ndarray:
        """Batch code of each cell (int64); unknown categories are an error."""
        return _codes(adata, self.batch_key, self.batch_categories, "batch_key")

    def label_codes(self, adata: ad.AnnData) -> np.ndarray:
        """Label code of each cell (int64); unknown categories are an error."""
        return _codes(adata, self.labels_key, self.label_categories, "labels_key")

    @property
    def n_cats_per_cov(self) -> list[int]:
        """Number of categories of each categorical covariate."""
        cats = self.categorical_covariate_categories
        return [len(cats[k]) for k in self.categorical_covariate_keys]

    def categorical_codes(self, adata: ad.AnnData) -> np.ndarray | None:
        """Codes of the categorical covariates, cells x keys (int64), or None."""
        if not self.categorical_covariate_keys:
            return None
        cats = self.categorical_covariate_categories
        cols = [
            _codes(adata, key, cats[key], "categorical_covariate_keys")
            for key in self.categorical_covariate_keys
        ]
        return np.stack(cols, axis=1)

    def continuous_values(self, adata: ad.AnnData) -> np.ndarray | None:
        """The continuous covariates, cells x keys (float32), or None."""
        if not self.continuous_covariate_keys:
            return None
        cols = [
            _numeric(adata, key, "continuous_covariate_keys")
            for key in self.continuous_covariate_keys
        ]
        return np.stack(cols, axis=1).astype(np.float32)

    def size_factors(self, adata: ad.AnnData) -> np.ndarray | None:
        """Per-cell size factors (n, 1) float32, checked positive, or None."""
        if self.size_factor_key is None:
            return None
        values = _numeric(adata, self.size_factor_key, "size_factor_key")
        if (values <= 0).any():
            raise RegistryError(
                f"adata.obs[{self.size_factor_key!r}] (size_factor_key) has "
                f"{int((values <= 0).sum())} values <= 0; size factors must be positive."
            )
        # the library is a float32 count scale: e.g. 1e300 would overflow it
        limit = np.finfo(np.float32).max / 1e6
        if (values > limit).any():
            raise RegistryError(
                f"adata.obs[{self.size_factor_key!r}] (size_factor_key) has "
                f"{int((values > limit).sum())} values above {limit:.0e} (largest "
                f"{values.max():.3g}); size factors are library sizes on the count scale "
                "(e.g. total counts per cell), far below that."
            )
        return values.astype(np.float32)[:, None]


def register(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    allow_non_integer: bool = False,
) -> Registry:
    """Validate an AnnData of raw counts and record its layer, keys, categories and genes.

    Parameters
    ----------
    adata
        Cells x genes raw counts in ``X`` or in ``layers[layer]``.
    layer
        Layer holding the counts (None: ``X``).
    batch_key, labels_key
        Columns of ``obs`` with the batch and the cell label (None: one batch / one label).
    size_factor_key
        Column of ``obs`` with positive size factors, used as the library size.
    categorical_covariate_keys, continuous_covariate_keys
        Further columns of ``obs`` that enter the decoder (one-hot or as numbers).
    allow_non_integer
        Accept fractional counts (ambient-corrected or EM-estimated); refused by default.

    Returns
    -------
    The :class:`Registry`.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> a = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    >>> a.obs["b"] = pd.Categorical(["x", "y"])
    >>> register(a, batch_key="b").batch_categories
    ['x', 'y']
    """
    if not isinstance(adata, ad.AnnData):
        hint = (
            f" Read the file first: adata = scvae.data.read({str(adata)!r})."
            if isinstance(adata, str | os.PathLike)
            else " Wrap a matrix as anndata.AnnData(counts)."
        )
        raise TypeError(f"Expected an AnnData, got {type(adata).__name__}.{hint}")
    _check_not_empty(adata)
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise RegistryError(
            f"Gene names (var_names) are not unique: {len(dup)} repeated, e.g. "
            f"{', '.join(map(str, dup[:5]))}. Run adata.var_names_make_unique() first."
        )
    check_counts(adata, layer, allow_non_integer=allow_non_integer)
    batches = _categories(adata, batch_key, "batch_key")
    labels = _categories(adata, labels_key, "labels_key")
    # any sequence of names (a list, a numpy array, adata.obs.columns[...]), as plain str
    cat_keys = [
        str(k) for k in ([] if categorical_covariate_keys is None else categorical_covariate_keys)
    ]
    cont_keys = [
        str(k) for k in ([] if continuous_covariate_keys is None else continuous_covariate_keys)
    ]
    for keys, what in ((cat_keys, "categorical"), (cont_keys, "continuous")):
        if len(set(keys)) != len(keys):
            raise RegistryError(f"{what}_covariate_keys lists a column twice: {keys}.")
    registry = Registry(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        batch_categories=batches,
        label_categories=labels,
        var_names=list(map(str, adata.var_names)),
        allow_non_integer=allow_non_integer,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        categorical_covariate_categories={
            k: _categories(adata, k, "categorical_covariate_keys") for k in cat_keys
        },
        continuous_covariate_keys=cont_keys,
    )
    registry.continuous_values(adata)
    registry.size_factors(adata)
    return registry


def check_counts(
    adata: ad.AnnData,
    layer: str | None,
    *,
    allow_non_integer: bool = False,
    block: int = CHECK_BLOCK,
) -> None:
    """Check the counts as :func:`get_counts` does, ``block`` cells at a time.

    Memory holds one block's copy of the counts, never a second copy of the whole matrix; an
    AnnData opened with ``read_h5ad(path, backed="r")`` is read block by block from disk.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> check_counts(ad.AnnData(np.ones((3, 2), dtype=np.float32)), None)
    """
    if adata.n_obs <= block:
        get_counts(adata, layer, allow_non_integer=allow_non_integer)
        return
    n_empty, examples = 0, []  # cells without counts in every block: their number is the message
    for start in range(0, adata.n_obs, block):
        stop = min(start + block, adata.n_obs)
        try:
            csr = get_counts(
                adata[start:stop], layer, allow_non_integer=allow_non_integer, refuse_empty=False
            )
        except RegistryError as err:
            raise RegistryError(
                f"{err} (Counted in cells {start} to {stop - 1} of {adata.n_obs}: the check "
                "stops at the first block of cells with a problem.)"
            ) from None
        empty = start + np.flatnonzero(np.asarray(csr.sum(axis=1)).ravel() <= 0)
        n_empty += empty.size
        examples.extend(empty[: 3 - len(examples)])
    if n_empty:
        raise _zero_count_error(n_empty, adata.obs_names[examples], _where(layer))


def get_counts(
    adata: ad.AnnData,
    layer: str | None,
    *,
    allow_non_integer: bool = False,
    registered: bool = False,
    refuse_empty: bool = True,
) -> sp.csr_matrix:
    """Return the counts as CSR float32 after checking they are usable raw counts.

    Refused, each with the fix: a missing layer, non-numeric data, NaN or inf, negative values,
    non-integer values (unless ``allow_non_integer``; data that looks log-normalised gets a
    pointer to the raw counts), and cells with zero total counts. ``registered``: the AnnData
    is checked against a model's registration (a query), whose option cannot change any more.

    Parameters
    ----------
    adata
        The AnnData.
    layer
        The layer holding the counts; None: ``adata.X``.
    allow_non_integer
        Accept non-integer values (e.g. corrected or pseudo-counts).
    registered
        Word the errors for an AnnData checked against a model's registration.
    refuse_empty
        Refuse cells with zero total counts (False: :func:`check_counts` counts them over all
        its blocks).

    Returns
    -------
    ``scipy.sparse.csr_matrix`` of float32, cells x genes.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> get_counts(ad.AnnData(np.array([[1.0, 0.0]], dtype=np.float32)), None).nnz
    1
    """
    where = _where(layer)
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise RegistryError("adata.X is empty (None). Pass layer= naming the counts layer.")
    else:
        if layer not in adata.layers:
            have = ", ".join(map(repr, adata.layers.keys())) or "none"
            fix = (
                f"The model was registered with layer={layer!r} and reads every AnnData's "
                f"counts there: put these cells' raw counts in adata.layers[{layer!r}]."
                if registered
                else "Pass the layer that holds the raw counts, or layer=None for adata.X."
            )
            raise RegistryError(
                f"Layer {layer!r} is not in adata.layers (layers present: {have}). {fix}"
            )
        matrix = adata.layers[layer]
    if isinstance(matrix, ad.abc.CSRDataset | ad.abc.CSCDataset):
        matrix = matrix.to_memory()
    if sp.issparse(matrix):
        try:  # out-of-range indices (a corrupted file) would crash scipy's conversions
            _check_compressed(matrix)
            csr = sp.csr_matrix(matrix)
        except (ValueError, TypeError, IndexError, OverflowError) as err:
            raise RegistryError(
                f"{where} is a malformed sparse matrix ({err}); the file it came from may be "
                "corrupted. Read or build the counts again."
            ) from None
        values = csr.data
    else:
        array = np.asarray(matrix)
        if array.dtype.kind not in "biuf":
            raise RegistryError(f"{where} has dtype {array.dtype}; counts must be numeric.")
        values = array.ravel()
        csr = None
    if values.dtype.kind not in "biuf":
        raise RegistryError(f"{where} has dtype {values.dtype}; counts must be numeric.")
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            n_nan = int(np.isnan(values).sum())
            raise RegistryError(
                f"{where} holds {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values. Counts "
                "must be finite: fix or remove the affected cells and genes."
            )
    if values.size and values.min() < 0:
        raise RegistryError(
            f"{where} holds {int((values < 0).sum())} negative values (minimum "
            f"{values.min():g}). scvae models raw counts, which are non-negative; pass the raw "
            "counts (e.g. layer='counts'), not scaled or centred data."
        )
    if values.dtype.kind == "f" and not allow_non_integer:
        frac = values != np.round(values)
        if frac.any() and values.dtype.itemsize > 4:
            # the model reads float32: values a rounding error from an integer (1e-13 after
            # a scaling round trip) are that integer there, and are counts
            near = values[frac].astype(np.float32)
            frac[np.flatnonzero(frac)[near == np.round(near)]] = False
        if frac.any():
            example = values[frac][0]
            total = _common_total(csr if csr is not None else np.asarray(matrix))
            # log-normalised data is fractional almost everywhere; a few fractional values
            # among integers are something else
            mostly = frac.sum() > 0.5 * np.count_nonzero(values)
            if values.max() < _LOG_DATA_MAX and mostly:
                looks = f"It looks log-normalised (largest value {values.max():.3g})."
            elif total is not None:
                looks = (
                    f"It looks normalised to the same total in every cell (each sums to about "
                    f"{total:.6g}, as sc.pp.normalize_total makes)."
                )
            else:
                looks = ""
            if registered:
                hint = (
                    f"The model was registered on integer counts (allow_non_integer=False) "
                    f"and reads every AnnData's counts in {where}: put these cells' raw counts "
                    "there."
                )
            elif looks:
                hint = f"Pass the raw counts: {_where_raw_counts(adata)}"
            else:
                hint = (
                    "If the fractional values are intended (ambient-corrected or EM-estimated "
                    "counts), pass allow_non_integer=True (scvae fit: --allow-non-integer); "
                    f"if not, pass the raw counts: {_where_raw_counts(adata)}"
                )
            hint = f"{looks} {hint}".strip()
            raise RegistryError(
                f"{where} holds {int(frac.sum())} non-integer values (e.g. "
                f"{float(example)!r}); scvae expects raw integer counts. {hint}"
            )
    if csr is None:
        csr = sp.csr_matrix(np.asarray(matrix, dtype=np.float32))
    csr = csr.astype(np.float32)
    if refuse_empty:
        empty = np.flatnonzero(np.asarray(csr.sum(axis=1)).ravel() <= 0)
        if empty.size:
            raise _zero_count_error(empty.size, adata.obs_names[empty[:3]], where)
    return csr


def _where(layer: str | None) -> str:
    """Where the counts are, as the messages name it."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _zero_count_error(n_cells: int, examples: Sequence[str], where: str) -> RegistryError:
    first = ", ".join(map(str, examples))
    return RegistryError(
        f"{n_cells} cells have zero total counts in {where} (e.g. {first}); scvae refuses "
        "cells without counts (their observed library size, the log of their total, is "
        "undefined, and they hold nothing to encode). Remove them first: "
        "sc.pp.filter_cells(adata, min_counts=1)."
    )


def _common_total(matrix: sp.csr_matrix | np.ndarray) -> float | None:
    """The total every cell sums to, if the cells' totals agree to 0.1 % (normalised data)."""
    totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    if totals.size < 2:
        return None
    middle = float(np.median(totals))
    if middle <= 0 or np.ptp(totals) > 1e-3 * middle:
        return None
    return middle


def _holds_counts(matrix: Any, sample: int = 10_000) -> bool:
    """Whether the first ``sample`` stored values of a layer are non-negative integers."""
    try:
        values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
        values = np.asarray(values[:sample])
    except (TypeError, ValueError, AttributeError):
        return False
    if values.dtype.kind not in "biuf":
        return False
    return bool(np.all(values >= 0) and np.all(values == np.round(values)))


def _where_raw_counts(adata: ad.AnnData) -> str:
    """Where a user's raw counts usually are, naming the layers of this AnnData that look like
    counts (non-negative integers; not e.g. scvae's own denoised layer)."""
    layers = list(adata.layers.keys())
    counts = [k for k in layers if _holds_counts(adata.layers[k])]
    keep = (
        "keep them in a layer before normalising (adata.layers['counts'] = adata.X.copy() "
        "before sc.pp.normalize_total) and pass layer='counts'"
    )
    if counts:
        where = (
            f"layer={counts[0]!r} if that layer holds them (layers of integers: "
            f"{', '.join(map(repr, counts))})"
        )
    elif layers:
        where = f"no layer holds integer counts ({', '.join(map(repr, layers))}); {keep}"
    else:
        where = keep
    if adata.raw is not None:
        where += ", or adata.raw.to_adata() if adata.raw holds them"
    return where + "."


def _check_compressed(matrix: Any) -> None:
    """Full structural check of a CSR/CSC matrix (index bounds, indptr), on a shallow copy so
    the user's matrix is not modified; raises ValueError for a malformed one."""
    if matrix.format in ("csr", "csc"):
        parts = (matrix.data, matrix.indices, matrix.indptr)
        type(matrix)(parts, shape=matrix.shape, copy=False).check_format(full_check=True)
        indptr = np.asarray(matrix.indptr)
        # scipy's full check lets a decreasing indptr through when its last entry is 0, and
        # its sums then fail with an IndexError
        if indptr.size and (indptr[0] != 0 or np.any(np.diff(indptr) < 0)):
            raise ValueError("indptr does not rise from 0")


def _check_not_empty(adata: ad.AnnData) -> None:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise RegistryError(
            f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); scvae needs at "
            "least one cell and one gene. Check the filtering steps before this call."
        )


def _column(adata: ad.AnnData, key: str, what: str, fill: str = "e.g. with 'unknown'") -> pd.Series:
    if key not in adata.obs.columns:
        have = ", ".join(map(repr, list(adata.obs.columns)[:20])) or "none"
        raise RegistryError(f"{what}={key!r} is not a column of adata.obs (columns: {have}).")
    column = adata.obs[key]
    if column.isna().any():
        raise RegistryError(
            f"adata.obs[{key!r}] ({what}) has {int(column.isna().sum())} missing values (NaN). "
            f"Fill them ({fill}) or remove those cells."
        )
    return column


def _numeric(adata: ad.AnnData, key: str, what: str) -> np.ndarray:
    column = _column(adata, key, what, fill="with a number")
    if not pd.api.types.is_numeric_dtype(column):  # numbers written as text are not taken
        raise RegistryError(
            f"adata.obs[{key!r}] ({what}) is not numeric (dtype {column.dtype}). Convert it "
            f"first, e.g. adata.obs[{key!r}] = pd.to_numeric(adata.obs[{key!r}])."
        )
    try:
        values = column.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise RegistryError(
            f"adata.obs[{key!r}] ({what}) is not numeric (dtype {column.dtype})."
        ) from None
    if not np.isfinite(values).all():
        raise RegistryError(f"adata.obs[{key!r}] ({what}) has infinite values.")
    return values


# A category with fewer cells than this is warned about at registration, as scvi-tools does.
_FEW_CELLS = 3


def _categories(adata: ad.AnnData, key: str | None, what: str) -> list[str]:
    if key is None:
        return ["0"]
    column = _column(adata, key, what)
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str))
        values = [c for c in column.cat.categories if str(c) in present]
    else:
        # in the order scvi-tools' setup_anndata gives (pandas' categories: numbers as
        # numbers, so batch 10 comes after batch 2), as text
        values = list(pd.Categorical(column.unique()).categories)
    names = [str(c) for c in values]
    sizes = column.astype(str).value_counts()
    few = [n for n in names if sizes.get(n, 0) < _FEW_CELLS]
    if few:  # as scvi-tools' setup_anndata warns
        _checks.warn_user(
            f"adata.obs[{key!r}] ({what}) has {len(few)} categories with fewer than "
            f"{_FEW_CELLS} cells (e.g. {', '.join(map(repr, few[:5]))}); a model learns "
            "little about them. Is this a column of groups?",
        )
    if len(set(names)) < len(names):  # 1 and "1": one name in the model's files, two groups
        seen: dict[str, Any] = {}
        for value, name in zip(values, names, strict=True):
            if name in seen:
                raise RegistryError(
                    f"adata.obs[{key!r}] ({what}) holds {seen[name]!r} and {value!r}, two "
                    f"values written alike ({name!r}); the model names its groups by their "
                    f"text. Make them one type first, e.g. adata.obs[{key!r}] = "
                    f"adata.obs[{key!r}].astype(str) to merge them, or rename one."
                )
            seen[name] = value
    return names


def _as_number(value: Any) -> int | float | None:
    """``value`` as an exact number key when it is a real, finite number (booleans are not):
    an int for whole numbers (so large integers are not rounded, as floats would be), else
    a float."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(value)
    if not np.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


def _text_number(text: str) -> int | float | None:
    """The number a category's text is the canonical writing of ("1", "-3", "1.0", "2.5"),
    else None: "01", "+1", " 1" or "1e3" stay text, as in pandas' matching."""
    try:
        if text == str(int(text)):
            return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if text not in (repr(number), str(number)) or not np.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


class CategoryMatcher:
    """Finds a value's position among registered categories (text, as registered).

    A value matches the category with its text (``str(value)``); a number whose text is no
    category matches the category that is the canonical writing of the same number, so a
    float column's 1.0 finds the category "1" registered from an integer 1 (and an integer 1
    finds "1.0"), as pandas' categorical matching does in scvi-tools. Whole numbers are
    compared exactly (large integers are not rounded); "01" or "+1" are text, not numbers. A
    number two categories read as is ambiguous and matches neither.

    Examples
    --------
    >>> m = CategoryMatcher(["1", "2", "b", "01"])
    >>> m.code(1.0), m.code(np.int64(2)), m.code("b"), m.code(3.0), m.code("1.0")
    (0, 1, 2, -1, -1)
    >>> CategoryMatcher(["20240101120000123"]).code(20240101120000124)
    -1
    """

    def __init__(self, categories: list[str]) -> None:
        self.exact: dict[str, int] = {}
        self.numeric: dict[int | float, int] = {}
        ambiguous: set[int | float] = set()
        for i, category in enumerate(categories):
            self.add(category, i, ambiguous)

    def add(self, category: str, code: int, ambiguous: set[int | float] | None = None) -> None:
        """Register one more category under ``code``."""
        self.exact.setdefault(category, code)
        number = _text_number(category)
        if number is None:
            return
        if ambiguous is not None and (number in self.numeric or number in ambiguous):
            self.numeric.pop(number, None)
            ambiguous.add(number)
        elif number not in self.numeric:
            self.numeric[number] = code

    def code(self, value: Any) -> int:
        """The category of ``value`` (-1: none)."""
        found = self.exact.get(str(value))
        if found is not None:
            return found
        number = _as_number(value)
        return -1 if number is None else self.numeric.get(number, -1)

    def codes(self, column: pd.Series) -> tuple[np.ndarray, list[Any]]:
        """Each cell's category (-1: none) and the distinct values that match none, in
        order of appearance."""
        inverse, uniques = pd.factorize(column)
        found = np.fromiter((self.code(u) for u in uniques), dtype=np.int64, count=len(uniques))
        codes = np.where(inverse >= 0, found[np.maximum(inverse, 0)], -1)
        return codes, [u for u, f in zip(uniques, found, strict=True) if f < 0]


def _codes(adata: ad.AnnData, key: str | None, categories: list[str], what: str) -> np.ndarray:
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    if key not in adata.obs.columns:  # registration read its categories: a later AnnData
        have = ", ".join(map(repr, list(adata.obs.columns)[:20])) or "none"
        raise RegistryError(
            f"The model was registered with {what}={key!r}, but this AnnData has no column "
            f"adata.obs[{key!r}] (columns: {have}). Add it, with values among the model's "
            f"categories ({', '.join(map(repr, categories[:10]))}"
            f"{', ...' if len(categories) > 10 else ''})."
        )
    codes, unknown = CategoryMatcher(categories).codes(_column(adata, key, what))
    if unknown:
        names = sorted(map(str, unknown))
        raise RegistryError(
            f"adata.obs[{key!r}] has categories the model was not trained with: "
            f"{', '.join(map(repr, names[:5]))} "
            f"(known: {', '.join(map(repr, categories[:10]))}). "
            "Use cells of the registered categories."
        )
    return codes
