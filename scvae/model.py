"""``SCVAE``: registration, construction and training of the AnnData-aware user class.

The class body binds the rest of the public API from the files beside this one, each a set
of functions that take the model first: the queries (:mod:`scvae.queries`), model files
(:mod:`scvae.model_files`), reference mapping (:mod:`scvae.mapping`) and differential
expression (:mod:`scvae.de_glue`).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvae import _checks, _rng, de_glue, distributed, mapping, model_files, queries
from scvae._settings import logger, settings
from scvae.data.backed import (
    BLOCK_ROWS,
    BUFFER_BLOCKS,
    BackedCSR,
    check_read_options,
    is_on_disk,
    row_totals,
)
from scvae.data.loader import count_source
from scvae.data.registry import Registry, register
from scvae.device import resolve_device
from scvae.module import VAE, ModuleConfig
from scvae.train import (
    KL_WARMUP_EPOCHS,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    fit,
    split_indices,
)

LATENT_KEY = "X_scvae"
# The least variance of a batch's log-library prior (use_observed_lib_size=False): cells with
# equal totals would give 0, where scvi-tools' Normal prior fails and the KL term explodes.
_LIBRARY_VAR_FLOOR = 0.01


def _digest(arrays: Sequence[np.ndarray | torch.Tensor]) -> str:
    """SHA-256 of the bytes of a sequence of arrays or tensors (identifies a run's inputs)."""
    digest = hashlib.sha256()
    for a in arrays:
        t = torch.as_tensor(a).detach().cpu().contiguous().reshape(-1)
        digest.update(str((t.dtype, t.numel())).encode())
        if t.numel():  # an empty tensor cannot be viewed as bytes (no validation cells)
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
        _checks.flag(name, options[name])


def _check_processes(n_processes: Any) -> None:
    # numpy integers too (distributed.launch, a lower-level entry, takes a plain int)
    whole = isinstance(n_processes, numbers.Integral) and not isinstance(n_processes, bool)
    if not (whole and n_processes >= 1):
        raise ValueError(f"n_processes must be a whole number >= 1, got {n_processes!r}.")


def _check_cells_per_step(batch_size: int, n_train: int, n_processes: int) -> None:
    """Every process needs at least 2 cells per step (BatchNorm normalises over them)."""
    if batch_size // n_processes < 2:
        raise ValueError(
            f"batch_size={batch_size} over {n_processes} processes leaves under 2 cells per "
            f"process and step (BatchNorm needs 2): use batch_size >= {2 * n_processes}."
        )
    if n_train < 2 * n_processes:
        what = "" if n_processes == 1 else f" ({n_processes} processes x 2)"
        raise ValueError(
            f"Only {n_train} training cell(s): training needs at least {2 * n_processes}"
            f"{what}, as BatchNorm normalises over the cells of a minibatch. Use more cells"
            f"{'' if n_processes == 1 else ', fewer processes'} or a larger train_size; a "
            "trained model can still be queried on a single cell."
        )


def _train_worker(rank: int, world_size: int, init_method: str, payload: str) -> None:
    """One process of ``SCVAE.train(n_processes=...)``: join the group, train, rank 0 saves."""
    import torch.distributed as dist

    # the payload is a pickle file that the caller wrote: each process unpickles its own copy
    # (tensors handed over by torch.multiprocessing would share memory, and every rank's
    # optimizer step would then update the same weights), read from the file so that no
    # process keeps the pickled bytes beside what they hold for the whole run
    with open(payload, "rb") as file:
        model, data, options, out, verbosity = pickle.load(file)
    # the caller's verbosity; rank 0 alone says what every rank would (resuming, stopping)
    settings.verbosity = (
        verbosity if rank == 0 or verbosity in ("warning", "error", "critical") else "warning"
    )
    device = resolve_device(options.get("device", "auto"))
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    dist.init_process_group(
        distributed.backend_for(device),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
    )
    try:
        if isinstance(data, tuple):  # a backed AnnData: its file, annotations as the caller has
            path, obs, var, layers = data
            data = ad.read_h5ad(path, backed="r")
            data.obs, data.var = obs, var
            for key, value in layers.items():  # held in memory by anndata anyway
                data.layers[key] = value
        model.adata = data
        try:
            model.train(**options)
        except TrainingDiverged:
            # every rank stops at the same step (the finiteness check is agreed by all);
            # rank 0 keeps the last good step's weights, as in one process, and the others
            # wait for that save before failing (a failure stops the remaining processes)
            if rank == 0:
                model.save(out)
            dist.barrier()
            raise
        if rank == 0:
            model.save(out)
        # every rank tears its process group down only once all are done: a rank that left
        # early while another was still connected aborted in gloo's teardown (seen once in CI
        # as "terminate called without an active exception", exit code -6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _refuse_backed_view(adata: ad.AnnData | None) -> None:
    """A model's own AnnData is read in row blocks, which a view of a backed one cannot give."""
    if isinstance(adata, ad.AnnData) and adata.isbacked and adata.is_view:
        raise ValueError(
            "This AnnData is a subset (view) of a backed AnnData, which cannot be read in blocks "
            "for training. Pass the whole backed AnnData, load the subset into memory with "
            ".to_memory(), or write it to its own file (.write_h5ad) and open that backed."
        )


def _stored_nonzeros(counts: Any) -> int | None:
    """The number of stored counts of a training matrix (None: not known without a read)."""
    if hasattr(counts, "nnz"):  # scipy sparse
        return int(counts.nnz)
    if is_on_disk(counts) and hasattr(counts, "group"):  # anndata's on-disk CSR / CSC
        return int(counts.group["indptr"][-1])
    return None


def _counts_total(counts: Any) -> float | None:
    """The sum of the counts held in memory (None for counts on disk: a whole read)."""
    if is_on_disk(counts):
        return None
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    return float(np.sum(data, dtype=np.float64))


def _continued(previous: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """The history of another ``train`` call after the previous one: its epochs numbered on.

    Examples
    --------
    >>> a = pd.DataFrame({"elbo_train": [3.0, 2.0]}, index=pd.Index([0, 1], name="epoch"))
    >>> _continued(a, a).index.tolist()
    [0, 1, 2, 3]
    """
    if previous.empty:
        return new
    start = int(previous.index.max()) + 1
    new = new.set_axis(new.index + start - (int(new.index.min()) if len(new) else 0), axis=0)
    return pd.concat([previous, new])


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
        _refuse_backed_view(adata)
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
            **{
                # as scVI: with size factors rho is softplus, so mu = size factor x rho fits
                # counts whatever the size factors' scale (mean 1, as usual, or per-cell totals)
                "scale_activation": "softplus" if size_factor_key is not None else "softmax",
                **self._extra_module_options(),
            },
        )
        # Initial weights from scvae.settings.seed, so the same seeds give the same model
        # whatever else used torch's global generator before (built on the CPU: only the
        # CPU's generator is seeded, and every generator is put back after).
        with _rng.seeded(settings._seed_of_weights()):
            module = VAE(config)
        self._setup(adata, registry, module)

    def _extra_module_options(self) -> dict[str, Any]:
        """Module options a subclass fixes (the linear decoder of :class:`LDVAE`)."""
        return {}

    def _setup(self, adata: ad.AnnData | None, registry: Registry, module: VAE) -> None:
        _refuse_backed_view(adata)
        self.adata = adata
        self.registry = registry
        self.module = module
        self.module.eval()
        self.is_trained = False
        self.history = pd.DataFrame()
        self.train_indices = np.array([], dtype=np.int64)
        self.validation_indices = np.array([], dtype=np.int64)
        self.train_config: dict[str, Any] = {}
        # set by load_query_data: a query model of an untrained reference warns as untrained
        self._untrained_reference = False

    # ------------------------------------------------------------------ basics
    @property
    def test_indices(self) -> np.ndarray:
        """Cells in neither ``train_indices`` nor ``validation_indices``, as scvi-tools'.

        They exist when ``train_size + validation_size < 1``; empty before training and
        when the split is not known (a model loaded with other cells). A model loaded without
        an AnnData knows them from the number of cells it was trained on.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(100, 20, seed=0))
        >>> model.train(max_epochs=1, train_size=0.6, validation_size=0.2, progress_bar=False)
        >>> len(model.train_indices), len(model.validation_indices), len(model.test_indices)
        (60, 20, 20)
        """
        used = np.concatenate([self.train_indices, self.validation_indices])
        if not self.is_trained or not used.size:
            return np.array([], dtype=np.int64)
        if self.adata is not None:
            n_obs = self.adata.n_obs
        else:  # loaded without cells: the saved fingerprint has their number
            n_obs = (getattr(self, "_cells", None) or {}).get("n_obs")
            if not isinstance(n_obs, int) or isinstance(n_obs, bool):
                return np.array([], dtype=np.int64)
        return np.setdiff1d(np.arange(n_obs), used).astype(np.int64)

    @property
    def var_names(self) -> pd.Index:
        """The genes the model was registered with, in order."""
        return pd.Index(self.registry.var_names)

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live."""
        return next(self.module.parameters()).device

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the model's weights to ``device``, as scvi-tools' ``model.to_device``.

        The queries then run there; ``train(device=...)`` trains where it says (by default the
        GPU when there is one). Nothing else changes (weights, history and options are kept).

        Parameters
        ----------
        device
            "cpu", "cuda", "cuda:1", a GPU's index (``1``: "cuda:1"), "mps", or "auto" (the
            GPU when there is one, else the CPU). A device that is not here is refused and
            the model stays where it is.

        Examples
        --------
        >>> import scvae
        >>> model = scvae.SCVAE(scvae.data.simulate(50, 20, seed=0))
        >>> model.to_device("cpu")
        >>> model.device
        device(type='cpu')
        """
        whole = isinstance(device, numbers.Integral) and not isinstance(device, bool)
        self.module.to(resolve_device(f"cuda:{int(device)}" if whole else device))

    def __repr__(self) -> str:
        c = self.module.config
        state = "trained" if self.is_trained else "not trained"
        return (
            f"{type(self).__name__}({c.n_input} genes, {c.n_batch} batches, "
            f"n_latent={c.n_latent}, "
            f"gene_likelihood={c.gene_likelihood!r}, dispersion={c.dispersion!r}; {state})"
        )

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_min_delta: float = 0.0,
        early_stopping_mode: str = "min",
        early_stopping_warmup_epochs: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        n_epochs_kl_warmup: int | None = KL_WARMUP_EPOCHS,
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
            out; ``train_size=1.0`` trains on every cell with no validation pass). A
            validation pass runs after every epoch when there are validation cells (the
            history's ``*_validation`` columns; scvi-tools validates only with early
            stopping). ``train_size=None`` is scvi-tools' default: 0.9, with the cells of a
            last training minibatch of 1-2 cells moved to validation.
        early_stopping, early_stopping_patience, early_stopping_monitor
            Stop when ``early_stopping_monitor`` (a validation column of the history:
            "elbo_validation", "reconstruction_loss_validation" or "kl_local_validation") has
            not improved for ``early_stopping_patience`` epochs. scvi-tools' options and
            defaults (its trainer keywords), as are the next three.
        early_stopping_min_delta, early_stopping_mode, early_stopping_warmup_epochs
            The least change that counts as improvement; "min" (lower is better) or "max";
            epochs before early stopping starts watching.
        lr, weight_decay, eps
            Adam's options.
        n_epochs_kl_warmup
            KL weight on z rises linearly from 0 to 1 over this many epochs (None: always 1).
            The default, 10, is scvae's own (scvi-tools: 400): with it training reaches
            scvi-tools' best held-out marginal log-likelihood in about a tenth of the time
            (benchmarks/README.md, Speed). Pass 400 to train exactly as scvi-tools does.
        reduce_lr_on_plateau
            Multiply the learning rate by 0.6 after 30 epochs without validation improvement.
        seed
            Seed of the split, the minibatch order and all sampling, 0 to 2**32 - 1 (None:
            ``scvae.settings.seed``); the same seed gives bit-identical weights on the CPU
            (with ``compile=True``, between runs in fresh processes: a second compiled run in
            the same process can differ in the last bits).
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
            checkpoint of another run is an error. ``max_epochs`` may differ, to train longer:
            repeat the call on a model built as the first one was (a model that already
            trained to the checkpoint is told to train on without it).
        checkpoint_every
            Write ``latest/`` every this many epochs (and after the last one).
        precision
            "32" (float32 throughout; also ``32`` or "32-true") or "bf16-mixed": the matrix
            products in bfloat16 under autocast, the likelihood and KL terms in float32
            (Lightning's names).
        compile
            Run the training step through ``torch.compile``: the first minibatch pays tens of
            seconds of compilation, later steps are faster, so it pays off on long runs. If
            compilation fails, training goes on without it (a warning says so).
        n_processes
            Train in this many new processes with DistributedDataParallel (gloo on the CPU,
            NCCL on GPUs with ``device="cuda"``: process ``r`` on ``cuda:r``; a GPU named by
            its index is refused), then load rank 0's weights and history into this model.
            ``batch_size`` stays the cells per optimizer step: each process takes
            ``batch_size / n_processes`` of every minibatch, so the optimisation is the same
            as in one process. The workers get a copy of the model and of what training reads
            of the AnnData: counts, obs and var (a backed AnnData is reopened from its file,
            with obs, var and a registered layer as they are here). Under ``torchrun``, leave
            this at 1: ``train`` joins the process group torchrun set up (see
            :mod:`scvae.distributed`).
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
        step (and the history of the finished epochs), so it can still be saved or queried,
        unless those weights give non-finite values in evaluation (then, as for any other
        failure, the weights from before the call are restored; the message says so).
        Ctrl-C (a notebook's stop button) keeps the epochs finished in this call, as
        scvi-tools does: the model has the weights of the last one and its history, and
        warns; the steps of the unfinished epoch are dropped (with no epoch finished, the model
        is as before the call). Any other failure (an error) restores the weights from before
        the call, so no half-trained model is left behind. With ``checkpoint_dir`` (or in several
        processes), Ctrl-C restores them too, and the same call resumes from the checkpoint.

        On the CPU, a run killed and resumed from its checkpoint ends with the same weights,
        bit for bit, as an uninterrupted run. A checkpoint is resumed only by the same run on
        the same cells and counts, and not past ``max_epochs``.

        A later ``train`` call on a trained model continues its history (epochs numbered on)
        and its random stream, but starts a new optimizer and a new KL warm-up, as
        scvi-tools' ``train`` does; one call of the total epochs keeps one schedule (so does
        repeating a ``checkpoint_dir`` call with a larger ``max_epochs``). A later call with
        another seed or split options splits the cells anew and warns when cells held out
        before are trained on.

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
            max_epochs = max(min(round(20000 / n_cells * 400), 400), 1)
        seed = settings.seed if seed is None else seed  # checked by TrainConfig
        if precision == "32-true" or (type(precision) is int and precision == 32):
            precision = "32"  # Lightning's other names of float32
        config = TrainConfig(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            early_stopping_monitor=early_stopping_monitor,
            early_stopping_min_delta=early_stopping_min_delta,
            early_stopping_mode=early_stopping_mode,
            early_stopping_warmup_epochs=early_stopping_warmup_epochs,
            reduce_lr_on_plateau=reduce_lr_on_plateau,
            seed=seed,
            progress_bar=settings.progress_bar if progress_bar is None else progress_bar,
            precision=precision,
            compile=compile,
        )
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
            raise ValueError(f"checkpoint_every must be a whole number, got {checkpoint_every!r}.")
        # checked whether or not the counts are on disk, as every option is
        check_read_options(backed_block_rows, backed_buffer_blocks, "backed_")
        watched = [
            n
            for n, on in (
                ("early_stopping", early_stopping),
                ("reduce_lr_on_plateau", reduce_lr_on_plateau),
            )
            if on
        ]
        if watched and not len(
            split_indices(n_cells, train_size, validation_size, config.seed, batch_size)[1]
        ):
            given = f"train_size={train_size}" + (
                "" if validation_size is None else f" with validation_size={validation_size}"
            )
            if n_cells < 2:
                fix = "there is no cell to hold out"
            elif validation_size is None:
                fix = f"use train_size <= {(n_cells - 1) / n_cells:.4g}"
            else:
                fix = (
                    f"use validation_size >= {1 / n_cells:.4g} with train_size <= "
                    f"{(n_cells - 1) / n_cells:.4g}"
                )
            monitors = {"early_stopping": early_stopping_monitor}
            needs = " and ".join(
                f"{name} (watching {monitors.get(name, 'elbo_validation')!r})" for name in watched
            )
            raise ValueError(
                f"{needs} {'need' if len(watched) > 1 else 'needs'} validation cells, but "
                f"{given} leaves none of {n_cells}: {fix}, or turn "
                f"{' and '.join(watched)} off."
            )
        dev = resolve_device(device)
        train_idx, val_idx = split_indices(
            n_cells, train_size, validation_size, config.seed, batch_size
        )
        if n_processes != 1:
            _check_processes(n_processes)
            n_processes = int(n_processes)
            _check_cells_per_step(batch_size, len(train_idx), n_processes)
            distributed.rank_device(dev, distributed.World(0, n_processes))  # one GPU each
            # the workers are fresh interpreters with default settings: send what was resolved
            options.update(seed=config.seed, progress_bar=config.progress_bar)
            self._train_in_processes(n_processes, options, dev)
            return
        distributed.init_from_env(dev)
        world = distributed.current_world()
        dev = distributed.rank_device(dev, world)
        if world.distributed and dev.type == "cuda":
            # NCCL's object collectives (this check, checkpoints' random states) use the
            # current device: without this every rank of a node would use cuda:0
            torch.cuda.set_device(dev)
        _check_cells_per_step(batch_size, len(train_idx), world.size)
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
            # how minibatches are read is part of the run (another order, another result)
            "counts_on_disk": is_on_disk(counts),
        }
        if train_config["counts_on_disk"]:
            train_config["backed_block_rows"] = backed_block_rows
            train_config["backed_buffer_blocks"] = backed_buffer_blocks
        data = None  # the cells in their order and the counts: one pass, only where needed
        if world.distributed or checkpoint_dir is not None:
            data = {
                "cells": model_files.cells_fingerprint(adata),
                "stored_nonzeros": _stored_nonzeros(counts),
                "counts_total": _counts_total(counts),
            }
        if world.distributed:
            train_config["n_processes"] = world.size
            # before any collective: ranks given other runs would wait on each other
            run = {k: v for k, v in train_config.items() if k not in ("progress_bar", "device")}
            run.update(
                {"device type": dev.type, "split (digest)": _digest([train_idx, val_idx])[:12]}
            )
            distributed.check_same_run(self._run_fingerprint(data, run), world)
        checkpoint = None
        if checkpoint_dir is not None:
            from scvae.checkpoint import Checkpointer

            previous = self.history if self.is_trained else None

            def describe(history: pd.DataFrame) -> dict[str, Any]:
                full = history if previous is None else _continued(previous, history)
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
                # the same cells in the same order, and the same counts (their number and sum)
                **data,
            }
            checkpoint = Checkpointer(
                checkpoint_dir, identity=identity, describe=describe, every=checkpoint_every
            )
        try:
            self.module.to(dev)
            # a query model keeps the prior load_query_data gave it (the reference's for its
            # batches), as in scvi-tools
            if self.module.l_encoder is not None and getattr(self, "frozen", None) is None:
                self._set_library_prior(row_totals(counts), batch.cpu().numpy(), train_idx)
            if is_on_disk(counts):
                source = BackedCSR(
                    counts,
                    dev,
                    block_rows=backed_block_rows,
                    buffer_blocks=backed_buffer_blocks,
                )
            else:
                source = count_source(counts, dev)
            # training seeds torch's CPU generator and the device's; the caller's generators
            # (every GPU's, which a checkpoint's resume sets) are put back after
            with _rng.kept_generators(dev):
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
                    epochs_before=len(self.history) if self.is_trained else 0,
                )
        except TrainingDiverged as err:
            # Keep the last good step's weights when any training happened in this call (or
            # came from a checkpoint); otherwise leave the model exactly as it was.
            moved = any(
                not torch.equal(p.detach().cpu(), before[name].cpu())
                for name, p in self.module.named_parameters()
            )
            if moved and not self._finite_in_evaluation(train_idx):
                moved = False
                err.args = (
                    f"{err.args[0]} The last good step's weights give non-finite values in "
                    "evaluation (e.g. exploded batch-norm statistics), so the weights from "
                    "before this train() call were restored.",
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
        except TrainingInterrupted as err:
            # Ctrl-C after some epochs: they are kept, as scvi-tools keeps them (fit put back
            # the weights of the last one); otherwise (none done, a checkpoint to resume from)
            # a plain KeyboardInterrupt reaches the restoring branch below
            self._record_training(err.history, train_idx, val_idx, train_config)
            _checks.warn_user(
                f"Training stopped (Ctrl-C) after {len(err.history)} epoch(s) of this call: the "
                "model keeps them (model.history). Pass checkpoint_dir= to resume a run "
                "where it stopped.",
            )
            self.module.eval()
            raise
        except BaseException:
            self.module.load_state_dict(before)
            self.module.eval()
            raise
        self._record_training(history, train_idx, val_idx, train_config)

    def _finite_in_evaluation(self, train_idx: np.ndarray, n_cells: int = 256) -> bool:
        """Whether the module, in evaluation mode, gives a finite ELBO on some training cells."""
        with torch.no_grad(), queries._untrained_warned():  # a check, not the user's query
            elbo = self.get_elbo(indices=train_idx[:n_cells], return_mean=False)
        return bool(np.isfinite(elbo).all())

    def _record_training(
        self,
        history: pd.DataFrame,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        train_config: dict[str, Any],
    ) -> None:
        if not distributed.current_world().distributed:  # a worker's parent warns, once
            self._warn_if_resplit(train_idx, val_idx)
        self.history = _continued(self.history, history) if self.is_trained else history
        self.is_trained = True
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.train_config = train_config

    def _warn_if_resplit(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        """Warn when a later ``train`` call trained on cells an earlier call held out, or
        validated on cells it trained on (another seed or split options); called once the
        call has trained, so a call that fails warns of nothing."""
        if not self.is_trained or not len(self.train_indices):  # no earlier split known
            return
        held_out_before = np.setdiff1d(np.arange(self.registry_adata().n_obs), self.train_indices)
        now_trained = np.intersect1d(held_out_before, train_idx).size
        now_validating = np.intersect1d(self.train_indices, val_idx).size
        if not (now_trained or now_validating):
            return
        parts = []
        if now_trained:
            parts.append(
                f"{now_trained} cells held out by the earlier training were trained on now"
            )
        if now_validating:
            parts.append(
                f"{now_validating} cells trained on before are validation cells now, so "
                "elbo_validation is no longer held out"
            )
        _checks.warn_user(
            f"This train() call split the cells anew (another seed, train_size or "
            f"validation_size than the earlier call, or with train_size=None another "
            f"batch_size): {'; '.join(parts)}. Held-out scores on model.validation_indices "
            "then include cells the model has seen. Pass the seed and split options of the "
            "first call to keep its split.",
        )

    def _run_fingerprint(
        self, data: dict[str, Any], train_options: dict[str, Any]
    ) -> dict[str, Any]:
        """What the ranks of a distributed run must share (compared by
        :func:`scvae.distributed.check_same_run`): versions, the cells (their number and
        names), genes, stored non-zeros and their sum (``data``: as the checkpoint identity
        records them), registration, the model's and ``train``'s options."""
        import json

        from scvae import __version__

        adata = self.registry_adata()
        registration = json.dumps(self.registry.to_dict(), sort_keys=True, default=str)
        return {
            "scvae version": __version__,
            "torch version": torch.__version__,
            "cells": adata.n_obs,
            # the same cells in the same order: each rank takes its share by position
            "cell names (digest)": data["cells"]["obs_names_sha256"][:12],
            "genes": adata.n_vars,
            "stored non-zero counts": data["stored_nonzeros"],
            "sum of the counts": data["counts_total"],
            "registration (digest)": hashlib.sha256(registration.encode()).hexdigest()[:12],
            **{f"model option {k}": v for k, v in self.module.config.to_dict().items()},
            **{f"train option {k}": v for k, v in train_options.items()},
        }

    def _training_counts(self, adata: ad.AnnData) -> Any:
        """The registered counts, checked block by block: the AnnData's own matrix (no copy of
        a CSR float32 matrix) or, for a backed AnnData, its on-disk dataset (X only: anndata
        holds the layers of a backed AnnData in memory)."""
        for block in self.registry.check_blocks(adata):
            del block  # not held while the next block is checked
        layer = self.registry.layer
        if adata.isbacked and layer is not None:
            logger.info(
                "The counts are in layer %r, which anndata holds in memory for a backed "
                "AnnData: training reads them from memory. Only X is read from disk; to train "
                "out of core, write the counts as X of an h5ad and open that backed.",
                layer,
            )
        return adata.X if layer is None else adata.layers[layer]

    def _train_in_processes(
        self, n_processes: int, options: dict[str, Any], device: torch.device
    ) -> None:
        """``train`` in ``n_processes`` spawned processes; rank 0's result is loaded here."""
        import copy
        import tempfile

        import torch.distributed as dist

        if (dist.is_available() and dist.is_initialized()) or int(
            os.environ.get("WORLD_SIZE", "1")
        ) > 1:
            raise ValueError(
                "n_processes cannot start processes inside a process group (e.g. under "
                "torchrun): call train without n_processes there, it trains across the group."
            )
        if getattr(self, "frozen", None) is not None:
            raise ValueError(
                "A query model from load_query_data trains in this process only (the hooks "
                "that keep the reference's weights frozen do not travel to new processes): "
                "call train without n_processes."
            )
        if device.type == "cuda" and n_processes > torch.cuda.device_count():
            raise ValueError(
                f"n_processes={n_processes} on CUDA needs one GPU per process; torch sees "
                f"{torch.cuda.device_count()}."
            )
        adata = self.registry_adata()
        layer = self.registry.layer  # a missing one is named by the workers' registry check
        layers = {} if layer is None or layer not in adata.layers else {layer: adata.layers[layer]}
        if adata.isbacked:
            if adata.is_view:
                raise ValueError(
                    "n_processes with a view of a backed AnnData: the workers reopen the file, "
                    "so write the subset to its own file first (adata.write_h5ad(path))."
                )
            # the workers reopen the file; obs and var travel as they are here (edited names
            # and columns too), and the registered layer, which anndata holds in memory
            data: ad.AnnData | tuple = (str(adata.filename), adata.obs, adata.var, layers)
        else:
            # what training reads, not uns, obsm and the rest: less to copy into every process,
            # and nothing that cannot be pickled (a lock in uns trains in one process)
            with warnings.catch_warnings():  # e.g. repeated obs names, warned about already
                warnings.simplefilter("ignore")
                data = ad.AnnData(
                    X=adata.X if layer is None else None,
                    obs=adata.obs,
                    var=adata.var,
                    layers=layers,
                )
        worker = copy.copy(self)
        worker.adata = None
        with tempfile.TemporaryDirectory(prefix="scvae-train-") as tmp:
            out = os.path.join(tmp, "model")
            payload = os.path.join(tmp, "payload.pickle")
            with open(payload, "wb") as file:
                pickle.dump((worker, data, options, out, settings.verbosity), file, protocol=5)
            del data
            try:
                distributed.launch(n_processes, _train_worker, payload)
            except TrainingDiverged:
                if os.path.isdir(out):  # rank 0 kept the last good step's weights
                    self._take_result(type(self).load(out, device=str(self.device)))
                raise
            result = type(self).load(out, device=str(self.device))
        self._take_result(result)

    def _take_result(self, result: SCVAE) -> None:
        """Weights, history and split of a model trained in other processes."""
        if not result.is_trained:  # nothing trained there: this model stays as it is
            return
        self._warn_if_resplit(result.train_indices, result.validation_indices)
        self.module.load_state_dict(result.module.state_dict())
        self.module.eval()
        self.history, self.is_trained = result.history, True
        self.train_indices = result.train_indices
        self.validation_indices = result.validation_indices
        self.train_config = result.train_config

    def _set_library_prior(
        self, totals: np.ndarray, batch: np.ndarray, train_idx: np.ndarray
    ) -> None:
        """Each batch's prior of the log library: mean and variance over its training cells.

        A batch with no training cell (all its cells held out) takes them over all its
        cells, as scvi-tools computes every batch's, with a warning; a batch without cells
        keeps the prior it has.
        """
        log_totals = np.log(np.asarray(totals, dtype=np.float64).ravel())
        train = np.zeros(log_totals.size, dtype=bool)
        train[train_idx] = True
        means = self.module.library_log_means.detach().cpu().numpy().astype(np.float32)
        variances = self.module.library_log_vars.detach().cpu().numpy().astype(np.float32)
        for b in range(self.registry.n_batch):
            sel = log_totals[(batch == b) & train]
            if not len(sel) and (batch == b).any():
                sel = log_totals[batch == b]
                _checks.warn_user(
                    f"Batch {self.registry.batch_categories[b]!r} has no training cells (its "
                    f"{len(sel)} cell(s) are all held out for validation): its library prior "
                    "is taken from all its cells. A larger train_size keeps some for training.",
                )
            if len(sel):
                means[b] = sel.mean()
                variances[b] = sel.var() if len(sel) > 1 else 1.0
                if variances[b] < _LIBRARY_VAR_FLOOR:
                    # equal totals (downsampled cells, two alike): a prior of (almost) no width
                    # makes the library's KL term explode, and the loss with it
                    _checks.warn_user(
                        f"The training cells of batch {self.registry.batch_categories[b]!r} "
                        f"have (nearly) equal library sizes (variance of the log library "
                        f"{float(variances[b]):.3g}): the library prior's variance is set to "
                        f"{_LIBRARY_VAR_FLOOR:g} instead.",
                    )
                    variances[b] = _LIBRARY_VAR_FLOOR
        self.module.library_log_means.copy_(torch.from_numpy(means))
        self.module.library_log_vars.copy_(torch.from_numpy(variances))

    def registry_adata(self) -> ad.AnnData:
        """The AnnData the model was built on (raises after a load without one)."""
        if self.adata is None:
            raise ValueError(
                "This model has no AnnData attached (it was loaded without one): pass adata= "
                "to the query, or load it with one, SCVAE.load(dir_path, adata), to train it."
            )
        return self.adata

    # ------------------------------------------------ queries (scvae/queries.py)
    _covariates = queries._covariates
    _chunks = queries._chunks
    _sampling_batch_size = queries._sampling_batch_size
    _batch_codes = queries._batch_codes
    _gene_index = queries._gene_index
    _obs_names = queries._obs_names
    get_latent_representation = queries.get_latent_representation
    get_elbo = queries.get_elbo
    get_reconstruction_error = queries.get_reconstruction_error
    get_marginal_ll = queries.get_marginal_ll
    get_normalized_expression = queries.get_normalized_expression
    get_likelihood_parameters = queries.get_likelihood_parameters
    get_latent_library_size = queries.get_latent_library_size
    posterior_predictive_sample = queries.posterior_predictive_sample
    get_feature_correlation_matrix = queries.get_feature_correlation_matrix

    # ------------------------------------------------ files (scvae/model_files.py)
    _description = model_files._description
    save = model_files.save
    load = classmethod(model_files.load)

    # ------------------------------------------- reference mapping (scvae/mapping.py)
    prepare_query_anndata = classmethod(mapping.prepare_query_anndata)
    load_query_data = classmethod(mapping.load_query_data)

    # -------------------------------- differential expression (scvae/de_glue.py)
    differential_expression = de_glue.differential_expression
