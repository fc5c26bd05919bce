"""Data: the registry (what in an AnnData is what), device-resident loaders, simulation,
bundled datasets."""

from __future__ import annotations

from scvae.data import datasets
from scvae.data.registry import Registry, RegistryError, get_counts, register
from scvae.data.simulate import simulate

__all__ = ["datasets", "Registry", "RegistryError", "get_counts", "register", "simulate"]
