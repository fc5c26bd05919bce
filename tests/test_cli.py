"""The `scvae` command: demo end to end (few epochs) and its one-line errors."""

from __future__ import annotations

import anndata as ad
import matplotlib.image as mpimg

from scvae.cli import main


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
