"""Model files: weights in safetensors plus a JSON description; loading never runs code.

A model directory holds exactly two files that scvae reads:

* ``model.safetensors``: the module's ``state_dict`` (tensors only; the format cannot hold code);
* ``model.json``: ``format`` ("scvae-model"), ``format_version``, ``scvae_version``,
  ``weights_sha256`` (checksum of the weights file) and the model's description (registry with
  the genes, module configuration, training options and history).

Anything else in the directory is ignored. Saving writes into a temporary sibling directory and
renames it into place, so an interrupted save leaves the previous model intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "scvae-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "model.json"
_MAX_JSON_BYTES = 512 * 2**20


class ModelFileError(ValueError):
    """A model directory is missing, incomplete, corrupted or of an unsupported version."""


def _version() -> str:
    from scvae import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(
    dir_path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    description: dict[str, Any],
    *,
    overwrite: bool = False,
) -> None:
    """Write ``state_dict`` and ``description`` into the directory ``dir_path``, atomically.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_model(path, {"w": torch.ones(2)}, {"note": "hi"})
    >>> load_model(path)[1]["note"]
    'hi'
    """
    target = Path(dir_path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path.")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another path."
        )
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise PermissionError(
            f"Cannot write the model to {target}: {err.strerror or err}. Choose a writable path."
        ) from None
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / WEIGHTS_FILE)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scvae_version": _version(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            **description,
        }
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(meta, indent=1))
        for name in (WEIGHTS_FILE, DESCRIPTION_FILE):
            _fsync(tmp / name)
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(dir_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model directory: ``(state_dict, description)``. Never unpickles anything.

    Raises :class:`ModelFileError` naming the problem for a missing, truncated, corrupted or
    newer-format directory.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_model(path, {"w": torch.zeros(3)}, {})
    >>> load_model(path)[0]["w"].tolist()
    [0.0, 0.0, 0.0]
    """
    root = Path(dir_path)
    if not root.is_dir():
        raise ModelFileError(f"No model directory at {root}.")
    meta_path = root / DESCRIPTION_FILE
    if not meta_path.is_file():
        raise ModelFileError(
            f"{root} is not a scvae model directory: {DESCRIPTION_FILE} is missing."
        )
    if meta_path.stat().st_size > _MAX_JSON_BYTES:
        raise ModelFileError(f"{meta_path} is implausibly large; it is not a scvae description.")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{meta_path} is corrupted or truncated ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{meta_path} is not a scvae model description.")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{meta_path} has no valid format_version.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{root} was saved by a newer scvae ({meta.get('scvae_version')}, model format "
            f"{version}); this scvae ({_version()}) reads formats up to {FORMAT_VERSION}. "
            "Upgrade scvae-torch to load it."
        )
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"{root} is incomplete: {WEIGHTS_FILE} is missing.")
    if _sha256(weights_path) != meta.get("weights_sha256"):
        raise ModelFileError(
            f"{weights_path} does not match the checksum in {DESCRIPTION_FILE}: the weights "
            "file is corrupted, truncated or was replaced. Restore it from the original save."
        )
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{weights_path} cannot be read as safetensors ({err}).") from None
    return weights, meta
