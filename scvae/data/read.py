"""Reading count files into an AnnData, with one clear error for every file that cannot be read.

``read(path)`` takes the three formats single-cell counts usually come in: an ``.h5ad`` file
(anndata), a 10x Genomics ``.h5`` file and a 10x matrix folder as scanpy reads them
(CellRanger v3: ``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``; v2:
``matrix.mtx``, ``genes.tsv``, ``barcodes.tsv``). A missing path, a file of
another format, a truncated or corrupted file all raise :class:`DataFileError` naming the
path, what was expected and what to do; no other exception escapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad

from scvae import _checks
from scvae._settings import logger

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 allows a user block before the superblock; the signature sits at 0, 512, 1024, ...
_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096)
_FORMATS = (
    "scvae.data.read takes an .h5ad file, a 10x Genomics .h5 file or a 10x matrix folder "
    "(matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)"
)


class DataFileError(ValueError):
    """A data file or folder is missing, of an unknown format, truncated or corrupted."""


# Walks every object header and attribute of an HDF5 file: the parts whose corruption can make
# libhdf5 loop forever or crash. Run in a child process so neither can reach the caller.
_PROBE = """
import sys
import h5py

def visit(name, obj):
    for key in obj.attrs.keys():
        obj.attrs[key]
    if isinstance(obj, h5py.Dataset):
        obj.shape, obj.dtype, obj.chunks, obj.compression

with h5py.File(sys.argv[1], "r") as f:
    visit("/", f)
    f.visititems(visit)
"""


def _probe_hdf5(path: Path, kind: str, timeout: float) -> None:
    """Check the HDF5 structure of ``path`` in a child process, within ``timeout`` seconds."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # the caller's import path (paths added at run time, as notebooks do), so the
            # child finds the h5py this process uses
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
    except subprocess.TimeoutExpired:
        raise DataFileError(
            f"Cannot read {path} as {kind}: walking its HDF5 structure did not finish within "
            f"{timeout:g} s, so the file is corrupted (libhdf5 can loop forever on a damaged "
            "header). Export or download it again; for a huge, valid file pass a larger "
            "timeout=."
        ) from None
    except OSError as err:  # no way to start a process here: read without the check
        logger.debug("HDF5 structure check of %s skipped (%s)", path, err)
        return
    if proc.returncode < 0:
        raise DataFileError(
            f"Cannot read {path} as {kind}: its HDF5 structure crashed the HDF5 library "
            f"(signal {-proc.returncode}), so the file is corrupted. Export or download it again."
        )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1][:300] if lines else f"exit status {proc.returncode}"
        if reason.startswith(("ModuleNotFoundError", "ImportError")):  # the check, not the file
            logger.debug("HDF5 structure check of %s skipped (%s)", path, reason)
            return
        raise DataFileError(
            f"Cannot read {path} as {kind}: {reason}. The file is truncated or corrupted; "
            "export or download it again."
        )


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            for offset in _SIGNATURE_OFFSETS:
                fh.seek(offset)
                if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return True
    except OSError as err:
        raise DataFileError(f"Cannot open {path}: {err.strerror or err}.") from None
    return False


def _reader(path: Path) -> tuple[str, Callable[[Path], ad.AnnData]]:
    """What ``path`` is and the function that reads it; refuses what is none of the formats."""
    import scanpy as sc

    if path.is_dir():
        if any((path / f"matrix.mtx{gz}").is_file() for gz in ("", ".gz")):
            return "a 10x matrix folder", lambda p: sc.read_10x_mtx(p, cache=False)
        raise DataFileError(
            f"{path} is a folder without matrix.mtx or matrix.mtx.gz, so not a 10x matrix "
            f"folder; {_FORMATS}."
        )
    suffix = path.suffix.lower()
    if suffix not in (".h5ad", ".h5"):
        raise DataFileError(
            f"{path} has an unknown format ({suffix or 'no extension'}); {_FORMATS}. For other "
            "formats read the file with scanpy or anndata and pass the AnnData."
        )
    kind = "an h5ad file" if suffix == ".h5ad" else "a 10x .h5 file"
    if not _is_hdf5(path):
        raise DataFileError(
            f"{path} is not {kind}: it does not carry the HDF5 signature ({path.stat().st_size} "
            "bytes). It may be another format renamed, a truncated copy or a saved error page; "
            "export or download it again."
        )
    if suffix == ".h5ad":
        return kind, ad.read_h5ad
    return kind, sc.read_10x_h5


def read(path: str | os.PathLike, *, timeout: float | None = 120.0) -> ad.AnnData:
    """Read single-cell counts from an ``.h5ad`` file, a 10x ``.h5`` file or a 10x folder.

    Parameters
    ----------
    path
        The file or folder.
    timeout
        Seconds allowed for checking the structure of an HDF5 file (``.h5ad``, ``.h5``) in a
        separate process before it is read here: some corruptions make libhdf5 loop forever
        or crash, which must not happen to the caller's process. The check reads metadata
        only (well under a second for most files). None: skip it.

    Returns
    -------
    The AnnData (counts in ``X`` for the 10x formats; as stored for h5ad). Pass it to
    :class:`scvae.SCVAE`, which validates the counts.

    Raises
    ------
    DataFileError
        The path is missing, is not one of the three formats, or is truncated or corrupted;
        the message names the path, what was expected and the fix.

    Examples
    --------
    >>> import os, tempfile, scvae
    >>> path = os.path.join(tempfile.mkdtemp(), "counts.h5ad")
    >>> scvae.data.simulate(20, 5, seed=0).write_h5ad(path)
    >>> scvae.data.read(path).shape
    (20, 5)
    >>> with open(path, "r+b") as fh:
    ...     _ = fh.truncate(3000)
    >>> scvae.data.read(path)
    Traceback (most recent call last):
    ...
    scvae.data.read.DataFileError: Cannot read ...counts.h5ad as an h5ad file: ...
    """
    if timeout is not None and not _checks.positive_number(timeout):
        raise ValueError(
            f"timeout must be a positive number of seconds (the HDF5 check's limit) or None "
            f"(no check), got {timeout!r}."
        )
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"No file or folder at {p}. Check the path; {_FORMATS}.")
    kind, reader = _reader(p)
    if timeout is not None and not p.is_dir():
        _probe_hdf5(p, kind, timeout)
    try:
        adata = reader(p)
    except Exception as err:  # any failure inside h5py/anndata/scanpy
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        reason = reason.rstrip(".")  # the message below adds its own full stop
        if p.is_dir() and isinstance(err, FileNotFoundError):
            advice = (
                "scanpy's 10x folder reader takes CellRanger v3's matrix.mtx.gz, "
                "features.tsv.gz and barcodes.tsv.gz, or v2's uncompressed matrix.mtx, "
                "genes.tsv and barcodes.tsv: gzip or gunzip the files to one of these layouts."
            )
        elif "genome" in reason.lower():
            advice = (
                "The file holds several genomes: read one with scanpy.read_10x_h5(path, "
                "genome=...) and pass that AnnData."
            )
        else:
            advice = (
                "The file is truncated, corrupted or not what its name says; export or "
                "download it again."
            )
        raise DataFileError(
            f"Cannot read {p} as {kind}: {type(err).__name__}"
            f"{': ' + reason if reason else ''}. {advice}"
        ) from err
    if not isinstance(adata, ad.AnnData):
        raise DataFileError(f"Reading {p} as {kind} gave a {type(adata).__name__}, not AnnData.")
    return adata
