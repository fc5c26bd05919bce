"""Count likelihoods for single-cell data: NB, ZINB, Poisson and Bernoulli.

The log-likelihoods follow Lopez et al. (2018), "Deep generative modeling for
single-cell transcriptomics" (scVI). The negative binomial is parameterized by
its mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu**2 /
theta``); the zero-inflated NB adds the logits ``zi_logits`` of the dropout
probability ``pi = sigmoid(zi_logits)``.

All functions are elementwise: inputs broadcast against each other and the
result has the broadcast shape (no reduction). They run in the dtype and on the
device of their inputs (float32 in training, nothing is upcast).

Numerical accuracy, float32 inputs against a float64 reference (scipy), over
``x`` in [0, 1e5], ``mu`` in [1e-8, 1e5], ``theta`` in [1e-4, 1e6] and
``zi_logits`` in [-100, 100] (asserted in ``tests/test_distributions.py``)::

    |error| <= 5e-7 * (1 + M)

where ``M`` is the sum of the magnitudes of the terms of the formula:
``|lgamma(x + theta) - lgamma(theta)| + lgamma(x + 1) + theta * log1p(mu /
theta) + x * log1p(theta / mu)`` for the NB, plus ``|zi_logits|`` for the
ZINB, and ``lgamma(x + 1) + rate + x * |log(rate)|`` for the Poisson. The
terms are each rounded to float32 (relative 2**-24 ~ 6e-8) before they cancel,
so a few float32 ulps of ``M`` is the floor for any float32 evaluation of
these formulas; the worst error measured is 2.1e-7 * (1 + M). Without
cancellation ``M ~ |log p|`` and this is a relative error of 5e-7. With
cancellation the relative error can be large: at ``x = mu = theta = 1e5``,
``log p ~ -7.0`` but ``M ~ 2.4e6``; the bound is 1.2 and the error measured
there is 0.04 (at ``x = mu = theta = 1e3``: 9e-5).
The Bernoulli log-probability has relative error <= 1e-6 (plus 1e-30).

Two rewrites make large ``theta`` accurate:

* ``theta * log(theta / (theta + mu))`` is computed as
  ``-theta * log1p(mu / theta)`` and ``x * log(mu / (theta + mu))`` as
  ``-x * log1p(theta / mu)``;
* ``lgamma(x + theta) - lgamma(theta)`` loses every digit in float32 once
  ``theta`` is about 1e5 (``lgamma(1e5) ~ 1e6``, whose float32 spacing is
  0.06). For ``theta >= 10`` it is replaced by the difference of Stirling
  series (truncation error below 1e-8). With ``theta = 1e6`` the float32 NB
  is then as close to the Poisson as the exact NB is (their gap is
  of order ``(x - mu)**2 / theta``), where a plain lgamma difference is off by ~1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Bernoulli",
    "NegativeBinomial",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_bernoulli",
    "log_nb_positive",
    "log_poisson",
    "log_zinb_positive",
    "nb_log_prob_rows",
]

#: ``(row, gene, value)`` of the stored counts of a minibatch (see :func:`nb_log_prob_rows`).
Nonzero = tuple[Tensor, Tensor, Tensor]

# Above this theta, lgamma(x + theta) - lgamma(theta) uses the Stirling series.
_STIRLING_MIN_THETA = 10.0


def _stirling_correction(a: Tensor) -> Tensor:
    """Return ``lgamma(a) - [(a - 0.5) * log(a) - a + 0.5 * log(2 * pi)]``.

    The first two terms of the Stirling series, ``1 / (12 a) - 1 / (360 a**3)``;
    for ``a >= 10`` the truncation error is below ``1 / (1260 * a**5) < 1e-8``.
    """
    return (1.0 / 12.0 - 1.0 / (360.0 * a * a)) / a


def _stirling_split(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``theta >= 10`` (the Stirling branch), and theta clamped into each branch's range."""
    return (
        theta >= _STIRLING_MIN_THETA,
        theta.clamp_max(_STIRLING_MIN_THETA),
        theta.clamp_min(_STIRLING_MIN_THETA),
    )


def _lgamma_diff_value(x: Tensor, theta: Tensor) -> Tensor:
    """Return ``lgamma(x + theta) - lgamma(theta)``, accurate for large theta.

    For ``theta >= 10`` the Stirling forms of both log-gammas are subtracted
    analytically::

        (theta - 0.5) * log1p(x / theta) + x * log(x + theta) - x
        + correction(x + theta) - correction(theta)

    Each branch of the ``torch.where`` gets inputs clamped to its own range so
    that the branch not selected stays finite. Computed as the terms that involve ``x``
    (:func:`_lgamma_diff_x_terms`) minus those of theta alone (:func:`_lgamma_theta_terms`),
    which a per-gene theta computes once per gene.
    """
    return _lgamma_diff_x_terms(x, theta) - _lgamma_theta_terms(theta)


def _lgamma_diff_x_terms(x: Tensor, theta: Tensor) -> Tensor:
    """``lgamma(x + theta)``, or for ``theta >= 10`` the Stirling terms that involve ``x``."""
    large, t_small, t_large = _stirling_split(theta)
    stirling = (
        (t_large - 0.5) * torch.log1p(x / t_large)
        + x * torch.log(x + t_large)
        - x
        + _stirling_correction(x + t_large)
    )
    return torch.where(large, stirling, torch.lgamma(x + t_small))


def _lgamma_theta_terms(theta: Tensor) -> Tensor:
    """``lgamma(theta)``, or for ``theta >= 10`` its Stirling correction (the rest cancels)."""
    large, t_small, t_large = _stirling_split(theta)
    return torch.where(large, _stirling_correction(t_large), torch.lgamma(t_small))


def _digamma(y: Tensor) -> Tensor:
    """``digamma(y)`` for ``y > 0`` from element-wise arithmetic, a log and reciprocals.

    Six steps of the recurrence ``digamma(y) = digamma(y + 1) - 1 / y`` and the asymptotic
    series at ``z = y + 6``: ``log z - 1 / (2 z) - 1 / (12 z**2) + 1 / (120 z**4)
    - 1 / (252 z**6)`` (truncation error below ``1 / (240 z**8) < 2e-9``). Unlike
    ``torch.digamma``, which CPUs evaluate one element at a time, every operation here is
    vectorised, and ``torch.compile`` fuses them into one loop.
    """
    shift = 1.0 / y
    for k in range(1, 6):
        shift = shift + 1.0 / (y + k)
    z = y + 6.0
    inv2 = 1.0 / (z * z)
    series = inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 / 252.0))
    return torch.log(z) - 0.5 / z - series - shift


def _lgamma_diff_grad(x: Tensor, theta: Tensor) -> Tensor:
    """``d/dtheta [lgamma(x + theta) - lgamma(theta)] = digamma(x + theta) - digamma(theta)``.

    For ``theta >= 10`` the derivative of the Stirling form (no cancellation between two
    digammas): ``log1p(x / theta) + x / (2 theta (x + theta))
    + correction'(x + theta) - correction'(theta)``. As the value, the terms with ``x`` minus
    those of theta alone.
    """
    return _lgamma_diff_grad_x_terms(x, theta) - _lgamma_theta_grad_terms(theta)


def _lgamma_diff_grad_x_terms(x: Tensor, theta: Tensor) -> Tensor:
    """The terms of :func:`_lgamma_diff_grad` that involve ``x``."""
    large, t_small, t_large = _stirling_split(theta)
    y = x + t_large
    stirling = torch.log1p(x / t_large) + 0.5 * x / (t_large * y) + _stirling_correction_grad(y)
    return torch.where(large, stirling, _digamma(x + t_small))


def _lgamma_theta_grad_terms(theta: Tensor) -> Tensor:
    """The terms of :func:`_lgamma_diff_grad` of theta alone (digamma, or correction')."""
    large, t_small, t_large = _stirling_split(theta)
    return torch.where(large, _stirling_correction_grad(t_large), _digamma(t_small))


def _stirling_correction_grad(a: Tensor) -> Tensor:
    """Derivative of :func:`_stirling_correction`: ``-1 / (12 a**2) + 1 / (120 a**4)``."""
    inv2 = 1.0 / (a * a)
    return inv2 * (inv2 / 120.0 - 1.0 / 12.0)


class _LgammaDiff(torch.autograd.Function):
    """``lgamma(x + theta) - lgamma(theta)`` with its theta-gradient written out.

    The counts ``x`` get no gradient (they are data). Autograd through ``torch.lgamma``
    would call ``torch.digamma`` twice per non-zero count in every backward pass, which
    CPUs evaluate one element at a time; :func:`_lgamma_diff_grad` is vectorised.
    """

    @staticmethod
    def forward(x: Tensor, theta: Tensor) -> Tensor:  # type: ignore[override]
        return _lgamma_diff_value(x, theta)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None]:  # type: ignore[override]
        x, theta = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        return None, _reduce_to(grad * _lgamma_diff_grad(x, theta), theta.shape)


class _LgammaDiffPerGene(torch.autograd.Function):
    """``lgamma(x + theta[gene]) - lgamma(theta[gene])`` for one theta per gene.

    As :class:`_LgammaDiff`, but the terms of theta alone (``lgamma(theta)`` and, in the
    backward pass, ``digamma(theta)``, or their Stirling corrections) are computed once per gene
    and gathered, instead of once per non-zero count.
    """

    @staticmethod
    def forward(x: Tensor, theta: Tensor, gene: Tensor) -> Tensor:  # type: ignore[override]
        return _lgamma_diff_x_terms(x, theta[gene]) - _lgamma_theta_terms(theta)[gene]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[None, Tensor | None, None]:
        x, theta, gene = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        per_count = grad * (
            _lgamma_diff_grad_x_terms(x, theta[gene]) - _lgamma_theta_grad_terms(theta)[gene]
        )
        return None, torch.zeros_like(theta).index_add_(0, gene, per_count), None


class _DenseRows(torch.autograd.Function):
    """Per-row sum of the dense part of the NB / ZINB log-probability, gradients written out.

    Every entry pays ``log NB(0) = -theta * log1p(mu / theta)`` and, with zero-inflation logits
    ``zi``, ``-softplus(zi)`` (the log of 1 - pi); entries where ``at_zero`` is 1 add
    ``softplus(zi - log NB(0))``, which makes them ``log(pi + (1 - pi) NB(0))``. Autograd
    through these operations makes a pass over the ``cells x genes`` arrays per operation;
    here the backward pass is two sigmoids and a few products::

        d/d zi    = at_zero * sigmoid(zi - log NB(0)) - sigmoid(zi)
        d/d mu    = -(1 - at_zero * sigmoid(zi - log NB(0))) / (1 + mu / theta)
        d/d theta = (1 - at_zero * sigmoid(zi - log NB(0))) * (1 - 1 / (1 + mu / theta)
                     - log1p(mu / theta))

    (without ``zi`` the sigmoid terms are 0). ``mu >= 0`` needs no lower bound here
    (``mu = 0`` gives ``log NB(0) = 0``); ``theta`` is bounded by the caller.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        mu: Tensor, theta: Tensor, zi: Tensor | None, at_zero: Tensor | None
    ) -> Tensor:
        log1p_r = torch.log1p(mu / theta)
        log_nb_zero = -theta * log1p_r
        if zi is None or at_zero is None:
            return log_nb_zero.sum(-1)
        shifted = zi - log_nb_zero
        dense = log_nb_zero - F.softplus(zi)
        return torch.addcmul(dense, at_zero, F.softplus(shifted)).sum(-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        mu, theta, zi, at_zero = inputs
        ctx.save_for_backward(mu, theta, zi, at_zero)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        mu, theta, zi, at_zero = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        r = mu / theta
        log1p_r = torch.log1p(r)
        inv = torch.reciprocal(r + 1.0)
        grad_zi = None
        if zi is None or at_zero is None:
            g_nb0 = g.expand_as(mu)
        else:
            # d/d log NB(0) of the row sum: 1 - at_zero * sigmoid(zi - log NB(0))
            pulled = at_zero * torch.sigmoid(torch.addcmul(zi, theta, log1p_r))
            if ctx.needs_input_grad[2]:
                grad_zi = g * (pulled - torch.sigmoid(zi))
            g_nb0 = g * (1.0 - pulled)
        grad_mu = -(g_nb0 * inv) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _reduce_to(g_nb0 * (1.0 - inv - log1p_r), theta.shape)
        return grad_mu, grad_theta, grad_zi, None


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _lgamma_diff(x: Tensor, theta: Tensor) -> Tensor:
    """Return ``lgamma(x + theta) - lgamma(theta)`` (see :func:`_lgamma_diff_value`).

    Differentiable in ``theta`` with the gradient of :func:`_lgamma_diff_grad`; ``x`` are
    counts and get no gradient.
    """
    if x.requires_grad:
        raise ValueError("The counts x of a log-probability cannot require a gradient.")
    return _LgammaDiff.apply(x, theta)


def _lgamma_diff_per_gene(x: Tensor, theta: Tensor, gene: Tensor) -> Tensor:
    """``lgamma(x + theta[gene]) - lgamma(theta[gene])`` for counts ``x`` of genes ``gene``.

    The same values and theta-gradient as ``_lgamma_diff(x, theta[gene])``, with the terms of
    theta alone computed once per gene (``theta``: one value per gene).
    """
    if x.requires_grad:
        raise ValueError("The counts x of a log-probability cannot require a gradient.")
    return _LgammaDiffPerGene.apply(x, theta, gene)


def log_nb_positive(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Log-probability of the NB with mean ``mu`` and inverse dispersion ``theta``.

    .. math::

        \log p(x) = \log\Gamma(x + \theta) - \log\Gamma(\theta)
        - \log\Gamma(x + 1)
        + \theta \log\frac{\theta}{\theta + \mu}
        + x \log\frac{\mu}{\theta + \mu}

    The last two terms are computed as ``-theta * log1p(mu / theta)`` and
    ``-x * log1p(theta / mu)``, and the log-gamma difference by Stirling series
    for ``theta >= 10`` (see the module docstring for the accuracy).

    Parameters
    ----------
    x
        Counts (non-negative; non-integer values give the usual continuous
        extension).
    mu
        Mean, positive.
    theta
        Inverse dispersion, positive; the variance is ``mu + mu**2 / theta``.
    eps
        Lower bound applied to ``mu`` and ``theta`` inside the formula, so that
        ``mu = 0`` gives finite values (values above ``eps`` are unchanged).

    Returns
    -------
    Tensor
        Elementwise log-probabilities, of the broadcast shape of the inputs.

    Examples
    --------
    >>> x = torch.tensor([0.0, 3.0])
    >>> log_nb_positive(x, mu=torch.tensor(2.0), theta=torch.tensor(1.0))
    tensor([-1.0986, -2.3150])
    """
    mu = mu.clamp_min(eps)
    theta = theta.clamp_min(eps)
    return (
        _lgamma_diff(x, theta)
        - torch.lgamma(x + 1.0)
        - theta * torch.log1p(mu / theta)
        - x * torch.log1p(theta / mu)
    )


def log_zinb_positive(
    x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor, eps: float = 1e-8
) -> Tensor:
    """Log-probability of the zero-inflated negative binomial.

    With ``pi = sigmoid(zi_logits)`` the dropout probability and ``NB`` the
    distribution of :func:`log_nb_positive`:

    * ``x == 0``: ``log(pi + (1 - pi) * NB(0))
      = logaddexp(zi_logits, log NB(0)) - softplus(zi_logits)``;
    * ``x > 0``: ``log(1 - pi) + log NB(x) = log NB(x) - softplus(zi_logits)``.

    Both forms stay finite for any finite logits (e.g. +-100).

    Parameters
    ----------
    x
        Counts (non-negative).
    mu
        Mean of the NB component, positive.
    theta
        Inverse dispersion of the NB component, positive.
    zi_logits
        Logits of the dropout probability ``pi``.
    eps
        Passed to :func:`log_nb_positive`.

    Returns
    -------
    Tensor
        Elementwise log-probabilities, of the broadcast shape of the inputs.

    Examples
    --------
    >>> x = torch.tensor([0.0, 3.0])
    >>> log_zinb_positive(x, torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.0))
    tensor([-0.4055, -3.0082])
    """
    log_nb = log_nb_positive(x, mu, theta, eps=eps)
    log_unnormalized = torch.where(x == 0, torch.logaddexp(zi_logits, log_nb), log_nb)
    return log_unnormalized - F.softplus(zi_logits)


def nb_log_prob_rows(
    x: Tensor,
    mu: Tensor,
    theta: Tensor,
    zi_logits: Tensor | None = None,
    eps: float = 1e-8,
    *,
    nonzero: Nonzero | None = None,
) -> Tensor:
    """Sum over the last axis of the NB (or, with ``zi_logits``, ZINB) log-probability.

    Equal to ``log_nb_positive(...).sum(-1)`` (``log_zinb_positive``), computed sparsely: at
    x = 0 the log-gamma terms vanish, so every entry pays only for the dense part
    ``log NB(0) = -theta * log1p(mu / theta)`` (and the zero-inflation mixing), and only the
    non-zero counts pay for ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` and
    ``-x * log1p(theta / mu)``. Same float32 accuracy as the dense functions.

    ``nonzero``, when the caller has it (a minibatch gathered from CSR arrays), is
    ``(row, gene, value)`` of every stored count of ``x`` seen as ``(-1, n_genes)`` rows
    (stored zeros are allowed: they add nothing); otherwise the non-zeros are found in ``x``.

    Examples
    --------
    >>> x = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    >>> mu, theta = torch.tensor([[2.0, 1.0], [0.5, 4.0]]), torch.tensor([1.0, 3.0])
    >>> bool(torch.allclose(nb_log_prob_rows(x, mu, theta),
    ...                     log_nb_positive(x, mu, theta).sum(-1)))
    True
    """
    theta = theta.clamp_min(eps)
    if zi_logits is None:
        at_zero = None
    elif torch.compiler.is_compiling():
        # the zero indicator as arithmetic on sign(x) (0 or 1 for counts): a boolean mask saved
        # for the backward pass is read back element by element by compiled CPU code
        at_zero = 1.0 - torch.sign(x)
    else:
        at_zero = (x == 0).to(mu.dtype)
    n_genes = x.shape[-1]
    rows = _DenseRows.apply(mu, theta, zi_logits, at_zero).reshape(-1)
    # the non-zeros of the (non-negative) counts themselves: a boolean mask shared with the
    # dense part would make torch.compile store it and read it back, at twice the cost
    if nonzero is None:
        cell, gene = x.reshape(-1, n_genes).nonzero(as_tuple=True)
        xs = x.reshape(-1, n_genes)[cell, gene]
    else:
        cell, gene, xs = nonzero
    # gathered, then clamped: no clamped or broadcast copy of the whole matrix is kept
    ms = mu.reshape(-1, n_genes)[cell, gene].clamp_min(eps)
    if theta.numel() == n_genes:  # one dispersion per gene (the default)
        ts = theta.reshape(-1)[gene]
        # lgamma(theta) and, backward, digamma(theta) once per gene, not once per count
        lgamma_diff = _lgamma_diff_per_gene(xs, theta.reshape(-1), gene)
    else:
        ts = theta.expand_as(mu).reshape(-1, n_genes)[cell, gene]
        lgamma_diff = _lgamma_diff(xs, ts)
    extra = lgamma_diff - torch.lgamma(xs + 1.0) - xs * torch.log1p(ts / ms)
    return rows.index_add(0, cell, extra).reshape(x.shape[:-1])


def log_poisson(x: Tensor, rate: Tensor) -> Tensor:
    """Log-probability of the Poisson distribution: ``x log(rate) - rate - lgamma(x + 1)``.

    Parameters
    ----------
    x
        Counts (non-negative).
    rate
        Rate (mean), non-negative; ``x = 0, rate = 0`` gives 0.

    Returns
    -------
    Tensor
        Elementwise log-probabilities, of the broadcast shape of the inputs.

    Examples
    --------
    >>> log_poisson(torch.tensor([0.0, 2.0]), torch.tensor(2.0))
    tensor([-2.0000, -1.3069])
    """
    return torch.xlogy(x, rate) - rate - torch.lgamma(x + 1.0)


def log_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """Log-probability of the Bernoulli distribution with logits ``logits``.

    Computed as ``x * log(p) + (1 - x) * log(1 - p)`` with
    ``log(p) = -softplus(-logits)`` and ``log(1 - p) = -softplus(logits)``,
    which equals ``-binary_cross_entropy_with_logits(logits, x)`` (also for
    ``x`` in ``[0, 1]``), broadcasts, and keeps full relative accuracy for
    binary ``x``.

    Parameters
    ----------
    x
        Observations in ``{0, 1}``.
    logits
        Logits of the probability of 1.

    Returns
    -------
    Tensor
        Elementwise log-probabilities, of the broadcast shape of the inputs.

    Examples
    --------
    >>> log_bernoulli(torch.tensor([0.0, 1.0]), torch.tensor(0.0))
    tensor([-0.6931, -0.6931])
    """
    return -x * F.softplus(-logits) - (1.0 - x) * F.softplus(logits)


def _sample_shape(sample_shape: tuple[int, ...], batch_shape: torch.Size) -> torch.Size:
    return torch.Size(sample_shape) + batch_shape


class NegativeBinomial:
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Parameters
    ----------
    mu
        Mean, positive.
    theta
        Inverse dispersion, positive; the variance is ``mu + mu**2 / theta``.

    Examples
    --------
    >>> nb = NegativeBinomial(torch.tensor([2.0]), torch.tensor([1.0]))
    >>> nb.mean, nb.variance
    (tensor([2.]), tensor([6.]))
    >>> nb.log_prob(torch.tensor([0.0]))
    tensor([-1.0986])
    >>> nb.sample((5,)).shape
    torch.Size([5, 1])
    """

    def __init__(self, mu: Tensor, theta: Tensor) -> None:
        self.mu, self.theta = torch.broadcast_tensors(mu, theta)

    @property
    def batch_shape(self) -> torch.Size:
        """Broadcast shape of the parameters."""
        return self.mu.shape

    @property
    def mean(self) -> Tensor:
        """Mean, ``mu``."""
        return self.mu

    @property
    def variance(self) -> Tensor:
        """Variance, ``mu + mu**2 / theta``."""
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, x: Tensor) -> Tensor:
        """Elementwise log-probability of counts ``x`` (see :func:`log_nb_positive`)."""
        return log_nb_positive(x, self.mu, self.theta)

    def log_prob_sum(self, x: Tensor, *, nonzero: Nonzero | None = None) -> Tensor:
        """``log_prob(x).sum(-1)``, computed sparsely (see :func:`nb_log_prob_rows`)."""
        return nb_log_prob_rows(x, self.mu, self.theta, nonzero=nonzero)

    @torch.no_grad()
    def sample(
        self,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw counts as a Gamma-Poisson mixture.

        ``lambda ~ Gamma(shape=theta, rate=theta / mu)``, then
        ``x ~ Poisson(lambda)``.

        Parameters
        ----------
        sample_shape
            Leading shape of the draws; the result has shape
            ``sample_shape + batch_shape``.
        generator
            Random generator (defaults to the global one, so
            ``torch.manual_seed`` makes draws reproducible).

        Returns
        -------
        Tensor
            Float tensor of counts.
        """
        shape = _sample_shape(sample_shape, self.batch_shape)
        theta = self.theta.expand(shape)
        # torch._standard_gamma is what torch.distributions.Gamma uses; it is
        # called directly because only it accepts a generator.
        rate = torch._standard_gamma(theta, generator=generator) * (self.mu / self.theta)
        return torch.poisson(rate, generator=generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """Zero-inflated negative binomial.

    A draw is 0 with probability ``pi = sigmoid(zi_logits)`` and otherwise
    comes from ``NegativeBinomial(mu, theta)``.

    Parameters
    ----------
    mu
        Mean of the NB component, positive.
    theta
        Inverse dispersion of the NB component, positive.
    zi_logits
        Logits of the dropout probability ``pi``.

    Examples
    --------
    >>> zinb = ZeroInflatedNegativeBinomial(
    ...     torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0])
    ... )
    >>> zinb.zi_probs, zinb.mean, zinb.variance
    (tensor([0.5000]), tensor([1.]), tensor([4.]))
    >>> zinb.log_prob(torch.tensor([0.0]))
    tensor([-0.4055])
    """

    def __init__(self, mu: Tensor, theta: Tensor, zi_logits: Tensor) -> None:
        self.mu, self.theta, self.zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)

    @property
    def zi_probs(self) -> Tensor:
        """Dropout probability ``pi = sigmoid(zi_logits)``."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> Tensor:
        """Mean, ``(1 - pi) * mu``."""
        return torch.sigmoid(-self.zi_logits) * self.mu

    @property
    def variance(self) -> Tensor:
        """Variance, ``(1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2``."""
        pi = self.zi_probs
        return (1.0 - pi) * (self.mu + self.mu**2 / self.theta) + pi * (1.0 - pi) * self.mu**2

    def log_prob(self, x: Tensor) -> Tensor:
        """Elementwise log-probability of counts ``x`` (see :func:`log_zinb_positive`)."""
        return log_zinb_positive(x, self.mu, self.theta, self.zi_logits)

    def log_prob_sum(self, x: Tensor, *, nonzero: Nonzero | None = None) -> Tensor:
        """``log_prob(x).sum(-1)``, computed sparsely (see :func:`nb_log_prob_rows`)."""
        return nb_log_prob_rows(x, self.mu, self.theta, self.zi_logits, nonzero=nonzero)

    @torch.no_grad()
    def sample(
        self,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw counts: an NB draw, replaced by 0 with probability ``pi``.

        Parameters
        ----------
        sample_shape
            Leading shape of the draws; the result has shape
            ``sample_shape + batch_shape``.
        generator
            Random generator (defaults to the global one, so
            ``torch.manual_seed`` makes draws reproducible).

        Returns
        -------
        Tensor
            Float tensor of counts.
        """
        counts = super().sample(sample_shape, generator=generator)
        pi = self.zi_probs.expand(counts.shape)
        dropout = torch.bernoulli(pi, generator=generator).bool()
        return counts.masked_fill(dropout, 0.0)


class Poisson:
    """Poisson distribution with rate (mean) ``rate``.

    Parameters
    ----------
    rate
        Rate, non-negative.

    Examples
    --------
    >>> p = Poisson(torch.tensor([2.0]))
    >>> p.mean, p.variance
    (tensor([2.]), tensor([2.]))
    >>> p.log_prob(torch.tensor([0.0]))
    tensor([-2.])
    """

    def __init__(self, rate: Tensor) -> None:
        self.rate = rate

    @property
    def batch_shape(self) -> torch.Size:
        """Shape of the parameter."""
        return self.rate.shape

    @property
    def mean(self) -> Tensor:
        """Mean, ``rate``."""
        return self.rate

    @property
    def variance(self) -> Tensor:
        """Variance, ``rate``."""
        return self.rate

    def log_prob(self, x: Tensor) -> Tensor:
        """Elementwise log-probability of counts ``x`` (see :func:`log_poisson`)."""
        return log_poisson(x, self.rate)

    def log_prob_sum(self, x: Tensor, *, nonzero: Nonzero | None = None) -> Tensor:
        """``log_prob(x).sum(-1)`` (``nonzero`` is accepted for a common signature, unused)."""
        return self.log_prob(x).sum(-1)

    @torch.no_grad()
    def sample(
        self,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw counts with :func:`torch.poisson`.

        Parameters
        ----------
        sample_shape
            Leading shape of the draws; the result has shape
            ``sample_shape + batch_shape``.
        generator
            Random generator (defaults to the global one).

        Returns
        -------
        Tensor
            Float tensor of counts.
        """
        shape = _sample_shape(sample_shape, self.batch_shape)
        return torch.poisson(self.rate.expand(shape), generator=generator)


class Bernoulli:
    """Bernoulli distribution with logits ``logits`` (e.g. for binarized MNIST).

    Parameters
    ----------
    logits
        Logits of the probability of 1.

    Examples
    --------
    >>> b = Bernoulli(torch.tensor([0.0]))
    >>> b.mean, b.variance
    (tensor([0.5000]), tensor([0.2500]))
    >>> b.log_prob(torch.tensor([1.0]))
    tensor([-0.6931])
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    @property
    def batch_shape(self) -> torch.Size:
        """Shape of the parameter."""
        return self.logits.shape

    @property
    def probs(self) -> Tensor:
        """Probability of 1, ``sigmoid(logits)``."""
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> Tensor:
        """Mean, ``sigmoid(logits)``."""
        return self.probs

    @property
    def variance(self) -> Tensor:
        """Variance, ``p * (1 - p)``."""
        return torch.sigmoid(self.logits) * torch.sigmoid(-self.logits)

    def log_prob(self, x: Tensor) -> Tensor:
        """Elementwise log-probability of ``x`` in ``{0, 1}`` (see :func:`log_bernoulli`)."""
        return log_bernoulli(x, self.logits)

    @torch.no_grad()
    def sample(
        self,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw 0/1 values with :func:`torch.bernoulli`.

        Parameters
        ----------
        sample_shape
            Leading shape of the draws; the result has shape
            ``sample_shape + batch_shape``.
        generator
            Random generator (defaults to the global one).

        Returns
        -------
        Tensor
            Float tensor of 0s and 1s.
        """
        shape = _sample_shape(sample_shape, self.batch_shape)
        return torch.bernoulli(self.probs.expand(shape), generator=generator)
