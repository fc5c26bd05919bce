"""The README's quickstart runs as written (fewer epochs and DE samples), and its plots of genes
read the denoised layer: ``adata.X`` holds raw counts."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402

import scvae  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
LAYER = "scvae_normalized"


def quickstart() -> str:
    text = README.read_text()
    section = text.split("## Five-minute quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_plots_genes_from_the_denoised_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model.save("pbmc_model/") lands here
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    fit, de = scvae.tl.fit, scvae.tl.differential_expression
    monkeypatch.setattr(scvae.tl, "fit", lambda adata, **k: fit(adata, max_epochs=3, **k))
    monkeypatch.setattr(
        scvae.tl,
        "differential_expression",
        lambda adata, model, **k: de(adata, model, n_samples_overall=100, **k),
    )
    plots = []

    def recording(plot):
        def record(adata, *args, **kwargs):
            plots.append((plot.__name__, kwargs, LAYER in adata.layers))
            return plot(adata, *args, **{**kwargs, "show": False})

        return record

    for name in ("umap", "rank_genes_groups_matrixplot"):
        monkeypatch.setattr(sc.pl, name, recording(getattr(sc.pl, name)))
    namespace: dict = {}
    exec(compile(quickstart(), str(README), "exec"), namespace)  # noqa: S102
    assert isinstance(namespace["model"], scvae.SCVAE) and namespace["model"].is_trained
    adata = namespace["adata"]
    genes = set(adata.var_names)
    gene_plots = [
        (name, kwargs, ready)
        for name, kwargs, ready in plots
        if name == "rank_genes_groups_matrixplot" or set(kwargs.get("color", [])) & genes
    ]
    assert {name for name, _, _ in gene_plots} == {"umap", "rank_genes_groups_matrixplot"}
    for name, kwargs, ready in gene_plots:
        assert kwargs.get("layer") == LAYER and ready, name  # not the raw counts of X
    plt.close("all")


@pytest.mark.parametrize("word", ["scvae.tl.normalized_expression", f'layer="{LAYER}"'])
def test_quickstart_mentions(word):
    assert word in quickstart()
