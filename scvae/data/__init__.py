"""Data: reading files (``read``), the registry (what in an AnnData is what: ``register``,
``get_counts``), simulation, binomial thinning and bundled datasets. The count sources that
training reads (``loader``, ``backed``) are internal modules of this package."""

from __future__ import annotations

from scvae.data import datasets
from scvae.data.read import DataFileError, read
from scvae.data.registry import Registry, RegistryError, get_counts, register
from scvae.data.simulate import simulate
from scvae.data.thinning import binomial_thinning

__all__ = [
    "binomial_thinning",
    "DataFileError",
    "datasets",
    "Registry",
    "RegistryError",
    "get_counts",
    "read",
    "register",
    "simulate",
]
