"""The training loop: Adam on the reparameterized ELBO with KL warm-up on z.

Tensors only (no AnnData). ``fit`` takes a module, the counts as :class:`DeviceCSR`, the batch
and label codes and a :class:`TrainConfig`, and returns the history, one row per epoch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scvae._settings import logger
from scvae.data.loader import DeviceCSR, minibatches
from scvae.module import VAE, Covariates

# A last minibatch with fewer cells than this is dropped (BatchNorm needs more than one).
_MIN_LAST_BATCH = 3


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run; the defaults are scvi-tools' ``SCVI.train`` defaults.

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
    n_epochs_kl_warmup: int | None = 400
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_patience: int = 30
    lr_factor: float = 0.6
    seed: int = 0
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (BatchNorm needs two cells), got {self.batch_size}."
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")

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
    n_cells: int, train_size: float, validation_size: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split as in scvi-tools' DataSplitter.

    ``n_train = ceil(train_size * n)``; ``n_val = floor(validation_size * n)`` or the rest.

    Examples
    --------
    >>> tr, va = split_indices(10, 0.9, None, seed=0)
    >>> len(tr), len(va)
    (9, 1)
    """
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    if validation_size is None:
        validation_size = 1.0 - train_size
    if validation_size < 0 or train_size + validation_size > 1.0 + 1e-9:
        raise ValueError(
            f"train_size + validation_size must be at most 1, got {train_size} + {validation_size}."
        )
    n_train = math.ceil(train_size * n_cells)
    n_val = math.floor(validation_size * n_cells + 1e-9)
    n_val = min(n_val, n_cells - n_train)
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

    def row(self, suffix: str) -> dict[str, float]:
        recon, kl = float(self.recon) / self.n, float(self.kl_z + self.kl_l) / self.n
        return {
            f"elbo_{suffix}": recon + kl,
            f"reconstruction_loss_{suffix}": recon,
            f"kl_local_{suffix}": kl,
        }


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good weights were restored."""


def fit(
    module: VAE,
    counts: DeviceCSR,
    batch_codes: torch.Tensor,
    covariates: Covariates,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
) -> pd.DataFrame:
    """Train ``module`` in place and return the history (one row per epoch).

    Columns follow scvi-tools' ``history``: ``elbo_train`` is the negative ELBO per cell with
    KL weight 1 (positive, lower is better), plus ``reconstruction_loss_train``,
    ``kl_local_train``, the same for ``_validation`` when there are validation cells,
    ``kl_weight``, ``lr`` and ``seconds``.

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
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad],
        lr=config.lr,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
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
    train_t = torch.as_tensor(train_idx, dtype=torch.long, device=device)
    val_t = torch.as_tensor(val_idx, dtype=torch.long, device=device)
    rows: list[dict[str, float]] = []
    best, since_best = math.inf, 0
    bar = tqdm(
        range(config.max_epochs), desc="Training", disable=not config.progress_bar, unit="epoch"
    )
    for epoch in bar:
        start = time.perf_counter()
        weight = kl_weight(epoch, config.n_epochs_kl_warmup)
        last_good = copy.deepcopy(module.state_dict())
        module.train()
        sums = _Sums(device)
        for idx in minibatches(
            train_t,
            config.batch_size,
            shuffle=True,
            generator=generator,
            drop_last_below=_MIN_LAST_BATCH,
        ):
            out = module(counts.rows(idx), batch_codes[idx], covariates.take(idx), kl_weight=weight)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            sums.add(out)
        row = {"epoch": epoch, **sums.row("train")}
        if not all(math.isfinite(v) for v in row.values()):
            module.load_state_dict(last_good)
            raise TrainingDiverged(
                f"The training loss became NaN or infinite in epoch {epoch}; the weights from "
                "before that epoch were restored. Likely causes: a learning rate too high for "
                "this data (try lr=1e-4), extreme counts in a few cells, or non-count input."
            )
        if len(val_t):
            row.update(evaluate(module, counts, batch_codes, covariates, val_t, "validation"))
        row.update(
            kl_weight=weight,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - start,
        )
        rows.append(row)
        bar.set_postfix(elbo_train=f"{row['elbo_train']:.1f}", refresh=False)
        monitor = row.get("elbo_validation", row["elbo_train"])
        if scheduler is not None:
            scheduler.step(monitor)
        if config.early_stopping and len(val_t):
            if monitor < best - config.early_stopping_min_delta:
                best, since_best = monitor, 0
            else:
                since_best += 1
                if since_best >= config.early_stopping_patience:
                    logger.info(
                        "Early stopping after epoch %d: the validation ELBO did not improve for "
                        "%d epochs.",
                        epoch,
                        config.early_stopping_patience,
                    )
                    break
    bar.close()
    module.eval()
    return pd.DataFrame(rows).set_index("epoch")


@torch.no_grad()
def evaluate(
    module: VAE,
    counts: DeviceCSR,
    batch_codes: torch.Tensor,
    covariates: Covariates,
    idx: torch.Tensor,
    suffix: str,
    chunk: int = 1024,
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
    for part in minibatches(idx, chunk, shuffle=False):
        sums.add(module(counts.rows(part), batch_codes[part], covariates.take(part)))
    module.train(was_training)
    return sums.row(suffix)
