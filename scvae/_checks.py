"""Argument checks shared by the public functions: an error that names the argument.

Without them a wrong type passes silently (any non-empty string is true) or fails deep
inside numpy, pandas or torch. No scvae imports: every layer may use these.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

# The largest seed: numpy's global generator and Lightning's seed_everything (which
# scvi.settings.seed calls) take no more, and it stays an int64 in an h5ad record
SEED_MAX = 2**32 - 1


def flag(name: str, value: Any, *, none: bool = False) -> bool | None:
    """``value`` as a bool, or a TypeError naming ``name`` (None passes with ``none=True``).

    Examples
    --------
    >>> flag("overwrite", np.True_)
    True
    >>> flag("overwrite", "no")
    Traceback (most recent call last):
    ...
    TypeError: overwrite must be True or False, got 'no'.
    """
    if value is None and none:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    allowed = "True, False or None" if none else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {value!r}.")


def anndata(name: str, value: Any, *, hint: str = "") -> ad.AnnData:
    """``value`` if it is an AnnData, else a TypeError naming ``name`` (``hint``: what to do).

    Examples
    --------
    >>> anndata("adata", [0, 1], hint=" Pass cells as indices=[...].")
    Traceback (most recent call last):
    ...
    TypeError: adata must be an AnnData, got list. Pass cells as indices=[...].
    """
    if isinstance(value, ad.AnnData):
        return value
    raise TypeError(f"{name} must be an AnnData, got {type(value).__name__}.{hint}")


def positive_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number above 0 (a bool is not a number here).

    Examples
    --------
    >>> positive_number(1e4), positive_number(0), positive_number("1"), positive_number(True)
    (True, False, False, False)
    """
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


# with the separator: a user's file beside the package ("scvae_demo/run.py") is not in it
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


def warn_user(message: str) -> None:
    """``warnings.warn(message, UserWarning)`` pointing at the user's line: the first caller
    outside the scvae package, however deep inside it the warning is raised (a fixed
    ``stacklevel`` is right for one entry point only: a check reached from ``scvae.tl`` and
    from a model method is one frame deeper in one of them).

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     warn_user("careful")
    >>> seen[0].message.args[0], seen[0].filename == __file__
    ('careful', False)
    """
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_user's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def seed(name: str, value: Any, *, none: bool = False, why: str = "", hint: str = "") -> int | None:
    """``value`` as a seed (a whole number from 0 to ``SEED_MAX`` = 2**32 - 1), or a
    ValueError naming ``name`` and the range (None passes with ``none=True``; ``why`` follows
    the range in the message, ``hint`` ends it).

    Examples
    --------
    >>> seed("seed", np.int64(3)), seed("seed", None, none=True)
    (3, None)
    >>> seed("seed", 2**32)
    Traceback (most recent call last):
    ...
    ValueError: seed must be a whole number from 0 to 2**32 - 1, got 4294967296.
    """
    if value is None and none:
        return None
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if whole and 0 <= value <= SEED_MAX:
        return int(value)
    allowed = "None or a whole number" if none else "a whole number"
    raise ValueError(f"{name} must be {allowed} from 0 to 2**32 - 1{why}, got {value!r}.{hint}")
