"""Tests for scvae.distributions against float64 scipy references.

Tolerances (float32 implementation vs float64 reference), as stated in the
module docstring: ``|error| <= 5e-7 * (1 + M)`` where ``M`` is the sum of the
magnitudes of the terms of the log-likelihood (see ``_nb_terms``). The terms
are rounded to float32 (2**-24 ~ 6e-8) before they cancel, so a few ulps of
``M`` is the best a float32 evaluation can do; the worst error measured over
200k random points is 2.1e-7 * (1 + M).

The NB reference is the scipy.special float64 formula written with log1p.
scipy.stats.nbinom itself takes ``p = theta / (theta + mu)``, which rounds
``1 - p`` when ``mu << theta`` or ``theta << mu`` (e.g. 1e-3 relative error
at ``mu / theta = 1e-13``); ``test_reference_matches_scipy_stats`` checks the
two agree wherever that parameterization is well-conditioned.
"""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import digamma, expit, gammaln, log_expit

import scvae.distributions as distributions_module
from scvae.distributions import (
    Bernoulli,
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_bernoulli,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    nb_log_prob_rows,
)

RTOL_M = 5e-7  # error bound relative to 1 + M (a few float32 ulps of M)

X_GRID = [0.0, 1.0, 2.0, 10.0, 100.0, 1e3, 1e5]
THETA_GRID = [1e-4, 1e-2, 1.0, 9.99, 10.0, 10.01, 1e3, 1e5, 1e6]
MU_GRID = [1e-8, 1e-6, 1e-3, 1.0, 10.0, 1e3, 1e5]
LOGIT_GRID = [-100.0, -30.0, -3.0, 0.0, 3.0, 30.0, 100.0]


def f32(a) -> np.ndarray:
    """Round to float32 and back, so the reference sees the same inputs."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def t32(a, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=requires_grad)


def _nb_terms(x, mu, theta):
    """Float64 terms of log NB, and their magnitude sum M."""
    a = gammaln(x + theta) - gammaln(theta)
    b = gammaln(x + 1)
    c = theta * np.log1p(mu / theta)
    d = x * np.log1p(theta / mu)
    return a - b - c - d, np.abs(a) + b + c + d


def nb_ref(x, mu, theta):
    return _nb_terms(x, mu, theta)[0]


def zinb_ref(x, mu, theta, logits):
    """ZINB by hand from the NB: pi + (1 - pi) NB(0) at zero, (1 - pi) NB(x) else."""
    pi, one_minus_pi = expit(logits), expit(-logits)
    log_nb = nb_ref(x, mu, theta)
    with np.errstate(divide="ignore"):
        at_zero = np.log(pi + one_minus_pi * np.exp(log_nb))
    return np.where(x == 0, at_zero, np.log(one_minus_pi) + log_nb)


def assert_close_m(out: torch.Tensor, ref: np.ndarray, m: np.ndarray) -> None:
    out = out.detach().double().numpy()
    assert np.all(np.isfinite(out))
    err = np.abs(out - ref)
    bound = RTOL_M * (1 + m)
    worst = np.argmax(err / bound)
    assert np.all(err <= bound), (
        f"error {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g} at index {worst}"
    )


def grid(*axes):
    cols = np.array(list(itertools.product(*axes)), dtype=np.float64).T
    return [f32(c) for c in cols]


# --------------------------------------------------------------------- grids


def test_reference_matches_scipy_stats():
    x, mu, theta = grid(X_GRID, MU_GRID, THETA_GRID)
    ref, m = _nb_terms(x, mu, theta)
    scipy_ref = scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    ok = np.minimum(mu, theta) / (mu + theta) > 1e-6
    assert ok.sum() > 200
    assert np.all(np.abs(scipy_ref[ok] - ref[ok]) <= 1e-10 * (1 + m[ok]))


def test_nb_grid_matches_reference():
    x, mu, theta = grid(X_GRID, MU_GRID, THETA_GRID)
    ref, m = _nb_terms(x, mu, theta)
    out = log_nb_positive(t32(x), t32(mu), t32(theta))
    assert out.dtype == torch.float32
    assert_close_m(out, ref, m)


def test_nb_grid_gradients_match_analytic():
    x, mu, theta = grid(X_GRID, MU_GRID, THETA_GRID)
    tmu, ttheta = t32(mu, True), t32(theta, True)
    log_nb_positive(t32(x), tmu, ttheta).sum().backward()
    # d/dmu = theta (x - mu) / (mu (theta + mu)), computed as two terms
    d_mu = theta * (x - mu) / (mu * (theta + mu))
    scale_mu = theta / (theta + mu) + x * theta / (mu * (mu + theta))
    assert np.all(np.abs(tmu.grad.double().numpy() - d_mu) <= 1e-6 * scale_mu)
    # d/dtheta = psi(x + theta) - psi(theta) - log1p(mu / theta) + (mu - x) / (theta + mu)
    dpsi = digamma(x + theta) - digamma(theta)
    d_theta = dpsi - np.log1p(mu / theta) + (mu - x) / (theta + mu)
    scale_theta = np.abs(dpsi) + np.log1p(mu / theta) + np.abs(mu - x) / (theta + mu)
    assert np.all(np.abs(ttheta.grad.double().numpy() - d_theta) <= 5e-6 * scale_theta)


def test_lgamma_diff_accuracy():
    """lgamma(x + theta) - lgamma(theta) to a few float32 ulps of its terms (measured 1.8)."""
    x, theta = grid(X_GRID + [3.0, 30.0, 1e4], THETA_GRID + [0.1, 5.0, 11.0, 20.0, 100.0])
    ref = gammaln(x + theta) - gammaln(theta)
    out = distributions_module._lgamma_diff(t32(x), t32(theta)).double().numpy()
    stirling_terms = theta * np.log1p(x / theta) + x * np.log(x + theta) + x
    direct_terms = np.abs(gammaln(x + theta)) + np.abs(gammaln(theta))
    scale = np.where(theta >= 10, stirling_terms, direct_terms)
    assert np.all(np.abs(out - ref) <= 4 * 2.0**-24 * (1 + scale))
    # in float64 the Stirling branch shows its truncation error, < 1 / (1260 theta**5)
    out64 = distributions_module._lgamma_diff(torch.tensor(x), torch.tensor(theta)).numpy()
    assert np.all(np.abs(out64 - ref) <= 1e-8 + 1e-14 * scale)


def test_lgamma_diff_gradient_is_the_digamma_difference():
    """The written-out theta-gradient against scipy's float64 digamma, in float32 and on both
    sides of the Stirling threshold; plain autograd through torch.lgamma is far off there."""
    x, theta = grid(X_GRID + [3.0, 30.0, 1e4], THETA_GRID + [0.1, 5.0, 9.99, 10.0, 20.0, 1e5])
    ref = digamma(x + theta) - digamma(theta)
    t = t32(theta, True)
    distributions_module._lgamma_diff(t32(x), t).sum().backward()
    got = t.grad.double().numpy()
    assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref) + 1e-7)
    # the vectorised digamma itself
    y = np.logspace(-6, 6, 500)
    fast = distributions_module._digamma(torch.tensor(y)).numpy()
    assert np.all(np.abs(fast - digamma(y)) <= 1e-8 * (1 + np.abs(digamma(y))))
    # counts are data: asking for their gradient is an error, not a silent zero
    with pytest.raises(ValueError, match="counts"):
        distributions_module._lgamma_diff(t32([1.0], True), t32([2.0]))


@pytest.mark.parametrize("eps", [1e-8, 1e-30])
def test_tiny_theta_finite(eps):
    """theta far below 1e-4, down to the eps floor: finite values and gradients.

    With eps = 1e-30 the (unselected) Stirling branch would overflow at theta =
    1e-15 unless its input is clamped.
    """
    thetas = [0.0, 1e-15, 1e-8, 1e-6]
    x, mu, theta = grid([0.0, 1.0, 5.0, 1e3], [1e-8, 1.0, 1e5], thetas)
    tmu, ttheta = t32(mu, True), t32(theta, True)
    out = log_nb_positive(t32(x), tmu, ttheta, eps=eps)
    out.sum().backward()
    for v in (out, tmu.grad, ttheta.grad):
        assert torch.isfinite(v).all()
    ref, m = _nb_terms(x, np.maximum(mu, f32(eps)), np.maximum(theta, f32(eps)))
    assert_close_m(out, ref, m)


def test_zinb_grid_matches_reference():
    x, mu, theta, logits = grid(X_GRID, MU_GRID, THETA_GRID, LOGIT_GRID)
    ref = zinb_ref(x, mu, theta, logits)
    m = _nb_terms(x, mu, theta)[1] + np.abs(logits)
    assert_close_m(log_zinb_positive(t32(x), t32(mu), t32(theta), t32(logits)), ref, m)


def test_poisson_grid_matches_scipy():
    x, rate = grid(X_GRID, MU_GRID)
    ref = scipy.stats.poisson.logpmf(x, rate)
    m = gammaln(x + 1) + rate + x * np.abs(np.log(rate))
    assert_close_m(log_poisson(t32(x), t32(rate)), ref, m)
    # x = 0, rate = 0 is a point mass at 0
    assert log_poisson(torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_bernoulli_grid_matches_scipy():
    x, logits = grid([0.0, 1.0], LOGIT_GRID + [-1e4, -15.0, 15.0, 20.5, 1e4])
    ref = x * log_expit(logits) + (1 - x) * log_expit(-logits)
    out = log_bernoulli(t32(x), t32(logits)).double().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-30)
    moderate = np.abs(logits) <= 15
    np.testing.assert_allclose(
        ref[moderate],
        scipy.stats.bernoulli.logpmf(x[moderate], expit(logits[moderate])),
        rtol=1e-9,
    )
    # equals -BCE with logits, also for fractional targets
    xs = torch.linspace(0, 1, 11)[:, None]
    ls = torch.linspace(-20, 20, 9)[None, :]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        ls.expand(11, 9), xs.expand(11, 9), reduction="none"
    )
    torch.testing.assert_close(log_bernoulli(xs, ls), -bce, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- properties

counts = st.one_of(
    st.just(0.0),
    st.integers(0, 20).map(float),
    st.floats(0, 5).map(lambda e: float(np.floor(10.0**e))),
)
mus = st.floats(-8, 5).map(lambda e: 10.0**e)
thetas = st.floats(-4, 6).map(lambda e: 10.0**e)
logits = st.floats(-100, 100)


@settings(max_examples=300, deadline=None)
@given(x=counts, mu=mus, theta=thetas, zi=logits)
def test_nb_zinb_property(x, mu, theta, zi):
    x, mu, theta, zi = (f32([v]) for v in (x, mu, theta, zi))
    ref, m = _nb_terms(x, mu, theta)
    tmu, ttheta, tzi = t32(mu, True), t32(theta, True), t32(zi, True)

    nb = log_nb_positive(t32(x), tmu, ttheta)
    assert_close_m(nb, ref, m)
    assert nb.item() <= RTOL_M * (1 + m.item())  # log p <= 0 up to rounding

    zinb = log_zinb_positive(t32(x), tmu, ttheta, tzi)
    m_zinb = m + np.abs(zi)
    assert_close_m(zinb, zinb_ref(x, mu, theta, zi), m_zinb)
    assert zinb.item() <= RTOL_M * (1 + m_zinb.item())

    (nb + zinb).sum().backward()
    for p in (tmu, ttheta, tzi):
        assert torch.isfinite(p.grad).all()


@settings(max_examples=200, deadline=None)
@given(x=counts, rate=mus)
def test_poisson_property(x, rate):
    x, rate = f32([x]), f32([rate])
    trate = t32(rate, True)
    out = log_poisson(t32(x), trate)
    m = gammaln(x + 1) + rate + x * np.abs(np.log(rate))
    assert_close_m(out, scipy.stats.poisson.logpmf(x, rate), m)
    assert out.item() <= RTOL_M * (1 + m.item())
    out.sum().backward()
    assert torch.isfinite(trate.grad).all()


@settings(max_examples=200, deadline=None)
@given(x=st.sampled_from([0.0, 1.0]), logit=st.floats(-1e4, 1e4))
def test_bernoulli_property(x, logit):
    tl = t32([logit], True)
    out = log_bernoulli(torch.tensor([x]), tl)
    logit = f32(logit)
    ref = x * log_expit(logit) + (1 - x) * log_expit(-logit)
    np.testing.assert_allclose(out.item(), ref, rtol=1e-6, atol=1e-30)
    assert out.item() <= 0
    out.sum().backward()
    assert torch.isfinite(tl.grad).all()


# ---------------------------------------------------------- specific claims


@pytest.mark.parametrize(
    ("mu", "theta", "n_max", "tol"),
    [
        (5.0, 0.5, 2000, 1e-6),
        (0.1, 1e6, 100, 1e-6),
        (30.0, 0.05, 200_000, 1e-6),  # heavy tail: P(x >= 2e5) ~ 1e-15
        (1e3, 1.0, 20_000, 1e-6),
        (100.0, 10.0, 2000, 2e-5),
        # log p(x) near x = 1e3 is only good to ~1e-4 in float32 (M ~ 1e4);
        # the float32 Poisson(1e3) sums to 1 + 9e-5 as well
        (1e3, 1e4, 5000, 3e-4),
    ],
)
def test_nb_and_zinb_normalize(mu, theta, n_max, tol):
    x = torch.arange(n_max, dtype=torch.float32)
    mu_t, theta_t = torch.tensor(mu), torch.tensor(theta)
    total = log_nb_positive(x, mu_t, theta_t).double().exp().sum().item()
    assert abs(total - 1) < tol
    total_zinb = log_zinb_positive(x, mu_t, theta_t, torch.tensor(1.5)).double().exp().sum()
    assert abs(total_zinb.item() - 1) < tol


def test_nb_approaches_poisson_for_large_theta():
    # a plain lgamma(x + theta) - lgamma(theta) is off by ~1 at theta = 1e6
    x, mu = grid([0.0, 1.0, 2.0, 5.0, 10.0, 30.0], [0.1, 1.0, 5.0, 10.0, 30.0])
    poisson = scipy.stats.poisson.logpmf(x, mu)
    for theta in [1e3, 1e4, 1e5, 1e6]:
        nb = log_nb_positive(t32(x), t32(mu), torch.tensor(theta)).double().numpy()
        exact_nb, m = _nb_terms(x, mu, theta)
        # the float32 NB is as close to the Poisson as the exact NB is
        assert np.all(np.abs(nb - poisson) <= np.abs(exact_nb - poisson) + RTOL_M * (1 + m))
    small = (x <= 10) & (mu <= 10)
    assert np.abs(nb - poisson)[small].max() < 1e-4  # exact gap is up to 5e-5
    out = log_nb_positive(t32(x), t32(mu), torch.tensor(1e6))
    torch.testing.assert_close(out, log_poisson(t32(x), t32(mu)), rtol=0, atol=5e-4)


@pytest.mark.parametrize("zi", [-100.0, -30.0, 30.0, 100.0])
def test_zinb_extreme_logits_finite(zi):
    x, mu, theta = grid([0.0, 1.0, 100.0], [1e-8, 1.0, 1e5], [1e-4, 1.0, 1e6])
    tmu, ttheta = t32(mu, True), t32(theta, True)
    tzi = torch.full(x.shape, zi, requires_grad=True)
    out = log_zinb_positive(t32(x), tmu, ttheta, tzi)
    out.sum().backward()
    for v in (out, tmu.grad, ttheta.grad, tzi.grad):
        assert torch.isfinite(v).all()
    m = _nb_terms(x, mu, theta)[1] + abs(zi)
    assert_close_m(out, zinb_ref(x, mu, theta, np.float64(zi)), m)
    # d/dlogit of log(1 - pi) is -pi for x > 0
    np.testing.assert_allclose(tzi.grad.numpy()[x > 0], -expit(zi), rtol=1e-6, atol=1e-30)


def test_zero_mean_and_eps():
    x = torch.tensor([0.0, 3.0])
    mu = torch.zeros(2, requires_grad=True)
    out = log_nb_positive(x, mu, torch.tensor(2.0))
    out.sum().backward()
    assert -1e-7 < out[0].item() <= 0.0
    assert torch.isfinite(out).all() and out[1].item() < -50
    assert torch.isfinite(mu.grad).all()


def test_broadcasting_dtype_and_batch_shape():
    x = torch.arange(3.0)[:, None]
    mu = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    theta = torch.tensor(2.0)
    zi = torch.zeros(1, 1)
    assert log_nb_positive(x, mu, theta).shape == (3, 4)
    assert log_zinb_positive(x, mu, theta, zi).shape == (3, 4)
    assert log_poisson(x, mu).shape == (3, 4)
    assert log_bernoulli(x.clamp_max(1), mu).shape == (3, 4)
    out64 = log_nb_positive(x.double(), mu.double(), theta.double())
    assert out64.dtype == torch.float64
    expected = nb_ref(x.double().numpy(), mu.double().numpy(), 2.0)
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-12)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, zi)
    assert zinb.batch_shape == (1, 4)
    assert zinb.sample((5,)).shape == (5, 1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    x, mu, theta, logits = grid(X_GRID, MU_GRID, THETA_GRID, [-100.0, -30.0, 0.0, 30.0])
    tmu, ttheta, tlogits = (t32(a).cuda().requires_grad_() for a in (mu, theta, logits))
    out = log_zinb_positive(t32(x).cuda(), tmu, ttheta, tlogits)
    assert out.is_cuda and out.dtype == torch.float32
    out.sum().backward()
    for p in (tmu, ttheta, tlogits):
        assert torch.isfinite(p.grad).all()
    m = _nb_terms(x, mu, theta)[1] + np.abs(logits)
    assert_close_m(out.cpu(), zinb_ref(x, mu, theta, logits), m)
    nb = NegativeBinomial(torch.tensor([5.0, 100.0]).cuda(), torch.tensor([0.5, 10.0]).cuda())
    a = nb.sample((100_000,), generator=torch.Generator("cuda").manual_seed(0))
    b = nb.sample((100_000,), generator=torch.Generator("cuda").manual_seed(0))
    assert a.is_cuda and torch.equal(a, b)
    assert torch.all((a.mean(0) - nb.mean).abs() <= 5 * (nb.variance / 100_000).sqrt())


# ------------------------------------------------------------------ classes


def test_class_log_probs_and_moments():
    mu, theta, zi = torch.tensor([2.0, 7.0]), torch.tensor([1.0, 0.5]), torch.tensor([0.0, -1.0])
    x = torch.tensor([3.0, 0.0])
    nb = NegativeBinomial(mu, theta)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, zi)
    torch.testing.assert_close(nb.log_prob(x), log_nb_positive(x, mu, theta))
    torch.testing.assert_close(zinb.log_prob(x), log_zinb_positive(x, mu, theta, zi))
    n, p = theta.numpy(), (theta / (theta + mu)).numpy()
    np.testing.assert_allclose(nb.mean, scipy.stats.nbinom.mean(n, p), rtol=1e-6)
    np.testing.assert_allclose(nb.variance, scipy.stats.nbinom.var(n, p), rtol=1e-6)
    pi = expit(zi.numpy())
    np.testing.assert_allclose(zinb.zi_probs, pi, rtol=1e-6)
    # ZINB moments from E[X] = (1 - pi) E[NB], E[X^2] = (1 - pi) E[NB^2]
    m1 = (1 - pi) * scipy.stats.nbinom.mean(n, p)
    m2 = (1 - pi) * scipy.stats.nbinom.moment(2, n, p)
    np.testing.assert_allclose(zinb.mean, m1, rtol=1e-6)
    np.testing.assert_allclose(zinb.variance, m2 - m1**2, rtol=1e-5)
    rate = torch.tensor([0.5, 4.0])
    assert Poisson(rate).mean is rate and Poisson(rate).variance is rate
    torch.testing.assert_close(Poisson(rate).log_prob(x), log_poisson(x, rate))
    b = Bernoulli(torch.tensor([-2.0, 1.0]))
    q = expit(np.array([-2.0, 1.0]))
    np.testing.assert_allclose(b.mean, q, rtol=1e-6)
    np.testing.assert_allclose(b.variance, q * (1 - q), rtol=1e-6)
    np.testing.assert_allclose(
        b.log_prob(torch.tensor([1.0, 0.0])), np.log([q[0], 1 - q[1]]), rtol=1e-6
    )


def _distributions():
    mu = torch.tensor([0.3, 5.0, 40.0, 1e3])
    theta = torch.tensor([2.0, 0.5, 10.0, 1e4])
    zi = torch.tensor([-1.0, 0.0, 1.0, -3.0])
    return [
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, zi),
        Poisson(mu),
        Bernoulli(zi),
    ]


@pytest.mark.parametrize("dist", _distributions(), ids=lambda d: type(d).__name__)
def test_sample_moments(dist):
    n = 200_000
    g = torch.Generator().manual_seed(0)
    s = dist.sample((n,), generator=g)
    assert s.shape == (n, 4) and s.dtype == torch.float32
    assert torch.equal(s, s.round()) and (s >= 0).all()
    mean, var = dist.mean, dist.variance
    # sample mean within 5 standard errors; sample variance within 6%
    assert torch.all((s.mean(0) - mean).abs() <= 5 * (var / n).sqrt())
    torch.testing.assert_close(s.var(0), var, rtol=0.06, atol=0)


def test_zinb_sample_zero_fraction():
    mu, theta, zi = torch.tensor([5.0]), torch.tensor([2.0]), torch.tensor([0.5])
    s = ZeroInflatedNegativeBinomial(mu, theta, zi).sample(
        (200_000,), torch.Generator().manual_seed(1)
    )
    p0 = log_zinb_positive(torch.zeros(1), mu, theta, zi).exp()
    assert abs((s == 0).float().mean().item() - p0.item()) < 5 * (p0 * (1 - p0) / 200_000).sqrt()


@pytest.mark.parametrize("dist", _distributions(), ids=lambda d: type(d).__name__)
def test_sample_reproducible(dist):
    torch.manual_seed(123)
    a = dist.sample((50,))
    torch.manual_seed(123)
    b = dist.sample((50,))
    c = dist.sample((50,))
    assert torch.equal(a, b) and not torch.equal(b, c)
    # an explicit generator is used instead of the global one
    torch.manual_seed(0)
    d = dist.sample((50,), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    e = dist.sample((50,), generator=torch.Generator().manual_seed(7))
    f = dist.sample((50,), generator=torch.Generator().manual_seed(8))
    assert torch.equal(d, e) and not torch.equal(e, f)


def test_docstring_examples():
    result = doctest.testmod(distributions_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


def test_public_api():
    assert set(distributions_module.__all__) == {
        "Bernoulli",
        "NegativeBinomial",
        "Poisson",
        "ZeroInflatedNegativeBinomial",
        "log_bernoulli",
        "log_nb_positive",
        "log_poisson",
        "log_zinb_positive",
        "nb_log_prob_rows",
    }


@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_sparse_row_sums_equal_dense_with_gradients(zero_inflated, theta_shape):
    """nb_log_prob_rows == log_*_positive(...).sum(-1), values and gradients (float32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((3, 64, 50), 0.4), generator=gen)
    x[0, 0, 0] = 1e4  # a large count takes the Stirling branch at large theta
    mu = (torch.rand(3, 64, 50, generator=gen) * 5 + 1e-3).requires_grad_()
    shape = (50,) if theta_shape == "gene" else (3, 64, 50)
    theta = (torch.rand(shape, generator=gen) * 1e3 + 1e-2).requires_grad_()
    zi = (torch.randn(3, 64, 50, generator=gen) * 3).requires_grad_()
    if zero_inflated:
        dense = log_zinb_positive(x, mu, theta, zi).sum(-1)
        sparse = nb_log_prob_rows(x, mu, theta, zi)
    else:
        dense = log_nb_positive(x, mu, theta).sum(-1)
        sparse = nb_log_prob_rows(x, mu, theta)
    assert sparse.shape == dense.shape == (3, 64)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-3)
    inputs = [mu, theta, zi] if zero_inflated else [mu, theta]
    g_dense = torch.autograd.grad(dense.sum(), inputs)
    g_sparse = torch.autograd.grad(sparse.sum(), inputs)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_given_non_zeros_give_the_same_rows_and_gradients(zero_inflated):
    """nonzero=(row, gene, value) from a CSR gather, stored zeros included, changes nothing."""
    gen = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((40, 30), 0.5), generator=gen)
    mu = (torch.rand(40, 30, generator=gen) * 4 + 1e-3).requires_grad_()
    theta = (torch.rand(30, generator=gen) * 50 + 1e-2).requires_grad_()
    zi = (torch.randn(40, 30, generator=gen) * 2).requires_grad_() if zero_inflated else None
    row, gene = x.nonzero(as_tuple=True)
    extra_row, extra_gene = torch.tensor([0, 5]), torch.tensor([1, 2])
    x[extra_row, extra_gene] = 0.0  # now stored zeros of the list below
    stored = (row, gene, x[row, gene])
    found = nb_log_prob_rows(x, mu, theta, zi)
    given = nb_log_prob_rows(x, mu, theta, zi, nonzero=stored)
    torch.testing.assert_close(given, found, rtol=1e-6, atol=1e-5)
    inputs = [mu, theta] + ([zi] if zero_inflated else [])
    for a, b in zip(
        torch.autograd.grad(given.sum(), inputs),
        torch.autograd.grad(found.sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_per_gene_log_gamma_difference_equals_the_per_count_one():
    """Theta-only terms computed once per gene and gathered: same values and gradient."""
    from scvae.distributions import _lgamma_diff, _lgamma_diff_per_gene

    gen = torch.Generator().manual_seed(2)
    gene = torch.randint(0, 6, (200,), generator=gen)
    x = torch.randint(1, 300, (200,), generator=gen).float()
    # thetas on both sides of the Stirling threshold (10), and at it
    theta = torch.tensor([0.05, 2.0, 9.99, 10.0, 80.0, 5e4], requires_grad=True)
    grad_out = torch.rand(200, generator=gen)
    per_gene = _lgamma_diff_per_gene(x, theta, gene)
    (g_gene,) = torch.autograd.grad((per_gene * grad_out).sum(), theta)
    per_count = _lgamma_diff(x, theta[gene])
    (g_count,) = torch.autograd.grad((per_count * grad_out).sum(), theta)
    torch.testing.assert_close(per_gene, per_count, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(g_gene, g_count, rtol=1e-5, atol=1e-4)
    exact = torch.lgamma(x.double() + theta.double()[gene]) - torch.lgamma(theta.double()[gene])
    torch.testing.assert_close(per_gene.double(), exact, rtol=1e-5, atol=2e-3)
