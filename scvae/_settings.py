"""Global settings: ``scvae.settings`` (seed, verbosity, progress bars)."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

logger = logging.getLogger("scvae")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s scvae: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


@dataclass
class Settings:
    """Package-wide settings, in the spirit of ``scvi.settings`` and ``sc.settings``.

    Attributes
    ----------
    seed
        Default random seed for training and sampling when a call gets ``seed=None``
        (scvi-tools' default is 0 too).
    progress_bar
        Show tqdm progress bars during training.
    inference_batch_size
        Cells per chunk in queries (latent, expression, ELBO, marginal likelihood) when a
        query gets ``batch_size=None``.

    Examples
    --------
    >>> import scvae
    >>> scvae.settings.seed = 1
    >>> scvae.settings.verbosity = "warning"
    >>> scvae.settings.seed, scvae.settings.verbosity
    (1, 'warning')
    >>> scvae.settings.seed, scvae.settings.verbosity = 0, "info"  # the defaults again
    """

    seed: int = 0
    progress_bar: bool = True
    inference_batch_size: int = 1024

    def __setattr__(self, name: str, value: object) -> None:
        # checked when set, so that a bad value names itself here, not deep inside a run
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if name == "seed" and not (whole and value >= 0):
            raise ValueError(
                f"settings.seed must be a whole number >= 0, got {value!r}. scvae seeds every "
                "run (the same seed gives the same model); pass seed= to a call, or set another "
                "number here, for different draws."
            )
        if name == "progress_bar" and not isinstance(value, bool):
            raise ValueError(f"settings.progress_bar must be True or False, got {value!r}.")
        if name == "inference_batch_size" and not (whole and value >= 1):
            raise ValueError(
                f"settings.inference_batch_size must be a whole number >= 1, got {value!r}."
            )
        super().__setattr__(name, value)

    @property
    def verbosity(self) -> str:
        """Logging level of the ``scvae`` logger ("debug", "info", "warning", "error")."""
        return logging.getLevelName(logger.level).lower()

    @verbosity.setter
    def verbosity(self, level: str | int) -> None:
        if isinstance(level, str):
            name = level.upper()
            if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ValueError(
                    f"verbosity {level!r} is not a level; use 'debug', 'info', 'warning' "
                    "or 'error'."
                )
            level = getattr(logging, name)
        logger.setLevel(level)


settings = Settings()
