"""The speed options of the training step: fused Adam, bf16 autocast, torch.compile + fallback."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import scvae
from scvae.module import VAE, Covariates, ModuleConfig
from scvae.train import TrainConfig
from scvae.train_step import StepRunner, make_optimizer


def _batch(n: int = 64, g: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n, g)) * (rng.random((n, g)) > 0.5)
    return torch.as_tensor(x, dtype=torch.float32), torch.zeros(n, dtype=torch.long)


def _non_zeros(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row, gene = x.nonzero(as_tuple=True)
    return row, gene, x[row, gene]


def _steps(
    module: VAE, opt: torch.optim.Optimizer, run, n: int = 5, *, give_non_zeros: bool = False
) -> list[float]:
    losses = []
    for i in range(n):
        x, b = _batch(seed=i)
        torch.manual_seed(i)  # the same reparameterisation noise for both runs
        nonzero = _non_zeros(x) if give_non_zeros else None
        out = run(x, b, Covariates(), kl_weight=0.5, nonzero=nonzero)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def test_fused_adam_matches_reference_adam():
    torch.manual_seed(0)
    a = VAE(ModuleConfig(n_input=50))
    b = copy.deepcopy(a)
    fused = make_optimizer(a.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-6)
    assert fused.defaults["fused"]
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-6, foreach=False)
    la = _steps(a, fused, StepRunner(a, torch.device("cpu"), "32", compile=False))
    lb = _steps(b, plain, StepRunner(b, torch.device("cpu"), "32", compile=False))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_bf16_matmuls_keep_the_likelihood_in_float32():
    torch.manual_seed(0)
    module = VAE(ModuleConfig(n_input=50))
    x, b = _batch()
    run32 = StepRunner(module, torch.device("cpu"), "32", compile=False)
    run16 = StepRunner(module, torch.device("cpu"), "bf16-mixed", compile=False)
    module.eval()  # no dropout: the two passes differ only by precision
    torch.manual_seed(1)
    full = run32(x, b, Covariates(), kl_weight=1.0)
    torch.manual_seed(1)
    half = run16(x, b, Covariates(), kl_weight=1.0)
    for out in (full, half):
        assert out.loss.dtype == out.reconstruction_loss.dtype == out.kl_z.dtype == torch.float32
    # bf16 has 8 mantissa bits: the per-cell loss moves by well under 1 %, but does move
    np.testing.assert_allclose(
        half.reconstruction_loss.detach(), full.reconstruction_loss.detach(), rtol=1e-2
    )
    assert not torch.equal(half.reconstruction_loss, full.reconstruction_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = module.generative(torch.zeros(3, 10), torch.zeros(3, 1), torch.zeros(3).long())
    assert gen["mu"].dtype == gen["theta"].dtype == gen["zi_logits"].dtype == torch.float32


def test_bf16_training_learns():
    adata = scvae.data.simulate(300, 60, seed=0)
    model = scvae.SCVAE(adata)
    model.train(max_epochs=15, precision="bf16-mixed", progress_bar=False, n_epochs_kl_warmup=5)
    elbo = model.history["elbo_train"].to_numpy()
    assert np.isfinite(elbo).all() and elbo[-1] < elbo[0] - 5
    assert model.get_latent_representation().dtype == np.float32


def test_speed_options_are_checked():
    with pytest.raises(ValueError, match="precision must be one of '32', 'bf16-mixed'"):
        TrainConfig(max_epochs=1, precision="16")
    with pytest.raises(ValueError, match="compile must be True or False"):
        TrainConfig(max_epochs=1, compile="yes")
    model = scvae.SCVAE(scvae.data.simulate(50, 20, seed=0))
    with pytest.raises(ValueError, match="precision"):
        model.train(max_epochs=1, precision="bf16", progress_bar=False)
    assert not model.is_trained


@pytest.mark.parametrize(
    ("options", "give_non_zeros"),
    [
        ({}, False),
        ({"use_observed_lib_size": False, "n_batch": 2}, False),
        ({"gene_likelihood": "nb"}, False),
        ({}, True),
    ],
    ids=["default", "latent-library", "nb", "non-zeros-given"],
)
def test_training_step_compiles_as_one_graph(options, give_non_zeros):
    # a graph break (torch.distributions' KL look-up split the step in three) leaves pieces
    # that inductor cannot fuse across, each a trip through Python forward and backward
    torch._dynamo.reset()
    torch.distributions.kl._KL_MEMOIZE.clear()  # the look-up broke the graph on a cache miss
    module = VAE(ModuleConfig(n_input=50, **options))
    x, b = _batch()
    nonzero = _non_zeros(x) if give_non_zeros else None
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(module)(
            x, b, Covariates(), kl_weight=torch.tensor(0.5), nonzero=nonzero
        )
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_step_gives_the_eager_results(monkeypatch):
    # inductor draws its own random numbers; with fallback_random it uses eager's generator, so
    # the same seed gives the same noise and the results can be compared step by step
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    a = VAE(ModuleConfig(n_input=50))
    b = copy.deepcopy(a)
    opt_a = make_optimizer(a.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-6)
    opt_b = make_optimizer(b.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-6)
    eager = _steps(a, opt_a, StepRunner(a, torch.device("cpu"), "32", compile=False))
    compiled_run = StepRunner(b, torch.device("cpu"), "32", compile=True)
    # the compiled run is given the non-zeros (as training from a count source does; their
    # number changes with each minibatch), the eager one finds them itself
    compiled = _steps(b, opt_b, compiled_run, give_non_zeros=True)
    assert compiled_run.compiled  # it really ran compiled (no silent fallback)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    # a real failure: no working C++ compiler for inductor's CPU kernels
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    a = VAE(ModuleConfig(n_input=50))
    b = copy.deepcopy(a)
    run = StepRunner(b, torch.device("cpu"), "32", compile=True)
    with caplog.at_level("WARNING", logger="scvae"):
        got = _steps(b, make_optimizer(b.parameters(), lr=1e-2, eps=0.01, weight_decay=0), run)
    assert not run.compiled and "torch.compile failed" in caplog.text
    ref_run = StepRunner(a, torch.device("cpu"), "32", compile=False)
    ref = _steps(a, make_optimizer(a.parameters(), lr=1e-2, eps=0.01, weight_decay=0), ref_run)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    torch._dynamo.reset()
