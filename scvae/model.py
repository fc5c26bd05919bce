"""``SCVAE``: the AnnData-aware user class, the only place that knows both AnnData and tensors."""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvae import distributed, inference
from scvae._settings import logger, settings
from scvae.data.backed import BLOCK_ROWS, BUFFER_BLOCKS, BackedCSR, is_on_disk, row_totals
from scvae.data.loader import DeviceCSR
from scvae.data.registry import Registry, register
from scvae.module import VAE, Covariates, ModuleConfig
from scvae.train import TrainConfig, TrainingDiverged, fit, split_indices

LATENT_KEY = "X_scvae"
# Bound on the elements (cells x samples x genes) held at once by sampling queries.
_SAMPLE_ELEMENTS = inference.SAMPLE_ELEMENTS


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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA "
            f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES "
            "renumbers them from 0)."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was asked for, but MPS is not available here.")
    return dev


def _digest(arrays: Sequence[np.ndarray | torch.Tensor]) -> str:
    """SHA-256 of the bytes of a sequence of arrays or tensors (identifies a run's inputs)."""
    digest = hashlib.sha256()
    for a in arrays:
        t = torch.as_tensor(a).detach().cpu().contiguous().reshape(-1)
        digest.update(str((t.dtype, t.numel())).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_options(**options: Any) -> None:
    """Refuse constructor options of the wrong type or range, naming the option and the fix."""
    for name in ("layer", "batch_key", "labels_key", "size_factor_key"):
        value = options[name]
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a column/layer name (str) or None, got {value!r}.")
    for name in ("categorical_covariate_keys", "continuous_covariate_keys"):
        value = options[name]
        if isinstance(value, str):
            raise TypeError(
                f"{name} must be a list of obs columns, e.g. [{value!r}], got {value!r}."
            )
        if value is not None and not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} must be a list of obs column names (str), got {value!r}.")
    for name in ("n_hidden", "n_latent", "n_layers"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    rate = options["dropout_rate"]
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {rate!r}.")
    for name in (
        "allow_non_integer",
        "use_observed_lib_size",
        "encode_covariates",
        "deeply_inject_covariates",
        "log_variational",
    ):
        if not isinstance(options[name], bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {options[name]!r}.")


def _train_worker(rank: int, world_size: int, init_method: str, payload: bytes) -> None:
    """One process of ``SCVAE.train(n_processes=...)``: join the group, train, rank 0 saves."""
    import torch.distributed as dist

    # the payload arrives as plain pickle bytes: each process unpickles its own copy (tensors
    # handed over by torch.multiprocessing would share memory, and every rank's optimizer
    # step would then update the same weights)
    model, data, options, out = pickle.loads(payload)
    device = resolve_device(options.get("device", "auto"))
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    dist.init_process_group(
        distributed.backend_for(device),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
    )
    try:
        model.adata = ad.read_h5ad(data, backed="r") if isinstance(data, str) else data
        model.train(**options)
        if rank == 0:
            model.save(out)
    finally:
        dist.destroy_process_group()


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
    size_factor_key
        Column of ``obs`` with positive size factors used as the library size (takes priority
        over ``use_observed_lib_size``).
    categorical_covariate_keys, continuous_covariate_keys
        Further columns of ``obs`` that enter the decoder (and the encoder with
        ``encode_covariates``) like the batch: one-hot, or as numbers.
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
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
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
        _check_options(
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            allow_non_integer=allow_non_integer,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            use_observed_lib_size=use_observed_lib_size,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            log_variational=log_variational,
        )
        # The string options are checked before the (slower) validation of the data.
        ModuleConfig(
            n_input=1,
            dispersion=dispersion,  # type: ignore[arg-type]
            gene_likelihood=gene_likelihood,  # type: ignore[arg-type]
            latent_distribution=latent_distribution,  # type: ignore[arg-type]
            use_batch_norm=use_batch_norm,  # type: ignore[arg-type]
            use_layer_norm=use_layer_norm,  # type: ignore[arg-type]
        )
        registry = register(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
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
            n_cats_per_cov=tuple(registry.n_cats_per_cov),
            n_continuous_cov=len(registry.continuous_covariate_keys),
            use_size_factor=size_factor_key is not None,
            **self._extra_module_options(),
        )
        # Initial weights from scvae.settings.seed, so the same seeds give the same model
        # whatever else used torch's global generator before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            module = VAE(config)
        self._setup(adata, registry, module)

    def _extra_module_options(self) -> dict[str, Any]:
        """Module options a subclass fixes (the linear decoder of :class:`LDVAE`)."""
        return {}

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
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        precision: str = "32",
        compile: bool = False,
        n_processes: int = 1,
        backed_block_rows: int = BLOCK_ROWS,
        backed_buffer_blocks: int = BUFFER_BLOCKS,
    ) -> None:
        """Fit the model by the reparameterized ELBO with Adam (scvi-tools' defaults).

        Parameters
        ----------
        max_epochs
            Passes over the training cells; None: ``min(round(20000 / n_cells * 400), 400)``
            as in scvi-tools.
        batch_size
            Cells per minibatch (a last minibatch under 3 cells is dropped). A batch size
            larger than the training set gives one minibatch of all training cells per epoch.
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
        checkpoint_dir
            Keep checkpoints here (see :mod:`scvae.checkpoint`): ``latest/`` and ``best/``
            (lowest validation loss, or training loss without validation), each with the
            weights, the optimizer state and the epoch, written atomically. When the directory
            already holds a checkpoint of this same run (same data registration, model options,
            training options, seed and starting weights), training resumes from it; a
            checkpoint of another run is an error. ``max_epochs`` may differ, to train longer.
        checkpoint_every
            Write ``latest/`` every this many epochs (and after the last one).
        precision
            "32" (float32 throughout) or "bf16-mixed": the matrix products in bfloat16 under
            autocast, the likelihood and KL terms in float32 (Lightning's names).
        compile
            Run the training step through ``torch.compile``: the first minibatch pays tens of
            seconds of compilation, later steps are faster, so it pays off on long runs. If
            compilation fails, training goes on without it (a warning says so).
        n_processes
            Train in this many new processes with DistributedDataParallel (gloo on the CPU,
            NCCL on GPUs: process ``r`` on ``cuda:r``), then load rank 0's weights and history
            into this model. ``batch_size`` stays the cells per optimizer step: each process
            takes ``batch_size / n_processes`` of every minibatch, so the optimisation is the
            same as in one process. The workers get a copy of the model and the AnnData (a
            backed AnnData is reopened from its file). Under ``torchrun``, leave this at 1:
            ``train`` joins the process group torchrun set up (see :mod:`scvae.distributed`).
        backed_block_rows, backed_buffer_blocks
            For an AnnData opened with ``read_h5ad(path, backed="r")``: cells per contiguous
            read and blocks shuffled together (memory holds about their product of cells; see
            :mod:`scvae.data.backed`).

        Notes
        -----
        ``model.history`` holds one row per epoch with scvi-tools' column names; there
        ``elbo_train``/``elbo_validation`` are the NEGATIVE ELBO per cell (positive, lower is
        better), as scvi-tools records them, while :meth:`get_elbo` returns the ELBO itself.

        If the loss becomes NaN or infinite, :class:`~scvae.train.TrainingDiverged` is raised
        at that step, naming the likely cause; the model keeps the weights of the last good
        step (and the history of the finished epochs), so it can still be saved or queried.
        Any other failure (an error or Ctrl-C) restores the weights from before the call, so
        no half-trained model is left behind; with ``checkpoint_dir`` the same call resumes.

        On the CPU, a run killed and resumed from its checkpoint ends with the same weights,
        bit for bit, as an uninterrupted run.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(200, 40, seed=0))
        >>> model.train(max_epochs=3, progress_bar=False)
        >>> list(model.history.index)
        [0, 1, 2]
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "n_processes")}
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
            precision=precision,
            compile=compile,
        )
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
            raise ValueError(f"checkpoint_every must be a whole number, got {checkpoint_every!r}.")
        dev = resolve_device(device)
        if n_processes != 1:
            self._train_in_processes(n_processes, options, dev)
            return
        distributed.init_from_env(dev)
        world = distributed.current_world()
        dev = distributed.rank_device(dev, world)
        if batch_size // world.size < 2:
            raise ValueError(
                f"batch_size={batch_size} over {world.size} processes leaves under 2 cells per "
                f"process and step (BatchNorm needs 2): use batch_size >= {2 * world.size}."
            )
        train_idx, val_idx = split_indices(n_cells, train_size, validation_size, config.seed)
        if len(train_idx) < 2:
            raise ValueError(
                f"Only {len(train_idx)} training cell(s): training needs at least two (BatchNorm "
                "normalises over the cells of a minibatch). Use more cells or a larger "
                "train_size; a trained model can still be queried on a single cell."
            )
        adata = self.registry_adata()
        counts = self._training_counts(adata)
        batch = torch.as_tensor(self.registry.batch_codes(adata), device=dev)
        covariates = self._covariates(adata).to(dev)
        before = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        train_config = {
            **config.to_dict(),
            "train_size": train_size,
            "validation_size": validation_size,
            "device": str(dev),
        }
        if world.distributed:
            train_config["n_processes"] = world.size
        checkpoint = None
        if checkpoint_dir is not None:
            from scvae.checkpoint import Checkpointer

            previous = self.history if self.is_trained else None

            def describe(history: pd.DataFrame) -> dict[str, Any]:
                full = history if previous is None else pd.concat([previous, history])
                return self._description(full, True, train_config, train_idx, val_idx)

            identity = {
                "model_class": type(self).__name__,
                "registry": self.registry.to_dict(),
                "module_config": self.module.config.to_dict(),
                "train_config": {
                    k: v
                    for k, v in train_config.items()
                    if k not in ("max_epochs", "progress_bar", "device")
                },
                "split_sha256": _digest([train_idx, val_idx]),
                "initial_weights_sha256": _digest(list(before.values())),
            }
            checkpoint = Checkpointer(
                checkpoint_dir, identity=identity, describe=describe, every=checkpoint_every
            )
        try:
            self.module.to(dev)
            if self.module.l_encoder is not None:
                totals = row_totals(counts)[train_idx]
                self._set_library_prior(totals, batch[train_idx].cpu().numpy())
            if is_on_disk(counts):
                source = BackedCSR(
                    counts,
                    dev,
                    block_rows=backed_block_rows,
                    buffer_blocks=backed_buffer_blocks,
                )
            else:
                source = DeviceCSR(counts, dev)
            history = fit(
                self.module,
                source,
                batch,
                covariates,
                train_idx,
                val_idx,
                config,
                checkpoint,
                world,
            )
        except TrainingDiverged as err:
            # Keep the last good step's weights when any training happened in this call (or
            # came from a checkpoint); otherwise leave the model exactly as it was.
            moved = any(
                not torch.equal(p.detach().cpu(), before[name].cpu())
                for name, p in self.module.named_parameters()
            )
            if moved:
                self._record_training(err.history, train_idx, val_idx, train_config)
            else:
                self.module.load_state_dict(before)
            self.module.eval()
            raise
        except NotImplementedError as err:
            self.module.load_state_dict(before)
            self.module.eval()
            if dev.type != "mps":
                raise
            raise NotImplementedError(
                f"An operation of the training step is missing on MPS ({err}). Run with "
                "device='cpu', or set PYTORCH_ENABLE_MPS_FALLBACK=1 before starting Python to "
                "run the missing operations on the CPU. (scvae uses no sparse tensors: the "
                "counts are plain index/value arrays, so MPS's lack of sparse CSR is no issue.)"
            ) from err
        except BaseException:
            self.module.load_state_dict(before)
            self.module.eval()
            raise
        self._record_training(history, train_idx, val_idx, train_config)

    def _record_training(
        self,
        history: pd.DataFrame,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        train_config: dict[str, Any],
    ) -> None:
        self.history = pd.concat([self.history, history]) if self.is_trained else history
        self.is_trained = True
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.train_config = train_config

    def _training_counts(self, adata: ad.AnnData) -> Any:
        """The registered counts, checked block by block: the AnnData's own matrix (no copy of
        a CSR float32 matrix) or, for a backed AnnData, its on-disk dataset."""
        for _ in self.registry.check_blocks(adata):
            pass
        layer = self.registry.layer
        return adata.X if layer is None else adata.layers[layer]

    def _train_in_processes(
        self, n_processes: int, options: dict[str, Any], device: torch.device
    ) -> None:
        """``train`` in ``n_processes`` spawned processes; rank 0's result is loaded here."""
        import copy
        import tempfile

        import torch.distributed as dist

        if isinstance(n_processes, bool) or not isinstance(n_processes, int) or n_processes < 1:
            raise ValueError(f"n_processes must be a whole number >= 1, got {n_processes!r}.")
        if dist.is_available() and dist.is_initialized():
            raise ValueError(
                "n_processes cannot start processes inside a process group (e.g. under "
                "torchrun): call train without n_processes there, it trains across the group."
            )
        if device.type == "cuda" and n_processes > torch.cuda.device_count():
            raise ValueError(
                f"n_processes={n_processes} on CUDA needs one GPU per process; torch sees "
                f"{torch.cuda.device_count()}."
            )
        adata = self.registry_adata()
        if adata.isbacked:
            if adata.is_view:
                raise ValueError(
                    "n_processes with a view of a backed AnnData: the workers reopen the file, "
                    "so write the subset to its own file first (adata.write_h5ad(path))."
                )
            data: ad.AnnData | str = str(adata.filename)
        else:
            data = adata
        worker = copy.copy(self)
        worker.adata = None
        with tempfile.TemporaryDirectory(prefix="scvae-train-") as tmp:
            out = os.path.join(tmp, "model")
            payload = pickle.dumps((worker, data, options, out))
            distributed.launch(n_processes, _train_worker, payload)
            result = type(self).load(out, device=str(self.device))
        self.module.load_state_dict(result.module.state_dict())
        self.module.eval()
        self.history, self.is_trained = result.history, True
        self.train_indices = result.train_indices
        self.validation_indices = result.validation_indices
        self.train_config = result.train_config

    def _set_library_prior(self, totals: np.ndarray, batch: np.ndarray) -> None:
        log_totals = np.log(np.asarray(totals, dtype=np.float64).ravel())
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
    def _covariates(self, adata: ad.AnnData) -> Covariates:
        """The registered per-cell covariates of ``adata`` as CPU tensors."""
        reg = self.registry

        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.as_tensor(a)

        return Covariates(
            labels=tensor(reg.label_codes(adata)),
            categorical=tensor(reg.categorical_codes(adata)),
            continuous=tensor(reg.continuous_values(adata)),
            size_factor=tensor(reg.size_factors(adata)),
        )

    def _chunks(
        self, adata: ad.AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> inference.Chunks:
        """Validated (counts, batch, covariates) on the model's device, chunk by chunk.

        The genes and the per-cell annotations are checked once; the counts are read and
        checked one chunk at a time (a slice of cells when the chunk is contiguous, e.g. from
        a backed AnnData on disk), so memory holds one chunk of counts, never all of them.
        """
        adata = self.registry_adata() if adata is None else adata
        self.registry.check(adata[:1])  # genes and layer; counts are checked chunk by chunk
        batch = torch.as_tensor(self.registry.batch_codes(adata))
        covariates = self._covariates(adata)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= adata.n_obs):
            raise IndexError(
                f"indices must lie in [0, {adata.n_obs}); got {idx.min()}..{idx.max()}."
            )
        size = settings.inference_batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1 or None, got {size!r}.")
        dev = self.device
        self.module.eval()

        def chunks() -> Iterator[inference.Chunk]:
            for start in range(0, len(idx), size):
                part = idx[start : start + size]
                lo, hi = int(part[0]), int(part[-1]) + 1
                if hi - lo == len(part) and np.array_equal(part, np.arange(lo, hi)):
                    counts = self.registry.check(adata[lo:hi])
                else:  # read each cell once, in file order, then put them in the asked order
                    unique, inverse = np.unique(part, return_inverse=True)
                    counts = self.registry.check(adata[unique])[inverse]
                x = torch.as_tensor(counts.toarray(), device=dev)
                part_t = torch.as_tensor(part)
                yield x, batch[part_t].to(dev), covariates.take(part_t).to(dev)

        return inference.Chunks(chunks(), len(idx))

    def _sampling_batch_size(self, batch_size: int | None, n_samples: int) -> int:
        """Cells per chunk so that cells x samples x genes stays under a fixed bound."""
        per_cell = max(1, n_samples) * self.module.config.n_input
        return max(
            1, min(batch_size or settings.inference_batch_size, _SAMPLE_ELEMENTS // per_cell)
        )

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
        return inference.latent(
            self.module,
            self._chunks(adata, indices, batch_size),
            give_mean=give_mean,
            mc_samples=mc_samples,
            return_dist=return_dist,
        )

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
        recon, kl = inference.loss_terms(self.module, self._chunks(adata, indices, batch_size))
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
        recon, _ = inference.loss_terms(self.module, self._chunks(adata, indices, batch_size))
        return float(recon.mean()) if return_mean else recon

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
        size = self._sampling_batch_size(batch_size, min(n_mc_samples, 100))
        values = inference.marginal_ll(
            self.module, self._chunks(adata, indices, size), n_mc_samples
        )
        return float(values.mean()) if return_mean else values

    def _batch_codes(self, transform_batch: str | Sequence[str] | None) -> list[int] | None:
        if transform_batch is None:
            return None
        names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
        known = self.registry.batch_categories
        unknown = [str(b) for b in names if str(b) not in known]
        if unknown:
            raise ValueError(
                f"transform_batch {unknown} is not a registered batch (batches: {known})."
            )
        return [known.index(str(b)) for b in names]

    def _gene_index(self, gene_list: Sequence[str] | None) -> np.ndarray | None:
        if gene_list is None:
            return None
        lookup = {g: i for i, g in enumerate(self.registry.var_names)}
        missing = [g for g in gene_list if g not in lookup]
        if missing:
            raise ValueError(f"gene_list has genes the model does not know: {missing[:5]}.")
        return np.array([lookup[g] for g in gene_list], dtype=np.int64)

    def _obs_names(self, adata: ad.AnnData | None, indices: Sequence[int] | None) -> pd.Index:
        names = (self.registry_adata() if adata is None else adata).obs_names
        return names if indices is None else names[np.asarray(indices, dtype=np.int64)]

    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression per cell and gene, as in scvi-tools.

        Parameters
        ----------
        adata, indices
            Cells (default: the registered AnnData, all cells).
        transform_batch
            Decode every cell as if it came from this batch (a list: averaged over those
            batches), for batch-corrected expression; None: each cell's own batch.
        gene_list
            Genes to return (default: all).
        library_size
            1: rho, the normalised expression (rows sum to 1 over all genes); a number: rho
            times it (e.g. 1e4 for counts per 10,000); "latent": mu, the expected counts at the
            cell's own library.
        n_samples, return_mean
            Posterior samples of z per cell (each gives one value, as in scvi-tools), averaged
            when ``return_mean``.
        return_numpy
            Return an ndarray instead of a DataFrame (forced when samples are kept).
        batch_size
            Cells per chunk.

        Returns
        -------
        DataFrame cells x genes (obs names x gene names), or an ndarray
        ``(n_samples, cells, genes)`` when ``n_samples > 1`` and ``return_mean=False``.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(60, 20, seed=0))
        >>> expr = model.get_normalized_expression()
        >>> expr.shape, bool(np.allclose(expr.sum(1), 1, atol=1e-4))
        ((60, 20), True)
        """
        if library_size != "latent" and not (
            isinstance(library_size, int | float) and library_size > 0
        ):
            raise ValueError(
                f"library_size must be a positive number or 'latent', got {library_size!r}."
            )
        gene_idx = self._gene_index(gene_list)
        values = inference.normalized_expression(
            self.module,
            self._chunks(adata, indices, self._sampling_batch_size(batch_size, n_samples)),
            transform_batch=self._batch_codes(transform_batch),
            gene_idx=gene_idx,
            library_size=library_size,
            n_samples=n_samples,
            return_mean=return_mean,
        )
        if return_numpy or values.ndim == 3:
            return values
        genes = self.var_names if gene_idx is None else self.var_names[gene_idx]
        return pd.DataFrame(values, index=self._obs_names(adata, indices), columns=genes)

    def get_likelihood_parameters(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) per cell and gene: ``mean``, ``dispersions``, ``dropout``.

        ``dropout`` (zinb only) holds the logits of the dropout probability and
        ``dispersions`` (not for poisson) the inverse dispersion theta, as in scvi-tools.
        With ``n_samples > 1`` the arrays have a leading sample axis unless ``give_mean``.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(40, 15, seed=0))
        >>> sorted(model.get_likelihood_parameters())
        ['dispersions', 'dropout', 'mean']
        """
        return inference.likelihood_parameters(
            self.module,
            self._chunks(adata, indices, self._sampling_batch_size(batch_size, n_samples)),
            n_samples=n_samples,
            give_mean=give_mean,
        )

    def get_latent_library_size(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size per cell, ``(cells, 1)``, on the count scale.

        A latent library gives the mean of q(l | x) on the count scale with ``give_mean``
        (else one sample); an observed one gives the total counts (size factors when
        registered).

        Examples
        --------
        >>> import scvae
        >>> adata = scvae.data.simulate(30, 10, seed=0)
        >>> model = scvae.SCVAE(adata)
        >>> bool(np.allclose(model.get_latent_library_size()[:, 0], adata.X.sum(1).A1))
        True
        """
        return inference.latent_library_size(
            self.module, self._chunks(adata, indices, batch_size), give_mean=give_mean
        )

    def posterior_predictive_sample(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> sp.csr_matrix | list[sp.csr_matrix]:
        """Counts drawn from the posterior predictive, as sparse CSR cells x genes.

        One matrix for ``n_samples=1``; a list of ``n_samples`` matrices otherwise (scvi-tools
        returns a 3-D sparse array there; scipy has none).

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(40, 15, seed=0))
        >>> model.posterior_predictive_sample().shape
        (40, 15)
        """
        samples = inference.posterior_predictive(
            self.module,
            self._chunks(adata, indices, self._sampling_batch_size(batch_size, n_samples)),
            n_samples=n_samples,
            gene_idx=self._gene_index(gene_list),
        )
        return samples[0] if n_samples == 1 else samples

    def get_feature_correlation_matrix(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        n_samples: int = 10,
        batch_size: int | None = None,
        rna_size_factor: float = 1000,
        transform_batch: str | Sequence[str] | None = None,
        correlation_type: str = "spearman",
    ) -> pd.DataFrame:
        """Gene-gene correlation of denoised expression, genes x genes.

        Denoised values are Gamma draws with mean ``rna_size_factor * rho`` (and the model's
        dispersion) for ``n_samples`` posterior samples per cell, pooled over the batches of
        ``transform_batch`` (None: each cell's own); "spearman" or "pearson" correlation.
        Memory grows with cells x samples x genes.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(40, 6, seed=0))
        >>> model.get_feature_correlation_matrix(n_samples=2).shape
        (6, 6)
        """
        if correlation_type not in ("spearman", "pearson"):
            raise ValueError(
                f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}."
            )
        codes = self._batch_codes(transform_batch) or [None]
        size = self._sampling_batch_size(batch_size, n_samples)
        data = np.concatenate(
            [
                inference.denoised_samples(
                    self.module,
                    self._chunks(adata, indices, size),
                    n_samples=n_samples,
                    rna_size_factor=rna_size_factor,
                    transform_batch=code,
                )
                for code in codes
            ]
        )
        if correlation_type == "spearman":
            data = np.apply_along_axis(lambda c: pd.Series(c).rank().to_numpy(), 0, data)
        corr = np.corrcoef(data, rowvar=False)
        return pd.DataFrame(corr, index=self.var_names, columns=self.var_names)

    # -------------------------------------------------------------------- files
    def _description(
        self,
        history: pd.DataFrame,
        is_trained: bool,
        train_config: dict[str, Any],
        train_indices: np.ndarray,
        validation_indices: np.ndarray,
    ) -> dict[str, Any]:
        """The JSON description of a model directory (see :mod:`scvae.io`)."""
        return {
            "model_class": type(self).__name__,
            "registry": self.registry.to_dict(),
            "module_config": self.module.config.to_dict(),
            "is_trained": is_trained,
            "train_config": train_config,
            "history": history.reset_index().to_dict(orient="list"),
            "train_indices": np.asarray(train_indices).tolist(),
            "validation_indices": np.asarray(validation_indices).tolist(),
        }

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save the weights (safetensors) and a JSON description into ``dir_path``, atomically.

        See :mod:`scvae.io` for the format. An existing directory is replaced only with
        ``overwrite=True``, in one step: a save that fails or is killed at any moment leaves
        the previous model intact and never a half-written directory. A path that cannot be
        written (under a file, without permission, disk full) raises the matching ``OSError``
        naming the path.

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

        description = self._description(
            self.history,
            self.is_trained,
            self.train_config,
            self.train_indices,
            self.validation_indices,
        )
        save_model(dir_path, self.module.state_dict(), description, overwrite=overwrite)

    @classmethod
    def load(
        cls, dir_path: str | os.PathLike, adata: ad.AnnData | None = None, *, device: str = "auto"
    ) -> SCVAE:
        """Load a model saved by :meth:`save`; reads JSON and safetensors only.

        Only ``model.json`` and ``model.safetensors`` are opened (the weights checked against
        the checksum in ``model.json``); other files in the directory, such as a pickle planted
        there, are ignored and never run. A missing, truncated, corrupted, foreign or
        newer-format directory raises :class:`~scvae.io.ModelFileError` naming the problem.
        A training checkpoint's ``latest/`` or ``best/`` directory loads the same way.

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
        from scvae.io import DESCRIPTION_FILE, ModelFileError, load_model

        weights, description = load_model(dir_path)
        saved_class = description.get("model_class", "SCVAE")
        if saved_class != cls.__name__:
            raise ModelFileError(
                f"{dir_path} holds a {saved_class} model; load it with scvae.{saved_class}.load."
            )
        malformed = f"{dir_path}: {DESCRIPTION_FILE} is malformed"
        try:
            registry = Registry.from_dict(description["registry"])
            config = ModuleConfig(**description["module_config"])
            history = pd.DataFrame(description.get("history", {}))
            history = history.set_index("epoch") if "epoch" in history else history
            train_indices = np.asarray(description.get("train_indices", []), dtype=np.int64)
            val_indices = np.asarray(description.get("validation_indices", []), dtype=np.int64)
            train_config = dict(description.get("train_config", {}))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ModelFileError(
                f"{malformed} ({type(err).__name__}: {err}). Restore it from the original save."
            ) from None
        try:
            consistent = (
                isinstance(registry.var_names, list)
                and all(isinstance(g, str) for g in registry.var_names)
                and (registry.n_vars, registry.n_batch, registry.n_labels)
                == (config.n_input, config.n_batch, config.n_labels)
                and tuple(registry.n_cats_per_cov) == config.n_cats_per_cov
            )
        except (KeyError, TypeError, AttributeError):
            consistent = False
        if not consistent:
            raise ModelFileError(
                f"{malformed}: its registry (genes, batches, labels) does not match its module "
                "configuration. Restore it from the original save."
            )
        # Shapes are compared on the meta device first, so a tampered configuration cannot
        # make this allocate a huge module.
        try:
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in VAE(config).state_dict().items()}
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ModelFileError(f"{malformed} ({err}).") from None
        saved = {k: tuple(v.shape) for k, v in weights.items()}
        if shapes != saved:
            wrong = sorted(set(shapes) ^ set(saved)) or [k for k in shapes if shapes[k] != saved[k]]
            raise ModelFileError(
                f"{dir_path}: the weights do not fit the saved configuration (e.g. "
                f"{', '.join(wrong[:3])}). Restore the directory from the original save."
            )
        module = VAE(config)
        module.load_state_dict(weights, strict=True)
        if adata is not None:
            registry.check(adata)
        model = cls.__new__(cls)
        model._decoder_bias = config.decoder_bias
        model._setup(adata, registry, module.to(resolve_device(device)))
        model.is_trained = bool(description.get("is_trained", False))
        model.train_config = train_config
        model.history = history
        model.train_indices = train_indices
        model.validation_indices = val_indices
        logger.debug("Loaded %r from %s", model, dir_path)
        return model

    @classmethod
    def prepare_query_anndata(
        cls, adata: ad.AnnData, reference_model: SCVAE | str | os.PathLike
    ) -> ad.AnnData:
        """A copy of a query AnnData with the reference's genes, in the reference's order.

        Genes the query lacks are added as zeros (in ``X`` and in every layer) and genes the
        reference lacks are dropped; how many of each is logged (``scvae`` logger, INFO; a
        warning when under 80 % of the reference's genes are present). Unlike scvi-tools,
        whose version changes ``adata`` in place by default, this returns a new AnnData and
        leaves ``adata`` as it was.

        Parameters
        ----------
        adata
            The query's raw counts.
        reference_model
            The reference, as a model or a directory saved by :meth:`save`.

        Examples
        --------
        >>> import scvae
        >>> data = scvae.data.simulate(60, 20, n_batches=2, seed=0)
        >>> ref = scvae.SCVAE(data, batch_key="batch", encode_covariates=True)
        >>> query = data[:10, ::-1][:, 2:].copy()  # genes reversed, two of them missing
        >>> scvae.SCVAE.prepare_query_anndata(query, ref).var_names.equals(ref.var_names)
        True
        """
        from scvae.data.query import pad_query_genes

        reference = (
            reference_model
            if isinstance(reference_model, SCVAE)
            else cls.load(reference_model, device="cpu")
        )
        return pad_query_genes(adata, reference.registry.var_names)

    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference_model: SCVAE | str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
    ) -> SCVAE:
        """A new model that maps a query onto a trained reference (scArches architecture surgery).

        The query's batches that the reference does not know are added as new batch
        categories (codes after the reference's; the library prior of each from the query's
        cells); cells of a batch the reference knows keep that batch's code. Then everything
        the reference learnt is frozen except what the new batches need (see
        :mod:`scvae.surgery`; the defaults are scvi-tools'), and ``train`` fits the new
        columns on the query's cells alone. The reference model and its files are not
        changed.

        Mapping needs a reference trained with ``encode_covariates=True`` (otherwise its
        encoder never sees the batch and the query's latent cannot move: refused), and works
        best with ``use_layer_norm="both", use_batch_norm="none"``, whose normalisation has no
        running statistics fitted to the reference's batches.

        Parameters
        ----------
        adata
            The query's raw counts with the reference's genes in its order (see
            :meth:`prepare_query_anndata`) and the reference's ``batch_key`` column.
        reference_model
            The reference, as a model or a directory saved by :meth:`save`.
        device
            Where the new model lives.
        unfrozen, freeze_dropout, freeze_expression, freeze_decoder_first_layer,
        freeze_batchnorm_encoder, freeze_batchnorm_decoder
            What trains (:class:`scvae.surgery.FreezeConfig`).

        Returns
        -------
        A new, untrained model (``is_trained=False``) on ``adata``; train it, e.g.
        ``model.train(max_epochs=200, weight_decay=0.0)``. ``model.frozen`` holds the masks
        of the parameters that train in part.

        Examples
        --------
        >>> import scvae
        >>> ref_data = scvae.data.simulate(100, 30, n_batches=2, seed=0)
        >>> ref = scvae.SCVAE(ref_data, batch_key="batch", encode_covariates=True)
        >>> query = scvae.data.simulate(40, 30, seed=1)
        >>> query.obs["batch"] = "lab2"
        >>> model = scvae.SCVAE.load_query_data(query, ref)
        >>> model.registry.batch_categories
        ['batch0', 'batch1', 'lab2']
        >>> model.train(max_epochs=1, weight_decay=0.0, progress_bar=False)
        """
        from scvae import surgery
        from scvae.data.query import library_prior, query_registry
        from scvae.data.registry import RegistryError

        reference = (
            reference_model
            if isinstance(reference_model, SCVAE)
            else cls.load(reference_model, device="cpu")
        )
        if type(reference) is not cls:
            name = type(reference).__name__
            raise TypeError(f"The reference is a {name}; use scvae.{name}.load_query_data.")
        surgery.check_mappable(reference.module)
        if list(map(str, adata.var_names)) != reference.registry.var_names:
            raise RegistryError(
                "The query's genes are not the reference's, in the reference's order; run "
                "query = scvae.SCVAE.prepare_query_anndata(query, reference_model) first."
            )
        keep_labels = reference.module.config.dispersion == "gene-label"
        registry, new = query_registry(reference.registry, adata, keep_labels=keep_labels)
        counts = registry.check(adata)
        n_ref = reference.registry.n_batch
        means, variances = library_prior(
            counts, registry.batch_codes(adata), range(n_ref, registry.n_batch)
        )
        module = surgery.add_batches(
            reference.module,
            len(new),
            library_log_means=torch.from_numpy(means),
            library_log_vars=torch.from_numpy(variances),
        )
        freeze = surgery.FreezeConfig(
            unfrozen=unfrozen,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        model = cls.__new__(cls)
        model._decoder_bias = module.config.decoder_bias
        model._setup(adata, registry, module.to(resolve_device(device)))
        model.frozen = surgery.freeze_reference(model.module, n_ref, freeze)
        logger.info(
            "Query of %d cells: %d new batch(es) %s added to the reference's %d; %d cells of "
            "reference batches keep their codes.",
            adata.n_obs,
            len(new),
            new,
            n_ref,
            int((registry.batch_codes(adata) < n_ref).sum()),
        )
        return model

    # --------------------------------------------------- differential expression
    def differential_expression(
        self,
        adata: ad.AnnData | None = None,
        *,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | Sequence[bool] | np.ndarray | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | np.ndarray | str | None = None,
        mode: str = "vanilla",
        delta: float = 0.25,
        fdr_target: float | Sequence[float] = 0.05,
        batch_correction: bool = False,
        n_samples_overall: int = 5000,
        pseudocounts: float | None = None,
        test_mode: str = "three",
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> pd.DataFrame:
        """scVI's Bayesian differential expression, as in scvi-tools, in bounded memory.

        Cells are sampled first (``n_samples_overall`` per group, with replacement), then one
        posterior sample of rho is drawn for each sampled cell only, so memory is
        O(n_samples_overall x genes) whatever the number of cells. See :mod:`scvae.de`.

        Parameters
        ----------
        adata
            Cells (default: the registered AnnData).
        groupby, group1, group2
            Column of ``obs``; each of ``group1`` (None: every group, one-vs-rest) is compared
            with ``group2`` (None: all other cells, "Rest").
        idx1, idx2
            Instead of groups: two cell sets (boolean masks, integer positions or an
            ``obs.eval`` query string); without ``idx2``, ``idx1`` against all other cells.
        mode
            "vanilla" (P(rho1 > rho2)) or "change" (P(|LFC| >= delta)).
        delta, test_mode, pseudocounts
            Change mode: the LFC (log2) threshold; "three" (up or down, the larger) or "two"
            (either); the pseudocount (None: estimated from lowly expressed genes).
        fdr_target
            Change mode: a column ``is_de_fdr_<t>`` per target (posterior expected FDR).
        batch_correction
            Decode every sampled cell under each registered batch (``n_samples_overall``
            split over them, pairs matched by batch) instead of under its own batch.
        n_samples_overall
            Cells sampled per group.
        batch_size, seed
            Cells per chunk of the expression query; seed of the sampling (None:
            ``scvae.settings.seed``).

        Returns
        -------
        DataFrame indexed by gene, one block of rows per comparison. Vanilla: ``proba_m1``
        (P(rho1 > rho2)), ``proba_m2``, ``bayes_factor`` (log odds, saturating near +-18.4).
        Change: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``pseudocounts``,
        ``delta``, ``lfc_mean/median/std/min/max`` (log2, group1 over group2),
        ``is_de_fdr_<t>``. Both: ``scale1``/``scale2`` (mean sampled rho), ``raw_mean1/2``,
        ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2`` (counts per 10,000),
        ``comparison`` ("A vs B", "A vs Rest"), ``group1``, ``group2``. Sorted within each
        comparison: vanilla by ``bayes_factor``, ties by ``log2(scale1 / scale2)``; change by
        ``proba_de``, ties by ``|lfc_mean|``; all decreasing. No p-values: the test has none.
        Both sorts rank how often a cell of group 1 exceeds one of group 2, so a marker shared
        with a type in "Rest" ranks low; for marker lists, keep the genes of ``is_de_fdr_<t>``
        with ``lfc_mean > 0`` and sort them by ``lfc_mean - lfc_std`` (benchmarks/README.md).

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(120, 20, seed=0))
        >>> de = model.differential_expression(groupby="cell_type", n_samples_overall=50)
        >>> de["comparison"].unique().tolist()
        ['type0 vs Rest', 'type1 vs Rest', 'type2 vs Rest']
        """
        from scvae import de

        adata = self.registry_adata() if adata is None else adata
        self.registry.check(adata[:1])  # genes and obs keys; the counts are checked in blocks
        masks = [adata.obs.eval(i).to_numpy() if isinstance(i, str) else i for i in (idx1, idx2)]
        if groupby is not None and groupby not in adata.obs:
            raise ValueError(f"groupby {groupby!r} is not a column of adata.obs.")
        comparisons = de.define_comparisons(
            adata.n_obs,
            labels=None if groupby is None else adata.obs[groupby],
            groupby=groupby or "groupby",
            group1=group1,
            group2=group2,
            idx1=masks[0],
            idx2=masks[1],
        )
        targets = fdr_target if isinstance(fdr_target, int | float) else tuple(fdr_target)
        options = de.DEOptions(mode, delta, targets, n_samples_overall, pseudocounts, test_mode)
        batches = self.registry.batch_categories
        codes = list(range(len(batches))) if batch_correction else [None]

        def expression(cells: np.ndarray, code: int | None) -> np.ndarray:
            # a view of the sampled cells only: validation and chunks never touch the rest
            unique, position = np.unique(cells, return_inverse=True)
            return self.get_normalized_expression(
                adata[unique],
                position,
                transform_batch=None if code is None else batches[code],
                return_numpy=True,
                batch_size=batch_size,
            )

        count_blocks = self.registry.check_blocks(adata)

        seed = settings.seed if seed is None else seed
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return de.run(
                comparisons,
                count_blocks,
                expression,
                batch_codes=codes,
                gene_names=list(self.var_names),
                options=options,
                rng=np.random.default_rng(seed),
            )
