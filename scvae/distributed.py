"""Training across processes with ``torch.distributed``: the process group, its collectives, and
a launcher for the Python API. Tensors only: no AnnData.

Two ways in, one training loop (:func:`scvae.train.fit`):

* ``torchrun --nproc_per_node=N script.py``: the script calls ``model.train(...)`` on every
  rank; :func:`init_from_env` creates the process group from torchrun's environment
  (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...) when none exists: NCCL for CUDA, gloo
  otherwise.
* ``model.train(..., n_processes=N)``: :func:`launch` starts N worker processes (spawned, so
  no state is inherited by forking), joined through a rendezvous file in a temporary
  directory; the caller loads rank 0's result.

In the loop, the module is wrapped in ``DistributedDataParallel`` (gradients averaged at each
step), each rank trains on its own part of every global minibatch, and the per-epoch sums of
the training and validation losses are summed over the ranks, so every rank records the same
history and takes the same early-stopping and learning-rate decisions. Rank 0 alone writes
checkpoints and shows the progress bar; batch-norm statistics are broadcast from rank 0 after
each epoch, so all ranks end with identical weights and buffers.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Examples
    --------
    >>> World().distributed, World(rank=1, size=2).is_main
    (False, False)
    """

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        """More than one process trains."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints and shows progress."""
        return self.rank == 0


def current_world() -> World:
    """The initialised default process group as a :class:`World` (one process when none).

    Examples
    --------
    >>> current_world()
    World(rank=0, size=1)
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise.

    Examples
    --------
    >>> backend_for(torch.device("cpu"))
    'gloo'
    """
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: torch.device) -> bool:
    """Create the default process group from torchrun's environment when it asks for one.

    Does nothing (and returns False) when a group already exists or ``WORLD_SIZE`` is unset
    or 1; returns True when it created the group (the caller may destroy it when done).

    Examples
    --------
    >>> init_from_env(torch.device("cpu"))  # not launched by torchrun
    False
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: "
            "launch the script with torchrun (torchrun --nproc_per_node=N script.py), or call "
            "torch.distributed.init_process_group yourself before model.train."
        )
    dist.init_process_group(backend_for(device), init_method="env://")
    return True


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:<local rank>``; a GPU named by its
    index is refused when several processes train (they would all share it).

    Examples
    --------
    >>> rank_device(torch.device("cpu"), World(1, 2))
    device(type='cpu')
    """
    if device.type != "cuda" or not world.distributed:
        return device
    if device.index is not None:  # every rank on one GPU: NCCL refuses it, deep inside
        raise ValueError(
            f"device={str(device)!r} names one GPU, but each of the {world.size} training "
            "processes needs its own: pass device='cuda' (process r then trains on cuda:r; "
            "choose the GPUs with CUDA_VISIBLE_DEVICES)."
        )
    local = int(os.environ.get("LOCAL_RANK", world.rank))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


def wrap(
    module: torch.nn.Module, world: World, *, unused_parameters: bool = True
) -> torch.nn.Module:
    """The module in ``DistributedDataParallel`` when several processes train, else itself.

    Parameters are broadcast from rank 0 here, so every rank starts from rank 0's weights.
    ``unused_parameters``: whether some trainable parameter gets no gradient from the loss
    (e.g. theta of a Poisson model, the dropout head of an NB one); DDP then looks for them
    in the graph at every step (``find_unused_parameters``), which costs a traversal and, when
    there are none, a warning from every rank. (``static_graph=True`` would save that
    traversal, but its first backward pass leaves the local, unaveraged gradients in place:
    checked, so not used.)
    """
    if not world.distributed:
        return module
    device = next(module.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused_parameters,
    )


def all_sum(values: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """Sum scalar tensors over the ranks (one collective); unchanged when alone.

    Examples
    --------
    >>> all_sum([torch.tensor(2.0)], World())
    [tensor(2.)]
    """
    if not world.distributed:
        return values
    packed = torch.stack([v.detach().double().reshape(()) for v in values])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return list(packed.unbind())


def all_true(flag: bool, device: torch.device, world: World) -> bool:
    """Whether ``flag`` holds on every rank (one collective); ``flag`` when alone.

    Examples
    --------
    >>> all_true(True, torch.device("cpu"), World())
    True
    """
    if not world.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_rng_states(device: torch.device, world: World) -> list[dict[str, torch.Tensor]]:
    """Every rank's own torch random state (and its CUDA device's), in rank order; a
    collective, called by all ranks. Checkpoints keep them, so that each rank resumes its
    own stream of sampling noise.

    Examples
    --------
    >>> [sorted(s) for s in gather_rng_states(torch.device("cpu"), World())]
    [['torch']]
    """
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    return [{k: v.cpu() for k, v in s.items()} for s in every_rank(own, world)]


def every_rank(value: Any, world: World) -> list[Any]:
    """``value`` of every rank, in rank order (one collective; alone: ``[value]``).

    Examples
    --------
    >>> every_rank(3, World())
    [3]
    """
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def check_same_run(fingerprint: dict[str, Any], world: World) -> None:
    """Refuse, on every rank at once, a run whose ranks were given different data or options.

    Each rank describes its run (cells, registration, options: plain values or digests); the
    descriptions are gathered (one collective) and compared with rank 0's. Ranks with other
    cells would take another number of steps and wait on each other until the process
    group's timeout; ranks with the same number of cells but other genes or options would
    train on a mixture. Both are turned into a ValueError naming what differs.

    Examples
    --------
    >>> check_same_run({"cells": 100}, World())  # alone: nothing to compare
    """
    if not world.distributed:
        return
    runs = every_rank(fingerprint, world)
    first = runs[0]
    differences = [
        f"rank {rank} has {key} {run.get(key)!r} where rank 0 has {first.get(key)!r}"
        for rank, run in enumerate(runs[1:], start=1)
        for key in dict.fromkeys([*first, *run])
        if run.get(key) != first.get(key)
    ]
    if differences:
        shown = "; ".join(differences[:6]) + (
            f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
        )
        raise ValueError(
            f"The {world.size} training processes were not given the same run: {shown}. "
            "Every rank must load the same AnnData (same cells, genes and counts), set the "
            "model up the same way and call train() with the same options (seed included); "
            "each rank takes its own share of the cells itself."
        )


def sync_buffers(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every rank."""
    if world.distributed:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def launch(
    n_processes: int,
    target: Callable[[int, int, str, Any], None],
    payload: Any,
) -> None:
    """Run ``target(rank, n_processes, init_method, payload)`` in ``n_processes`` new processes.

    The processes are spawned (a fresh interpreter each, so ``target`` and ``payload`` must
    pickle) and meet through a rendezvous file in a temporary directory (no network port).
    Blocks until all finish. An exception in any of them is raised here again, of its own
    type and with its attributes (so ``except TrainingDiverged`` works as in one process),
    chained to a ``RuntimeError`` that names the rank and carries the worker's traceback;
    an exception that cannot be pickled arrives as that ``RuntimeError``.
    """
    import torch.multiprocessing as mp

    if isinstance(n_processes, bool) or not isinstance(n_processes, int) or n_processes < 1:
        raise ValueError(f"n_processes must be a whole number >= 1, got {n_processes!r}.")
    with _sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="scvae-ddp-") as tmp:
        init_method = Path(tmp, "rendezvous").as_uri()
        others = set(multiprocessing.active_children())
        context = None
        try:
            context = mp.start_processes(
                _run,
                args=(n_processes, init_method, target, payload, tmp),
                nprocs=n_processes,
                join=False,
                start_method="spawn",
            )
            while not context.join():
                pass
        except mp.ProcessRaisedException as err:
            failure = RuntimeError(f"A training process failed (rank {err.error_index}):\n{err}")
            original = _load_error(Path(tmp, f"error-{err.error_index}.pickle"))
            if original is None:
                raise failure from None
            raise original from failure
        except mp.ProcessExitedException as err:
            raise RuntimeError(
                f"Training process {err.error_index} died (exit code {err.exit_code}), e.g. "
                "out of memory; the others were stopped."
            ) from None
        finally:
            # Interrupted here (Ctrl-C, a notebook's interrupt, SIGTERM), even while the
            # workers were being started: stop them before their folder is removed; left
            # alone they would train on as orphans, or wait for a missing rank while this
            # process waits for them at exit. Only this call's workers: another thread's
            # processes (its own train(n_processes=N) included) are not ours to stop; while
            # ours were being started, the children started since is the best that is known.
            if context is not None:
                ours = [p for p in context.processes if p.is_alive()]
            else:
                ours = [p for p in multiprocessing.active_children() if p not in others]
            for process in ours:
                process.terminate()
            for process in ours:
                process.join(timeout=30)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the workers run (or a ``scvae`` command), SIGTERM to this process raises
    SystemExit(143) (the status a shell reports for a process ended by SIGTERM; the process
    now exits with it rather than by the signal) instead of ending it on the spot, so the
    workers are stopped and the temporary folders and files removed. Only where Python's
    default action was in place, in the main thread; the default is put back after."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_with_launcher() -> None:
    """In a spawned worker: end this process as soon as the one that launched it is gone
    (killed without a chance to stop its workers), instead of training on as an orphan."""
    from multiprocessing import connection

    launcher = multiprocessing.parent_process()
    if launcher is None:
        return

    def watch() -> None:
        connection.wait([launcher.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="scvae-launcher-watch", daemon=True).start()


def _run(
    rank: int,
    world_size: int,
    init_method: str,
    target: Callable[[int, int, str, Any], None],
    payload: Any,
    error_dir: str,
) -> None:
    _exit_with_launcher()
    try:
        target(rank, world_size, init_method, payload)
    except BaseException as err:
        # the exception itself, for launch to raise again with its type (written to a
        # temporary file first, so launch never reads half of one)
        path = Path(error_dir, f"error-{rank}.pickle")
        try:
            Path(f"{path}.part").write_bytes(pickle.dumps(err))
            os.replace(f"{path}.part", path)
        except Exception:  # an exception that does not pickle: only its traceback travels
            pass
        raise


def _load_error(path: Path) -> BaseException | None:
    """The exception a worker wrote (our own process's file), or None."""
    try:
        err = pickle.loads(path.read_bytes())
    except Exception:
        return None
    return err if isinstance(err, BaseException) else None
