"""Global settings: ``scvae.settings`` (seed, verbosity, progress bars)."""

from __future__ import annotations

import logging
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
