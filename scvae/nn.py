"""Neural-network blocks: fully connected layers with covariate injection, encoder, decoder.

The shapes and defaults follow scvi-tools' ``FCLayers``, ``Encoder`` and ``DecoderSCVI`` (which
follow the scVI paper): a hidden block is Linear -> BatchNorm1d(momentum=0.01, eps=1e-3) ->
(LayerNorm) -> ReLU -> Dropout, and categorical covariates (the batch) enter as one-hot vectors
concatenated to the input of the first layer and, with ``inject_covariates=True``, of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def one_hot_covariates(categories: Sequence[torch.Tensor], n_cats: Sequence[int]) -> torch.Tensor:
    """One-hot encode integer covariates and concatenate them along the last axis.

    Parameters
    ----------
    categories
        Integer tensors of codes, each of shape ``(..., )`` or ``(..., 1)``.
    n_cats
        Number of categories of each covariate.

    Returns
    -------
    Float tensor ``(..., sum(n_cats))``.

    Examples
    --------
    >>> one_hot_covariates([torch.tensor([0, 2])], [3]).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    parts = []
    for codes, n in zip(categories, n_cats, strict=True):
        if codes.dim() > 1 and codes.shape[-1] == 1:
            codes = codes.squeeze(-1)
        parts.append(F.one_hot(codes.long(), n).float())
    return torch.cat(parts, dim=-1)


class FCLayers(nn.Module):
    """A stack of fully connected hidden blocks with optional covariate injection.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_cat_list
        Number of categories of each categorical covariate (entries <= 1 are ignored).
    n_layers, n_hidden
        Number of blocks and width of the inner ones.
    dropout_rate
        Dropout after each block.
    use_batch_norm, use_layer_norm
        Normalisation in each block (BatchNorm1d(momentum=0.01, eps=1e-3); LayerNorm without
        affine parameters, as in scvi-tools).
    inject_covariates
        Concatenate the covariates to every block's input, not only the first one.
    bias
        Bias in the linear layers.
    use_activation
        ReLU after each block (False for a linear decoder).

    Examples
    --------
    >>> layers = FCLayers(5, 8, n_cat_list=[2])
    >>> layers(torch.randn(4, 5), torch.tensor([0, 1, 1, 0])).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        n_cat_list: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        bias: bool = True,
        use_activation: bool = True,
    ) -> None:
        super().__init__()
        self.n_cat_list = [n if n > 1 else 0 for n in n_cat_list]
        self.inject_covariates = inject_covariates
        n_cov = sum(self.n_cat_list)
        widths = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.layers = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            extra = n_cov if (i == 0 or inject_covariates) else 0
            block: list[nn.Module] = [nn.Linear(w_in + extra, w_out, bias=bias)]
            if use_batch_norm:
                block.append(nn.BatchNorm1d(w_out, momentum=0.01, eps=0.001))
            if use_layer_norm:
                block.append(nn.LayerNorm(w_out, elementwise_affine=False))
            if use_activation:
                block.append(nn.ReLU())
            if dropout_rate > 0:
                block.append(nn.Dropout(p=dropout_rate))
            self.layers.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor) -> torch.Tensor:
        """Apply the blocks to ``x`` (shape ``(n, n_in)``) with covariate codes ``cat_list``."""
        used = [(c, n) for c, n in zip(cat_list, self.n_cat_list, strict=True) if n > 0]
        cov = one_hot_covariates([c for c, _ in used], [n for _, n in used]) if used else None
        for i, block in enumerate(self.layers):
            if cov is not None and (i == 0 or self.inject_covariates):
                x = torch.cat([x, cov], dim=-1)
            x = block(x)
        return x


class Encoder(nn.Module):
    """Gaussian encoder q(z | x) = N(mean(x), exp(v(x)) + var_eps).

    Parameters
    ----------
    n_input, n_output
        Input width and latent dimension.
    n_cat_list
        Categorical covariates fed to the encoder (empty unless ``encode_covariates``).
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        As in :class:`FCLayers`.
    var_eps
        Added to the variance for numerical stability (1e-4 as in scvi-tools).

    Examples
    --------
    >>> enc = Encoder(20, 4)
    >>> q, z = enc(torch.randn(3, 20))
    >>> z.shape
    torch.Size([3, 4])
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_cat_list: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)
        self.var_eps = var_eps

    def forward(
        self, x: torch.Tensor, *cat_list: torch.Tensor
    ) -> tuple[torch.distributions.Normal, torch.Tensor]:
        """Return the posterior ``q`` and one reparameterized sample from it."""
        h = self.encoder(x, *cat_list)
        # float32 even under bf16 autocast: the KL and the sample stay in full precision
        mean = self.mean_encoder(h).float()
        var = torch.exp(self.var_encoder(h).float()) + self.var_eps
        q = torch.distributions.Normal(mean, var.sqrt(), validate_args=False)
        return q, q.rsample()


class LinearDecoderSCVI(nn.Module):
    """Linear decoder (LDVAE, Svensson et al. 2020): rho = softmax(BN(W [z, batch])).

    No hidden layer and no activation, so the genes x latent weights (corrected for the batch
    norm) are interpretable loadings. The dropout logits come from a second linear map.

    Examples
    --------
    >>> dec = LinearDecoderSCVI(4, 20, n_cat_list=[2])
    >>> rho, _, mu, zi = dec(torch.randn(3, 4), torch.zeros(3, 1), torch.tensor([0, 1, 0]))
    >>> rho.shape
    torch.Size([3, 20])
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_cat_list: Sequence[int] = (),
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        linear = {
            "n_cat_list": n_cat_list,
            "n_layers": 1,
            "dropout_rate": 0.0,
            "use_batch_norm": use_batch_norm,
            "use_layer_norm": use_layer_norm,
            "bias": bias,
            "use_activation": False,
        }
        self.factor_regressor = FCLayers(n_input, n_output, **linear)
        self.px_dropout_decoder = FCLayers(n_input, n_output, **linear)

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, *cat_list: torch.Tensor
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor]:
        """Return ``(rho, None, mu, zi_logits)`` as :class:`DecoderSCVI` does."""
        rho = torch.softmax(self.factor_regressor(z, *cat_list).float(), dim=-1)
        mu = torch.exp(library) * rho
        return rho, None, mu, self.px_dropout_decoder(z, *cat_list).float()

    def loadings(self) -> torch.Tensor:
        """Genes x inputs weights, the batch norm folded in: diag(gamma / sigma) W."""
        block = self.factor_regressor.layers[0]
        weight = block[0].weight
        if len(block) > 1 and isinstance(block[1], nn.BatchNorm1d):
            bn = block[1]
            weight = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(1) * weight
        return weight


class DecoderSCVI(nn.Module):
    """Decoder p(x | z, l, covariates): normalised expression rho, dispersion and dropout.

    rho = softmax(Linear(h)) over genes (``scale_activation="softplus"``: softplus, not
    normalised, as scVI with size factors), the count mean is ``exp(library) * rho``, the
    dropout logits are ``Linear(h)`` and, for per-cell dispersion, ``log theta = Linear(h)``.

    Examples
    --------
    >>> dec = DecoderSCVI(4, 20)
    >>> rho, log_theta, mu, zi = dec(torch.randn(3, 4), torch.zeros(3, 1))
    >>> bool(torch.allclose(rho.sum(-1), torch.ones(3)))
    True
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_cat_list: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        cell_dispersion: bool = False,
        scale_activation: str = "softmax",
    ) -> None:
        super().__init__()
        self.softplus = scale_activation == "softplus"
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        # Only built for per-cell dispersion, so no parameter is left without a gradient.
        self.px_r_decoder = nn.Linear(n_hidden, n_output) if cell_dispersion else None
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, *cat_list: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Return ``(rho, log_theta_cell, mu, zi_logits)`` for latent ``z`` and log library.

        ``log_theta_cell`` is None unless the decoder was built with ``cell_dispersion``.
        """
        h = self.px_decoder(z, *cat_list)
        # float32 even under bf16 autocast: the likelihood is computed in full precision
        logits = self.px_scale_decoder(h).float()
        rho = F.softplus(logits) if self.softplus else torch.softmax(logits, dim=-1)
        mu = torch.exp(library) * rho
        log_theta = self.px_r_decoder(h).float() if self.px_r_decoder is not None else None
        return rho, log_theta, mu, self.px_dropout_decoder(h).float()
