"""The ``scvae`` command.

- ``scvae fit IN -o OUT.h5ad``: reads counts (h5ad, 10x .h5 or a 10x matrix folder), trains
  the model (:func:`scvae.tl.fit`), adds neighbors, UMAP and Leiden clusters with scanpy and
  writes the AnnData (and, with ``--model-dir``, the model).
- ``scvae de MODEL_DIR IN -o de.csv --groupby KEY``: scVI's differential expression of each
  group against the rest, as a CSV table.
- ``scvae demo [--out DIR]``: the whole pipeline on the bundled PBMC data, with PNG plots and
  the clustering scores.

Every bad input (missing or unreadable file, unknown key or layer, data that is not raw
counts, an output that cannot be written) is one line on stderr and exit code 2, before
anything is trained or written. Outputs are written to a temporary file beside the target and
renamed into place, so a failed or interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata as ad

    from scvae.model import SCVAE


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# A Python literal after "name=": a quoted string, or a bare token (number, True, None).
_LITERAL = r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[\w+-]+(?:\.\w+)*)?"""


def _command_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """``{dest: (long flag, takes no value)}`` of the options of one subcommand's parser."""
    flags = {}
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest != "help":
            flags[action.dest] = (long[0], action.nargs == 0)
    return flags


def _as_flags(
    message: str,
    command: str,
    flags: dict[str, tuple[str, bool]],
    paths: Sequence[str] = (),
) -> str:
    """``message`` with the Python option names of this command as its flags: ``layer='x'``
    becomes ``--layer x``, ``allow_non_integer=True`` ``--allow-non-integer``, ``n_latent``
    ``--n-latent``. A one-word name (``layer``, ``seed``) is rewritten only as ``name=...``
    or ``name must``, as such words also occur in plain English. The run's own ``paths``
    and any word inside a path (next to a ``/``) are left as they are.

    Examples
    --------
    >>> flags = {"batch_key": ("--batch-key", False), "layer": ("--layer", False)}
    >>> _as_flags("batch_key='nope' is not a column; or pass layer=None.", "fit", flags)
    '--batch-key nope is not a column; or pass no --layer.'
    >>> path = "runs/layer=2/in.h5ad"
    >>> _as_flags(f"{path} is not an h5ad file", "fit", flags, [path])
    'runs/layer=2/in.h5ad is not an h5ad file'
    """
    kept = sorted({str(p) for p in paths if str(p)}, key=len, reverse=True)
    for i, path in enumerate(kept):  # longest first, so a path's folder stays inside it
        message = message.replace(path, f"\x00{i}\x00")
    for name, (flag, switch) in flags.items():
        start = rf"(?<![\w.\[\'\"/\x00-]){re.escape(name)}"

        def literal(match: re.Match, flag: str = flag, switch: bool = switch) -> str:
            value = match.group("value")
            if value is None:
                return flag
            if value == "None" or (switch and value == "False"):
                return f"no {flag}"
            if switch and value == "True":
                return flag
            try:
                shown = ast.literal_eval(value) if value[0] in "'\"" else value
            except (ValueError, SyntaxError):
                shown = value
            return f"{flag} {shlex.quote(str(shown))}"

        message = re.sub(start + "=" + _LITERAL + r"(?![/\w])", literal, message)
        bare = start + r"(?![\w(=/.])" if "_" in name else start + r"(?= must )"
        message = re.sub(bare, flag, message)
        message = message.replace(f"{flag} (scvae {command}: {flag})", flag)
    for i, path in enumerate(kept):
        message = message.replace(f"\x00{i}\x00", path)
    return message


# the arguments that hold paths, whose words are never read as option names
_PATH_ARGUMENTS = ("input", "output", "model_dir", "plots", "out")


# ------------------------------------------------------------------ files
def _check_output_file(path: Path, flag: str, suffix: str | None, overwrite: bool) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise CLIError(f"{flag} {path} must end in {suffix}")
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CLIError(f"{flag} {path} exists; pass --overwrite to replace it")
    _probe_folder(path.parent, flag, path)


def _probe_write(folder: Path, what: str) -> None:
    """Write and delete a file in ``folder``, or refuse with "cannot write {what}"."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".scvae-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CLIError(f"cannot write {what}: {err.strerror or err}") from None


def _probe_folder(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise CLIError(f"cannot write {flag} {target}: the folder {folder} does not exist")
    _probe_write(folder, f"{flag} {target}")


def _check_model_dir(path: Path, overwrite: bool) -> None:
    from scvae.io import foreign_entries

    if path.exists() and not path.is_dir():
        raise CLIError(f"--model-dir {path} is a file; give a folder name")
    foreign = foreign_entries(path)
    if foreign:
        raise CLIError(
            f"--model-dir {path} holds files that are not part of a saved model "
            f"({', '.join(foreign[:5])}); give a new or empty folder"
        )
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"--model-dir {path} exists and is not empty; pass --overwrite")
    _probe_folder(path.parent, "--model-dir", path)


def _write_atomically(
    path: Path,
    write: Callable[[Path], object],
    *,
    flag: str = "",
    before_rename: Callable[[], object] | None = None,
) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place.

    ``before_rename`` runs once the file is written whole, before it takes its name (a step
    that must not happen unless the file could be written, and whose failure leaves no file).
    A failed write is a CLIError naming ``flag`` and ``path``, not the temporary file.
    """
    from scvae.io import default_file_mode

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
            default_file_mode(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as err:
            reason = str(err.strerror or err).replace(str(tmp), str(path))
            where = f"{flag} {path}" if flag else str(path)
            raise CLIError(f"cannot write {where}: {reason}; nothing was written") from None
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: str) -> ad.AnnData:
    import scvae

    with warnings.catch_warnings():
        # repeated gene names are made unique below (10x) or refused by name (h5ad): anndata's
        # two-line warning about them would only precede that one line
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = scvae.data.read(path)
    p = Path(path)
    if (p.is_dir() or p.suffix.lower() == ".h5") and not adata.var_names.is_unique:
        adata.var_names_make_unique()  # 10x gene symbols repeat; scanpy's readers do the same
    print(f"read {path}: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
    return adata


def _load_model(model_dir: Path, adata: ad.AnnData, device: str) -> SCVAE:
    """The model saved in ``model_dir`` with its own class (SCVAE or LDVAE)."""
    import scvae
    from scvae.mapping import _saved_class

    # None: SCVAE.load names what is wrong with the directory
    cls = _saved_class(model_dir) or scvae.SCVAE
    return cls.load(model_dir, adata, device=device)


def _ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and check a file can be written there ("cannot write {what}")."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot write {what}: {err.strerror or err}") from None
    _probe_write(path, what)


def _check_writable_dir(path: Path, what: str) -> None:
    """Refuse a folder that cannot be written or created, creating nothing (checked before
    any work; the folder is made when there is something to put in it)."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"cannot write {what}: {path} is a file; give a folder name")
    existing = path
    while not existing.exists():  # the nearest folder that exists must take new entries
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write {what}: {existing} is a file")
    _probe_write(existing, what)


def _plot_names(colors: dict[str, str]) -> list[str]:
    """The files :func:`_write_plots` writes for ``colors``, in its order."""
    return [f"umap_{key}.png" for key in colors] + ["history.png"]


def _check_plots(folder: Path, colors: dict[str, str], overwrite: bool) -> None:
    """Refuse ``--plots`` when the PNGs this run writes are there already (no --overwrite)."""
    _check_writable_dir(folder, f"plots to {folder}")
    targets = [folder / name for name in _plot_names(colors)]
    folders = [p.name for p in targets if p.is_dir()]
    if folders:
        raise CLIError(f"--plots {folder} holds folders named {', '.join(folders)}; give another")
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise CLIError(
            f"--plots {folder} already holds {', '.join(existing)}; pass --overwrite to replace "
            "them, or give another folder"
        )


def _write_plots(adata, model, out: Path, colors: dict[str, str]) -> dict[str, Path]:
    """UMAP PNGs (one per obs key in ``colors``, titled by its value) and the history PNG
    (:func:`scvae.pl.history`), named as :func:`_plot_names` says."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    import scvae

    names = iter(_plot_names(colors))
    written = {}
    for key, title in colors.items():
        fig = sc.pl.umap(
            adata, color=key, title=f"scvae latent: {title}", show=False, return_fig=True
        )
        fig.set_size_inches(8, 5.5)
        path = out / next(names)
        _write_atomically(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
        plt.close(fig)
        written[f"UMAP by {title}"] = path
    fig, ax = plt.subplots(figsize=(6, 4))
    scvae.pl.history(model, ax=ax, show=False, save=False)
    path = out / next(names)
    _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    written["training history"] = path
    return written


# -------------------------------------------------------------- commands
def _fit(args: argparse.Namespace) -> None:
    import scanpy as sc

    import scvae
    from scvae.distributed import current_world

    out = Path(args.output)
    _check_output_file(out, "-o", ".h5ad", args.overwrite)
    model_dir = None if args.model_dir is None else Path(args.model_dir)
    if model_dir is not None:
        if model_dir.absolute() == out.absolute():
            raise CLIError(f"--model-dir {model_dir} is the -o file; give the model its own folder")
        _check_model_dir(model_dir, args.overwrite)
    plot_dir = None if args.plots is None else Path(args.plots)
    colors = {"leiden": "Leiden clusters"}
    if args.labels_key:
        colors[args.labels_key] = args.labels_key
    if plot_dir is not None:
        _check_plots(plot_dir, colors, args.overwrite)
    adata = _read(args.input)
    start = time.perf_counter()
    model = scvae.tl.fit(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        allow_non_integer=args.allow_non_integer,
        n_latent=args.n_latent,
        max_epochs=args.max_epochs,
        seed=args.seed,
        device=args.device,
        progress_bar=False if args.no_progress else None,
        n_processes=args.n_processes,
    )
    if not current_world().is_main:
        return  # under torchrun: rank 0 clusters and writes the outputs
    record = adata.uns["scvae"]
    validation = record.get("elbo_validation")
    print(
        f"trained {record['n_epochs']} epochs in {time.perf_counter() - start:.1f} s on "
        f"{model.train_config['device']}; negative ELBO per cell: train "
        f"{record['elbo_train']:.1f}"
        + ("" if validation is None else f", validation {validation:.1f}"),
        flush=True,
    )
    sc.pp.neighbors(adata, use_rep=scvae.LATENT_KEY, random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=args.seed)
    print(f"Leiden: {adata.obs['leiden'].nunique()} clusters", flush=True)

    def save_model() -> None:
        if model_dir is not None:
            # an empty folder was accepted up front (_check_model_dir): nothing in it to lose
            empty = model_dir.is_dir() and not any(model_dir.iterdir())
            model.save(model_dir, overwrite=args.overwrite or empty)

    # the h5ad is written whole first, the model saved, then the h5ad named: a failure at
    # either step leaves neither (a disk that fills while writing the h5ad left the model)
    _write_atomically(out, adata.write_h5ad, flag="-o", before_rename=save_model)
    if model_dir is not None:
        print(f"wrote the model: {model_dir}")
    print(f"wrote {out}: latent in obsm['{scvae.LATENT_KEY}'], obsm['X_umap'], obs['leiden']")
    if plot_dir is not None:
        _ensure_writable_dir(plot_dir, f"plots to {plot_dir}")
        for what, where in _write_plots(adata, model, plot_dir, colors).items():
            print(f"wrote {what}: {where}")


def _de(args: argparse.Namespace) -> None:
    out = Path(args.output)
    _check_output_file(out, "-o", None, args.overwrite)
    if not args.delta > 0:  # vanilla mode does not use it, but a bad value is still a mistake
        raise CLIError(f"--delta must be a positive log2 fold change, got {args.delta}")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        what = "is a file" if model_dir.exists() else "does not exist"
        raise CLIError(f"no model directory at {model_dir}: the path {what}")
    adata = _read(args.input)
    if args.groupby not in adata.obs:
        have = ", ".join(map(repr, list(adata.obs.columns)[:20])) or "none"
        raise CLIError(f"--groupby {args.groupby!r} is not a column of obs (columns: {have})")
    model = _load_model(model_dir, adata, args.device)
    table = model.differential_expression(
        adata,
        groupby=args.groupby,
        mode=args.mode,
        delta=args.delta,
        fdr_target=args.fdr_target,
        batch_correction=args.batch_correction,
        n_samples_overall=args.n_samples_overall,
        seed=args.seed,
    )
    _write_atomically(out, lambda tmp: table.to_csv(tmp, index_label="gene"))
    groups = table["comparison"].nunique()
    print(f"wrote {out}: {len(table)} rows ({groups} comparisons, one row per gene in each)")


_DEMO_COLORS = {"leiden": "Leiden clusters", "cell_type": "known cell types"}
_DEMO_H5AD = "pbmc68k_scvae.h5ad"


def _demo(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    import torch

    import scvae
    from scvae.metrics import knn_accuracy, leiden_nmi_ari

    out = Path(args.out)
    _check_writable_dir(out, f"to --out {out}")  # created once there is something to write
    model_dir = out / "model"  # a previous demo's model is replaced, nothing else
    if model_dir.exists():
        from scvae.io import foreign_entries

        if not model_dir.is_dir() or foreign_entries(model_dir):
            raise CLIError(
                f"{model_dir} is not a saved model (the demo writes its model there); give "
                "another --out"
            )
    # checked before training: a folder where a file goes failed only at the end
    folders = [n for n in (*_plot_names(_DEMO_COLORS), _DEMO_H5AD) if (out / n).is_dir()]
    if folders:
        raise CLIError(f"--out {out} holds folders named {', '.join(folders)}; give another")

    scvae.settings.seed = args.seed
    adata = scvae.datasets.pbmc68k()
    print(f"data: scanpy's bundled PBMCs, {adata.n_obs} cells x {adata.n_vars} genes (raw counts)")
    model = scvae.SCVAE(adata)
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    device = model.train_config["device"]
    print(f"trained {len(model.history)} epochs in {seconds:.1f} s on {device}")

    adata.obsm[scvae.LATENT_KEY] = model.get_latent_representation()
    sc.pp.neighbors(adata, use_rep=scvae.LATENT_KEY, random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=args.seed)

    labels = adata.obs["cell_type"].to_numpy()
    best = leiden_nmi_ari(adata.obsm[scvae.LATENT_KEY], labels, seed=args.seed)
    knn = knn_accuracy(adata.obsm[scvae.LATENT_KEY], labels)
    held_out = model.validation_indices
    torch.manual_seed(args.seed)  # the ELBO's posterior sample: the same number every run
    elbo = model.get_elbo(indices=held_out)
    print(f"held-out ELBO per cell: {elbo:.1f} ({len(held_out)} cells)")
    print(
        f"clustering vs the known cell types: Leiden (default resolution) "
        f"{adata.obs['leiden'].nunique()} clusters; resolution-optimised NMI {best['nmi']:.3f}, "
        f"ARI {best['ari']:.3f} (resolution {best['resolution']}); "
        f"kNN label accuracy {knn:.3f}"
    )

    _ensure_writable_dir(out, f"to --out {out}")
    written = _write_plots(adata, model, out, _DEMO_COLORS)
    h5ad = out / _DEMO_H5AD
    _write_atomically(h5ad, adata.write_h5ad, flag="--out")
    written["AnnData (latent in obsm['X_scvae'], UMAP, Leiden)"] = h5ad
    model_dir = out / "model"
    model.save(str(model_dir), overwrite=True)
    written["model (safetensors + JSON)"] = model_dir
    for what, where in written.items():
        print(f"wrote {what}: {where}")


_FIT_EXAMPLES = """examples:
  scvae fit pbmc.h5ad -o pbmc_scvae.h5ad
  scvae fit filtered_feature_bc_matrix.h5 -o out.h5ad --batch-key sample --model-dir model/
  scvae fit counts.h5ad -o out.h5ad --layer counts --max-epochs 100 --n-latent 20
  scvae fit pbmc.h5ad -o pbmc_scvae.h5ad --labels-key cell_type --plots plots/
"""
_DE_EXAMPLES = """examples:
  scvae fit pbmc.h5ad -o pbmc_scvae.h5ad --model-dir pbmc_model/
  scvae de pbmc_model/ pbmc_scvae.h5ad --groupby leiden -o de.csv
  scvae de pbmc_model/ pbmc_scvae.h5ad --groupby cell_type --mode change -o de.csv
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    p.add_argument(
        "--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:1, ..."
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scvae`` command.

    Examples
    --------
    >>> build_parser().parse_args(["demo", "--out", "x"]).out
    'x'
    >>> build_parser().parse_args(["fit", "in.h5ad", "-o", "out.h5ad"]).max_epochs is None
    True
    """
    parser = argparse.ArgumentParser(
        prog="scvae", description="Single-cell variational inference (scVI) with scanpy."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    fit = sub.add_parser(
        "fit",
        help="train on a counts file; write the latent, UMAP and Leiden into an h5ad",
        description="Read raw counts (.h5ad, 10x .h5 or a 10x matrix folder), train scVI, add\n"
        "neighbors, UMAP and Leiden clusters (scanpy) on the latent and write the AnnData with\n"
        "the latent in obsm['X_scvae'], obsm['X_umap'], obs['leiden'] and the run recorded in\n"
        "uns['scvae']. Progress bars go to stderr; a bad input is one line on stderr and\n"
        "exit code 2, before anything is trained or written.",
        epilog=_FIT_EXAMPLES,
        formatter_class=raw,
    )
    fit.add_argument("input", help="counts: .h5ad, 10x .h5 or 10x matrix folder")
    fit.add_argument("-o", "--output", required=True, metavar="OUT.h5ad", help="output file")
    fit.add_argument("--layer", metavar="LAYER", help="layer with the raw counts (default: X)")
    fit.add_argument(
        "--allow-non-integer",
        action="store_true",
        help="accept fractional counts (ambient-corrected or EM-estimated); default: refused",
    )
    fit.add_argument("--batch-key", metavar="KEY", help="obs column with the batch")
    fit.add_argument("--labels-key", metavar="KEY", help="obs column with cell labels")
    fit.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        metavar="N",
        help="training epochs (default: chosen from the data size, as scvi-tools)",
    )
    fit.add_argument(
        "--n-latent", type=int, default=10, metavar="N", help="latent dimensions (default: 10)"
    )
    fit.add_argument("--model-dir", metavar="DIR", help="also save the trained model here")
    fit.add_argument(
        "--plots",
        metavar="DIR",
        help="also write PNGs here: UMAP by Leiden (and by --labels-key), training history "
        "(umap_leiden.png, umap_KEY.png, history.png; existing ones need --overwrite)",
    )
    fit.add_argument(
        "--n-processes",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes (DistributedDataParallel; default: 1). Under torchrun "
        "leave it at 1: the command trains across torchrun's processes and rank 0 writes",
    )
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(fit)
    fit.set_defaults(func=_fit, flags=_command_flags(fit))

    de = sub.add_parser(
        "de",
        help="differential expression of each group against the rest, as a CSV",
        description="Load a model saved by `scvae fit --model-dir`, run scVI's differential\n"
        "expression of each group of --groupby against all other cells, and write the table\n"
        "as CSV: one row per gene and comparison, the columns of\n"
        "model.differential_expression (proba_de, lfc_mean, ... in change and group modes).",
        epilog=_DE_EXAMPLES,
        formatter_class=raw,
    )
    de.add_argument("model_dir", help="model folder written by `scvae fit --model-dir`")
    de.add_argument(
        "input",
        help="the cells: an .h5ad with the --groupby column in obs (e.g. the output of "
        "`scvae fit`, with its leiden clusters)",
    )
    de.add_argument("-o", "--output", required=True, metavar="OUT.csv", help="output file")
    de.add_argument("--groupby", required=True, metavar="KEY", help="obs column with the groups")
    de.add_argument(
        "--mode",
        choices=("vanilla", "change", "group"),
        default="vanilla",
        help="vanilla: P(rho1 > rho2); change: max(P(lfc >= delta), P(lfc <= -delta)) of the "
        "log2 fold change over pairs of cells; group: the same for the groups' mean expression "
        "(default: vanilla)",
    )
    de.add_argument(
        "--delta", type=float, default=0.25, help="change, group: log2 FC threshold (0.25)"
    )
    de.add_argument(
        "--fdr-target", type=float, default=0.05, help="change, group: target FDR (0.05)"
    )
    de.add_argument(
        "--batch-correction", action="store_true", help="decode cells under every batch"
    )
    de.add_argument(
        "--n-samples-overall",
        type=int,
        default=5000,
        metavar="N",
        help="cells sampled per group (5000)",
    )
    _add_common(de)
    de.set_defaults(func=_de, flags=_command_flags(de))
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled PBMC data",
        description="Train on scanpy's bundled 700 PBMCs, cluster the latent with scanpy and "
        "write an h5ad, the model and UMAP PNGs.",
    )
    demo.add_argument(
        "--out",
        default="scvae_demo",
        help="output folder (default: scvae_demo); the files the demo writes there "
        f"({', '.join(_plot_names(_DEMO_COLORS))}, {_DEMO_H5AD}, model/) replace those of an "
        "earlier run; nothing else in it is touched",
    )
    demo.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="training epochs (default: chosen from the data size, as scvi-tools)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo, flags=_command_flags(demo))
    return parser


def _warning_line(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command: ``scvae COMMAND: warning: message``, one line
    on stderr (the category named unless it is a plain UserWarning)."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        text = " ".join(str(message).split())
        print(f"scvae {command}: warning: {kind}{text}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scvae`` command; returns the exit code.

    Parameters
    ----------
    argv
        The command's arguments (None: ``sys.argv[1:]``).

    Returns
    -------
    0 on success; 2 for bad input or an unwritable path, named on stderr; 1 when training
    diverged; 130 when interrupted.

    Examples
    --------
    >>> main(["demo", "--max-epochs", "0"])
    2
    """
    from scvae.distributed import _sigterm_as_exit
    from scvae.train import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(err: BaseException | str) -> None:
        message = " ".join(str(err).split())  # one line
        if not isinstance(err, CLIError | str):  # scvae's own message names Python options
            paths = [getattr(args, k, None) for k in _PATH_ARGUMENTS]
            message = _as_flags(message, args.command, args.flags, [p for p in paths if p])
        print(f"scvae {args.command}: error: {message}", file=sys.stderr)

    try:
        if getattr(args, "max_epochs", None) is not None and args.max_epochs < 1:
            raise CLIError(f"--max-epochs must be at least 1, got {args.max_epochs}")
        if not 0 <= args.seed < 2**32:  # numpy's and scanpy's random states take no more
            raise CLIError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
        # a warning is one line naming the command, as an error is, not Python's "file:line:"
        # (the first frame outside scvae is runpy's or the console script's, no help here)
        with _sigterm_as_exit(), warnings.catch_warnings():  # SIGTERM unwinds, so
            warnings.showwarning = _warning_line(args.command)  # half-written files go
            args.func(args)
    except (CLIError, ValueError, OSError) as err:
        # scvae's own bad-input errors (unreadable data, unknown key or layer, not raw counts,
        # options out of range, damaged model directory) are ValueErrors naming the problem.
        fail(err)
        return 2
    except TrainingDiverged as err:
        fail(err)
        return 1
    except KeyboardInterrupt:
        fail("interrupted (outputs are written whole or not at all)")
        return 130
    except SystemExit as err:
        if err.code == 128 + signal.SIGTERM:  # a scheduler's timeout: temporary files removed
            fail("terminated by SIGTERM (outputs are written whole or not at all)")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
