"""``SCVAE``: the AnnData-aware user class, the only place that knows both AnnData and tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvae._settings import logger, settings
from scvae.data.loader import DeviceCSR
from scvae.data.registry import Registry, register
from scvae.module import VAE, ModuleConfig
from scvae.train import TrainConfig, fit, split_indices

LATENT_KEY = "X_scvae"
# Bound on the elements (cells x samples x genes) held at once by sampling queries.
_SAMPLE_ELEMENTS = 2**24


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device when present, else the CPU; others are checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device ({err}); use 'auto', 'cpu' or 'cuda:0'."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for, but torch sees no CUDA device; use 'auto' or 'cpu'."
        )
    return dev


class SCVAE:
    """Single-cell variational inference (scVI, Lopez et al. 2018) on an AnnData of raw counts.

    Building the model registers the AnnData: the counts (``X`` or ``layers[layer]``), the
    batch and the labels are read and validated, and every later AnnData is checked against
    that record. The defaults are those of scvi-tools' ``SCVI``.

    Parameters
    ----------
    adata
        Cells x genes raw counts.
    layer
        Layer with the counts (None: ``X``).
    batch_key, labels_key
        Columns of ``obs`` with the batch (enters the decoder) and the cell labels (used by
        ``dispersion="gene-label"``).
    allow_non_integer
        Accept fractional counts (refused by default).
    n_hidden, n_latent, n_layers, dropout_rate
        Width and depth of the networks, latent dimension, encoder dropout.
    dispersion
        "gene", "gene-batch", "gene-label" or "gene-cell".
    gene_likelihood
        "zinb", "nb" or "poisson".
    latent_distribution
        "normal" or "ln" (logistic normal).
    use_observed_lib_size
        Use the observed log library size (True) or a latent one with a per-batch prior.
    encode_covariates, deeply_inject_covariates
        Feed the batch to the encoder; inject it into every hidden layer (not only the first).
    use_batch_norm, use_layer_norm
        Where to normalise: "encoder", "decoder", "both" or "none".
    log_variational
        Encode log1p(counts).

    Notes
    -----
    The initial weights are drawn with ``scvae.settings.seed``, so the same settings seed and
    the same ``train(seed=...)`` give bit-identical models on the CPU.

    Examples
    --------
    >>> import scvae
    >>> adata = scvae.data.simulate(300, 60, seed=0)
    >>> model = scvae.SCVAE(adata, n_latent=5)
    >>> model.train(max_epochs=2, progress_bar=False)
    >>> model.get_latent_representation().shape
    (300, 5)
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        allow_non_integer: bool = False,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        log_variational: bool = True,
    ) -> None:
        registry = register(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            allow_non_integer=allow_non_integer,
        )
        config = ModuleConfig(
            n_input=registry.n_vars,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,  # type: ignore[arg-type]
            gene_likelihood=gene_likelihood,  # type: ignore[arg-type]
            latent_distribution=latent_distribution,  # type: ignore[arg-type]
            log_variational=log_variational,
            use_observed_lib_size=use_observed_lib_size,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            use_batch_norm=use_batch_norm,  # type: ignore[arg-type]
            use_layer_norm=use_layer_norm,  # type: ignore[arg-type]
        )
        # Initial weights from scvae.settings.seed, so the same seeds give the same model
        # whatever else used torch's global generator before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            module = VAE(config)
        self._setup(adata, registry, module)

    def _setup(self, adata: ad.AnnData | None, registry: Registry, module: VAE) -> None:
        self.adata = adata
        self.registry = registry
        self.module = module
        self.module.eval()
        self.is_trained = False
        self.history = pd.DataFrame()
        self.train_indices = np.array([], dtype=np.int64)
        self.validation_indices = np.array([], dtype=np.int64)
        self.train_config: dict[str, Any] = {}

    # ------------------------------------------------------------------ basics
    @property
    def var_names(self) -> pd.Index:
        """The genes the model was registered with, in order."""
        return pd.Index(self.registry.var_names)

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live."""
        return next(self.module.parameters()).device

    def __repr__(self) -> str:
        c = self.module.config
        state = "trained" if self.is_trained else "not trained"
        return (
            f"SCVAE({c.n_input} genes, {c.n_batch} batches, n_latent={c.n_latent}, "
            f"gene_likelihood={c.gene_likelihood!r}, dispersion={c.dispersion!r}; {state})"
        )

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        n_epochs_kl_warmup: int | None = 400,
        reduce_lr_on_plateau: bool = False,
        seed: int | None = None,
        device: str | torch.device = "auto",
        progress_bar: bool | None = None,
    ) -> None:
        """Fit the model by the reparameterized ELBO with Adam (scvi-tools' defaults).

        Parameters
        ----------
        max_epochs
            Passes over the training cells; None: ``min(round(20000 / n_cells * 400), 400)``
            as in scvi-tools.
        batch_size
            Cells per minibatch (a last minibatch under 3 cells is dropped).
        train_size, validation_size
            Fractions of cells for training and validation (the rest of the cells are held
            out; ``train_size=1.0`` trains on every cell with no validation pass).
        early_stopping, early_stopping_patience
            Stop when the validation ELBO has not improved for this many epochs.
        lr, weight_decay, eps
            Adam's options.
        n_epochs_kl_warmup
            KL weight on z rises linearly from 0 to 1 over this many epochs (None: always 1).
        reduce_lr_on_plateau
            Multiply the learning rate by 0.6 after 30 epochs without validation improvement.
        seed
            Seed of the split, the minibatch order and all sampling (None:
            ``scvae.settings.seed``); the same seed gives bit-identical weights on the CPU.
        device
            "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
        progress_bar
            Show a tqdm bar (None: ``scvae.settings.progress_bar``).

        Notes
        -----
        ``model.history`` holds one row per epoch with scvi-tools' column names; there
        ``elbo_train``/``elbo_validation`` are the NEGATIVE ELBO per cell (positive, lower is
        better), as scvi-tools records them, while :meth:`get_elbo` returns the ELBO itself.
        If training fails (an error, NaN loss or Ctrl-C) the weights from before the call are
        restored, so no half-trained model is left behind.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(200, 40, seed=0))
        >>> model.train(max_epochs=3, progress_bar=False)
        >>> list(model.history.index)
        [0, 1, 2]
        """
        n_cells = self.registry_adata().n_obs
        if max_epochs is None:
            max_epochs = min(round(20000 / n_cells * 400), 400)
        seed = settings.seed if seed is None else seed
        config = TrainConfig(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            reduce_lr_on_plateau=reduce_lr_on_plateau,
            seed=seed,
            progress_bar=settings.progress_bar if progress_bar is None else progress_bar,
        )
        dev = resolve_device(device)
        train_idx, val_idx = split_indices(n_cells, train_size, validation_size, seed)
        if len(train_idx) < 2:
            raise ValueError(
                f"Only {len(train_idx)} training cell(s): BatchNorm needs at least two. Use more "
                "cells or a larger train_size."
            )
        adata = self.registry_adata()
        counts = self.registry.check(adata)
        batch = torch.as_tensor(self.registry.batch_codes(adata), device=dev)
        labels = torch.as_tensor(self.registry.label_codes(adata), device=dev)
        before = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        try:
            self.module.to(dev)
            if not self.module.config.use_observed_lib_size:
                self._set_library_prior(counts[train_idx], batch[train_idx].cpu().numpy())
            history = fit(
                self.module, DeviceCSR(counts, dev), batch, labels, train_idx, val_idx, config
            )
        except BaseException:
            self.module.load_state_dict(before)
            self.module.eval()
            raise
        self.history = pd.concat([self.history, history]) if self.is_trained else history
        self.is_trained = True
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.train_config = {
            **config.to_dict(),
            "train_size": train_size,
            "validation_size": validation_size,
            "device": str(dev),
        }

    def _set_library_prior(self, counts: sp.csr_matrix, batch: np.ndarray) -> None:
        log_totals = np.log(np.asarray(counts.sum(axis=1)).ravel())
        means = np.zeros(self.registry.n_batch, dtype=np.float32)
        variances = np.ones(self.registry.n_batch, dtype=np.float32)
        for b in range(self.registry.n_batch):
            sel = log_totals[batch == b]
            if len(sel):
                means[b] = sel.mean()
                variances[b] = sel.var() if len(sel) > 1 else 1.0
        self.module.library_log_means.copy_(torch.from_numpy(means))
        self.module.library_log_vars.copy_(torch.from_numpy(variances))

    def registry_adata(self) -> ad.AnnData:
        """The AnnData the model was built on (raises after a load without one)."""
        if self.adata is None:
            raise ValueError("This model has no AnnData attached; pass adata= to the call.")
        return self.adata

    # ----------------------------------------------------------------- queries
    def _chunks(
        self, adata: ad.AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Validated (counts, batch, label) tensors on the model's device, chunk by chunk."""
        adata = self.registry_adata() if adata is None else adata
        counts = self.registry.check(adata)
        batch = self.registry.batch_codes(adata)
        labels = self.registry.label_codes(adata)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= adata.n_obs):
            raise IndexError(
                f"indices must lie in [0, {adata.n_obs}); got {idx.min()}..{idx.max()}."
            )
        size = batch_size or settings.inference_batch_size
        dev = self.device
        for start in range(0, len(idx), size):
            part = idx[start : start + size]
            x = torch.as_tensor(counts[part].toarray(), device=dev)
            yield (
                x,
                torch.as_tensor(batch[part], device=dev),
                torch.as_tensor(labels[part], device=dev),
            )

    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        give_mean: bool = True,
        mc_samples: int = 5000,
        return_dist: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of each cell, for ``adata.obsm["X_scvae"]``.

        Parameters
        ----------
        adata, indices
            Cells to embed (default: the registered AnnData, all cells).
        give_mean
            Posterior mean (for the ``ln`` latent: the mean of ``mc_samples`` transformed
            samples); False: one sample.
        mc_samples
            Samples for the ``ln`` posterior mean.
        return_dist
            Return the Gaussian posterior's ``(mean, variance)`` instead.
        batch_size
            Cells per chunk (None: ``scvae.settings.inference_batch_size``).

        Returns
        -------
        ndarray cells x n_latent (or two of them with ``return_dist``).

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0), n_latent=4)
        >>> model.get_latent_representation().shape
        (100, 4)
        """
        self.module.eval()
        means, variances = [], []
        for x, b, _ in self._chunks(adata, indices, batch_size):
            qz = self.module.inference(x, b)["qz"]
            if return_dist:
                means.append(qz.loc.cpu())
                variances.append(qz.variance.cpu())
                continue
            if not give_mean:
                z = self.module.transform_z(qz.sample())
            elif self.module.config.latent_distribution == "ln":
                z = self._ln_mean(qz, mc_samples)
            else:
                z = qz.loc
            means.append(z.cpu())
        latent = torch.cat(means).numpy() if means else np.zeros((0, self.module.config.n_latent))
        return (latent, torch.cat(variances).numpy()) if return_dist else latent

    def _ln_mean(self, qz: torch.distributions.Normal, mc_samples: int) -> torch.Tensor:
        total = torch.zeros_like(qz.loc)
        step = max(1, _SAMPLE_ELEMENTS // max(1, qz.loc.numel()))
        done = 0
        while done < mc_samples:
            s = min(step, mc_samples - done)
            total += self.module.transform_z(qz.sample((s,))).sum(0)
            done += s
        return total / mc_samples

    @torch.no_grad()
    def _loss_terms(self, adata, indices, batch_size) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        recon, kl = [], []
        for x, b, lab in self._chunks(adata, indices, batch_size):
            out = self.module(x, b, lab)
            recon.append(out.reconstruction_loss.cpu())
            kl.append((out.kl_z + out.kl_l).cpu())
        return torch.cat(recon).double().numpy(), torch.cat(kl).double().numpy()

    def get_elbo(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """ELBO per cell with KL weight 1 and one posterior sample: negative, higher is better.

        Returns the mean over cells (float) or, with ``return_mean=False``, one value per cell.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0))
        >>> model.get_elbo() < 0
        True
        """
        recon, kl = self._loss_terms(adata, indices, batch_size)
        elbo = -(recon + kl)
        return float(elbo.mean()) if return_mean else elbo

    def get_reconstruction_error(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """-log p(x | z, l) per cell (one posterior sample): positive, lower is better.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(100, 30, seed=0))
        >>> model.get_reconstruction_error() > 0
        True
        """
        recon, _ = self._loss_terms(adata, indices, batch_size)
        return float(recon.mean()) if return_mean else recon

    @torch.no_grad()
    def get_marginal_ll(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-sampled log p(x) per cell (observed library: log p(x | l)).

        Negative, higher is better; at least the ELBO in expectation. ``n_mc_samples`` draws
        from q(z, l | x) are used as the proposal.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(50, 30, seed=0))
        >>> model.get_marginal_ll(n_mc_samples=20) < 0
        True
        """
        self.module.eval()
        n_genes = self.module.config.n_input
        per_pass = max(1, min(n_mc_samples, 100))
        cells = max(1, _SAMPLE_ELEMENTS // (per_pass * n_genes))
        size = min(batch_size or settings.inference_batch_size, cells)
        out = []
        for x, b, lab in self._chunks(adata, indices, size):
            ll = self.module.marginal_ll(
                x, b, lab, n_mc_samples=n_mc_samples, samples_per_pass=per_pass
            )
            out.append(ll.double().cpu())
        values = torch.cat(out).numpy()
        return float(values.mean()) if return_mean else values

    # -------------------------------------------------------------------- files
    def save(self, dir_path: str, *, overwrite: bool = False) -> None:
        """Save the weights (safetensors) and a JSON description into ``dir_path``, atomically.

        See :mod:`scvae.io` for the format. An existing directory is replaced only with
        ``overwrite=True``; a failed save leaves what was there intact.

        Examples
        --------
        >>> import scvae, tempfile, os
        >>> model = scvae.SCVAE(scvae.data.simulate(50, 20, seed=0))
        >>> path = os.path.join(tempfile.mkdtemp(), "model")
        >>> model.save(path)
        >>> sorted(os.listdir(path))
        ['model.json', 'model.safetensors']
        """
        from scvae.io import save_model

        description = {
            "registry": self.registry.to_dict(),
            "module_config": self.module.config.to_dict(),
            "is_trained": self.is_trained,
            "train_config": self.train_config,
            "history": self.history.reset_index().to_dict(orient="list"),
            "train_indices": self.train_indices.tolist(),
            "validation_indices": self.validation_indices.tolist(),
        }
        save_model(dir_path, self.module.state_dict(), description, overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str, adata: ad.AnnData | None = None, *, device: str = "auto") -> SCVAE:
        """Load a model saved by :meth:`save`; reads JSON and safetensors only.

        Parameters
        ----------
        dir_path
            The model directory.
        adata
            An AnnData to attach; checked against the saved registry (same genes in the same
            order, known categories).
        device
            Where to put the weights.

        Examples
        --------
        >>> import scvae, tempfile, os
        >>> adata = scvae.data.simulate(50, 20, seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model")
        >>> scvae.SCVAE(adata).save(path)
        >>> scvae.SCVAE.load(path, adata).is_trained
        False
        """
        from scvae.io import load_model

        weights, description = load_model(dir_path)
        registry = Registry.from_dict(description["registry"])
        try:
            config = ModuleConfig(**description["module_config"])
        except TypeError as err:
            raise ValueError(
                f"{dir_path}: the saved module configuration is malformed ({err})."
            ) from None
        module = VAE(config)
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"{dir_path}: the weights do not fit the saved configuration ({err})."
            ) from None
        if adata is not None:
            registry.check(adata)
        model = cls.__new__(cls)
        model._setup(adata, registry, module.to(resolve_device(device)))
        model.is_trained = bool(description.get("is_trained", False))
        model.train_config = description.get("train_config", {})
        history = pd.DataFrame(description.get("history", {}))
        model.history = history.set_index("epoch") if "epoch" in history else history
        model.train_indices = np.asarray(description.get("train_indices", []), dtype=np.int64)
        model.validation_indices = np.asarray(
            description.get("validation_indices", []), dtype=np.int64
        )
        logger.debug("Loaded %r from %s", model, dir_path)
        return model
