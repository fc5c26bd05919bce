"""The training loop: Adam on the reparameterized ELBO with KL warm-up on z.

Tensors only (no AnnData). ``fit`` takes a module, the counts as a count source
(:class:`~scvae.data.loader.DeviceCSR`, :class:`~scvae.data.loader.HostCSR` or
:class:`~scvae.data.backed.BackedCSR`), the batch and label codes and a :class:`TrainConfig`,
and returns the history, one row per epoch.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from scvae import _checks
from scvae._rng import seed_generators
from scvae._settings import logger
from scvae.checkpoint import Checkpointer, CheckpointError, LoopState
from scvae.data.loader import CountSource, DeviceCSR  # noqa: F401 (DeviceCSR: the examples)
from scvae.distributed import (
    World,
    all_sum,
    all_true,
    every_rank,
    gather_rng_states,
    sync_buffers,
    wrap,
)
from scvae.module import VAE, Covariates
from scvae.train_step import PRECISIONS, StepRunner, make_optimizer

# A last minibatch with fewer cells than this is dropped (BatchNorm needs more than one).
_MIN_LAST_BATCH = 3
# A minibatch count above this is named as a likely cause of divergence.
_EXTREME_COUNT = 1e6
#: scvae's default KL warm-up, in epochs (scvi-tools': 400). With 400 the KL weight is still
#: under 1 where scvi-tools' held-out marginal LL peaks; a 10-epoch warm-up reaches scvi-tools'
#: best held-out marginal LL and NMI in about a tenth of the time (benchmarks/README.md, Speed).
KL_WARMUP_EPOCHS = 10


# Validation columns of the history that early stopping can watch (scvi-tools' choices).
EARLY_STOPPING_MONITORS = (
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
)


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run; the defaults are scvi-tools' ``SCVI.train`` defaults but for
    the KL warm-up (:data:`KL_WARMUP_EPOCHS`, 10 epochs instead of 400).

    Every option is checked when the config is made: a wrong type or a value out of range is a
    ``ValueError`` naming the option, the value and what is allowed. ``precision`` ("32" or
    "bf16-mixed") and ``compile`` are scvae's speed options (:mod:`scvae.train_step`).

    Examples
    --------
    >>> TrainConfig(max_epochs=10).lr
    0.001
    """

    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = KL_WARMUP_EPOCHS
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_mode: str = "min"
    early_stopping_warmup_epochs: int = 0
    reduce_lr_on_plateau: bool = False
    lr_patience: int = 30
    lr_factor: float = 0.6
    seed: int = 0
    progress_bar: bool = True
    precision: str = "32"
    compile: bool = False

    def __post_init__(self) -> None:
        def whole(name: str, low: int, why: str = "") -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}{why}, got {value!r}.")
            object.__setattr__(self, name, int(value))

        def real(name: str, low: float, *, strict: bool, high: float = math.inf) -> None:
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > low if strict else value >= low)
            if not ok or value >= high:
                side = ">" if strict else ">="
                upper = f" and < {high:g}" if math.isfinite(high) else ""
                raise ValueError(
                    f"{name} must be a finite number {side} {low:g}{upper}, got {value!r}."
                )
            object.__setattr__(self, name, float(value))

        whole("max_epochs", 1)
        whole("batch_size", 2, " (BatchNorm needs two cells)")
        real("lr", 0.0, strict=True)
        real("weight_decay", 0.0, strict=False)
        real("eps", 0.0, strict=True)
        if self.n_epochs_kl_warmup is not None:
            whole("n_epochs_kl_warmup", 0, " (or None)")
        whole("early_stopping_patience", 1)
        real("early_stopping_min_delta", 0.0, strict=False)
        whole("early_stopping_warmup_epochs", 0)
        if self.early_stopping_monitor not in EARLY_STOPPING_MONITORS:
            raise ValueError(
                "early_stopping_monitor must be one of "
                f"{', '.join(map(repr, EARLY_STOPPING_MONITORS))}, got "
                f"{self.early_stopping_monitor!r}."
            )
        if self.early_stopping_mode not in ("min", "max"):
            raise ValueError(
                f"early_stopping_mode must be 'min' or 'max', got {self.early_stopping_mode!r}."
            )
        whole("lr_patience", 0)
        real("lr_factor", 0.0, strict=True, high=1.0)
        object.__setattr__(self, "seed", _checks.seed("seed", self.seed))
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(map(repr, PRECISIONS))} (train() also "
                f"takes Lightning's 32 and '32-true' for '32'), got {self.precision!r}."
            )
        for name in ("early_stopping", "reduce_lr_on_plateau", "progress_bar", "compile"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, bool(getattr(self, name)))

    def to_dict(self) -> dict:
        """The options as a JSON-ready dict."""
        return asdict(self)


def kl_weight(epoch: int, n_epochs_kl_warmup: int | None) -> float:
    """KL weight on z at ``epoch`` (0-based): ``min(1, epoch / n_epochs_kl_warmup)``.

    Examples
    --------
    >>> kl_weight(0, 400), kl_weight(200, 400), kl_weight(500, 400), kl_weight(3, None)
    (0.0, 0.5, 1.0, 1.0)
    """
    if not n_epochs_kl_warmup:
        return 1.0
    return min(1.0, epoch / n_epochs_kl_warmup)


def split_indices(
    n_cells: int,
    train_size: float | None,
    validation_size: float | None,
    seed: int,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split as in scvi-tools' DataSplitter.

    ``n_train = ceil(train_size * n)``; ``n_val = floor(validation_size * n)``, or without
    ``validation_size`` all the other cells. ``train_size=None`` is scvi-tools' default:
    0.9, and when the training cells would end in a minibatch of 1 or 2 cells (with
    ``batch_size``), those cells go to validation instead (or, without validation cells,
    are left out).

    Examples
    --------
    >>> tr, va = split_indices(10, 0.9, None, seed=0)
    >>> len(tr), len(va)
    (9, 1)
    >>> [len(s) for s in split_indices(143, None, None, seed=0, batch_size=128)]
    [128, 15]
    """
    for name, value in (("train_size", train_size), ("validation_size", validation_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"{name} must be a number, got {value!r}.")
    default = train_size is None
    train_size = 0.9 if default else train_size
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n_cells)
    if validation_size is None:  # the rest, counted (not 1 - train_size: float rounding)
        n_val = n_cells - n_train
    else:
        if not (math.isfinite(validation_size) and 0.0 <= validation_size < 1.0):
            raise ValueError(f"validation_size must be a number in [0, 1), got {validation_size}.")
        if train_size + validation_size > 1.0 + 1e-9:
            raise ValueError(
                "train_size + validation_size must be at most 1, got "
                f"{train_size} + {validation_size}."
            )
        n_val = min(math.floor(validation_size * n_cells + 1e-9), n_cells - n_train)
    small = n_train % batch_size if default and batch_size else 0
    if 0 < small < _MIN_LAST_BATCH and n_train > small:  # scvi-tools moves them
        n_train -= small
        n_val += small if n_val > 0 else 0
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val])


class _Sums:
    """Running sums of per-cell loss terms, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.recon = torch.zeros((), device=device, dtype=torch.float64)
        self.kl_z = torch.zeros((), device=device, dtype=torch.float64)
        self.kl_l = torch.zeros((), device=device, dtype=torch.float64)
        self.n = 0

    def add(self, out) -> None:
        self.recon += out.reconstruction_loss.detach().sum().double()
        self.kl_z += out.kl_z.detach().sum().double()
        self.kl_l += out.kl_l.detach().sum().double()
        self.n += out.reconstruction_loss.shape[0]

    def reduce(self, world: World) -> None:
        """Sum over the training processes, so every rank holds the totals of all cells."""
        if world.distributed:
            n = torch.tensor(float(self.n), dtype=torch.float64, device=self.recon.device)
            self.recon, self.kl_z, self.kl_l, n = all_sum(
                [self.recon, self.kl_z, self.kl_l, n], world
            )
            self.n = int(round(float(n)))

    def row(self, suffix: str) -> dict[str, float]:
        recon, kl = float(self.recon) / self.n, float(self.kl_z + self.kl_l) / self.n
        return {
            f"elbo_{suffix}": recon + kl,
            f"reconstruction_loss_{suffix}": recon,
            f"kl_local_{suffix}": kl,
        }


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training after the epochs of ``history``, which the module keeps (it
    has the weights of the last one). Raised by :func:`fit` only in one process without a
    checkpoint (which resumes instead); otherwise Ctrl-C stays a plain ``KeyboardInterrupt``."""

    def __init__(self, *, history: pd.DataFrame) -> None:
        super().__init__()
        self.history = history


class TrainingDiverged(FloatingPointError):
    """The loss (or its gradient) became NaN or infinite; the bad step was not applied.

    The module keeps the weights of the last good step. Attributes: ``epoch`` and ``step``
    where it happened, ``history`` of the finished epochs, ``steps_applied`` in this call.
    """

    def __init__(
        self, message: str, *, epoch: int, step: int, history: pd.DataFrame, steps_applied: int
    ) -> None:
        super().__init__(message)
        self.epoch, self.step, self.history = epoch, step, history
        self.steps_applied = steps_applied

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its attributes, so that a training process can hand it to its parent
        return (_rebuild_diverged, (str(self.args[0]), dict(self.__dict__)))


def _rebuild_diverged(message: str, attributes: dict[str, Any]) -> TrainingDiverged:
    err = TrainingDiverged.__new__(TrainingDiverged)
    FloatingPointError.__init__(err, message)
    err.__dict__.update(attributes)
    return err


def _all_finite(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> bool:
    """Whether the loss and every gradient are finite (one host sync).

    The gradients are checked by the multi-tensor kernel that torch's ``GradScaler`` uses
    (scale 1: the gradients are left as they are), a quarter of the time of a total norm on
    the CPU; where it is missing, by the total norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    ok = torch.isfinite(loss)
    if grads:
        found = torch.zeros(1, device=loss.device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found, torch.ones(1, device=loss.device)
            )
            ok = ok & (found == 0).squeeze(0)
        except (RuntimeError, NotImplementedError, TypeError):
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))
    return bool(ok)


def _divergence_message(
    epoch: int, step: int, x: torch.Tensor, loss: torch.Tensor, lr: float
) -> str:
    """Name the likely cause of a non-finite loss from what the bad minibatch held."""
    what = "loss" if not torch.isfinite(loss) else "gradient of the loss"
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        cause = (
            f"this minibatch's counts hold {bad} NaN or infinite values: non-count data reached "
            "the training loop. Validate the input (scvae.SCVAE checks an AnnData for this)"
        )
    elif x.numel() and float(x.max()) > _EXTREME_COUNT:
        cause = (
            f"extreme counts in this minibatch (up to {float(x.max()):.3g}): check for outlier "
            "cells or data that are not raw counts, or lower the learning rate"
        )
    else:
        cause = (
            f"a learning rate too high for this data (lr={lr:g}): try lr={lr / 10:g}; extreme "
            "counts in a few cells or non-count input can also cause it"
        )
    return (
        f"The training {what} became NaN or infinite in epoch {epoch}, step {step}; that step "
        f"was not applied and the weights of the last good step were kept. Likely cause: {cause}."
    )


def _has_unused_parameters(
    module: VAE,
    counts: CountSource,
    batch_codes: torch.Tensor,
    covariates: Covariates,
    train_idx: np.ndarray,
) -> bool:
    """Whether some trainable parameter gets no gradient from the loss (theta of a Poisson
    model, the dropout head of an NB one), found from one loss of two training cells. Nothing
    changes: evaluation mode (no batch-norm update), the random state put back, gradients
    returned rather than stored."""
    params = [p for p in module.parameters() if p.requires_grad]
    idx = torch.as_tensor(np.asarray(train_idx)[:2], dtype=torch.long, device=counts.device)
    if not params or not len(idx):
        return False
    cuda = [counts.device.index or 0] if counts.device.type == "cuda" else []
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=cuda):
            cells, x, nonzero = next(iter(counts.batches(idx, len(idx), shuffle=False)))
            out = module(
                x, batch_codes[cells], covariates.take(cells), kl_weight=1.0, nonzero=nonzero
            )
            grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    finally:
        module.train(was_training)
    return any(g is None for g in grads)


def fit(
    module: VAE,
    counts: CountSource,
    batch_codes: torch.Tensor,
    covariates: Covariates,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    checkpoint: Checkpointer | None = None,
    world: World | None = None,
    epochs_before: int = 0,
) -> pd.DataFrame:
    """Train ``module`` in place and return the history (one row per epoch).

    ``epochs_before``: epochs the module was trained for by earlier calls. The minibatch
    order and the sampling noise start from ``config.seed`` for a first call and from
    ``(config.seed, epochs_before)`` for a later one, so training in several calls draws
    new randomness in each, as one long call would (and as scvi-tools does).

    Columns follow scvi-tools' ``history``: ``elbo_train`` is the negative ELBO per cell with
    KL weight 1 (positive, lower is better), plus ``reconstruction_loss_train``,
    ``kl_local_train``, the same for ``_validation`` when there are validation cells,
    ``kl_weight``, ``lr`` and ``seconds``.

    Every step checks that the loss and its gradient are finite before the optimizer applies
    it; if not, the module is left with the weights (and batch-norm statistics) of the last
    good step and :class:`TrainingDiverged` names the epoch, the step and the likely cause.

    With a :class:`~scvae.checkpoint.Checkpointer`, the latest checkpoint (if any) is restored
    first and the run continues from its epoch; checkpoints are written after the epochs it
    asks for.

    ``counts`` is a :class:`~scvae.data.loader.DeviceCSR` (all counts on the device) or a
    :class:`~scvae.data.backed.BackedCSR` (row blocks read from disk). With a ``world`` of
    several processes (:mod:`scvae.distributed`), the module trains wrapped in
    DistributedDataParallel, each process on its own part of every minibatch, the epoch sums
    (training and validation) are summed over the processes, and only rank 0 writes
    checkpoints.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from scvae.module import ModuleConfig, VAE
    >>> x = np.random.default_rng(0).poisson(3.0, (40, 12)).astype("float32") + 1
    >>> module = VAE(ModuleConfig(n_input=12))
    >>> codes = torch.zeros(40, dtype=torch.long)
    >>> cfg = TrainConfig(max_epochs=2, progress_bar=False)
    >>> data = DeviceCSR(x, "cpu")
    >>> hist = fit(module, data, codes, Covariates(), np.arange(36), np.arange(36, 40), cfg)
    >>> len(hist)
    2
    """
    device = counts.device
    world = world or World()
    stream = config.seed
    if epochs_before:  # a later call: new randomness, still determined by the seed
        stream = int(np.random.SeedSequence([config.seed, epochs_before]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(stream)  # the same on every rank
    # sampling noise: its own on each rank; only the CPU's and this device's generators (a
    # seed is at most 2**32 - 1, so seed + rank stays far inside torch's 64-bit seeds)
    seed_generators(stream + world.rank, device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay
    )
    net = wrap(  # DistributedDataParallel with several processes
        module,
        world,
        unused_parameters=world.distributed
        and _has_unused_parameters(module, counts, batch_codes, covariates, train_idx),
    )
    run_step = StepRunner(net, device, config.precision, compile=config.compile)
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=config.lr_factor,
            patience=config.lr_patience,
            threshold=0.0,
        )
        if config.reduce_lr_on_plateau and len(val_idx)
        else None
    )
    loop = LoopState()
    if checkpoint is not None:
        resumed = checkpoint.restore(
            module,
            optimizer,
            scheduler,
            generator,
            rank=world.rank,
            device=device,
            max_epochs=config.max_epochs,
        )
        if resumed is not None:
            loop = resumed
            logger.info(
                "Resuming training from the checkpoint in %s after epoch %d (of %d)%s.",
                checkpoint.latest_path,
                loop.next_epoch - 1,
                config.max_epochs,
                "; nothing is left to train"
                if loop.stopped_early or loop.next_epoch >= config.max_epochs
                else "",
            )
        # every rank reads the checkpoint, only rank 0 writes it: a folder that is not the
        # same for all (one per node) made rank 0 resume while another started afresh
        found = every_rank(None if resumed is None else loop.next_epoch, world)
        if len(set(found)) > 1:
            where = ", ".join(
                f"rank {r} {'finds none' if e is None else f'resumes after epoch {e - 1}'}"
                for r, e in enumerate(found)
            )
            raise CheckpointError(
                f"The training processes found different checkpoints in {checkpoint.root} "
                f"({where}). checkpoint_dir must be a folder every process sees (on a shared "
                "file system); rank 0 writes it."
            )
    train_t = torch.as_tensor(train_idx, dtype=torch.long, device=device)
    # validation cells: a contiguous share per rank, losses summed over the ranks
    val_t = torch.as_tensor(
        np.array_split(np.asarray(val_idx), world.size)[world.rank], dtype=torch.long, device=device
    )
    has_val = len(val_idx) > 0
    # Batch-norm statistics change in the forward pass: kept so a bad step can be undone.
    buffers = [b for b in module.buffers() if b.numel()]
    saved = [b.detach().clone() for b in buffers]
    steps_applied = 0
    bar = tqdm(
        total=config.max_epochs,
        initial=min(loop.next_epoch, config.max_epochs),
        desc="Training",
        disable=not config.progress_bar or not world.is_main,
        unit="epoch",
    )
    finished: dict[str, torch.Tensor] | None = None  # the state after the last epoch done
    try:
        while loop.next_epoch < config.max_epochs and not loop.stopped_early:
            epoch = loop.next_epoch
            start = time.perf_counter()
            weight = kl_weight(epoch, config.n_epochs_kl_warmup)
            module.train()
            sums = _Sums(device)
            batches = counts.batches(
                train_t,
                config.batch_size,
                shuffle=True,
                generator=generator,
                drop_last_below=_MIN_LAST_BATCH,
                rank=world.rank,
                world_size=world.size,
            )
            for step, (idx, x, nonzero) in enumerate(batches):
                for keep, buf in zip(saved, buffers, strict=True):
                    keep.copy_(buf)
                out = run_step(
                    x, batch_codes[idx], covariates.take(idx), kl_weight=weight, nonzero=nonzero
                )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if not all_true(_all_finite(out.loss, params), device, world):
                    for keep, buf in zip(saved, buffers, strict=True):
                        buf.copy_(keep)
                    optimizer.zero_grad(set_to_none=True)
                    module.eval()
                    lr = optimizer.param_groups[0]["lr"]
                    raise TrainingDiverged(
                        _divergence_message(epoch, step, x, out.loss.detach(), lr),
                        epoch=epoch,
                        step=step,
                        history=loop.history(),
                        steps_applied=steps_applied,
                    )
                optimizer.step()
                steps_applied += 1
                sums.add(out)
            sums.reduce(world)
            sync_buffers(module, world)  # rank 0's batch-norm statistics everywhere
            row = {"epoch": epoch, **sums.row("train")}
            if has_val:
                row.update(
                    # in training-sized chunks: the validation pass needs no more memory than a
                    # step
                    evaluate(
                        module,
                        counts,
                        batch_codes,
                        covariates,
                        val_t,
                        "validation",
                        chunk=config.batch_size,
                        world=world,
                    )
                )
            row.update(
                kl_weight=weight,
                lr=optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - start,
            )
            loop.rows.append(row)
            loop.next_epoch = epoch + 1
            if checkpoint is None and not world.distributed:  # what Ctrl-C keeps
                finished = {k: v.detach().clone() for k, v in module.state_dict().items()}
            shown = {k: f"{row[k]:.1f}" for k in ("elbo_train", "elbo_validation") if k in row}
            # set before the update draws the bar, so the bar shows this epoch's values; the
            # validation value shows overfitting
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            monitor = row.get("elbo_validation", row["elbo_train"])
            if scheduler is not None:
                scheduler.step(monitor)
            if config.early_stopping and has_val and epoch >= config.early_stopping_warmup_epochs:
                # as Lightning's EarlyStopping: kept as "lower is better" (mode "max": negated)
                watched = row[config.early_stopping_monitor]
                watched = watched if config.early_stopping_mode == "min" else -watched
                if not math.isfinite(watched):  # as Lightning's check_finite: stop, saying why
                    loop.stopped_early = True
                    logger.warning(
                        "Early stopping after epoch %d: %s is %s.",
                        epoch,
                        config.early_stopping_monitor,
                        row[config.early_stopping_monitor],
                    )
                elif watched < loop.early_stopping_best - config.early_stopping_min_delta:
                    loop.early_stopping_best, loop.since_best = watched, 0
                else:
                    loop.since_best += 1
                    if loop.since_best >= config.early_stopping_patience:
                        loop.stopped_early = True
                        logger.info(
                            "Early stopping after epoch %d: %s did not improve for %d epochs.",
                            epoch,
                            config.early_stopping_monitor,
                            config.early_stopping_patience,
                        )
            improved = monitor < loop.best_monitor
            if improved:
                loop.best_monitor, loop.best_epoch = monitor, epoch
            if checkpoint is not None:
                # every rank's own random state (a collective: all ranks take part); rank 0 writes
                ranks = gather_rng_states(device, world) if world.distributed else None
                if world.is_main:
                    final = loop.next_epoch >= config.max_epochs or loop.stopped_early
                    checkpoint.epoch_end(
                        module,
                        optimizer,
                        scheduler,
                        generator,
                        loop,
                        improved=improved,
                        final=final,
                        ranks=ranks,
                    )
    except KeyboardInterrupt as err:
        if finished is None:  # nothing to keep: the caller puts back the weights it had
            raise
        module.load_state_dict(finished)  # the epochs done are kept, as scvi-tools keeps them
        module.eval()
        raise TrainingInterrupted(history=loop.history()) from err
    finally:
        # on any error too: a bar left open stays in tqdm's list and the next one is drawn a
        # line lower
        bar.close()
    module.eval()
    return loop.history()


@torch.no_grad()
def evaluate(
    module: VAE,
    counts: CountSource,
    batch_codes: torch.Tensor,
    covariates: Covariates,
    idx: torch.Tensor,
    suffix: str,
    chunk: int = 1024,
    world: World | None = None,
) -> dict[str, float]:
    """Negative ELBO (KL weight 1), reconstruction loss and KL per cell on ``idx``, in eval mode.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from scvae.module import ModuleConfig, VAE
    >>> x = np.ones((4, 3), dtype="float32")
    >>> codes = torch.zeros(4, dtype=torch.long)
    >>> out = evaluate(VAE(ModuleConfig(n_input=3)), DeviceCSR(x, "cpu"), codes, Covariates(),
    ...                torch.arange(4), "validation")
    >>> sorted(out)
    ['elbo_validation', 'kl_local_validation', 'reconstruction_loss_validation']
    """
    was_training = module.training
    module.eval()
    sums = _Sums(counts.device)
    for part, x, nonzero in counts.batches(idx, chunk, shuffle=False):
        sums.add(module(x, batch_codes[part], covariates.take(part), nonzero=nonzero))
    sums.reduce(world or World())
    module.train(was_training)
    return sums.row(suffix)
