"""The VAE as an ``nn.Module``: inference -> generative -> loss (scVI, Lopez et al. 2018).

Tensors only: this file never sees an AnnData. The model is

* z ~ N(0, I) with ``n_latent`` dimensions (``latent_distribution="ln"``: z = softmax(u),
  u ~ N(0, I));
* l, a LOG library size: observed, ``l = log(sum_g x_g)``, or latent with q(l | x) normal and
  the prior N(mean_b, var_b) of the log totals of the training cells of batch b;
* rho = softmax(decoder(z, batch)), mu = exp(l) * rho, and x ~ ZINB / NB / Poisson(mu, theta, pi).

The per-cell loss is recon = -log p(x | z, l) summed over genes plus KL terms; training minimises
``mean(recon + kl_weight * kl_z + kl_l)`` (KL warm-up on z only).

Examples
--------
>>> import torch
>>> module = VAE(ModuleConfig(n_input=30))
>>> x = torch.poisson(torch.full((8, 30), 2.0))
>>> batch = torch.zeros(8, dtype=torch.long)
>>> inf = module.inference(x, batch)
>>> gen = module.generative(inf["z"], inf["library"], batch)
>>> module.loss(x, inf, gen, batch_index=batch).loss.shape
torch.Size([])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from scvae.distributions import (
    NegativeBinomial,
    Nonzero,
    Poisson,
    ZeroInflatedNegativeBinomial,
)
from scvae.nn import DecoderSCVI, Encoder, LinearDecoderSCVI

GeneLikelihood = Literal["zinb", "nb", "poisson"]
Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
LatentDistribution = Literal["normal", "ln"]
NormWhere = Literal["encoder", "decoder", "none", "both"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "gene_likelihood": ("zinb", "nb", "poisson"),
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "latent_distribution": ("normal", "ln"),
    "use_batch_norm": ("encoder", "decoder", "none", "both"),
    "use_layer_norm": ("encoder", "decoder", "none", "both"),
    "scale_activation": ("softmax", "softplus"),
}


@dataclass(frozen=True)
class ModuleConfig:
    """Architecture of the VAE; the defaults are scvi-tools' ``SCVI`` defaults.

    Examples
    --------
    >>> ModuleConfig(n_input=100, n_batch=2).n_latent
    10
    """

    n_input: int
    n_batch: int = 1
    n_labels: int = 1
    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    dispersion: Dispersion = "gene"
    gene_likelihood: GeneLikelihood = "zinb"
    latent_distribution: LatentDistribution = "normal"
    log_variational: bool = True
    use_observed_lib_size: bool = True
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: NormWhere = "both"
    use_layer_norm: NormWhere = "none"
    n_cats_per_cov: tuple[int, ...] = ()
    n_continuous_cov: int = 0
    use_size_factor: bool = False
    linear_decoder: bool = False
    decoder_bias: bool = False
    # rho of the (non-linear) decoder: softmax over genes, or softplus (unnormalised: scVI's
    # choice with size factors, whose scale then need not be that of the counts)
    scale_activation: str = "softmax"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")
        for name in ("n_input", "n_batch", "n_labels", "n_hidden", "n_latent", "n_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.latent_distribution == "ln" and int(self.n_latent) < 2:
            raise ValueError(
                'latent_distribution="ln" needs n_latent >= 2: its latent is a softmax over '
                "the dimensions, which is constant (1) in one dimension."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        object.__setattr__(self, "n_cats_per_cov", tuple(int(n) for n in self.n_cats_per_cov))

    @property
    def n_cat_list(self) -> list[int]:
        """Categories of the batch and of each categorical covariate, in decoder order."""
        return [self.n_batch, *self.n_cats_per_cov]

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Covariates:
    """Per-cell inputs besides the counts and the batch (all optional).

    ``labels`` (n,) int64 codes; ``categorical`` (n, k) int64 codes, one column per registered
    categorical covariate; ``continuous`` (n, m) float32; ``size_factor`` (n, 1) positive
    float32 (used as the library instead of the observed or latent one).
    """

    labels: torch.Tensor | None = None
    categorical: torch.Tensor | None = None
    continuous: torch.Tensor | None = None
    size_factor: torch.Tensor | None = None

    def take(self, idx: torch.Tensor) -> Covariates:
        """The covariates of cells ``idx``."""
        return Covariates(*(None if t is None else t[idx] for t in self._fields()))

    def to(self, device: torch.device | str) -> Covariates:
        """The covariates on ``device``."""
        return Covariates(*(None if t is None else t.to(device) for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.labels, self.categorical, self.continuous, self.size_factor)


def _expand_cells(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Broadcast per-cell rows ``(n, ...)`` over leading sample axes and flatten them."""
    return t.expand(*lead, *t.shape[1:]).reshape(-1, *t.shape[1:])


def standard_normal_like(t: torch.Tensor) -> Normal:
    """The prior N(0, I) with the shape, dtype and device of ``t``."""
    return Normal(torch.zeros_like(t), torch.ones_like(t), validate_args=False)


def normal_kl(q: Normal, prior: Normal | None = None) -> torch.Tensor:
    """Element-wise KL(q || prior) of two normals; the standard normal when ``prior`` is None.

    torch.distributions' closed form, term for term, without its registry look-up by type,
    which torch.compile cannot trace (it split the compiled training step in three).

    Examples
    --------
    >>> from torch.distributions import kl_divergence
    >>> q = Normal(torch.tensor([0.5]), torch.tensor([2.0]))
    >>> bool(torch.equal(normal_kl(q), kl_divergence(q, Normal(0.0, 1.0))))
    True
    """
    if prior is None:
        var_ratio = q.scale.pow(2)
        t1 = q.loc.pow(2)
    else:
        var_ratio = (q.scale / prior.scale).pow(2)
        t1 = ((q.loc - prior.loc) / prior.scale).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


@dataclass
class LossOutput:
    """Per-cell terms of the loss and the minibatch loss that is minimised.

    ``reconstruction_loss`` is -log p(x | z, l) per cell (positive); ``kl_z`` and ``kl_l`` are
    per-cell KL divergences; ``loss`` is ``mean(recon + kl_weight * kl_z + kl_l)``.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_z: torch.Tensor
    kl_l: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        """Per-cell ELBO with KL weight 1 (negative, higher is better)."""
        return -(self.reconstruction_loss + self.kl_z + self.kl_l)


def _in_float32(init: Callable[..., None]) -> Callable[..., None]:
    """Build a module with float32 as torch's default dtype (the parameters are float32, as
    scvi-tools'), whatever default the caller set (``torch.set_default_dtype(torch.float64)``
    made float64 weights that the float32 counts could not be multiplied with); the same
    seed gives the same weights either way. The caller's default is restored."""

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            init(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    return wrapper


class VAE(nn.Module):
    """scVI's variational autoencoder (see the module docstring for the model).

    Parameters
    ----------
    config
        The architecture (:class:`ModuleConfig`).
    library_log_means, library_log_vars
        Per-batch mean and variance of the log library size of the training cells; the prior
        of a latent library (ignored, but kept, when the library is observed).

    Examples
    --------
    >>> module = VAE(ModuleConfig(n_input=30, n_batch=2))
    >>> sum(p.numel() for p in module.parameters()) > 0
    True
    """

    @_in_float32
    def __init__(
        self,
        config: ModuleConfig,
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = c = config
        norm_enc = c.use_batch_norm in ("encoder", "both")
        norm_dec = c.use_batch_norm in ("decoder", "both")
        ln_enc = c.use_layer_norm in ("encoder", "both")
        ln_dec = c.use_layer_norm in ("decoder", "both")
        enc_cats = c.n_cat_list if c.encode_covariates else []
        n_enc_in = c.n_input + (c.n_continuous_cov if c.encode_covariates else 0)
        common = {
            "n_layers": c.n_layers,
            "n_hidden": c.n_hidden,
            "inject_covariates": c.deeply_inject_covariates,
        }
        enc = {**common, "dropout_rate": c.dropout_rate}
        enc.update(use_batch_norm=norm_enc, use_layer_norm=ln_enc, n_cat_list=enc_cats)
        self.z_encoder = Encoder(n_enc_in, c.n_latent, **enc)
        self.l_encoder = (
            None
            if c.use_observed_lib_size or c.use_size_factor
            else Encoder(n_enc_in, 1, **{**enc, "n_layers": 1})
        )
        n_dec_in = c.n_latent + c.n_continuous_cov
        if c.linear_decoder:
            self.decoder: nn.Module = LinearDecoderSCVI(
                n_dec_in,
                c.n_input,
                n_cat_list=c.n_cat_list,
                use_batch_norm=norm_dec,
                use_layer_norm=ln_dec,
                bias=c.decoder_bias,
            )
        else:
            self.decoder = DecoderSCVI(
                n_dec_in,
                c.n_input,
                n_cat_list=c.n_cat_list,
                use_batch_norm=norm_dec,
                use_layer_norm=ln_dec,
                cell_dispersion=c.dispersion == "gene-cell",
                scale_activation=c.scale_activation,
                **common,
            )
        if c.linear_decoder and c.dispersion == "gene-cell":
            raise ValueError(
                "The linear decoder has no per-cell dispersion (dispersion='gene-cell'): use "
                "'gene', 'gene-batch' or 'gene-label'."
            )
        n_theta = {"gene": 1, "gene-batch": c.n_batch, "gene-label": c.n_labels}.get(c.dispersion)
        # log theta, initialised N(0, 1) as in scvi-tools; absent for per-cell dispersion.
        self.px_r = nn.Parameter(torch.randn(c.n_input, n_theta)) if n_theta else None
        means = torch.zeros(c.n_batch) if library_log_means is None else library_log_means
        variances = torch.ones(c.n_batch) if library_log_vars is None else library_log_vars
        self.register_buffer("library_log_means", means.float().reshape(c.n_batch))
        self.register_buffer("library_log_vars", variances.float().reshape(c.n_batch))

    # ------------------------------------------------------------------ inference
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        covariates: Covariates | None = None,
        n_samples: int = 1,
        nonzero: Nonzero | None = None,
    ) -> dict[str, Any]:
        """q(z | x) and q(l | x) (or the observed l), with reparameterized samples.

        Parameters
        ----------
        x
            Counts, ``(n_cells, n_genes)`` float32.
        batch_index
            Batch codes, ``(n_cells,)`` int64.
        covariates
            Other per-cell inputs (:class:`Covariates`).
        n_samples
            Samples per cell; with more than one, ``z`` and ``library`` get a leading axis.
        nonzero
            ``(row, gene, value)`` of the stored counts of ``x`` where the caller has them:
            ``log1p(x)`` is then computed at them alone and placed in zeros (the same values).

        Returns
        -------
        dict with ``qz`` (Normal over the untransformed latent), ``z`` (the sample, after the
        softmax for the ln latent), ``untran_z``, ``ql`` (None unless the library is latent)
        and ``library`` (log library, shape ``(..., n_cells, 1)``).
        """
        c = self.config
        cov = covariates or Covariates()
        if not c.log_variational:
            x_in = x
        elif nonzero is not None:
            row, gene, value = nonzero
            x_in = torch.zeros_like(x).index_put_((row, gene), torch.log1p(value))
        else:
            x_in = torch.log1p(x)
        cats: list[torch.Tensor] = []
        if c.encode_covariates:
            if cov.continuous is not None:
                x_in = torch.cat([x_in, cov.continuous], dim=-1)
            cats = [batch_index, *self._categorical_columns(cov)]
        qz, untran_z = self.z_encoder(x_in, *cats)
        ql = None
        if c.use_size_factor:
            if cov.size_factor is None:
                raise ValueError("This module was built for size factors; pass them.")
            library = torch.log(cov.size_factor)
        elif self.l_encoder is None:
            library = torch.log(x.sum(dim=-1, keepdim=True))
        else:
            ql, library = self.l_encoder(x_in, *cats)
        if n_samples > 1:
            untran_z = qz.rsample((n_samples,))
            if ql is None:
                library = library.expand(n_samples, *library.shape)
            else:
                library = ql.rsample((n_samples,))
        z = self.transform_z(untran_z)
        return {"qz": qz, "z": z, "untran_z": untran_z, "ql": ql, "library": library}

    def _categorical_columns(self, cov: Covariates) -> list[torch.Tensor]:
        if not self.config.n_cats_per_cov:
            return []
        if cov.categorical is None:
            raise ValueError("This module was built with categorical covariates; pass them.")
        return list(cov.categorical.unbind(-1))

    def transform_z(self, untran_z: torch.Tensor) -> torch.Tensor:
        """Map a sample of the Gaussian posterior to the latent space (softmax for ``ln``)."""
        if self.config.latent_distribution == "ln":
            return torch.softmax(untran_z, dim=-1)
        return untran_z

    # ----------------------------------------------------------------- generative
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        covariates: Covariates | None = None,
    ) -> dict[str, Any]:
        """p(x | z, l, batch, covariates): the likelihood and its parameters.

        ``z`` is ``(..., n_cells, n_latent)`` and ``library`` ``(..., n_cells, 1)``; batch codes
        ``(n_cells,)`` and the covariates broadcast over leading sample axes.

        Returns
        -------
        dict with ``px`` (the count distribution), ``rho`` (normalised expression, rows sum to
        1), ``mu`` (mean of the non-zero-inflated counts, ``exp(l) * rho``), ``theta``
        (inverse dispersion) and ``zi_logits``.
        """
        c = self.config
        cov = covariates or Covariates()
        lead = z.shape[:-1]
        z_flat = z.reshape(-1, z.shape[-1])
        if c.n_continuous_cov:
            if cov.continuous is None:
                raise ValueError("This module was built with continuous covariates; pass them.")
            z_flat = torch.cat([z_flat, _expand_cells(cov.continuous, lead)], dim=-1)
        lib_flat = library.expand(*lead, 1).reshape(-1, 1)
        batch_flat = batch_index.expand(lead).reshape(-1)
        cats = [_expand_cells(col, lead) for col in self._categorical_columns(cov)]
        rho, log_theta_cell, mu, zi_logits = self.decoder(z_flat, lib_flat, batch_flat, *cats)
        labels = None if cov.labels is None else cov.labels.expand(lead).reshape(-1)
        theta = self._theta(batch_flat, labels, log_theta_cell)
        rho, mu, zi_logits = (t.reshape(*lead, c.n_input) for t in (rho, mu, zi_logits))
        theta = theta.reshape(*lead, c.n_input) if theta.dim() > 1 else theta
        if c.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
        elif c.gene_likelihood == "nb":
            px = NegativeBinomial(mu, theta)
        else:
            px = Poisson(mu)
        return {"px": px, "rho": rho, "mu": mu, "theta": theta, "zi_logits": zi_logits}

    def _theta(
        self,
        batch_flat: torch.Tensor,
        labels_flat: torch.Tensor | None,
        log_theta_cell: torch.Tensor | None,
    ) -> torch.Tensor:
        c = self.config
        if c.dispersion == "gene-cell":
            assert log_theta_cell is not None
            return torch.exp(log_theta_cell)
        assert self.px_r is not None
        if c.dispersion == "gene":
            return torch.exp(self.px_r[:, 0])
        if c.dispersion == "gene-batch":
            codes, n = batch_flat, c.n_batch
        else:
            if labels_flat is None:
                raise ValueError("dispersion='gene-label' needs the label codes of the cells.")
            codes, n = labels_flat, c.n_labels
        return torch.exp(F.one_hot(codes.long(), n).float() @ self.px_r.T)

    # ----------------------------------------------------------------------- loss
    def loss(
        self,
        x: torch.Tensor,
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Any],
        kl_weight: float = 1.0,
        batch_index: torch.Tensor | None = None,
        nonzero: Nonzero | None = None,
    ) -> LossOutput:
        """Per-cell reconstruction and KL terms and the minibatch loss.

        ``batch_index`` selects the library prior of each cell (needed for a latent library).
        ``nonzero``: ``(row, gene, value)`` of the non-zeros of ``x`` where the caller has them
        (:class:`scvae.data.loader.Minibatch`), so that the likelihood need not search for them.
        """
        recon = -generative_outputs["px"].log_prob_sum(x, nonzero=nonzero)
        qz = inference_outputs["qz"]
        kl_z = normal_kl(qz).sum(-1)
        ql = inference_outputs["ql"]
        if ql is None:
            kl_l = torch.zeros_like(kl_z)
        else:
            prior = self.library_prior(batch_index, like=ql.loc)
            kl_l = normal_kl(ql, prior).sum(-1)
        loss = torch.mean(recon + kl_weight * kl_z + kl_l)
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_z=kl_z, kl_l=kl_l)

    def library_prior(self, batch_index: torch.Tensor | None, like: torch.Tensor) -> Normal:
        """The per-batch prior N(mean_b, var_b) of the log library, shaped like ``like``."""
        if batch_index is None:
            raise ValueError("A latent library needs the batch codes for its prior.")
        idx = batch_index.long().reshape(-1)
        mean = self.library_log_means[idx].unsqueeze(-1).expand_as(like)
        var = self.library_log_vars[idx].unsqueeze(-1).expand_as(like)
        return Normal(mean, var.sqrt(), validate_args=False)

    def forward(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        covariates: Covariates | None = None,
        kl_weight: float = 1.0,
        nonzero: Nonzero | None = None,
    ) -> LossOutput:
        """inference -> generative -> loss on one minibatch (``nonzero``: see :meth:`loss`)."""
        inf = self.inference(x, batch_index, covariates, nonzero=nonzero)
        gen = self.generative(inf["z"], inf["library"], batch_index, covariates)
        return self.loss(x, inf, gen, kl_weight=kl_weight, batch_index=batch_index, nonzero=nonzero)

    @torch.no_grad()
    def loadings(self) -> torch.Tensor:
        """Genes x latent loadings of the linear decoder, its batch norm folded in."""
        if not isinstance(self.decoder, LinearDecoderSCVI):
            raise ValueError("Loadings exist only for the linear decoder (LDVAE).")
        return self.decoder.loadings()[:, : self.config.n_latent]

    # -------------------------------------------------------- marginal likelihood
    @torch.no_grad()
    def marginal_ll(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        covariates: Covariates | None = None,
        n_mc_samples: int = 1000,
        samples_per_pass: int = 100,
    ) -> torch.Tensor:
        """Importance-sampled log p(x) per cell, with q(z, l | x) as the proposal.

        log p(x) ~= logsumexp_s [log p(x | z_s, l_s) + log p(z_s) + log p(l_s)
        - log q(z_s | x) - log q(l_s | x)] - log S. With the observed library (or size
        factors) this is log p(x | l). Densities are evaluated in the untransformed (Gaussian)
        latent space, so the estimate is also right for the ``ln`` latent. Negative; higher
        is better.
        """
        inf = self.inference(x, batch_index, covariates)
        qz, ql = inf["qz"], inf["ql"]
        prior_z = standard_normal_like(qz.loc)
        prior_l = None if ql is None else self.library_prior(batch_index, like=ql.loc)
        chunks = []
        done = 0
        while done < n_mc_samples:
            s = min(samples_per_pass, n_mc_samples - done)
            untran_z = qz.sample((s,))
            if ql is None:
                library = inf["library"].expand(s, *inf["library"].shape)
            else:
                library = ql.sample((s,))
            gen = self.generative(self.transform_z(untran_z), library, batch_index, covariates)
            log_w = gen["px"].log_prob_sum(x.expand_as(gen["mu"]))
            log_w = log_w + prior_z.log_prob(untran_z).sum(-1) - qz.log_prob(untran_z).sum(-1)
            if ql is not None:
                log_w = log_w + (prior_l.log_prob(library) - ql.log_prob(library)).sum(-1)
            chunks.append(log_w)
            done += s
        log_w = torch.cat(chunks, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)
