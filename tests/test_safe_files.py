"""Model files cannot run code, and a save killed at any moment leaves the previous model."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import anndata
import numpy as np
import pytest
import torch

import scvae
from scvae.io import ModelFileError, load_model, save_model


class Payload:
    """Unpickling this touches ``marker``: the proof that a file was unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def pickle_bytes(marker: pathlib.Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_save_bytes(marker: pathlib.Path, tmp: pathlib.Path) -> bytes:
    path = tmp / "payload.pt"
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def saved(tmp_path):
    adata = scvae.data.simulate(40, 12, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    path = tmp_path / "model"
    model.save(path)
    return model, adata, path


def test_payloads_are_live(tmp_path):
    """The guard: these payloads do run when unpickled, so the tests below can fail."""
    marker = tmp_path / "ran"
    pickle.loads(pickle_bytes(marker))
    assert marker.exists()
    marker.unlink()
    payload = tmp_path / "p.pt"
    payload.write_bytes(torch_save_bytes(marker, tmp_path))
    torch.load(payload, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("fix_checksum", [False, True], ids=["stale-checksum", "new-checksum"])
def test_pickle_as_weights_is_refused_without_running(saved, tmp_path, kind, fix_checksum):
    _, adata, path = saved
    marker = tmp_path / "ran"
    data = pickle_bytes(marker) if kind == "pickle" else torch_save_bytes(marker, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(data)
    if fix_checksum:  # an attacker who also edits model.json gets past the checksum...
        meta = json.loads((path / "model.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
        (path / "model.json").write_text(json.dumps(meta))
    # ...and is stopped by the safetensors parser, which never unpickles
    match = "cannot be read as safetensors" if fix_checksum else "checksum"
    with pytest.raises(ModelFileError, match=match):
        scvae.SCVAE.load(path, adata)
    assert not marker.exists()


def test_pickles_beside_the_weights_are_ignored(saved, tmp_path):
    model, adata, path = saved
    marker = tmp_path / "ran"
    for name in ("model.pt", "model.pkl", "optimizer.pt", "train_state.safetensors"):
        (path / name).write_bytes(pickle_bytes(marker))
    (path / "model.ckpt").write_bytes(torch_save_bytes(marker, tmp_path))
    loaded = scvae.SCVAE.load(path, adata)
    assert not marker.exists()
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_pickle_in_checkpoint_state_is_refused_without_running(tmp_path):
    adata = scvae.data.simulate(60, 12, seed=0)
    scvae.SCVAE(adata, n_hidden=16).train(max_epochs=2, checkpoint_dir=tmp_path / "ck")
    marker = tmp_path / "ran"
    (tmp_path / "ck" / "latest" / "train_state.safetensors").write_bytes(pickle_bytes(marker))
    with pytest.raises(scvae.checkpoint.CheckpointError, match="checksum"):
        scvae.SCVAE(adata, n_hidden=16).train(max_epochs=3, checkpoint_dir=tmp_path / "ck")
    assert not marker.exists()


SAVER = """
import sys
import torch
from scvae.io import save_model
target, n = sys.argv[1], int(sys.argv[2])
version = 0
while True:
    version += 1
    save_model(target, {{"w": torch.full((n,), float(version))}}, {{"version": version}},
               overwrite=True)
    print(version, flush=True)
"""


def kill_mid_save(tmp_path: pathlib.Path, delay: float, n: int = 2**23) -> None:
    """A child saves ever-new versions over ``target`` (32 MiB each); SIGKILL it ``delay``
    seconds after a save finished, i.e. inside the next one. Then the directory must be one
    complete version, the last finished or the one after."""
    target = tmp_path / "model"
    save_model(target, {"w": torch.zeros(n)}, {"version": 0})
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(SAVER.format()))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(target), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "1", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read().split()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = int(rest[-1]) if rest else 1
    weights, meta = load_model(target)  # checks the checksum of the weights
    assert meta["version"] in (last, last + 1)
    w = weights["w"]
    assert w.shape == (n,) and bool((w == meta["version"]).all())
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.safetensors"]
    # leftovers of the killed save, if any, are hidden temporary siblings that load ignores
    for p in tmp_path.iterdir():
        assert p.name in ("model", "saver.py") or p.name.startswith(".model.tmp-"), p.name


def test_save_killed_midway_leaves_a_complete_model(tmp_path):
    kill_mid_save(tmp_path, delay=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.07, 0.12, 0.2, 0.35, 0.6])
def test_save_killed_at_many_moments_leaves_a_complete_model(tmp_path, delay):
    kill_mid_save(tmp_path, delay=delay)


def test_failed_save_leaves_previous_model_and_no_temporary(saved, tmp_path, monkeypatch):
    model, adata, path = saved
    before = (path / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scvae.io, "save_file", disk_full)
    model.module.z_encoder.mean_encoder.weight.data += 1.0  # a new model...
    with pytest.raises(OSError, match=r"Cannot write the model to .*model.*free space"):
        model.save(path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == before  # ...the old one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    scvae.SCVAE.load(path, adata)


def test_overwrite_through_a_symlink_writes_where_it_points(saved, tmp_path):
    model, adata, path = saved
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    model.module.z_encoder.mean_encoder.weight.data += 1.0
    model.save(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == path.resolve()
    loaded = scvae.SCVAE.load(path, adata)
    assert torch.equal(
        loaded.module.z_encoder.mean_encoder.weight, model.module.z_encoder.mean_encoder.weight
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_failed_swap_without_exchange_puts_the_previous_model_back(saved, tmp_path, monkeypatch):
    """Where the system cannot swap two directories in one step, a failure between the two
    renames restores the previous model."""
    model, adata, path = saved
    before = (path / "model.safetensors").read_bytes()
    monkeypatch.setattr(scvae.io, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(scvae.io.os, "rename", failing_rename)
    with pytest.raises(OSError, match="Cannot write the model"):
        model.save(path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_never_deletes_files_a_model_does_not_own(tmp_path):
    model = scvae.SCVAE(scvae.data.simulate(60, 12, seed=0), n_hidden=16)
    project = tmp_path / "project"
    (project / "figs").mkdir(parents=True)
    (project / "analysis.ipynb").write_text("{}")
    with pytest.raises(
        FileExistsError, match=r"not part of a saved model \(analysis\.ipynb, figs\)"
    ):
        model.save(project, overwrite=True)
    assert sorted(p.name for p in project.iterdir()) == ["analysis.ipynb", "figs"]
    model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)  # a model directory: its own files are replaced
    (tmp_path / "empty").mkdir()
    model.save(tmp_path / "empty", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "model.json",
        "model.safetensors",
    ]


def test_a_crafted_list_of_extra_files_cannot_make_an_overwrite_delete_them(tmp_path):
    model = scvae.SCVAE(scvae.data.simulate(60, 12, seed=0), n_hidden=16)
    model.save(tmp_path / "m")
    description = json.loads((tmp_path / "m" / "model.json").read_text())
    description["extra_files"] = {"analysis.ipynb": "0" * 64}
    (tmp_path / "m" / "model.json").write_text(json.dumps(description))
    (tmp_path / "m" / "analysis.ipynb").write_text("{}")
    with pytest.raises(FileExistsError, match=r"not part of a saved model \(analysis\.ipynb\)"):
        model.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "analysis.ipynb").read_text() == "{}"


def test_saved_files_are_as_readable_as_any_other_file(tmp_path):
    model = scvae.SCVAE(scvae.data.simulate(60, 12, seed=0), n_hidden=16)
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"model.json": 0o644, "model.safetensors": 0o644}


def test_save_anndata_keeps_the_cells_and_load_attaches_them(tmp_path):
    # scvi-tools' save(save_anndata=True) / load(dir_path): the AnnData travels with the model
    adata = scvae.data.simulate(60, 12, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, train_size=0.8, progress_bar=False)
    model.save(tmp_path / "m", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "adata.h5ad",
        "model.json",
        "model.safetensors",
    ]
    loaded = scvae.SCVAE.load(tmp_path / "m")
    assert loaded.adata is not None and list(loaded.adata.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    assert scvae.SCVAE.load(tmp_path / "m", adata).adata is adata  # a given AnnData wins
    # the model's own file: an overwrite replaces it, without save_anndata it goes
    model.save(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "adata.h5ad").exists()
    assert scvae.SCVAE.load(tmp_path / "m").adata is None


def test_a_replaced_saved_anndata_is_refused_and_bad_uses_are_named(tmp_path):
    adata = scvae.data.simulate(60, 12, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16, n_latent=3)
    model.save(tmp_path / "m", save_anndata=True)
    scvae.data.simulate(60, 12, seed=1).write_h5ad(tmp_path / "m" / "adata.h5ad")
    with pytest.raises(ModelFileError, match=r"adata\.h5ad does not match the checksum"):
        scvae.SCVAE.load(tmp_path / "m")
    unattached = scvae.SCVAE.load(tmp_path / "m", adata)
    unattached.adata = None
    with pytest.raises(ValueError, match="no AnnData attached"):
        unattached.save(tmp_path / "n", save_anndata=True)
    adata.uns["not_h5ad"] = object()
    with pytest.raises(ValueError, match=r"cannot be written as h5ad .*'not_h5ad'"):
        model.save(tmp_path / "n", save_anndata=True)
    assert not (tmp_path / "n").exists() and not list(tmp_path.glob(".n.tmp-*"))
    del adata.uns["not_h5ad"]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = scvae.SCVAE(anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r"), n_hidden=16)
    with pytest.raises(ValueError, match="backed by .*cells.h5ad"):
        backed.save(tmp_path / "n", save_anndata=True)
