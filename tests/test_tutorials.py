"""The tutorials run top to bottom, and the committed notebooks carry their outputs.

Each notebook of ``tutorials/`` is executed in quick mode (``SCVAE_TUTORIAL_QUICK=1``: fewer
cells, images and epochs) by a real Jupyter kernel, in a temporary directory, so nothing is
written into the repository. The kernel is ipykernel under the interpreter running the tests
(``sys.executable``), whatever kernelspecs the machine has installed: no ``ipykernel install``
is needed. The quick runs use the notebooks' fallback data (scanpy's and scikit-learn's
bundled data sets, or scvae's simulator), which is what CI without ``../shared/data`` sees;
the default run executes the first notebook, the others are marked slow (CI runs them with
``make test-slow``), and so are the runs on the real data sets (skipped when they are absent).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
# Each of these spends most of its quick run compiling numba code for scanpy's neighbours
# (pynndescent, in a fresh kernel) and takes one to two minutes on two loaded cores: slow.
HEAVY = {"02_pbmc3k.ipynb", "03_batches.ipynb"}
QUICK_RUNS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in NOTEBOOKS]
# A committed notebook must stay small enough to read on GitHub.
MAX_NOTEBOOK_BYTES = 3_000_000


class ThisInterpreter(KernelSpecManager):
    """Resolves every kernel name to ipykernel running under ``sys.executable``.

    Installed kernelspecs (``python3`` in a user's or the system's Jupyter path) may point to
    another Python without scvae; this spec cannot.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return KernelSpec(argv=argv, display_name=f"{kernel_name} (tests)", language="python")


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in a fresh kernel started in ``cwd``; raise on any cell error."""
    km = KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=timeout,
        coalesce_streams=True,
        resources={"metadata": {"path": str(cwd)}},
    )
    return client.execute()


def test_kernel_runs_this_interpreter_in_the_given_directory(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")
    )
    out = execute(nb, tmp_path, timeout=120)
    lines = out.cells[0].outputs[0]["text"].splitlines()
    assert Path(lines[0]).resolve() == Path(sys.executable).resolve()
    assert Path(lines[1]).resolve() == tmp_path.resolve()


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('broken tutorial')"))
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="broken tutorial"):
        execute(nb, tmp_path, timeout=120)


def _run_quick(name: str, data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SCVAE_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("SCVAE_DATA_DIR", str(data_dir))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    work = tmp_path / "run"
    work.mkdir()
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    out = execute(nb, work)
    errors = [o for c in out.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in errors if o.get("output_type") == "error"]
    assert _n_images(out) > 0


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_tutorial_runs_in_quick_mode_on_bundled_data(name, tmp_path, monkeypatch):
    empty = tmp_path / "no_data"
    empty.mkdir()
    _run_quick(name, empty, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs_in_quick_mode_on_the_real_data(name, tmp_path, monkeypatch):
    _run_quick(name, SHARED_DATA, tmp_path, monkeypatch)


def _n_images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_there_are_tutorials():
    assert {"01_vae_mnist.ipynb", "02_pbmc3k.ipynb", "03_batches.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_its_outputs(name):
    """Saved after a full run, top to bottom, with its plots (they show on GitHub)."""
    path = TUTORIALS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "run the notebook top to bottom, then save"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert _n_images(nb) >= 3
    for o in outputs:
        png = o.get("data", {}).get("image/png")
        if png is not None:
            assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SCVAE_TUTORIAL_QUICK" in code[0].source
    text = "".join(o.get("text", "") for o in outputs)
    assert "quick mode: False" in text, "the committed outputs must come from a full run"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
