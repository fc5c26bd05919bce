"""Global settings: ``scvae.settings`` (seed, verbosity, progress bars, inference batch size)."""

from __future__ import annotations

import contextvars
import logging
import numbers
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from scvae import _checks

logger = logging.getLogger("scvae")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s scvae: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    # scvae's own handler prints each line; a root handler (logging.basicConfig) would print it
    # again (scvi-tools, anndata and torch keep their loggers to themselves the same way)
    logger.propagate = False

# tl.fit's seed for the initial weights of the model it builds, per thread (None: settings.seed)
_WEIGHTS_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "scvae_weights_seed", default=None
)


def _seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's and torch's global generators (every CUDA device's
    too), as Lightning's ``seed_everything`` does for ``scvi.settings.seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global generator is the point)
    torch.manual_seed(seed)


_SETTINGS = frozenset({"seed", "progress_bar", "inference_batch_size", "verbosity"})
# scvi.settings' names a user may set by habit, and what scvae has instead
_SCVI_SETTINGS = {
    "batch_size": " scvi-tools' settings.batch_size is the query batch size: set "
    "scvae.settings.inference_batch_size.",
    "num_threads": " Set torch's threads with torch.set_num_threads(n).",
    "dl_num_workers": " scvae gathers minibatches without DataLoader workers.",
    "dl_persistent_workers": " scvae gathers minibatches without DataLoader workers.",
    "dl_pin_memory": " scvae gathers minibatches without a DataLoader.",
    "progress_bar_style": " scvae's bars are tqdm's; settings.progress_bar turns them off.",
}


@dataclass
class Settings:
    """Package-wide settings, in the spirit of ``scvi.settings`` and ``sc.settings``.

    Attributes
    ----------
    seed
        Random seed, 0 to 2**32 - 1. Setting it seeds Python's ``random``, numpy's and
        torch's global generators at once, as setting ``scvi.settings.seed`` does (Lightning's
        ``seed_everything``), so the sampling queries (``get_elbo``,
        ``posterior_predictive_sample``, ``get_normalized_expression`` with samples...), which
        draw from torch's global generator, give the same draws after setting the same seed
        (with the same chunk size: ``batch_size``, or ``inference_batch_size`` when it is None;
        the draws are made chunk by chunk, as in scvi-tools).
        It is also the seed of the initial weights of a new model and the default of
        ``train(seed=None)``, ``differential_expression(seed=None)`` and ``tl.fit(seed=None)``;
        those use generators of their own and leave the global ones as they were. The value
        at import is 0 and importing scvae seeds nothing (scvi-tools' default is None:
        unseeded training; scvae's training is always seeded).
    progress_bar
        Show tqdm progress bars during training.
    inference_batch_size
        Cells per chunk in queries (latent, expression, ELBO, marginal likelihood) when a
        query gets ``batch_size=None``.

    Examples
    --------
    >>> import scvae, torch
    >>> scvae.settings.seed = 1
    >>> a = torch.rand(2)
    >>> scvae.settings.seed = 1  # torch's, numpy's and random's global generators seeded again
    >>> bool(torch.equal(a, torch.rand(2)))
    True
    >>> scvae.settings.verbosity = "warning"
    >>> scvae.settings.seed, scvae.settings.verbosity
    (1, 'warning')
    >>> scvae.settings.seed, scvae.settings.verbosity = 0, "info"  # the defaults again
    """

    seed: int = 0
    progress_bar: bool = True
    inference_batch_size: int = 1024

    def __setattr__(self, name: str, value: object) -> None:
        if name not in _SETTINGS and name != "_ready":
            # a misspelt or scvi-tools-only setting would otherwise be set and read by nothing
            known = ", ".join(sorted(_SETTINGS))
            hint = _SCVI_SETTINGS.get(name, "")
            raise AttributeError(
                f"scvae.settings has no setting {name!r} (its settings: {known}).{hint}"
            )
        # checked when set, so that a bad value names itself here, not deep inside a run
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if name == "seed":
            _check_seed(value)
        if name == "progress_bar" and not isinstance(value, bool):
            raise ValueError(f"settings.progress_bar must be True or False, got {value!r}.")
        if name == "inference_batch_size" and not (whole and value >= 1):
            raise ValueError(
                f"settings.inference_batch_size must be a whole number >= 1, got {value!r}."
            )
        super().__setattr__(name, int(value) if name == "seed" else value)
        if name == "seed" and self.__dict__.get("_ready", False):  # not at import
            _seed_everything(int(value))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ready", True)

    @contextmanager
    def _weights_seed(self, seed: int) -> Iterator[None]:
        """``seed`` as the seed of new models' initial weights inside the block, in this
        thread only (``settings.seed`` itself is untouched, and nothing is seeded).

        Examples
        --------
        >>> import scvae
        >>> with scvae.settings._weights_seed(7):
        ...     scvae.settings._seed_of_weights(), scvae.settings.seed
        (7, 0)
        """
        token = _WEIGHTS_SEED.set(_checks.seed("seed", seed))
        try:
            yield
        finally:
            _WEIGHTS_SEED.reset(token)

    def _seed_of_weights(self) -> int:
        """The seed of a new model's initial weights: ``_weights_seed``'s, else ``seed``."""
        lent = _WEIGHTS_SEED.get()
        return self.seed if lent is None else lent

    @property
    def verbosity(self) -> str:
        """Logging level of the ``scvae`` logger: "debug", "info", "warning", "error" or
        "critical"; set it by name or by logging's number (``logging.INFO``), as
        ``scvi.settings.verbosity``."""
        return logging.getLevelName(logger.level).lower()

    @verbosity.setter
    def verbosity(self, level: str | int) -> None:
        logger.setLevel(_check_verbosity(level))


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _check_verbosity(level: object) -> int:
    """logging's number of a verbosity given by name or by number; anything else refused."""
    allowed = (
        "use 'debug', 'info', 'warning', 'error' or 'critical', or logging's numbers "
        "(logging.DEBUG = 10 to logging.CRITICAL = 50)"
    )
    if isinstance(level, str) and level.lower() in _LEVELS:
        return _LEVELS[level.lower()]
    whole = isinstance(level, numbers.Integral) and not isinstance(level, bool)
    if whole and int(level) in _LEVELS.values():  # type: ignore[arg-type]
        return int(level)  # type: ignore[arg-type]
    hint = ""
    if whole and 0 <= int(level) <= 4:  # type: ignore[arg-type]
        # scanpy's sc.settings.verbosity counts 0 (errors) to 4 (debug): not logging's scale
        hint = (
            " (scanpy's verbosity scale, 0 = errors to 4 = debug, is not logging's: for "
            "scanpy's 1, warnings, use 'warning')"
        )
    raise ValueError(f"settings.verbosity cannot be {level!r}{hint}; {allowed}.")


def _check_seed(value: object) -> None:
    _checks.seed(
        "settings.seed",
        value,
        why=" (numpy's global generator takes no more)",
        hint=" Setting it seeds torch's, numpy's and random's global generators; pass seed= "
        "to a call, or set another number here, for different draws.",
    )


settings = Settings()
