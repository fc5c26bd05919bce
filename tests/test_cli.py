"""The `scvae` command: fit, de and demo end to end on real files (few epochs), and every bad
input as one line on stderr with exit code 2, leaving no output behind."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.io
import scipy.sparse as sp
from conftest import shared_file
from sklearn.metrics import adjusted_rand_score

import scvae
from scvae.cli import CLIError, _write_atomically, main


def test_demo_writes_readable_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-epochs", "5"]) == 0
    printed = capsys.readouterr().out
    assert "NMI" in printed and "kNN label accuracy" in printed
    adata = ad.read_h5ad(out / "pbmc68k_scvae.h5ad")
    assert adata.obsm["X_scvae"].shape == (700, 10)
    assert "X_umap" in adata.obsm and "leiden" in adata.obs
    for name in ("umap_leiden.png", "umap_cell_type.png", "history.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 300
        assert image.std() > 0.05  # not a blank canvas
    assert (out / "model" / "model.safetensors").exists()


def test_demo_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scvae demo: error: cannot write to --out") and "\n" not in err
    # a model folder holding other files is refused before training, and nothing is written
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "is not a saved model" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    assert main(["demo", "--out", str(tmp_path / "new"), "--seed", str(2**32)]) == 2
    assert "--seed must be between 0 and 2**32 - 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------ files
def write_10x_mtx(folder: Path, adata: ad.AnnData) -> None:
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(adata.X.T).astype(np.int64))
    rows = "".join(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(adata.var_names))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write(rows)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"{c}-1\n" for c in adata.obs_names))


def write_10x_h5(path: Path, adata: ad.AnnData) -> None:
    csc = sp.csc_matrix(adata.X.T).astype(np.int32)  # genes x cells, one column per cell
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        m["barcodes"] = np.array([f"{c}-1".encode() for c in adata.obs_names])
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i}".encode() for i in range(adata.n_vars)])
        feats["name"] = np.array([g.encode() for g in adata.var_names])
        feats["feature_type"] = np.array([b"Gene Expression"] * adata.n_vars)
        feats["genome"] = np.array([b"GRCh38"] * adata.n_vars)
        feats["_all_tag_keys"] = np.array([b"genome"])


@pytest.fixture(scope="module")
def counts():
    adata = scvae.data.simulate(160, 30, n_cell_types=3, n_batches=2, seed=0)
    adata.layers["counts"] = adata.X.copy()
    return adata


@pytest.fixture(scope="module")
def files(counts, tmp_path_factory):
    """The same counts as h5ad, 10x .h5 and 10x folder, a log-normalised h5ad and a model."""
    root = tmp_path_factory.mktemp("cli_inputs")
    counts.write_h5ad(root / "counts.h5ad")
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts)
    write_10x_mtx(root / "filtered_feature_bc_matrix", counts)
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    lognorm.write_h5ad(root / "lognorm.h5ad")
    other = scvae.data.simulate(50, 12, seed=3)
    other.write_h5ad(root / "other_genes.h5ad")
    (root / "text.h5ad").write_text("cell,gene\nc1,1\n")
    (root / "a_file").write_text("")
    model = scvae.SCVAE(counts.copy(), batch_key="batch")
    model.train(max_epochs=1)
    model.save(root / "model")
    (root / "empty_model").mkdir()
    (root / "folder.h5ad").mkdir()
    return root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------------- scvae fit
def test_fit_then_de_end_to_end(files, tmp_path, capsys):
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    argv = [
        "fit",
        files / "counts.h5ad",
        "-o",
        out,
        "--batch-key",
        "batch",
        "--layer",
        "counts",
        "--max-epochs",
        "3",
        "--n-latent",
        "4",
        "--model-dir",
        model_dir,
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "trained 3 epochs" in stdout and f"wrote {out}" in stdout
    result = sc.read_h5ad(out)
    assert result.obsm["X_scvae"].shape == (160, 4) and result.obsm["X_umap"].shape == (160, 2)
    assert result.obs["leiden"].nunique() >= 2 and "connectivities" in result.obsp
    record = result.uns["scvae"]
    assert record["n_epochs"] == 3 and record["model"]["layer"] == "counts"
    assert record["model"]["batch_key"] == "batch" and record["train"]["seed"] == 0
    assert "counts" in result.layers and "cell_type" in result.obs  # the input is kept
    # the saved model is the one that made the latent
    model = scvae.SCVAE.load(model_dir, result)
    np.testing.assert_allclose(
        model.get_latent_representation(), result.obsm["X_scvae"], rtol=1e-5, atol=1e-6
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    table_path = tmp_path / "de.csv"
    argv = [
        "de",
        model_dir,
        out,
        "--groupby",
        "cell_type",
        "-o",
        table_path,
        "--n-samples-overall",
        "100",
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    table = pd.read_csv(table_path, index_col="gene")
    assert set(table["comparison"]) == {"type0 vs Rest", "type1 vs Rest", "type2 vs Rest"}
    assert len(table) == 3 * 30 and {"proba_m1", "bayes_factor", "scale1"} <= set(table)
    argv = [
        "de",
        model_dir,
        out,
        "--groupby",
        "leiden",
        "-o",
        table_path,
        "--mode",
        "change",
        "--fdr-target",
        "0.1",
        "--n-samples-overall",
        "100",
        "--overwrite",
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    table = pd.read_csv(table_path, index_col="gene")
    assert {"proba_de", "lfc_mean", "is_de_fdr_0.1"} <= set(table)
    assert table["comparison"].nunique() == result.obs["leiden"].nunique()


@pytest.mark.parametrize("name", ["filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix"])
def test_fit_reads_10x_files(files, counts, tmp_path, capsys, name):
    out = tmp_path / "out.h5ad"
    code, stdout, err = run(["fit", files / name, "-o", out, "--max-epochs", "2"], capsys)
    assert code == 0, err
    assert "read" in stdout and "160 cells x 30 genes" in stdout
    result = sc.read_h5ad(out)
    assert list(result.var_names) == list(counts.var_names)
    assert result.obsm["X_scvae"].shape == (160, 10) and "leiden" in result.obs


def test_fit_shows_a_progress_bar_on_stderr(files, tmp_path, capsys):
    scvae.settings.progress_bar = True
    out = tmp_path / "out.h5ad"
    code, stdout, err = run(["fit", files / "counts.h5ad", "-o", out, "--max-epochs", "2"], capsys)
    assert code == 0 and "2/2" in err and "2/2" not in stdout
    assert "elbo_train=" in err and "elbo_validation=" in err  # both values on the bar
    code, _, err = run(
        [
            "fit",
            files / "counts.h5ad",
            "-o",
            out,
            "--max-epochs",
            "2",
            "--overwrite",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and "2/2" not in err


FIT_ERRORS = {
    "missing input": (["fit", "{d}/nowhere.h5ad", "-o", "{t}/out.h5ad"], r"No file or folder at"),
    "not h5ad": (["fit", "{d}/text.h5ad", "-o", "{t}/out.h5ad"], r"is not an h5ad file"),
    "unknown format": (["fit", "{d}/a_file", "-o", "{t}/out.h5ad"], r"unknown format"),
    "batch key": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--batch-key", "sample"],
        r"--batch-key sample is not a column of adata.obs \(columns: 'cell_type'",
    ),
    "labels key": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--labels-key", "x"],
        r"--labels-key x is not a column",
    ),
    "layer": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--layer", "raw"],
        r"Layer 'raw' is not in adata.layers \(layers present: 'counts'\)",
    ),
    "not counts": (
        ["fit", "{d}/lognorm.h5ad", "-o", "{t}/out.h5ad"],
        r"non-integer values .* expects raw integer counts. It looks log-normalised .* Pass the "
        r"raw counts: --layer counts if that layer holds them",
    ),
    "output folder missing": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/no/out.h5ad"],
        r"cannot write -o .*out.h5ad: the folder .*no does not exist",
    ),
    "output under a file": (
        ["fit", "{d}/counts.h5ad", "-o", "{d}/a_file/out.h5ad"],
        r"cannot write -o .*a_file/out.h5ad: the folder .*a_file does not exist",
    ),
    "output is a folder": (
        ["fit", "{d}/counts.h5ad", "-o", "{d}/folder.h5ad"],
        r"-o .*folder.h5ad is a folder",
    ),
    "output suffix": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.csv"],
        r"-o .*out.csv must end in .h5ad",
    ),
    "output exists": (
        ["fit", "{d}/counts.h5ad", "-o", "{d}/counts.h5ad"],
        r"counts.h5ad exists; pass --overwrite",
    ),
    "model dir is a file": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--model-dir", "{d}/a_file"],
        r"--model-dir .*a_file is a file",
    ),
    "model dir exists": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--model-dir", "{d}/model"],
        r"--model-dir .*model exists and is not empty; pass --overwrite",
    ),
    "model dir holds other files": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--model-dir", "{d}", "--overwrite"],
        r"--model-dir .* holds files that are not part of a saved model",
    ),
    "max epochs": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--max-epochs", "0"],
        r"--max-epochs must be at least 1",
    ),
    "n latent": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--n-latent", "0"],
        r"--n-latent must be a whole number >= 1, got 0",
    ),
    "device": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--device", "tpu9"],
        r"--device tpu9 is not a torch device",
    ),
    "not counts, plots asked": (  # the plots folder is made only once there are plots
        ["fit", "{d}/lognorm.h5ad", "-o", "{t}/out.h5ad", "--plots", "{t}/plots"],
        r"It looks log-normalised",
    ),
    "model dir is the output": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--model-dir", "{t}/out.h5ad"],
        r"--model-dir .*out.h5ad is the -o file",
    ),
    "seed too large": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--seed", "4294967296"],
        r"--seed must be between 0 and 2\*\*32 - 1, got 4294967296",
    ),
    "unwritable plots dir": (
        ["fit", "{d}/counts.h5ad", "-o", "{t}/out.h5ad", "--plots", "{d}/a_file/plots"],
        r"cannot write plots to .*a_file/plots",
    ),
}


def check_one_line_error(code: int, err: str, command: str, match: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"scvae {command}: error: "), lines[0]
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(FIT_ERRORS), ids=list(FIT_ERRORS))
def test_fit_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, case):
    argv, match = FIT_ERRORS[case]
    before = sorted(p.name for p in files.iterdir())
    argv = [a.format(d=files, t=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    check_one_line_error(code, err, "fit", match)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    assert sorted(p.name for p in files.iterdir()) == before


def test_fit_takes_fractional_counts_only_when_allowed(counts, tmp_path, capsys):
    fractional = counts.copy()
    fractional.X = fractional.X * 1.5
    fractional.write_h5ad(tmp_path / "fractional.h5ad")
    argv = ["fit", tmp_path / "fractional.h5ad", "-o", tmp_path / "out.h5ad", "--max-epochs", "1"]
    code, _, err = run(argv, capsys)
    check_one_line_error(code, err, "fit", r"counts\), pass --allow-non-integer; if not")
    code, _, err = run([*argv, "--allow-non-integer"], capsys)
    assert code == 0, err
    assert (tmp_path / "out.h5ad").exists()


def test_fit_into_an_empty_model_folder_writes_readable_files(files, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out.h5ad"
    old = os.umask(0o022)
    try:
        argv = ["fit", files / "counts.h5ad", "-o", out, "--max-epochs", "1"]
        code, _, err = run([*argv, "--model-dir", tmp_path / "model"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.json",
        "model.safetensors",
    ]
    assert out.stat().st_mode & 0o777 == 0o644  # not the 0600 of a temporary file


def test_fit_in_two_processes(files, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    argv = ["fit", files / "counts.h5ad", "-o", out, "--max-epochs", "1", "--no-progress"]
    code, _, err = run([*argv, "--n-processes", "2"], capsys)
    assert code == 0, err
    assert ad.read_h5ad(out).uns["scvae"]["train"]["n_processes"] == 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fit_under_torchrun_rank_0_writes(files, tmp_path):
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [
        f"--master_port={free_port()}",
        "-m",
        "scvae.cli",
        "fit",
        str(files / "counts.h5ad"),
        "-o",
        str(out),
    ]
    cmd += ["--max-epochs", "1", "--no-progress", "--model-dir", str(model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 2  # the model and the h5ad, once: rank 0 alone
    assert ad.read_h5ad(out).uns["scvae"]["train"]["n_processes"] == 2
    assert scvae.SCVAE.load(model_dir).is_trained


def test_a_failed_run_keeps_the_previous_output(files, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"previous result")
    argv = ["fit", files / "counts.h5ad", "-o", out, "--overwrite", "--batch-key", "nope"]
    code, _, err = run(argv, capsys)
    check_one_line_error(code, err, "fit", "--batch-key nope is not a column")
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


def test_write_atomically_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")

    # named by the flag and the file, not the hidden temporary file that failed
    with pytest.raises(CLIError, match=r"cannot write -o .*table\.csv: No space left on device"):
        _write_atomically(target, half_then_fail, flag="-o")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    _write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_fit_whose_h5ad_cannot_be_written_saves_no_model(files, tmp_path, capsys, monkeypatch):
    # the disk fills while the h5ad is written: the model was saved first and stayed behind,
    # and a rerun was then refused for the model folder it left
    def disk_full(self, filename, **kwargs):
        Path(filename).write_bytes(b"half an h5ad")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", disk_full)
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    argv = ["fit", files / "counts.h5ad", "-o", out, "--model-dir", model_dir]
    code, _, err = run([*argv, "--max-epochs", "1", "--no-progress"], capsys)
    check_one_line_error(code, err, "fit", r"cannot write -o .*out\.h5ad: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_fit_stopped_by_sigterm_exits_143_leaving_nothing(files, tmp_path):
    # a scheduler's timeout: Python's default action ended the process on the spot, leaving
    # the temporary files of a write in progress
    cmd = [sys.executable, "-m", "scvae", "fit", str(files / "counts.h5ad")]
    cmd += ["-o", str(tmp_path / "out.h5ad"), "--max-epochs", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in proc.stderr:  # the progress bar: training has started
        if "Training" in line:
            break
    proc.terminate()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    assert "scvae fit: error: terminated by SIGTERM" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_checks_its_output_names_before_training(tmp_path, capsys):
    (tmp_path / "history.png").mkdir()  # failed after training, with a raw [Errno 21]
    code, out, err = run(["demo", "--out", tmp_path], capsys)
    check_one_line_error(code, err, "demo", r"holds folders named history\.png")
    assert "trained" not in out


# --------------------------------------------------------------------- scvae de
DE_ERRORS = {
    "delta": (
        ["de", "{d}/model", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"]
        + ["--delta", "-1"],
        r"--delta must be a positive log2 fold change, got -1",
    ),
    "missing model dir": (
        ["de", "{t}/nomodel", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"],
        r"no model directory at .*nomodel: the path does not exist",
    ),
    "not a model dir": (
        ["de", "{d}/empty_model", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"],
        r"empty_model is not a scvae model directory: model.json is missing",
    ),
    "missing input": (
        ["de", "{d}/model", "{t}/nowhere.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"],
        r"No file or folder at",
    ),
    "unknown groupby": (
        ["de", "{d}/model", "{d}/counts.h5ad", "--groupby", "leiden", "-o", "{t}/de.csv"],
        r"--groupby 'leiden' is not a column of obs \(columns: 'cell_type', 'batch'",
    ),
    "other genes": (
        ["de", "{d}/model", "{d}/other_genes.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"],
        r"gene",
    ),
    "fdr target": (
        ["de", "{d}/model", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"]
        + ["--mode", "change", "--fdr-target", "2"],
        r"error: --fdr-target must lie in \(0, 1\), got 2.0",
    ),
    "samples": (
        ["de", "{d}/model", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{t}/de.csv"]
        + ["--n-samples-overall", "0"],
        r"error: --n-samples-overall must be a positive integer, got 0",
    ),
    "unwritable output": (
        ["de", "{d}/model", "{d}/counts.h5ad", "--groupby", "cell_type", "-o", "{d}/a_file/de.csv"],
        r"cannot write -o .*de.csv: the folder .*a_file does not exist",
    ),
}


@pytest.mark.parametrize("case", list(DE_ERRORS), ids=list(DE_ERRORS))
def test_de_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, case):
    argv, match = DE_ERRORS[case]
    argv = [a.format(d=files, t=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    check_one_line_error(code, err, "de", match)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("sub", "flags"),
    [
        ("fit", ["--batch-key", "--layer", "--max-epochs", "--n-latent", "--model-dir"]),
        ("de", ["--groupby", "--mode", "--fdr-target", "-o OUT.csv"]),
        ("demo", ["--out", "--max-epochs"]),
    ],
)
def test_help_of_each_command(capsys, sub, flags):
    with pytest.raises(SystemExit) as exit_info:
        main([sub, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: scvae {sub}") and all(f in text for f in flags)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "counts.h5ad"])  # no -o
    assert exit_info.value.code == 2
    assert "the following arguments are required: -o/--output" in capsys.readouterr().err


# ------------------------------------------------------------ a real process
def test_a_real_process_reports_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scvae.cli",
            "fit",
            str(tmp_path / "nowhere.h5ad"),
            "-o",
            str(tmp_path / "o.h5ad"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("scvae fit: error: No file or folder at")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_fit_on_pbmc3k_gives_a_latent_scanpy_opens(tmp_path, capsys):
    data = shared_file("pbmc3k_seurat.h5ad")
    out, plots = tmp_path / "pbmc3k.h5ad", tmp_path / "plots"
    argv = ["fit", data, "-o", out, "--max-epochs", "10", "--labels-key", "cell_type"]
    code, stdout, err = run(argv + ["--plots", plots], capsys)
    assert code == 0, err
    for name in ("umap_leiden.png", "umap_cell_type.png", "history.png"):
        image = mpimg.imread(plots / name)
        assert image.shape[0] > 300 and image.shape[1] > 300
        assert image.std() > 0.05  # not a blank canvas
    result = sc.read_h5ad(out)
    assert result.obsm["X_scvae"].shape == (2638, 10) and result.obsm["X_umap"].shape[1] == 2
    assert result.obs["leiden"].nunique() >= 5
    assert adjusted_rand_score(result.obs["cell_type"], result.obs["leiden"]) > 0.3


# ------------------------------------------------------------------ --plots
def test_fit_plots_draw_the_history_with_scvae_pl(files, tmp_path, capsys, monkeypatch):
    calls = []
    history = scvae.pl.history

    def recording(model, **kwargs):
        calls.append(kwargs)
        return history(model, **kwargs)

    monkeypatch.setattr(scvae.pl, "history", recording)
    plots = tmp_path / "plots"
    argv = ["fit", files / "counts.h5ad", "-o", tmp_path / "out.h5ad", "--max-epochs", "1"]
    code, stdout, err = run([*argv, "--plots", plots, "--labels-key", "cell_type"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in plots.iterdir()) == [
        "history.png",
        "umap_cell_type.png",
        "umap_leiden.png",
    ]
    assert len(calls) == 1 and calls[0]["show"] is False and calls[0]["save"] is False
    image = mpimg.imread(plots / "history.png")
    assert image.std() > 0.05  # one epoch still draws its points


def test_fit_refuses_existing_plots_without_overwrite(files, tmp_path, capsys):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "history.png").write_bytes(b"an earlier run")
    (plots / "mine.txt").write_text("kept")
    argv = ["fit", files / "counts.h5ad", "-o", tmp_path / "out.h5ad", "--max-epochs", "1"]
    code, _, err = run([*argv, "--plots", plots], capsys)
    check_one_line_error(
        code, err, "fit", r"--plots .*plots already holds history.png; pass --overwrite"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # nothing trained or written
    assert (plots / "history.png").read_bytes() == b"an earlier run"
    (plots / "umap_cell_type.png").mkdir()
    code, _, err = run(
        [*argv, "--plots", plots, "--labels-key", "cell_type", "--overwrite"], capsys
    )
    check_one_line_error(code, err, "fit", r"holds folders named umap_cell_type.png")
    (plots / "umap_cell_type.png").rmdir()
    code, _, err = run([*argv, "--plots", plots, "--overwrite"], capsys)
    assert code == 0, err
    assert (plots / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (plots / "mine.txt").read_text() == "kept"


def test_messages_name_flags_not_python_options():
    from scvae.cli import _as_flags, build_parser

    flags = build_parser().parse_args(["fit", "in.h5ad", "-o", "o.h5ad"]).flags
    assert flags["layer"] == ("--layer", False) and flags["allow_non_integer"][1] is True
    cases = {
        "Layer 'raw' is not in adata.layers. Pass layer= naming it, or layer=None for adata.X.": (
            "Layer 'raw' is not in adata.layers. Pass --layer naming it, or no --layer for adata.X."
        ),
        "registered with layer='my counts' (allow_non_integer=False)": (
            "registered with --layer 'my counts' (no --allow-non-integer)"
        ),
        "n_processes=4 on CUDA; seed must be >= 0; the seed of adata.obs['batch_key']": (
            "--n-processes 4 on CUDA; --seed must be >= 0; the seed of adata.obs['batch_key']"
        ),
        "model.registry.batch_key is 'b'; batch_size=2 is not a flag": (
            "model.registry.batch_key is 'b'; batch_size=2 is not a flag"
        ),
    }
    for message, expected in cases.items():
        assert _as_flags(message, "fit", flags) == expected
    # words of paths are not options: a sweep's folders, or a folder named like one
    path = "runs/max_epochs=50/in.h5ad"
    assert _as_flags(f"{path} is not an h5ad file", "fit", flags, [path]).startswith(path)
    assert _as_flags("/data/model_dir/x and ./batch_key.h5ad", "fit", flags) == (
        "/data/model_dir/x and ./batch_key.h5ad"
    )


def test_a_path_like_an_option_reaches_the_message_unchanged(tmp_path, capsys):
    folder = tmp_path / "seed=1"
    folder.mkdir()
    (folder / "junk.h5ad").write_text("not hdf5")
    assert main(["fit", str(folder / "junk.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert f"{folder / 'junk.h5ad'} is not an h5ad file" in capsys.readouterr().err


def test_python_dash_m_scvae_is_the_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_m = [sys.executable, "-m", "scvae"]
    shown = subprocess.run(
        [*run_m, "fit", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert shown.returncode == 0 and shown.stdout.startswith("usage: scvae fit")
    argv = ["fit", str(tmp_path / "nowhere.h5ad"), "-o", str(tmp_path / "o.h5ad")]
    proc = subprocess.run([*run_m, *argv], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("scvae fit: error: No file or folder at")
    assert proc.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_repeated_gene_names_are_one_line_without_anndata_s_warning(counts, tmp_path, capsys):
    dup = counts.copy()
    dup.var_names = ["g0", "g0", *dup.var_names[2:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns while the file is written
        dup.write_h5ad(tmp_path / "dup.h5ad")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run(["fit", tmp_path / "dup.h5ad", "-o", tmp_path / "o.h5ad"], capsys)
    check_one_line_error(code, err, "fit", r"g0")
    assert not [w for w in seen if "not unique" in str(w.message)]


def test_warnings_are_one_line_naming_the_command(counts, tmp_path, capsys):
    # a warning showed Python's "<frozen runpy>:88: UserWarning:" and the message on two lines
    few = counts.copy()
    few.obs["label"] = ["a"] * (few.n_obs - 1) + ["b"]  # a category of one cell: warned
    few.write_h5ad(tmp_path / "few.h5ad")
    argv = ["fit", tmp_path / "few.h5ad", "-o", tmp_path / "o.h5ad", "--max-epochs", "1"]
    code, _, err = run([*argv, "--labels-key", "label", "--no-progress"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "fewer than" in line]
    assert len(lines) == 1 and lines[0].startswith("scvae fit: warning: adata.obs['label']")
    assert "UserWarning" not in err and ".py:" not in err
