"""The training loop's pieces: KL warm-up, data split, divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scvae.data.loader import DeviceCSR
from scvae.module import VAE, Covariates, ModuleConfig
from scvae.train import TrainConfig, TrainingDiverged, fit, kl_weight, split_indices


def test_kl_warmup_is_linear_then_one():
    assert [kl_weight(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_weight(0, None) == 1.0


def test_split_sizes_and_disjoint():
    tr, va = split_indices(101, 0.9, None, seed=1)
    assert len(tr) == 91 and len(va) == 10
    assert not set(tr) & set(va)
    tr2, va2 = split_indices(101, 0.5, 0.2, seed=1)
    assert len(tr2) == 51 and len(va2) == 20
    with pytest.raises(ValueError, match="train_size"):
        split_indices(10, 0.0, None, seed=0)
    with pytest.raises(ValueError, match="at most 1"):
        split_indices(10, 0.8, 0.5, seed=0)


def test_divergence_is_caught_and_weights_restored():
    x = np.random.default_rng(0).poisson(5.0, (64, 10)).astype("float32") + 1
    module = VAE(ModuleConfig(n_input=10))
    codes = torch.zeros(64, dtype=torch.long)
    cfg = TrainConfig(max_epochs=3, progress_bar=False)
    fit(module, DeviceCSR(x, "cpu"), codes, Covariates(), np.arange(64), np.array([], int), cfg)
    good = {k: v.clone() for k, v in module.state_dict().items()}
    x[10, 3] = np.inf  # one bad value reaching the loop makes the loss NaN
    with pytest.raises(TrainingDiverged, match="NaN or infinite in epoch 0"):
        fit(module, DeviceCSR(x, "cpu"), codes, Covariates(), np.arange(64), np.array([], int), cfg)
    for k, v in module.state_dict().items():
        assert torch.equal(v, good[k]), k
