"""Training checkpoints: the latest and the best state of a run, saved atomically, resumable.

A checkpoint directory holds two model directories (:mod:`scvae.io` format, so
``SCVAE.load(checkpoint_dir / "best", adata)`` opens either as a model):

* ``latest/``: the state after the most recent checkpointed epoch;
* ``best/``: the state after the epoch with the lowest monitored loss (the validation negative
  ELBO, or the training one without validation cells).

Each holds ``model.safetensors`` (weights), ``train_state.safetensors`` (the optimizer's
tensors and the random generators' states) and ``model.json`` (the model description plus a
``checkpoint`` entry: epoch, loop state, scheduler state, optimizer options and the identity
of the run; the history is the description's own, as in any model directory). Nothing is
pickled. Each directory is replaced atomically, so a process killed at any moment leaves the
previous checkpoint readable.

A checkpoint restores everything the loop depends on (weights, optimizer and scheduler state,
the minibatch-order generator, torch's global generator, the epoch counter and the
early-stopping state), so on the CPU a resumed run ends with the same weights, bit for bit, as
an uninterrupted run with the same seed. Tensors and JSON only: no AnnData.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scvae.io import (
    DESCRIPTION_FILE,
    ModelFileError,
    link_model,
    load_extra,
    load_model,
    save_model,
)

LATEST = "latest"
BEST = "best"
STATE_FILE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used for this training run."""


@dataclass
class LoopState:
    """The training loop's own state between epochs (JSON-ready).

    Examples
    --------
    >>> LoopState().next_epoch
    0
    """

    next_epoch: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)
    early_stopping_best: float = math.inf
    since_best: int = 0
    best_monitor: float = math.inf
    best_epoch: int | None = None
    stopped_early: bool = False

    def __post_init__(self) -> None:
        # read back from a checkpoint's JSON: a wrong type or value names its field here
        # instead of failing later in the loop (or training -3 + max_epochs epochs)
        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        problems = []
        if not count(self.next_epoch):
            problems.append(f"next_epoch must be a whole number >= 0, got {self.next_epoch!r}")
        if not count(self.since_best):
            problems.append(f"since_best must be a whole number >= 0, got {self.since_best!r}")
        if not (self.best_epoch is None or count(self.best_epoch)):
            problems.append(f"best_epoch must be null or an epoch, got {self.best_epoch!r}")
        for name in ("early_stopping_best", "best_monitor"):
            if not number(getattr(self, name)):
                problems.append(f"{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.stopped_early, bool):
            problems.append(f"stopped_early must be true or false, got {self.stopped_early!r}")
        rows_ok = isinstance(self.rows, list) and all(
            isinstance(row, dict)
            and count(row.get("epoch"))
            and all(isinstance(k, str) and number(v) for k, v in row.items())
            for row in self.rows
        )
        if not rows_ok:
            problems.append("rows must be a list of {column: number} with an epoch each")
        if problems:
            raise ValueError("loop: " + "; ".join(problems))

    def history(self) -> pd.DataFrame:
        """The finished epochs, one row each, indexed by epoch."""
        frame = pd.DataFrame(self.rows)
        return frame.set_index("epoch") if "epoch" in frame else frame


@dataclass
class _Snapshot:
    """Everything a checkpoint holds, copied to the CPU."""

    weights: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    info: dict[str, Any]


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _optimizer_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as safetensors-ready tensors and JSON-ready options."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        values[str(pid)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().to("cpu", copy=True)
                values[str(pid)][name] = None
            else:
                values[str(pid)][name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": values}


def _optimizer_state(
    tensors: dict[str, torch.Tensor], info: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, Any]:
    """The optimizer's state dict from a checkpoint, checked against the live ``params``
    (a ValueError names what does not fit: a tensor of another shape, an option of another
    type, which the optimizer would take and fail on, or diverge with, later)."""
    state = {
        int(pid): {
            name: tensors[f"optimizer.{pid}.{name}"] if value is None else value
            for name, value in entry.items()
        }
        for pid, entry in info["state"].items()
    }
    for pid, entry in state.items():
        if not 0 <= pid < len(params):
            raise ValueError(f"optimizer state for parameter {pid} of {len(params)}")
        for name, value in entry.items():
            if name in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != params[pid].shape:
                raise ValueError(
                    f"optimizer.{pid}.{name} has shape {tuple(value.shape)}, its parameter "
                    f"{tuple(params[pid].shape)}"
                )
    for group in info["param_groups"]:
        for name in ("lr", "eps", "weight_decay"):
            value = group.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"optimizer option {name} must be a number, got {value!r}")
    return {"state": state, "param_groups": info["param_groups"]}


def _rng_tensors(
    generator: torch.Generator, ranks: list[dict[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    """The random states a resume needs: the minibatch generator, this process's torch (and
    CUDA) states, and with several processes each other rank's own (``ranks``, in rank order,
    from :func:`scvae.distributed.gather_rng_states`): every rank draws its own sampling noise."""
    out = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    for rank, states in enumerate(ranks or []):
        if rank:  # rank 0 is this process, above
            out.update({f"rng.rank{rank}.{k}": v for k, v in states.items()})
    return out


# What an identity entry that is left out means (one process records no n_processes)
_ABSENT_MEANS = {"train_config.n_processes": 1}
# Identity entries added after checkpoints were first written: one without them resumes, as
# it did before they existed (the other entries still have to match)
_RECORDED_SINCE = {"cells", "stored_nonzeros", "counts_total"}


# What reading a checkpoint's malformed contents raises (named by :func:`_malformed`)
_MALFORMED = (KeyError, TypeError, ValueError, RuntimeError)


def _malformed(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"The latest checkpoint in {path} is malformed ({type(err).__name__}: {err}). "
        f"Delete {path} to start afresh, or pass another checkpoint_dir."
    )


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Leaf paths where two JSON-ready values differ, with both values (shortened).

    Examples
    --------
    >>> _differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c (checkpoint 2, now 3)']
    >>> _differences({"train_config": {}}, {"train_config": {"n_processes": 2}})
    ['train_config.n_processes (checkpoint 1, now 2)']
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if name in _RECORDED_SINCE and key not in saved:
                continue  # a checkpoint from before this entry: it cannot be compared
            absent = _ABSENT_MEANS.get(name)
            out += _differences(saved.get(key, absent), current.get(key, absent), name)
        return out
    if saved == current:
        return []

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{prefix} (checkpoint {short(saved)}, now {short(current)})"]


class Checkpointer:
    """Writes and restores the checkpoints of one training run in ``dir_path``.

    Parameters
    ----------
    dir_path
        The checkpoint directory (created when missing).
    identity
        JSON-ready facts that must match for a checkpoint to be resumed (registry, module
        configuration, training options, split, starting weights); a checkpoint of another
        identity is refused with :class:`CheckpointError`.
    describe
        Returns the model description (as :func:`scvae.io.save_model` takes it) for the
        history so far, so that a checkpoint is also a loadable model directory.
    every
        Write ``latest/`` every this many epochs (and after the last epoch); ``best/`` is
        written at the same moments when the best epoch changed (kept in memory until then).

    Examples
    --------
    >>> import tempfile
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), identity={"run": 1}, describe=lambda h: {})
    >>> net = torch.nn.Linear(2, 1)
    >>> opt, gen = torch.optim.Adam(net.parameters()), torch.Generator()
    >>> ckpt.restore(net, opt, None, gen) is None  # nothing saved yet
    True
    >>> loop = LoopState(next_epoch=1, rows=[{"epoch": 0, "elbo_train": 5.0}])
    >>> ckpt.epoch_end(net, opt, None, gen, loop, improved=True, final=True)
    >>> sorted(p.name for p in ckpt.root.iterdir())
    ['best', 'latest']
    >>> ckpt.restore(torch.nn.Linear(2, 1), opt, None, gen).next_epoch
    1
    """

    def __init__(
        self,
        dir_path: str | os.PathLike,
        *,
        identity: dict[str, Any],
        describe: Callable[[pd.DataFrame], dict[str, Any]],
        every: int = 1,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a whole number >= 1, got {every!r}.")
        self.root = Path(dir_path).absolute()
        self.every = every
        self.identity = _json_ready(identity)
        self.describe = describe
        self._pending_best: _Snapshot | None = None
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(
                f"checkpoint_dir {self.root} is a file, not a directory; choose another path."
            )
        if (self.root / DESCRIPTION_FILE).is_file():  # latest/ and best/ would go inside it
            raise CheckpointError(
                f"checkpoint_dir {self.root} is a saved model's folder (it holds "
                f"{DESCRIPTION_FILE}); give the checkpoints a folder of their own, e.g. "
                f"{self.root / 'checkpoints'}."
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                err.errno,
                f"Cannot write checkpoints to {self.root}: {err.strerror or err}. Choose a "
                "writable checkpoint_dir.",
            ) from None

    @property
    def latest_path(self) -> Path:
        """Directory of the latest checkpoint."""
        return self.root / LATEST

    @property
    def best_path(self) -> Path:
        """Directory of the best checkpoint."""
        return self.root / BEST

    # ------------------------------------------------------------------ restore
    def restore(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
        *,
        rank: int = 0,
        device: torch.device | None = None,
        max_epochs: int | None = None,
    ) -> LoopState | None:
        """Load ``latest/`` into the live objects and return the loop state (None: no
        checkpoint yet). Raises :class:`CheckpointError` for an unreadable checkpoint, one
        of another run, or one past ``max_epochs`` (loading it would give a model trained
        longer than asked), before anything is loaded. ``rank``: this process's rank, whose
        own random states are restored (the CUDA one on ``device``)."""
        path = self.latest_path
        if not path.exists():
            return None
        try:
            weights, meta = load_model(path)
            info = meta.get("checkpoint")
            if not isinstance(info, dict) or not isinstance(info.get("identity"), dict):
                raise CheckpointError(
                    f"{path} is a model directory, not a training checkpoint. Pass an empty or "
                    "new checkpoint_dir."
                )
            tensors = load_extra(path, meta, STATE_FILE)
        except ModelFileError as err:
            raise CheckpointError(
                f"The latest checkpoint in {self.root} cannot be read: {err} Delete {path} to "
                "start afresh, or pass another checkpoint_dir."
            ) from None
        diffs = _differences(info["identity"], self.identity)
        if diffs and all(d.startswith("initial_weights_sha256") for d in diffs):
            state = module.state_dict()
            if state.keys() == weights.keys() and all(
                torch.equal(state[k].detach().cpu(), weights[k]) for k in weights
            ):  # this model is where that run ended: it trained in this process already
                raise CheckpointError(
                    f"This model already holds the weights of the latest checkpoint in "
                    f"{self.root} (epoch {info.get('epoch')}): that run ended in this model. "
                    "To train it further, call train() again without checkpoint_dir or with a "
                    "new one; to extend that run from its checkpoint, repeat the original call "
                    "with a larger max_epochs on a model built as it was (e.g. the same script "
                    "in a new process)."
                )
        if diffs:
            raise CheckpointError(
                f"checkpoint_dir {self.root} holds a checkpoint of another training run; it "
                f"differs in {'; '.join(diffs[:6])}. Pass a new checkpoint_dir, or delete "
                f"{self.root} to start afresh."
            )
        try:
            loop = LoopState(**info["loop"])  # its fields checked before anything is loaded
        except _MALFORMED as err:
            raise _malformed(path, err) from None
        done = loop.next_epoch
        if max_epochs is not None and done > max_epochs:
            raise CheckpointError(
                f"The latest checkpoint in {self.root} has trained {done} epochs, more than "
                f"max_epochs={max_epochs}. Pass max_epochs={done} or more to resume it (with "
                f"{done} nothing is left to train), or a new checkpoint_dir for a shorter run."
            )
        try:
            module.load_state_dict(weights, strict=True)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            optimizer.load_state_dict(_optimizer_state(tensors, info["optimizer"], params))
            if scheduler is not None and info.get("scheduler") is not None:
                scheduler.load_state_dict(info["scheduler"])
            generator.set_state(tensors["rng.generator"])
            if rank:
                # a checkpoint from before per-rank states: rank 0's, as it was then
                torch.set_rng_state(tensors.get(f"rng.rank{rank}.torch", tensors["rng.torch"]))
                own_cuda = tensors.get(f"rng.rank{rank}.cuda")
                if own_cuda is not None and device is not None and device.type == "cuda":
                    torch.cuda.set_rng_state(own_cuda, device)
            else:
                torch.set_rng_state(tensors["rng.torch"])
                cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
                if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        except _MALFORMED as err:
            raise _malformed(path, err) from None
        return loop

    # -------------------------------------------------------------------- write
    def _snapshot(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
        loop: LoopState,
        ranks: list[dict[str, torch.Tensor]] | None = None,
    ) -> _Snapshot:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        opt_tensors, opt_info = _optimizer_parts(optimizer)
        info = {
            "epoch": loop.next_epoch - 1,
            "identity": self.identity,
            "loop": copy.deepcopy(asdict(loop)),
            "optimizer": copy.deepcopy(opt_info),
            "scheduler": None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
        }
        return _Snapshot(weights, {**opt_tensors, **_rng_tensors(generator, ranks)}, info)

    def _write(self, snapshot: _Snapshot, path: Path) -> None:
        loop = LoopState(**snapshot.info["loop"])
        description = {**self.describe(loop.history()), "checkpoint": snapshot.info}
        save_model(
            path,
            snapshot.weights,
            _json_ready(description),
            overwrite=True,
            extra_files={STATE_FILE: snapshot.state},
        )

    def epoch_end(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
        loop: LoopState,
        *,
        improved: bool,
        final: bool,
        ranks: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Called after each finished epoch (``loop.next_epoch`` already advanced); ``ranks``:
        every rank's random states when several processes train."""
        write_now = final or loop.next_epoch % self.every == 0
        if improved and not write_now:
            self._pending_best = self._snapshot(
                module, optimizer, scheduler, generator, loop, ranks
            )
        if not write_now:
            return
        self._write(
            self._snapshot(module, optimizer, scheduler, generator, loop, ranks), self.latest_path
        )
        if improved:
            link_model(self.latest_path, self.best_path)
            self._pending_best = None
        elif self._pending_best is not None:
            self._write(self._pending_best, self.best_path)
            self._pending_best = None
