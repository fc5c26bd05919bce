"""Training across two real CPU processes (gloo): torchrun and the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import scvae
from scvae.data.loader import shard_minibatches

SCRIPT = Path(__file__).with_name("_ddp_script.py")


@pytest.mark.parametrize(("n_cells", "world_size"), [(301, 2), (301, 3), (400, 2)])
def test_shards_are_disjoint_cover_the_cells_and_take_equal_steps(n_cells, world_size):
    cells = torch.arange(1000, 1000 + n_cells)

    def epoch(rank: int, size: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(4)  # every rank: the same seed
        return list(
            shard_minibatches(
                cells,
                60,
                shuffle=True,
                generator=gen,
                drop_last_below=3,
                rank=rank,
                world_size=size,
            )
        )

    shards = [epoch(rank, world_size) for rank in range(world_size)]
    alone = epoch(0, 1)
    assert {len(s) for s in shards} == {len(alone)}  # the same number of steps everywhere
    union = np.concatenate([torch.cat(s).numpy() for s in shards])
    assert len(union) == len(set(union.tolist()))  # disjoint
    # together they are the cells one process trains on (301: a last cell is dropped there too)
    np.testing.assert_array_equal(np.sort(union), np.sort(torch.cat(alone).numpy()))
    assert len(union) == (300 if n_cells == 301 else n_cells)
    # step k of all ranks together is step k of one process, split in near-equal parts
    for k, batch in enumerate(alone):
        together = torch.cat([s[k] for s in shards])
        assert torch.equal(together, batch)
        assert max(len(s[k]) for s in shards) - min(len(s[k]) for s in shards) <= 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """tests/_ddp_script.py on two gloo processes under torchrun (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        str(out),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    """Train tests/_ddp_script.py on two gloo processes under torchrun; each rank saves."""
    out = tmp_path_factory.mktemp("ddp")
    done = _torchrun(out, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (out / "stderr.txt").write_text(done.stderr)
    return out


def test_ddp_looks_for_unused_parameters_only_where_there_are_some(torchrun_out, tmp_path):
    # the default ZINB model uses every parameter: DDP used to be told to search the graph
    # for unused ones at every step anyway, and every rank warned about it
    assert (
        "find_unused_parameters=True was specified" not in (torchrun_out / "stderr.txt").read_text()
    )
    # a Poisson model has an unused theta and dropout head: DDP must be told, or it fails
    adata = scvae.data.simulate(200, 30, seed=0)
    model = scvae.SCVAE(adata, gene_likelihood="poisson", n_hidden=16)
    model.train(max_epochs=2, batch_size=64, n_processes=2, progress_bar=False)
    assert model.is_trained and np.isfinite(model.history["elbo_train"]).all()


def test_ranks_given_other_data_are_refused_by_name_instead_of_hanging(tmp_path):
    # rank 1 loads 300 cells and lr 2e-3 where rank 0 has 400 and 1e-3: before the check the
    # ranks took different numbers of steps and waited on each other until gloo's timeout
    done = _torchrun(tmp_path, "mismatch", timeout=120)
    assert done.returncode != 0
    assert "rank 1 has cells 300 where rank 0 has 400" in done.stderr
    assert "rank 1 has train option lr 0.002 where rank 0 has 0.001" in done.stderr
    assert not list(tmp_path.iterdir())  # no rank trained or saved


def test_ranks_given_other_counts_are_refused(tmp_path):
    # the same cells, genes and stored non-zeros, every count tripled on rank 1
    done = _torchrun(tmp_path, "tripled", timeout=120)
    assert done.returncode != 0
    assert "rank 1 has sum of the counts" in done.stderr


def test_ranks_that_find_different_checkpoints_are_refused(tmp_path):
    # a folder per node: rank 0 resumed after epoch 1 while rank 1 started afresh, their
    # steps paired across epochs, until rank 1 died with "Connection closed by peer"
    first = _torchrun(tmp_path, "local-checkpoints", "2", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun(tmp_path, "local-checkpoints", "4", timeout=120)
    assert again.returncode != 0
    assert "found different checkpoints" in again.stderr
    assert "rank 0 resumes after epoch 1, rank 1 finds none" in again.stderr


def test_torchrun_two_processes_end_identical(torchrun_out):
    w0, w1 = load_file(torchrun_out / "0.st"), load_file(torchrun_out / "1.st")
    assert w0.keys() == w1.keys()
    for key in w0:  # weights and batch-norm statistics, bit for bit
        assert torch.equal(w0[key], w1[key]), key
    h0 = pd.read_json(torchrun_out / "0.json")
    h1 = pd.read_json(torchrun_out / "1.json")
    # the same history on both ranks (the wall-clock seconds aside)
    pd.testing.assert_frame_equal(h0.drop(columns="seconds"), h1.drop(columns="seconds"))
    assert len(h0) == 4 and np.isfinite(h0["elbo_validation"]).all()
    assert h0["elbo_train"].iloc[-1] < h0["elbo_train"].iloc[0]


@pytest.mark.slow
def test_python_api_trains_like_torchrun(torchrun_out):
    # the same data, model and options as tests/_ddp_script.py, through train(n_processes=2)
    adata = scvae.data.simulate(400, 40, seed=0)
    model = scvae.SCVAE(adata, n_latent=4, n_hidden=32)
    model.train(
        max_epochs=4,
        batch_size=64,
        progress_bar=False,
        early_stopping=True,
        seed=0,
        n_processes=2,
    )
    assert model.is_trained and len(model.history) == 4
    assert model.train_config["n_processes"] == 2
    # rank 0's result is what torchrun's ranks ended with: the processes really trained one
    # model together (each its own copy of the weights, gradients averaged)
    w0 = load_file(torchrun_out / "0.st")
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, w0[key], rtol=1e-4, atol=1e-5, msg=key)
    assert model.get_latent_representation().shape == (400, 4)


def test_backed_shards_are_disjoint_and_take_equal_steps(tmp_path):
    import anndata as ad

    from scvae.data.backed import BackedCSR

    scvae.data.simulate(1000, 20, seed=2).write_h5ad(tmp_path / "c.h5ad")
    x = ad.read_h5ad(tmp_path / "c.h5ad", backed="r").X
    cells = torch.as_tensor(np.sort(np.random.default_rng(0).choice(1000, 900, replace=False)))
    shards, steps = [], []
    for rank in range(2):
        src = BackedCSR(x, "cpu", block_rows=64, buffer_blocks=2)
        gen = torch.Generator().manual_seed(3)
        parts = [
            b.idx.numpy()
            for b in src.batches(
                cells, 64, shuffle=True, generator=gen, drop_last_below=3, rank=rank, world_size=2
            )
        ]
        assert all(len(p) <= 32 for p in parts)  # half of the 64-cell step each
        steps.append(len(parts))
        shards.append(np.concatenate(parts))
        # each rank read only its own buffers: every other buffer of the shared block order
        assert len(src.reads) < 16
    assert steps[0] == steps[1]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) > 0.9 * 900


def test_two_processes_resume_from_a_checkpoint_as_if_never_stopped(tmp_path):
    # each rank draws its own sampling noise; the checkpoint keeps every rank's random state
    adata = scvae.data.simulate(200, 30, n_batches=2, seed=0)
    options = dict(batch_size=64, n_processes=2, progress_bar=False, seed=0)
    whole = scvae.SCVAE(adata, batch_key="batch", n_hidden=16)
    whole.train(max_epochs=4, **options)
    first = scvae.SCVAE(adata, batch_key="batch", n_hidden=16)
    first.train(max_epochs=2, checkpoint_dir=tmp_path / "ckpt", **options)
    resumed = scvae.SCVAE(adata, batch_key="batch", n_hidden=16)
    resumed.train(max_epochs=4, checkpoint_dir=tmp_path / "ckpt", **options)
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    cols = ["elbo_train", "elbo_validation"]
    pd.testing.assert_frame_equal(whole.history[cols], resumed.history[cols])


def test_workers_get_the_settings_and_the_edited_obs_of_a_backed_anndata(tmp_path):
    path = tmp_path / "cells.h5ad"
    cells = scvae.data.simulate(301, 30, seed=0)
    cells.write_h5ad(path)
    adata = __import__("anndata").read_h5ad(path, backed="r")
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")  # not in the file
    # nor these, which the workers lost: gene names edited and a layer added in memory
    adata.var_names = [f"gene_{i}" for i in range(adata.n_vars)]
    adata.layers["mem"] = cells.X
    previous = (scvae.settings.seed, scvae.settings.progress_bar)
    scvae.settings.seed, scvae.settings.progress_bar = 5, False
    try:
        model = scvae.SCVAE(adata, batch_key="donor", layer="mem", n_hidden=16)
        model.train(max_epochs=1, batch_size=64, n_processes=2)
    finally:
        scvae.settings.seed, scvae.settings.progress_bar = previous
    assert model.train_config["seed"] == 5
    _, expected = scvae.train.split_indices(301, 0.9, None, 5)
    np.testing.assert_array_equal(model.validation_indices, expected)
    assert model.registry.batch_categories == ["d1", "d2"]


def test_a_worker_error_arrives_with_its_type_and_the_last_good_weights(tmp_path):
    adata = scvae.data.simulate(200, 30, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(scvae.TrainingDiverged) as caught:
        model.train(max_epochs=20, batch_size=64, lr=1e4, n_processes=2, progress_bar=False)
    assert caught.value.epoch >= 0 and "rank" in str(caught.value.__cause__)
    after = model.module.state_dict()
    # as in one process: the last good step's weights, unless they are not finite in
    # evaluation or no step was applied; then the weights from before the call
    if caught.value.steps_applied and "were restored" not in str(caught.value):
        assert model.is_trained
        assert any(not torch.equal(v, before[k]) for k, v in after.items())
    else:
        assert not model.is_trained
        assert all(torch.equal(v, before[k]) for k, v in after.items())


def test_refused_before_any_process_starts(monkeypatch):
    adata = scvae.data.simulate(60, 20, n_batches=2, seed=0)
    with pytest.raises(ValueError, match=r"Only 3 training cell\(s\).*at least 4 \(2 processes"):
        scvae.SCVAE(adata[:3].copy(), n_hidden=8).train(max_epochs=1, train_size=1.0, n_processes=2)
    with pytest.raises(ValueError, match="n_processes must be a whole number"):
        scvae.SCVAE(adata, n_hidden=8).train(max_epochs=1, n_processes=0)
    reference = scvae.SCVAE(adata, batch_key="batch", n_hidden=8, encode_covariates=True)
    query = adata.copy()
    query.obs["batch"] = "new"
    mapped = scvae.SCVAE.load_query_data(query, reference)
    with pytest.raises(ValueError, match="query model from load_query_data trains in this"):
        mapped.train(max_epochs=1, n_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="inside a process group"):
        scvae.SCVAE(adata, n_hidden=8).train(max_epochs=1, n_processes=2)


_LONG_RUN = """
import signal
import scvae
if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt, as in a terminal or a notebook, even where the tests
    # were started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    adata = scvae.data.simulate(2000, 100, seed=0)
    scvae.SCVAE(adata, n_hidden=16).train(max_epochs=10_000, n_processes=2, progress_bar=False)
"""


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc (Linux); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    stats = {int(p.name): _state_and_parent(int(p.name)) for p in Path("/proc").glob("[0-9]*")}
    return [p for p, st in stats.items() if st is not None and st[0] != "Z" and st[1] == pid]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_workers_end_with_their_launcher_and_leave_no_folders(tmp_path, signum):
    # before: killing (SIGTERM) or interrupting (a notebook's SIGINT to the kernel alone) the
    # process that called train(n_processes=2) left both workers training on as orphans and
    # their temporary folders behind
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # SIGABRT below prints where the launcher is stuck
    }
    log = tmp_path / "launcher.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-c", _LONG_RUN], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and not (
            len(workers) == 2 and list(tmp.glob("scvae-ddp-*/rendezvous"))
        ):
            assert launcher.poll() is None, "the training run ended before it was signalled"
            time.sleep(0.2)
            workers = [p for p in _children(launcher.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2
        time.sleep(2)  # the workers meet and train
        launcher.send_signal(getattr(signal, signum))
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.send_signal(signal.SIGABRT)
            launcher.wait(timeout=30)
            pytest.fail(f"the launcher did not end:\n{log.read_text()[-6000:]}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(_alive, workers)):
            time.sleep(0.2)
        assert not any(map(_alive, workers))
        if signum != "SIGKILL":  # no process can clean up after SIGKILL
            assert not list(tmp.glob("scvae-*"))  # (torch may leave its compiler cache there)
            assert launcher.returncode != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _sleep_forever() -> None:
    import time

    time.sleep(600)


def test_train_in_processes_leaves_other_threads_processes_alone():
    # launch() stopped every multiprocessing child started while it ran, its own workers or
    # not: a second thread's process (or its own train(n_processes=2), which then failed
    # with "Training process 0 died (exit code -15)") was SIGTERMed when training ended
    import multiprocessing
    import threading
    import time

    started = set(multiprocessing.active_children())
    foreign: list[multiprocessing.Process] = []

    def start_foreign() -> None:
        deadline = time.monotonic() + 120
        # once the workers run, launch() has taken its list of the processes before it
        while time.monotonic() < deadline:
            if len(set(multiprocessing.active_children()) - started) >= 2:
                break
            time.sleep(0.05)
        process = multiprocessing.get_context("fork").Process(target=_sleep_forever)
        process.start()
        foreign.append(process)

    helper = threading.Thread(target=start_foreign)
    helper.start()
    try:
        model = scvae.SCVAE(scvae.data.simulate(200, 30, seed=0), n_hidden=16)
        model.train(max_epochs=30, batch_size=64, n_processes=2, progress_bar=False)
        helper.join()
        assert foreign and foreign[0].is_alive(), foreign[0].exitcode
    finally:
        helper.join()
        for process in foreign:
            process.kill()
            process.join()


def test_two_processes_train_without_validation_cells():
    # train_size=1.0 leaves no validation cells: the run check's digest of the split failed
    # on the empty array ("self.stride(-1) must be 1 to view Long as Byte") in every worker
    adata = scvae.data.simulate(200, 30, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, train_size=1.0, n_processes=2, progress_bar=False)
    assert model.is_trained and len(model.validation_indices) == 0


def test_two_processes_leave_the_callers_generator():
    # the caller loads rank 0's result, and loading drew the random initial weights of a new
    # module from the caller's global generator; the largest seed leaves room for seed + rank
    adata = scvae.data.simulate(120, 30, seed=0)
    model = scvae.SCVAE(adata, n_hidden=8)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    model.train(max_epochs=1, batch_size=32, n_processes=2, seed=2**32 - 1, progress_bar=False)
    assert model.is_trained and torch.equal(torch.get_rng_state(), before)


def test_workers_log_at_the_callers_verbosity_and_once(capfd):
    # the workers started with the default verbosity and every rank said the same things
    adata = scvae.data.simulate(200, 30, seed=0)
    options = dict(max_epochs=5, batch_size=64, n_processes=2, progress_bar=False)
    options.update(early_stopping=True, early_stopping_patience=1, early_stopping_min_delta=1e9)
    scvae.SCVAE(adata, n_hidden=16).train(**options)
    assert capfd.readouterr().err.count("Early stopping after epoch") == 1
    previous, scvae.settings.verbosity = scvae.settings.verbosity, "error"
    try:
        scvae.SCVAE(adata, n_hidden=16).train(**options)
    finally:
        scvae.settings.verbosity = previous
    assert "Early stopping" not in capfd.readouterr().err


def test_workers_get_what_training_reads_and_not_the_rest_of_the_anndata():
    # the whole AnnData was pickled for the workers: a lock in uns (which one process never
    # touches) stopped the run with "cannot pickle '_thread.lock'"
    import threading

    adata = scvae.data.simulate(200, 30, n_batches=2, seed=0)
    adata.uns["lock"] = threading.Lock()
    adata.layers["counts"] = adata.X.copy()
    model = scvae.SCVAE(adata, batch_key="batch", layer="counts", n_hidden=16)
    model.train(max_epochs=1, batch_size=64, n_processes=2, progress_bar=False)
    assert model.is_trained and model.adata is adata


def test_one_named_gpu_is_refused_for_several_processes():
    # every rank kept device="cuda:1", so all of them shared that GPU (NCCL refuses it)
    from scvae.distributed import World, rank_device

    with pytest.raises(ValueError, match=r"device='cuda:1' names one GPU, but each of the 2"):
        rank_device(torch.device("cuda", 1), World(0, 2))
    assert rank_device(torch.device("cuda", 1), World()) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda"), World(1, 2)).type == "cuda"
