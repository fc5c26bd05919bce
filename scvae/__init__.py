"""scvae: single-cell variational inference (scVI's model) with a scanpy-style API.

The public face only: everything is defined in the submodules and re-exported here.

Examples
--------
>>> import scvae
>>> adata = scvae.data.simulate(200, 50, seed=0)
>>> model = scvae.SCVAE(adata)
"""

from __future__ import annotations

__version__ = "0.1.0"

from scvae import data, pl, tl
from scvae._settings import settings
from scvae.checkpoint import CheckpointError
from scvae.data import datasets
from scvae.integration import integration_scores
from scvae.io import ModelFileError
from scvae.label_transfer import transfer_labels
from scvae.ldvae import LDVAE
from scvae.model import LATENT_KEY, SCVAE
from scvae.train import TrainingDiverged

__all__ = [
    "CheckpointError",
    "LATENT_KEY",
    "LDVAE",
    "ModelFileError",
    "SCVAE",
    "TrainingDiverged",
    "__version__",
    "data",
    "datasets",
    "integration_scores",
    "pl",
    "settings",
    "tl",
    "transfer_labels",
]
