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
from scvae.data import datasets
from scvae.integration import integration_scores
from scvae.label_transfer import transfer_labels
from scvae.ldvae import LDVAE
from scvae.model import LATENT_KEY, SCVAE

__all__ = [
    "LATENT_KEY",
    "LDVAE",
    "SCVAE",
    "__version__",
    "data",
    "datasets",
    "integration_scores",
    "pl",
    "settings",
    "tl",
    "transfer_labels",
]
