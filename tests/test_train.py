"""The training loop's pieces: KL warm-up, data split, divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import scvae
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
    with pytest.raises(ValueError, match=r"validation_size must be a number in \[0, 1\), got -0.1"):
        split_indices(10, 0.8, -0.1, seed=0)
    # every cell in one of the two sets, whatever the float type (scvi-tools: the rest)
    for size in (np.float32(0.8), 0.7, 0.9, np.float64(0.85)):
        for n in (10, 300, 2638):
            tr, va = split_indices(n, size, None, seed=0)
            assert len(tr) + len(va) == n and len(tr) == int(np.ceil(size * n))


def test_training_leaves_the_callers_random_state_as_it_was():
    import scvae

    adata = scvae.data.simulate(100, 20, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    scvae.SCVAE(adata, n_hidden=8).train(max_epochs=1, progress_bar=False, seed=5)
    assert torch.equal(torch.rand(3), expected)


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


def first_epoch_order(n: int, seed: int) -> list[int]:
    """The minibatch order of epoch 0 (fit shuffles with a CPU generator seeded by seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_divergence_is_caught_at_its_step_with_last_good_weights_kept():
    x = np.random.default_rng(0).poisson(5.0, (64, 10)).astype("float32") + 1
    bad_cell = first_epoch_order(64, seed=0)[8 * 2 + 3]  # a cell of step 2 (batches of 8)
    x[bad_cell, 4] = np.nan
    module = VAE(ModuleConfig(n_input=10))
    after_step = []

    def snapshot(optimizer, args, kwargs):
        after_step.append({k: v.clone() for k, v in module.state_dict().items()})

    hook = register_optimizer_step_post_hook(snapshot)
    cfg = TrainConfig(max_epochs=3, batch_size=8, progress_bar=False)
    try:
        with pytest.raises(TrainingDiverged, match=r"epoch 0, step 2.*1 NaN or infinite") as err:
            fit(module, DeviceCSR(x, "cpu"), torch.zeros(64, dtype=torch.long), Covariates(),
                np.arange(64), np.array([], int), cfg)  # fmt: skip
    finally:
        hook.remove()
    assert (err.value.epoch, err.value.step, err.value.steps_applied) == (0, 2, 2)
    assert len(after_step) == 2  # steps 0 and 1 were applied, step 2 was not
    for k, v in module.state_dict().items():  # weights AND batch-norm statistics of step 1
        assert torch.equal(v, after_step[-1][k]), k
        assert torch.isfinite(v.float()).all(), k


def test_divergence_from_a_high_learning_rate_names_it(sim):
    import scvae

    model = scvae.SCVAE(sim[:300].copy())
    with pytest.raises(
        TrainingDiverged, match=r"learning rate too high.*lr=1e\+06.*try lr=100000"
    ) as err:
        model.train(max_epochs=20, lr=1e6, n_epochs_kl_warmup=None, device="cpu")
    # the model keeps the last good step (finite weights, trained, history of finished
    # epochs), or, when those give non-finite values in evaluation, the weights before the call
    restored = "weights from before this train() call were restored" in str(err.value)
    assert model.is_trained != restored
    for k, v in model.module.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
    assert list(model.history.index) == list(range(len(model.history)))
    assert np.isfinite(model.get_elbo())


def test_divergence_before_any_step_leaves_model_untouched():
    import scvae

    model = scvae.SCVAE(scvae.data.simulate(60, 10, seed=0))
    with torch.no_grad():  # weights that make the very first loss non-finite
        model.module.z_encoder.mean_encoder.bias.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="epoch 0, step 0"):
        model.train(max_epochs=2, device="cpu")
    assert not model.is_trained and model.history.empty
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("lr", [10.0, 0.3])
def test_the_model_left_by_a_divergence_gives_finite_answers(lr):
    import scvae

    model = scvae.SCVAE(scvae.data.simulate(300, 50, seed=1))
    with pytest.raises(TrainingDiverged):
        model.train(max_epochs=10, lr=lr, device="cpu")
    assert np.isfinite(model.get_elbo())
    assert np.isfinite(model.get_normalized_expression(n_samples=2).to_numpy()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_a_bad_gradient_and_leaves_the_gradients_alone(bad):
    from scvae.train import _all_finite

    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(4))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.5 + i)
    before = [p.grad.clone() for p in params]
    assert _all_finite(torch.tensor(1.0), params)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    assert not _all_finite(torch.tensor(bad), params)
    params[1].grad[2] = bad
    assert not _all_finite(torch.tensor(1.0), params)


@pytest.mark.parametrize(("batch_size", "steps", "cells"), [(2, 5, 10), (3, 3, 9), (128, 1, 11)])
def test_every_full_minibatch_is_trained_even_below_the_last_batch_minimum(
    batch_size, steps, cells
):
    """batch_size 2 once trained a single step per epoch: a full minibatch of 2 cells is below
    the minimum of a *last, partial* minibatch (3), and every one after the first was cut."""
    import scvae

    adata = scvae.data.simulate(11, 10, seed=0)
    model = scvae.SCVAE(adata, n_hidden=8, n_latent=2)
    seen: list[int] = []
    model.module.register_forward_hook(
        lambda mod, args, out: seen.append(len(args[0])) if mod.training else None
    )
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False)
    # 11 cells: every full minibatch, and a partial last one only with 3 cells or more
    assert (len(seen), sum(seen)) == (steps, cells)


def test_a_later_call_that_splits_anew_warns():
    import warnings

    import scvae

    model = scvae.SCVAE(scvae.data.simulate(100, 12, seed=0), n_hidden=8, n_latent=2)
    model.train(max_epochs=1, seed=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same split again: no warning
        model.train(max_epochs=1, seed=0, device="cpu")
    held_out = np.setdiff1d(np.arange(100), model.train_indices)
    with pytest.warns(UserWarning, match=r"split the cells anew.*held out by the earlier"):
        model.train(max_epochs=1, seed=5, device="cpu")
    assert np.intersect1d(held_out, model.train_indices).size > 0
    with pytest.warns(UserWarning, match=r"trained on before are validation cells now"):
        model.train(max_epochs=1, seed=0, train_size=0.5, device="cpu")
    assert len(model.history) == 4


@pytest.mark.parametrize("name", [32, "32-true"])
def test_lightning_names_of_float32(name):
    import scvae

    model = scvae.SCVAE(scvae.data.simulate(60, 10, seed=0), n_hidden=8, n_latent=2)
    model.train(max_epochs=1, precision=name, device="cpu")
    assert model.train_config["precision"] == "32"


def _stop_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C at the given training step (counted over the call)."""
    calls = {"n": 0}
    check = scvae.train._all_finite

    def interrupting(loss, params):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return check(loss, params)

    monkeypatch.setattr(scvae.train, "_all_finite", interrupting)


def test_ctrl_c_keeps_the_epochs_done_as_scvi_tools(monkeypatch, tmp_path):
    adata = scvae.data.simulate(300, 20, seed=0)
    done = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    done.train(max_epochs=2, progress_bar=False)
    steps = len(done.train_indices) // 128 + 1  # per epoch
    stopped = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    _stop_at_step(monkeypatch, 2 * steps + 1)  # in the third epoch
    with pytest.warns(UserWarning, match=r"after 2 epoch\(s\)"), pytest.raises(KeyboardInterrupt):
        stopped.train(max_epochs=10, progress_bar=False)
    assert stopped.is_trained and list(stopped.history.index) == [0, 1]
    for name, value in done.module.state_dict().items():  # the weights of epoch 2, exactly
        assert torch.equal(value, stopped.module.state_dict()[name]), name
    # in the first epoch, or with a checkpoint to resume from: as before the call
    for kwargs in ({}, {"checkpoint_dir": tmp_path / "ck"}):
        fresh = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
        before = {k: v.clone() for k, v in fresh.module.state_dict().items()}
        _stop_at_step(monkeypatch, 2 if not kwargs else 2 * steps + 1)
        with pytest.raises(KeyboardInterrupt):
            fresh.train(max_epochs=10, progress_bar=False, **kwargs)
        assert not fresh.is_trained
        assert all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in before.items())


def test_the_progress_bar_closes_on_any_error_and_shows_each_epochs_values(monkeypatch):
    import tqdm as tqdm_module

    import scvae.train as train_module

    shown = []

    class Recording(tqdm_module.tqdm):
        def update(self, n=1):
            shown.append(self.postfix or "")  # what the bar draws at this update
            return super().update(n)

    monkeypatch.setattr(train_module, "tqdm", Recording)
    monkeypatch.setattr(scvae.settings, "progress_bar", True)
    adata = scvae.data.simulate(150, 20, seed=0)
    model = scvae.SCVAE(adata)
    model.train(max_epochs=3, seed=0)
    elbo = [f"{v:.1f}" for v in model.history["elbo_train"]]
    # the bar's figures lagged an epoch: the postfix was set after the update had drawn it
    assert [f"elbo_train={e}" in s for s, e in zip(shown, elbo, strict=True)] == [True] * 3

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "evaluate", broken)  # an ordinary error mid-run
    before = len(tqdm_module.tqdm._instances)
    with pytest.raises(OSError, match="disk full") as info:
        model.train(max_epochs=2, seed=0)
    # a bar left open stays in tqdm's list while the traceback is kept (as IPython keeps it),
    # and the next bar is drawn a line lower
    assert info.traceback and len(tqdm_module.tqdm._instances) == before
