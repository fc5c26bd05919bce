"""Data: the registry (what in an AnnData is what), device-resident loaders, simulation,
bundled datasets."""

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
