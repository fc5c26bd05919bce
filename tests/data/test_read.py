"""scvae.data.read: the three count formats, one clear error for every bad file, and a fuzz run
over the h5ad path in which every failure of reading and registering is a clean error."""

from __future__ import annotations

import gzip
import importlib
import warnings
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import scvae
from scvae.data import DataFileError, RegistryError


@pytest.fixture(scope="module")
def small():
    adata = scvae.data.simulate(30, 8, n_batches=2, seed=0)
    adata.layers["counts"] = adata.X.copy()
    return adata


def write_10x_mtx(folder: Path, x: sp.csr_matrix, genes: list[str]) -> None:
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(x.T).astype(np.int64))
    rows = "".join(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(genes))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write(rows)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"CELL{i}-1\n" for i in range(x.shape[0])))


def write_10x_h5(path: Path, x: sp.csr_matrix, genes: list[str]) -> None:
    csc = sp.csc_matrix(x.T).astype(np.int32)  # 10x stores genes x cells, CSC by cell
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        m["barcodes"] = np.array([f"CELL{i}-1".encode() for i in range(x.shape[0])])
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i}".encode() for i in range(len(genes))])
        feats["name"] = np.array([g.encode() for g in genes])
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"GRCh38"] * len(genes))
        feats["_all_tag_keys"] = np.array([b"genome"])


def test_reads_the_three_formats(small, tmp_path):
    genes = list(small.var_names)
    small.write_h5ad(tmp_path / "a.h5ad")
    write_10x_mtx(tmp_path / "filtered_feature_bc_matrix", small.X, genes)
    write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", small.X, genes)
    for path in ("a.h5ad", "filtered_feature_bc_matrix", "filtered_feature_bc_matrix.h5"):
        adata = scvae.data.read(tmp_path / path)
        assert adata.shape == small.shape, path
        np.testing.assert_array_equal(sp.csr_matrix(adata.X).toarray(), small.X.toarray())
        assert list(adata.var_names) == genes
        scvae.SCVAE(adata)  # registers


def test_valid_inputs_scanpy_cannot_read_are_not_called_corrupted(small, tmp_path):
    folder = tmp_path / "plain_v3"
    write_10x_mtx(folder, small.X, list(small.var_names))
    for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):  # uncompressed v3 files
        with gzip.open(folder / f"{name}.gz", "rb") as src:
            (folder / name).write_bytes(src.read())
        (folder / f"{name}.gz").unlink()
    with pytest.raises(DataFileError, match="gzip or gunzip the files") as err:
        scvae.data.read(folder)
    assert "corrupted" not in str(err.value)


def test_the_structure_check_runs_with_the_callers_import_path(small, tmp_path, monkeypatch):
    # a child that cannot import h5py is the check's problem, not the file's
    small.write_h5ad(tmp_path / "a.h5ad")
    read_module = importlib.import_module("scvae.data.read")  # the module, not the function
    monkeypatch.setattr(read_module, "_PROBE", "import not_a_module_here")
    assert scvae.data.read(tmp_path / "a.h5ad").shape == small.shape


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "nowhere.h5ad", r"No file or folder at .*nowhere\.h5ad"),
        (lambda p: _write(p / "x.h5ad", b"cell,gene\n1,2\n"), r"x\.h5ad is not an h5ad file"),
        (lambda p: _write(p / "empty.h5ad", b""), r"empty\.h5ad is not an h5ad file.*0 bytes"),
        (lambda p: _write(p / "x.csv", b"a,b\n"), r"unknown format \(\.csv\).*\.h5ad"),
        (lambda p: _write(p / "x", b"a"), r"unknown format \(no extension\)"),
        (lambda p: _mkdir(p / "folder"), r"folder without matrix\.mtx.*10x matrix folder"),
        (lambda p: _write(p / "f.h5", b"<html>404</html>"), r"f\.h5 is not a 10x \.h5 file"),
    ],
    ids=["missing", "text-as-h5ad", "empty-file", "csv", "no-extension", "empty-folder", "html"],
)
def test_bad_paths_name_the_problem(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataFileError, match=match):
        scvae.data.read(path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_h5ad_renamed_to_h5_and_truncated_files(small, tmp_path):
    small.write_h5ad(tmp_path / "a.h5ad")
    data = (tmp_path / "a.h5ad").read_bytes()
    (tmp_path / "renamed.h5").write_bytes(data)
    with pytest.raises(DataFileError, match=r"Cannot read .*renamed\.h5 as a 10x \.h5 file"):
        scvae.data.read(tmp_path / "renamed.h5")
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"Cannot read .*cut\.h5ad as an h5ad file.*truncated"):
        scvae.data.read(tmp_path / "cut.h5ad")
    write_10x_mtx(tmp_path / "mtx", small.X, list(small.var_names))
    (tmp_path / "mtx" / "features.tsv.gz").unlink()
    with pytest.raises(DataFileError, match=r"Cannot read .*mtx as a 10x matrix folder"):
        scvae.data.read(tmp_path / "mtx")


def test_path_instead_of_anndata_points_to_read(tmp_path):
    with pytest.raises(TypeError, match=r"got str\. Read the file first: .*scvae\.data\.read"):
        scvae.SCVAE(str(tmp_path / "counts.h5ad"))


@pytest.mark.parametrize(
    ("probe", "match"),
    [
        ("import time; time.sleep(60)", r"did not finish within 1 s.*corrupted"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"crashed the HDF5 library"),
    ],
    ids=["hang", "crash"],
)
def test_hdf5_hang_or_crash_stays_in_the_child(small, tmp_path, monkeypatch, probe, match):
    """libhdf5 loops forever (or crashes) on some corrupted headers (the fuzz run below finds
    such files): the structure is checked in a child process, stopped after ``timeout``."""
    read_module = importlib.import_module("scvae.data.read")  # the module, not the function
    small.write_h5ad(tmp_path / "a.h5ad")
    monkeypatch.setattr(read_module, "_PROBE", probe)
    with pytest.raises(DataFileError, match=match):
        scvae.data.read(tmp_path / "a.h5ad", timeout=1)
    assert scvae.data.read(tmp_path / "a.h5ad", timeout=None).shape == small.shape


# ------------------------------------------------------------------------------------- fuzz
CLEAN_ERRORS = (DataFileError, RegistryError)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption: flipped bytes, a truncation, a zeroed or a duplicated block."""
    out = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for pos in rng.integers(0, len(out), size=rng.integers(1, 9)):
            out[pos] = int(rng.integers(256))
    elif kind == 1:
        del out[int(rng.integers(0, len(out))) :]
    elif kind == 2:
        start, size = int(rng.integers(0, len(out))), int(rng.integers(16, 512))
        out[start : start + size] = bytes(len(out[start : start + size]))
    else:
        size = int(rng.integers(8, 256))
        src, dst = rng.integers(0, len(out) - size, size=2)
        out[dst : dst + size] = out[src : src + size]
    return bytes(out)


def fuzz(tmp_path: Path, small, n_cases: int, seed: int) -> Counter:
    source = tmp_path / "source.h5ad"
    small.write_h5ad(source)
    data = source.read_bytes()
    rng = np.random.default_rng(seed)
    outcomes: Counter = Counter()
    case = tmp_path / "case.h5ad"
    for i in range(n_cases):
        case.write_bytes(mutate(data, rng))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adata = scvae.data.read(case, timeout=3)
                scvae.SCVAE(adata, layer="counts", batch_key="batch", n_hidden=8, n_latent=2)
            outcomes["accepted"] += 1
        except CLEAN_ERRORS as err:
            assert str(case) in str(err) or isinstance(err, RegistryError)
            outcomes[type(err).__name__] += 1
        except Exception as err:  # noqa: BLE001 - the failure this test looks for
            pytest.fail(f"fuzz case {i} (seed {seed}) escaped as {type(err).__name__}: {err}")
    return outcomes


def test_fuzz_h5ad_short(small, tmp_path):
    outcomes = fuzz(tmp_path, small, n_cases=40, seed=0)  # case 25 hangs libhdf5
    # the corruptions reach the file layer, and some files survive to registration
    assert outcomes["DataFileError"] > 10 and outcomes["accepted"] > 5, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_h5ad_long(small, tmp_path, seed):
    outcomes = fuzz(tmp_path, small, n_cases=300, seed=seed)
    assert outcomes["DataFileError"] > 50 and outcomes["RegistryError"] > 0, outcomes
