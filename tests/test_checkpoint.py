"""Checkpoints: latest and best states on disk, resume after a kill, bit-identical on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import scvae
from scvae.checkpoint import CheckpointError

# One small run, shared by the tests: batches, validation cells, the scheduler and early
# stopping all take part, so their states must survive a resume.
MODEL = dict(batch_key="batch", n_hidden=32)
TRAIN = dict(
    batch_size=32,
    seed=5,
    device="cpu",
    train_size=0.8,
    early_stopping=True,
    early_stopping_patience=50,
    reduce_lr_on_plateau=True,
    n_epochs_kl_warmup=4,
)


def new_model(**options) -> scvae.SCVAE:
    """The same model in every process: initial weights from settings.seed = 0."""
    seed, scvae.settings.seed = scvae.settings.seed, 0
    try:
        adata = scvae.data.simulate(300, 40, n_batches=2, seed=1)
        return scvae.SCVAE(adata, **{**MODEL, "n_latent": 4, **options})
    finally:
        scvae.settings.seed = seed


@contextmanager
def one_thread():
    """Bit-identity needs the same reduction order: one intra-op thread, as in the child."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_weights(a: scvae.SCVAE, b: scvae.SCVAE) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:  # on the CPU: load() puts a model on the GPU when there is one
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def assert_same_history(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)


def test_checkpoint_holds_latest_and_best_and_loads_as_model(tmp_path):
    model = new_model()
    with one_thread():
        model.train(max_epochs=5, checkpoint_dir=tmp_path / "ck", **TRAIN)
    latest, best = tmp_path / "ck" / "latest", tmp_path / "ck" / "best"
    for d in (latest, best):
        assert sorted(p.name for p in d.iterdir()) == [
            "model.json",
            "model.safetensors",
            "train_state.safetensors",
        ]
    meta = json.loads((latest / "model.json").read_text())
    assert meta["checkpoint"]["epoch"] == 4
    assert meta["checkpoint"]["loop"]["next_epoch"] == 5
    state = scvae.io.load_extra(latest, meta, "train_state.safetensors")
    assert {"rng.generator", "rng.torch"} <= set(state)
    assert any(k.endswith(".exp_avg") for k in state)  # Adam's moments travel with the weights
    best_epoch = int(model.history["elbo_validation"].idxmin())
    assert json.loads((best / "model.json").read_text())["checkpoint"]["epoch"] == best_epoch
    # latest/ is the model at the end; best/ is a loadable model too
    assert_same_weights(scvae.SCVAE.load(latest, model.adata), model)
    loaded = scvae.SCVAE.load(best, model.adata)
    assert loaded.is_trained and len(loaded.history) == best_epoch + 1


def test_best_checkpoint_is_the_best_epoch_between_writes(tmp_path):
    """With checkpoint_every > 1 the best epoch is held in memory until the next write."""
    model = new_model()
    with one_thread():
        model.train(max_epochs=5, checkpoint_dir=tmp_path, checkpoint_every=2, **TRAIN)
    meta = json.loads((tmp_path / "best" / "model.json").read_text())
    assert meta["checkpoint"]["epoch"] == int(model.history["elbo_validation"].idxmin())
    assert json.loads((tmp_path / "latest" / "model.json").read_text())["checkpoint"]["epoch"] == 4


def test_resume_in_process_equals_uninterrupted_run(tmp_path):
    with one_thread():
        full = new_model()
        full.train(max_epochs=6, **TRAIN)
        first = new_model()
        first.train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
        resumed = new_model()  # a fresh process would build exactly this model
        resumed.train(max_epochs=6, checkpoint_dir=tmp_path, **TRAIN)
    assert_same_weights(resumed, full)
    assert_same_history(resumed.history, full.history)
    # the guard: without the restored state the run would differ
    with one_thread():
        other = new_model()
        other.train(max_epochs=3, **{**TRAIN, "seed": 6})
    assert not torch.equal(
        other.module.state_dict()["z_encoder.mean_encoder.weight"],
        full.module.state_dict()["z_encoder.mean_encoder.weight"],
    )


def test_finished_checkpoint_is_loaded_without_training(tmp_path, caplog):
    with one_thread():
        done = new_model()
        done.train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
        again = new_model()
        with caplog.at_level("INFO", logger="scvae"):
            again.train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
    assert "Resuming training" in caplog.text
    assert_same_weights(again, done)
    assert len(again.history) == 3


def test_checkpoint_of_another_run_is_refused(tmp_path):
    with one_thread():
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    model = new_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another training run.*train_config\.lr.*new"):
        model.train(max_epochs=2, checkpoint_dir=tmp_path, **{**TRAIN, "lr": 2e-3})
    with pytest.raises(CheckpointError, match=r"differs in .*module_config\.n_latent"):
        new_model(n_latent=3).train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    assert not model.is_trained
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_checkpoint_of_other_cells_or_counts_is_refused(tmp_path):
    with one_thread():
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    seed, scvae.settings.seed = scvae.settings.seed, 0
    try:  # built as new_model builds it, on other data: the same starting weights
        adata = scvae.data.simulate(300, 40, n_batches=2, seed=1)
        shuffled = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()
        other = scvae.data.simulate(300, 40, n_batches=2, seed=2)  # same names, other counts
        models = [scvae.SCVAE(a, **{**MODEL, "n_latent": 4}) for a in (shuffled, other)]
    finally:
        scvae.settings.seed = seed
    with pytest.raises(CheckpointError, match=r"differs in cells\.obs_names_sha256"):
        models[0].train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    with pytest.raises(CheckpointError, match=r"differs in .*(stored_nonzeros|counts_total)"):
        models[1].train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    assert not models[0].is_trained and not models[1].is_trained


def test_checkpoint_from_before_the_cells_were_recorded_resumes(tmp_path):
    with one_thread():
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
        description = tmp_path / "latest" / "model.json"
        meta = json.loads(description.read_text())
        for key in ("cells", "stored_nonzeros", "counts_total"):  # as an older scvae wrote it
            del meta["checkpoint"]["identity"][key]
        description.write_text(json.dumps(meta))
        model = new_model()
        model.train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
        straight = new_model()
        straight.train(max_epochs=3, **TRAIN)
    assert_same_weights(model, straight)


def test_checkpoint_past_max_epochs_is_refused(tmp_path):
    with one_thread():
        new_model().train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
    model = new_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"has trained 3 epochs, more than max_epochs=2"):
        model.train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    assert not model.is_trained and model.history.empty
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())


def test_training_on_from_the_model_a_run_ended_in_says_how(tmp_path):
    with one_thread():
        model = new_model()
        model.train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
        trained = {k: v.clone() for k, v in model.module.state_dict().items()}
        with pytest.raises(CheckpointError, match=r"already holds the weights of the latest "):
            model.train(max_epochs=4, checkpoint_dir=tmp_path, **TRAIN)
        assert all(torch.equal(v, trained[k]) for k, v in model.module.state_dict().items())
        model.train(max_epochs=2, **TRAIN)  # as the message says: on, without the checkpoint
        assert len(model.history) == 4
        extended = new_model()  # or the first run extended, from a model built as it was
        extended.train(max_epochs=4, checkpoint_dir=tmp_path, **TRAIN)
        assert len(extended.history) == 4


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    with one_thread():
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    state = tmp_path / "latest" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot be read.*checksum.*Delete"):
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    plain = tmp_path / "plain"
    new_model().save(plain / "latest")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        new_model().train(max_epochs=2, checkpoint_dir=plain, **TRAIN)


def _edit_checkpoint(path, edit) -> None:
    description = path / "latest" / "model.json"
    meta = json.loads(description.read_text())
    edit(meta["checkpoint"])
    description.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # trained 2 + 3 + max_epochs epochs, with a history of its own making
        (lambda c: c["loop"].update(next_epoch=-3), r"next_epoch must be a whole number >= 0"),
        (lambda c: c["loop"].update(next_epoch="2"), r"next_epoch must be a whole number"),
        (lambda c: c["loop"].update(rows=["abc"]), r"rows must be a list of \{column: number\}"),
        (
            lambda c: c["optimizer"]["param_groups"][0].update(lr="abc"),
            r"optimizer option lr must be a number, got 'abc'",
        ),
    ],
    ids=["negative-epoch", "epoch-text", "rows-text", "lr-text"],
)
def test_tampered_checkpoint_state_names_the_field(tmp_path, edit, match):
    with one_thread():
        new_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    _edit_checkpoint(tmp_path, edit)
    model = new_model()
    with pytest.raises(CheckpointError, match=rf"is malformed \(ValueError: .*{match}"):
        model.train(max_epochs=4, checkpoint_dir=tmp_path, **TRAIN)
    assert not model.is_trained


def test_checkpoint_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = new_model()
    with pytest.raises(FileExistsError, match=r"checkpoint_dir .*file.* not a directory"):
        model.train(max_epochs=1, checkpoint_dir=blocker, **TRAIN)
    with pytest.raises(OSError, match=r"Cannot write checkpoints to .*file"):
        model.train(max_epochs=1, checkpoint_dir=blocker / "sub", **TRAIN)
    with pytest.raises(ValueError, match="checkpoint_every"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path / "c", checkpoint_every=0, **TRAIN)
    assert not model.is_trained and blocker.read_text() == "x"
    # a saved model's folder: latest/ and best/ went inside it, and from then on
    # save(overwrite=True) refused the folder as holding files that are not the model's
    model.save(tmp_path / "saved")
    with pytest.raises(CheckpointError, match=r"is a saved model's folder .*model\.json"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path / "saved", **TRAIN)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "model.json",
        "model.safetensors",
    ]


CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
import scvae
import scvae.checkpoint as ck
sys.path.insert(0, {tests!r})
from test_checkpoint import TRAIN, new_model
scvae.settings.progress_bar = False
write = ck.Checkpointer.epoch_end

def paced(self, *args, **kwargs):
    write(self, *args, **kwargs)
    print("epoch", args[4].next_epoch - 1, flush=True)
    time.sleep(0.3)  # time for the parent to kill this process between epochs

ck.Checkpointer.epoch_end = paced
new_model().train(max_epochs={max_epochs}, checkpoint_dir=sys.argv[1], **TRAIN)
print("done", flush=True)
"""


def run_and_kill(ckpt: Path, tmp_path: Path, kill_after: int, max_epochs: int) -> int:
    """Train in a child process, SIGKILL it once epoch ``kill_after`` is checkpointed; return
    the epoch of the latest checkpoint it left."""
    script = tmp_path / "child.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(textwrap.dedent(CHILD.format(tests=tests, max_epochs=max_epochs)))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.strip() == f"epoch {kill_after}":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    meta = json.loads((ckpt / "latest" / "model.json").read_text())
    return int(meta["checkpoint"]["epoch"])


@pytest.mark.parametrize("kill_after", [2])
def test_killed_run_resumes_to_identical_weights(tmp_path, kill_after):
    max_epochs = 6
    ckpt = tmp_path / "ck"
    epoch = run_and_kill(ckpt, tmp_path, kill_after, max_epochs)
    assert kill_after <= epoch < max_epochs - 1  # killed mid-way, after a checkpoint
    with one_thread():
        resumed = new_model()
        resumed.train(max_epochs=max_epochs, checkpoint_dir=ckpt, **TRAIN)
        full = new_model()
        full.train(max_epochs=max_epochs, **TRAIN)
    assert_same_weights(resumed, full)
    assert_same_history(resumed.history, full.history)
    assert np.array_equal(resumed.get_latent_representation(), full.get_latent_representation())


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0, 3, 6])
def test_killed_run_resumes_to_identical_weights_at_other_epochs(tmp_path, kill_after):
    max_epochs = 9
    ckpt = tmp_path / "ck"
    epoch = run_and_kill(ckpt, tmp_path, kill_after, max_epochs)
    assert kill_after <= epoch < max_epochs - 1
    with one_thread():
        resumed = new_model()
        resumed.train(max_epochs=max_epochs, checkpoint_dir=ckpt, **TRAIN)
        full = new_model()
        full.train(max_epochs=max_epochs, **TRAIN)
    assert_same_weights(resumed, full)
    assert_same_history(resumed.history, full.history)


def test_checkpoint_without_validation_cells(tmp_path):
    # train_size=1.0: the split's digest (the checkpoint's identity) failed on the empty
    # validation indices
    adata = scvae.data.simulate(200, 30, seed=0)
    model = scvae.SCVAE(adata, n_hidden=16)
    model.train(
        max_epochs=2, batch_size=64, train_size=1.0, progress_bar=False, checkpoint_dir=tmp_path
    )
    assert model.is_trained and (tmp_path / "latest").is_dir()
