"""Seeded blocks that leave the caller's torch generators as they were.

``torch.manual_seed`` seeds the CPU generator and also every CUDA device's (or, before CUDA
starts, queues that seed for all of them) and the MPS one; ``torch.random.fork_rng(devices=[])``
puts back only the CPU's. So a seeded block written that way silently resets the caller's GPU
generators. Here a block seeds only the generators it draws from (the CPU's and its own
device's) and puts back every generator that may change inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def kept_cuda_devices(device: torch.device | None = None) -> list[int]:
    """The CUDA devices whose generators a block on ``device`` puts back: every device when
    CUDA has started or the block runs on a CUDA device (a checkpoint's resume sets them all),
    none otherwise (nothing inside then touches them, and reading their state would start
    CUDA).

    Examples
    --------
    >>> kept_cuda_devices(torch.device("cpu")) if not torch.cuda.is_available() else []
    []
    """
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return list(range(torch.cuda.device_count()))
    return []


def seed_generators(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator and ``device``'s (a CUDA device or MPS) with ``seed``, and no
    other: the same CPU draws as ``torch.manual_seed(seed)``, without reseeding every GPU.

    Examples
    --------
    >>> seed_generators(3)
    >>> a = torch.rand(2)
    >>> _ = torch.manual_seed(3)
    >>> torch.equal(a, torch.rand(2))
    True
    """
    torch.default_generator.manual_seed(int(seed))
    if device is not None and device.type == "cuda":
        torch.cuda.init()
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.default_generators[index].manual_seed(int(seed))
    elif device is not None and device.type == "mps":
        torch.mps.manual_seed(int(seed))


@contextmanager
def kept_generators(device: torch.device | None = None) -> Iterator[None]:
    """Put torch's CPU generator, the CUDA ones of :func:`kept_cuda_devices` and (on MPS) the
    MPS one back as they were when the block ends, however it ends.

    Examples
    --------
    >>> before = torch.get_rng_state()
    >>> with kept_generators():
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
    """
    cpu = torch.get_rng_state()
    cuda = {i: torch.cuda.get_rng_state(i) for i in kept_cuda_devices(device)}
    on_mps = device is not None and device.type == "mps"
    mps = torch.mps.get_rng_state() if on_mps else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        for i, state in cuda.items():
            torch.cuda.set_rng_state(state, i)
        if mps is not None:
            torch.mps.set_rng_state(mps)


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Draw from generators seeded with ``seed`` inside the block (the CPU's and
    ``device``'s), and leave every torch generator of the caller as it was after it.

    Examples
    --------
    >>> with seeded(5):
    ...     a = torch.rand(2)
    >>> with seeded(5):
    ...     torch.equal(a, torch.rand(2))
    True
    """
    with kept_generators(device):
        seed_generators(seed, device)
        yield
