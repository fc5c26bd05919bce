"""``LDVAE``: scVI with a linear decoder, whose weights are interpretable gene loadings."""

from __future__ import annotations

from typing import Any

import anndata as ad
import pandas as pd

from scvae.model import SCVAE


class LDVAE(SCVAE):
    """Linearly decoded VAE (Svensson et al. 2020), scvi-tools' ``LinearSCVI``.

    The encoder is scVI's; the decoder is one linear map from the latent (and the batch) to
    the genes' logits, followed by a batch norm: rho = softmax(BN(W [z, batch])). Defaults
    are LinearSCVI's: ``gene_likelihood="nb"``, a latent library
    (``use_observed_lib_size=False``), batch norm in encoder and decoder, no decoder bias.
    Everything else (training, queries, files) is :class:`SCVAE`'s.
    ``encode_covariates=True`` (the batch also enters the encoder, as LinearSCVI's
    ``**model_kwargs`` allow) makes the model a reference for ``LDVAE.load_query_data``.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.LDVAE(scvae.data.simulate(100, 30, seed=0), n_latent=3)
    >>> model.train(max_epochs=2, progress_bar=False)
    >>> model.get_loadings().shape
    (30, 3)
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        allow_non_integer: bool = False,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "nb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = False,
        use_batch_norm: bool = True,
        bias: bool = False,
        encode_covariates: bool = False,
    ) -> None:
        self._decoder_bias = bias
        super().__init__(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            allow_non_integer=allow_non_integer,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            use_batch_norm="both" if use_batch_norm else "encoder",
            encode_covariates=encode_covariates,
        )

    def _extra_module_options(self) -> dict[str, Any]:
        # the linear decoder's rho is a softmax, with size factors too (as LinearSCVI's)
        return {
            "linear_decoder": True,
            "decoder_bias": self._decoder_bias,
            "scale_activation": "softmax",
        }

    def get_loadings(self) -> pd.DataFrame:
        """Genes x latent loadings of the linear decoder, the batch norm folded in.

        Each weight is scaled by gamma / sqrt(running_var + eps) of its gene's batch norm, so
        a loading is the change in the gene's logit per unit of the latent dimension.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.LDVAE(scvae.data.simulate(50, 12, seed=0), n_latent=2)
        >>> list(model.get_loadings().columns)
        ['Z_0', 'Z_1']
        """
        weights = self.module.loadings().detach().cpu().numpy()
        columns = [f"Z_{i}" for i in range(weights.shape[1])]
        return pd.DataFrame(weights, index=self.var_names, columns=columns)
