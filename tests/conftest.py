"""Shared fixtures: small simulated data and one trained model per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import scvae

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _quiet():
    scvae.settings.progress_bar = False


@pytest.fixture(autouse=True)
def _scvae_logs_in_caplog(caplog):
    """The ``scvae`` logger does not propagate to the root logger, where pytest's ``caplog``
    listens: its handler is added to the ``scvae`` logger for each test instead."""
    log = logging.getLogger("scvae")
    log.addHandler(caplog.handler)
    yield
    log.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def sim():
    """1,200 cells x 150 genes, 3 cell types, 2 batches."""
    return scvae.data.simulate(1200, 150, n_cell_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="session")
def trained(sim):
    """A default model trained briefly on ``sim`` (do not mutate it in tests)."""
    scvae.settings.progress_bar = False
    model = scvae.SCVAE(sim.copy(), batch_key="batch")
    model.train(max_epochs=40, seed=0)
    return model


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test when the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path
