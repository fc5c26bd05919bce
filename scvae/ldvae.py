"""``LDVAE``: scVI with a linear decoder, whose weights are interpretable gene loadings."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scvae.model import SCVAE


class LDVAE(SCVAE):
    """Linearly decoded VAE (Svensson et al. 2020), scvi-tools' ``LinearSCVI``.

    The encoder is scVI's; the decoder is one linear map from the latent (and the batch) to
    the genes' logits, followed by a batch norm: rho = softmax(BN(W [z, batch])). Defaults
    are LinearSCVI's: ``gene_likelihood="nb"``, a latent library
    (``use_observed_lib_size=False``), batch norm in encoder and decoder, no decoder bias.
    Everything else (training, queries, files) is :class:`SCVAE`'s.
    ``encode_covariates=True`` puts the batch into the encoder too, which makes the model a
    reference for ``LDVAE.load_query_data``. This departs from scvi-tools 1.4.2, whose
    LinearSCVI accepts ``encode_covariates=True`` and ignores it.
    ``size_factor_key`` is refused, since LinearSCVI has no size factors and a softmax rho
    times size factors of the usual scale (mean 1) cannot fit counts. A per-cell dispersion
    is refused too, since the linear decoder has none.

    Parameters
    ----------
    adata, layer, batch_key, labels_key, categorical_covariate_keys, allow_non_integer
        Registration, as in :class:`SCVAE`.
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, latent_distribution
        The model, as in :class:`SCVAE`.
    gene_likelihood, use_observed_lib_size, use_batch_norm
        As in :class:`SCVAE`, with LinearSCVI's defaults: ``"nb"``, a latent library, batch
        norm in both networks.
    encode_covariates, log_variational
        As in :class:`SCVAE` (see above for ``encode_covariates``).
    bias
        A bias in the linear decoder (LinearSCVI: none).
    size_factor_key
        Refused (see above); present so that the error names it.

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
        log_variational: bool = True,
    ) -> None:
        # checked here, before the data: a string such as "none" would read as True
        for name, value in (("use_batch_norm", use_batch_norm), ("bias", bias)):
            if not isinstance(value, bool | np.bool_):
                raise TypeError(
                    f"LDVAE's {name} must be True or False, got {value!r}"
                    + (
                        " (batch norm in the linear decoder; the encoder always has it)."
                        if name == "use_batch_norm"
                        else " (a bias in the linear decoder)."
                    )
                )
        if size_factor_key is not None:
            raise ValueError(
                f"LDVAE does not take size factors (size_factor_key={size_factor_key!r}): its "
                "rho is a softmax, so size factor x rho cannot fit counts with size factors of "
                "the usual scale, and scvi-tools' LinearSCVI has none either. Leave "
                "size_factor_key=None (a latent library, the default, or "
                "use_observed_lib_size=True), or use scvae.SCVAE with size_factor_key."
            )
        if dispersion == "gene-cell":
            raise ValueError(
                "LDVAE does not support dispersion='gene-cell' (the linear decoder has no "
                "per-cell dispersion): use 'gene', 'gene-batch' or 'gene-label'."
            )
        self._decoder_bias = bool(bias)
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
            log_variational=log_variational,
        )

    def _extra_module_options(self) -> dict[str, Any]:
        # the linear decoder's rho is a softmax, as LinearSCVI's (size factors are refused)
        return {
            "linear_decoder": True,
            "decoder_bias": self._decoder_bias,
            "scale_activation": "softmax",
        }

    def get_loadings(self) -> pd.DataFrame:
        """Genes x latent loadings of the linear decoder, the batch norm folded in.

        Each weight is scaled by gamma / sqrt(running_var + eps) of its gene's batch norm, so
        a loading is the change in the gene's logit per unit of the latent dimension.

        Returns
        -------
        DataFrame genes x latent dimensions, indexed by gene, columns ``Z_0``, ``Z_1``, ...
        (scvi-tools' names).

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
