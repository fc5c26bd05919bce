"""The compute device of a model: ``"auto"`` or a torch device string, checked."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device when present, else the CPU; others are checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and device.split(":")[0].lower() in ("gpu", "accelerator"):
        # Lightning's accelerator="gpu" (scvi-tools' train(accelerator="gpu")) by habit
        raise ValueError(
            f"device={device!r}: torch calls GPUs 'cuda'; use 'cuda' (or 'cuda:0'), or 'auto' "
            "to pick the GPU when there is one."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device ({err}); use 'auto', 'cpu' or 'cuda:0'."
        ) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device={device!r}: scvae runs on 'cpu', 'cuda' (e.g. 'cuda:0') or 'mps'; use "
            "'auto' to pick the GPU when there is one."
        )
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
        raise ValueError(
            f"device={device!r} was asked for, but MPS is not available here (it needs Apple "
            "silicon and a torch built with MPS); use 'auto' or 'cpu'."
        )
    return dev
