"""Model files: weights in safetensors plus a JSON description; loading never runs code.

A model directory holds the two files that scvae reads to rebuild a model:

* ``model.safetensors``: the module's ``state_dict`` (tensors only; the format cannot hold code);
* ``model.json``: ``format`` ("scvae-model"), ``format_version``, ``scvae_version``,
  ``weights_sha256`` (checksum of the weights file) and the model's description (registry with
  the genes, module configuration, training options and history).

A training checkpoint is a model directory with one more safetensors file (the optimizer and
random-generator states, see :mod:`scvae.checkpoint`), listed with its checksum under
``extra_files`` in ``model.json``; a model saved with ``save_anndata=True`` lists its
``adata.h5ad`` there too (read by anndata, through :func:`checked_extra`). Any other file in the
directory is ignored: a pickle planted beside the weights is never opened.

Saving writes into a temporary sibling directory ``.<name>.tmp-<random>``, fsyncs it and then
puts it in place in one step: on Linux an existing directory is swapped with the new one by
``renameat2(RENAME_EXCHANGE)``, so at every instant ``<name>`` is either the complete previous
model or the complete new one. (Elsewhere the old directory is first renamed to
``.<name>.old-<random>``; a process killed between the two renames leaves the previous model
there, and :func:`load_model` says so.) A killed save can leave ``.<name>.tmp-*`` siblings
behind; loading ignores them and they can be deleted.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
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
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


def default_file_mode(path: Path) -> None:
    """Give a file written through a private temporary file the mode a plain ``open`` gives.

    ``tempfile.mkstemp`` and safetensors create files readable by their owner only; a saved
    model or output file should be as readable as any other file the user writes (0666 minus
    the process's umask).
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _install(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target``, replacing what is there atomically."""
    if target.exists():
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
        else:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # the previous model back in its place
                raise
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync(target.parent)


def _unwritable(target: Path, err: Exception) -> OSError:
    """The same kind of OSError, with a message naming the model path and the fix."""
    code = getattr(err, "errno", None)
    reason = getattr(err, "strerror", None) or str(err)
    msg = f"Cannot write the model to {target}: {reason}. Choose a writable path"
    if code == errno.ENOSPC:
        msg += " on a disk with enough free space"
    msg += "; nothing was written there."
    # OSError(errno, ...) builds the matching subclass (PermissionError, ...).
    return OSError(code, msg) if code is not None else OSError(msg)


def foreign_entries(dir_path: str | os.PathLike) -> list[str]:
    """Names in the directory ``dir_path`` that are not part of a saved model.

    A model directory holds ``model.json``, ``model.safetensors`` and the extra files its
    ``model.json`` lists; saving with ``overwrite=True`` replaces the whole directory, so it
    must hold nothing else (a user's notebook, figures, data). Empty for a path that does not
    exist.

    Examples
    --------
    >>> import tempfile, os
    >>> root = tempfile.mkdtemp()
    >>> open(os.path.join(root, "notes.txt"), "w").close()
    >>> foreign_entries(root)
    ['notes.txt']
    """
    root = Path(dir_path)
    if not root.is_dir():
        return []
    own = {WEIGHTS_FILE, DESCRIPTION_FILE}
    try:
        meta = json.loads((root / DESCRIPTION_FILE).read_text())
        # an extra file is the model's own only with the content it was saved with: a name
        # listed in a crafted model.json must not let an overwrite delete a user's file
        for name, checksum in meta.get("extra_files", {}).items():
            path = root / str(name)
            if Path(str(name)).name == name and path.is_file() and _sha256(path) == checksum:
                own.add(name)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no readable description: only the two standard names are a model's own
    return sorted(entry.name for entry in root.iterdir() if entry.name not in own)


def _prepare(dir_path: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Check ``dir_path`` can be (re)written and create the temporary sibling directory.

    A symbolic link is followed: the model is written where it points, and the link stays.
    """
    target = Path(dir_path).absolute()
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path.")
    foreign = foreign_entries(target)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(foreign[:5]) + more
        raise FileExistsError(
            f"{target} holds files that are not part of a saved model ({shown}). Saving "
            "replaces the whole model directory, so it is never a folder with other files: "
            "choose a new or empty directory, e.g. a subfolder."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another path."
        )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"Cannot write the model to {target}: {ancestor} is a file, not a directory. "
            "Choose another path; nothing was written.",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise _unwritable(target, err) from None
    return target, tmp


def save_model(
    dir_path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    description: dict[str, Any],
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra_writers: Mapping[str, Callable[[Path], None]] | None = None,
) -> None:
    """Write ``state_dict`` and ``description`` into the directory ``dir_path``, atomically.

    Parameters
    ----------
    dir_path
        The model directory; its parent folders are created.
    state_dict
        The weights, written to ``model.safetensors``.
    description
        JSON-ready facts about the model, written into ``model.json`` after the format keys.
    overwrite
        Replace an existing directory (atomically); otherwise an existing one is an error.
    extra_files
        More safetensors files to write (file name -> tensors), each listed with its checksum
        under ``extra_files`` in ``model.json`` and read back by :func:`load_extra`.
    extra_writers
        More files of other formats (file name -> a function that writes the file at the path
        it is given), listed with their checksums as the extra files are; see
        :func:`checked_extra`.

    Raises
    ------
    FileExistsError
        ``dir_path`` exists (without ``overwrite``) or is a file.
    OSError
        The path cannot be written (``PermissionError``, ``NotADirectoryError``, disk full...);
        the message names the path, and nothing was written there.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_model(path, {"w": torch.ones(2)}, {"note": "hi"})
    >>> load_model(path)[1]["note"]
    'hi'
    """
    extra = dict(extra_files or {})
    writers = dict(extra_writers or {})
    for name in [*extra, *writers]:
        if name in (WEIGHTS_FILE, DESCRIPTION_FILE) or Path(name).name != name:
            raise ValueError(f"{name!r} cannot be an extra file name of a model directory.")
    if set(extra) & set(writers):
        raise ValueError(f"{sorted(set(extra) & set(writers))} given twice.")
    target, tmp = _prepare(dir_path, overwrite)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / WEIGHTS_FILE)
        checksums = {}
        for name, content in extra.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, tmp / name)
            checksums[name] = _sha256(tmp / name)
        for name, write in writers.items():
            write(tmp / name)
            checksums[name] = _sha256(tmp / name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scvae_version": _version(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            **({"extra_files": checksums} if checksums else {}),
            **description,
        }
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(meta, indent=1))
        for name in (WEIGHTS_FILE, DESCRIPTION_FILE, *extra, *writers):
            default_file_mode(tmp / name)
            _fsync(tmp / name)
        _install(tmp, target)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(target, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_model(src: str | os.PathLike, dir_path: str | os.PathLike) -> None:
    """Make ``dir_path`` a copy of the complete model directory ``src``, atomically.

    The files are hard-linked where the file system allows (saves never modify a file in
    place, so the two directories cannot affect each other), else copied; an existing
    ``dir_path`` is replaced.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> root = tempfile.mkdtemp()
    >>> save_model(os.path.join(root, "a"), {"w": torch.ones(1)}, {})
    >>> link_model(os.path.join(root, "a"), os.path.join(root, "b"))
    >>> load_model(os.path.join(root, "b"))[0]["w"].tolist()
    [1.0]
    """
    source = Path(src)
    target, tmp = _prepare(dir_path, overwrite=True)
    try:
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith("."):
                try:
                    os.link(path, tmp / path.name)
                except OSError:
                    shutil.copy2(path, tmp / path.name)
                    _fsync(tmp / path.name)
        _install(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(target, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _interrupted_save_hint(root: Path) -> str:
    olds = sorted(root.parent.glob(f".{root.name}.old-*")) if root.parent.is_dir() else []
    if not olds:
        return ""
    return (
        f" A save there was interrupted; the previous model is in {olds[-1]}: rename it to "
        f"{root.name} to use it."
    )


def load_model(dir_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model directory: ``(state_dict, description)``. Never unpickles anything.

    Only ``model.json`` (parsed as JSON) and ``model.safetensors`` (checked against the
    checksum in ``model.json``, then parsed as safetensors) are opened; every other file in the
    directory is ignored.

    Raises
    ------
    ModelFileError
        Naming the problem for a missing, truncated, corrupted, foreign or newer-format
        directory.

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
        what = "is a file, not a model directory" if root.exists() else "does not exist"
        raise ModelFileError(
            f"No model directory at {root}: the path {what}.{_interrupted_save_hint(root)}"
        )
    meta_path = root / DESCRIPTION_FILE
    if not meta_path.is_file():
        raise ModelFileError(
            f"{root} is not a scvae model directory: {DESCRIPTION_FILE} is missing. Pass the "
            "directory written by model.save()."
        )
    if meta_path.stat().st_size > _MAX_JSON_BYTES:
        raise ModelFileError(f"{meta_path} is implausibly large; it is not a scvae description.")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON, huge ints
        raise ModelFileError(
            f"{meta_path} is corrupted or truncated ({err}). Restore the directory from the "
            "original save."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(
            f'{meta_path} is not a scvae model description (no "format": "{FORMAT}"). '
            "Pass a directory written by model.save()."
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{meta_path} has no valid format_version (got {version!r}).")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{root} was saved by a newer scvae ({meta.get('scvae_version')}, model format "
            f"{version}); this scvae ({_version()}) reads formats up to {FORMAT_VERSION}. "
            "Upgrade scvae-torch to load it."
        )
    weights = _read_tensors(root, WEIGHTS_FILE, meta.get("weights_sha256"))
    return weights, meta


def load_extra(dir_path: str | os.PathLike, meta: Mapping[str, Any], name: str) -> dict:
    """Read the extra safetensors file ``name`` of a model directory, checked by its checksum.

    ``meta`` is the description returned by :func:`load_model` for the same directory.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_model(path, {}, {}, extra_files={"state.safetensors": {"s": torch.ones(1)}})
    >>> load_extra(path, load_model(path)[1], "state.safetensors")["s"].tolist()
    [1.0]
    """
    listed = meta.get("extra_files")
    if not isinstance(listed, dict) or name not in listed:
        raise ModelFileError(f"{dir_path} does not list {name} in {DESCRIPTION_FILE}.")
    return _read_tensors(Path(dir_path), name, listed[name])


def checked_extra(dir_path: str | os.PathLike, meta: Mapping[str, Any], name: str) -> Path | None:
    """The path of the extra file ``name`` if ``model.json`` lists it, checked by its checksum.

    None when it is not listed; a listed file that is missing or does not match its checksum
    raises :class:`ModelFileError`. Reading it is the caller's (in a format that runs no code).

    Examples
    --------
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_model(path, {}, {}, extra_writers={"a.txt": lambda p: p.write_text("hi")})
    >>> checked_extra(path, load_model(path)[1], "a.txt").read_text()
    'hi'
    """
    listed = meta.get("extra_files")
    if not isinstance(listed, dict) or name not in listed:
        return None
    root = Path(dir_path)
    _check_file(root, name, listed[name])
    return root / name


def _check_file(root: Path, name: str, checksum: Any) -> None:
    path = root / name
    if not path.is_file():
        raise ModelFileError(
            f"{root} is incomplete: {name} is missing. Restore the directory from the original "
            "save."
        )
    if not isinstance(checksum, str) or _sha256(path) != checksum:
        raise ModelFileError(
            f"{path} does not match the checksum in {DESCRIPTION_FILE}: the file is corrupted, "
            "truncated or was replaced. Restore it from the original save."
        )


def _read_tensors(root: Path, name: str, checksum: Any) -> dict[str, torch.Tensor]:
    _check_file(root, name, checksum)
    path = root / name
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path} cannot be read as safetensors ({err}).") from None
