"""Plots scanpy does not have: the training history and a volcano plot of a DE table.

Everything else (UMAPs, dot plots, rank_genes_groups) goes through scanpy's own ``sc.pl``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scvae.model import SCVAE

HISTORY_KEYS = ("elbo_train", "elbo_validation")


def _save_or_show(ax: Axes, name: str, save: bool | str | None, show: bool | None, own: bool):
    """scanpy's ``save``/``show``: ``save=True`` writes ``{figdir}/{name}.{format}``, a string
    ``{figdir}/{name}{save}`` (e.g. "_run1.png"); the Axes are returned unless the figure was
    shown (``show=True``, or None with a new figure in an interactive session)."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    if save:
        suffix = "" if save is True else str(save)
        if not os.path.splitext(f"x{suffix}")[1]:  # no extension given: scanpy's format
            suffix += f".{sc.settings.file_format_figs}"
        path = Path(sc.settings.figdir) / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(path, bbox_inches="tight")  # matplotlib's savefig.dpi, as scanpy
    if show or (show is None and own and plt.isinteractive()):
        plt.show()
        return None
    return ax


def history(
    model: SCVAE,
    *,
    keys: str | Sequence[str] = HISTORY_KEYS,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Plot the per-epoch training history (by default the train and validation ELBO).

    The values are those of ``model.history``: ``elbo_*`` is the negative ELBO per cell
    (scvi-tools' convention), so the curves fall as the model learns.

    Parameters
    ----------
    model
        A trained model.
    keys
        A column of ``model.history`` or several to draw (of the default pair, a missing
        ``elbo_validation`` is skipped: no validation cells).
    ax
        Axes to draw into (a new figure when None).
    show
        Call ``plt.show()`` (None: only when no ``ax`` was given and matplotlib is
        interactive).
    save
        As in scanpy: True writes ``{sc.settings.figdir}/scvae_history.{format}``, a string is
        appended to that name (e.g. "_run1.png").

    Returns
    -------
    The matplotlib Axes; None when the figure was shown (as scanpy's plots).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(100, 20, seed=0))
    >>> model.train(max_epochs=3, progress_bar=False)
    >>> ax = scvae.pl.history(model, show=False)
    >>> ax.get_xlabel()
    'epoch'
    """
    import matplotlib.pyplot as plt

    if model.history.empty:
        raise ValueError("The model has no training history yet; call model.train() first.")
    keys = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in keys if k not in model.history]
    if missing and (tuple(keys) != HISTORY_KEYS or missing != ["elbo_validation"]):
        raise ValueError(f"{missing} not in model.history (columns: {list(model.history)}).")
    present = [k for k in keys if k in model.history]
    own_figure = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for key in present:
        ax.plot(model.history.index, model.history[key], label=key)
    ax.set(
        xlabel="epoch",
        ylabel="negative ELBO per cell" if all(k.startswith("elbo") for k in present) else "value",
        title="scvae training history",
    )
    ax.legend()
    return _save_or_show(ax, "scvae_history", save, show, own_figure)


def volcano(
    de: pd.DataFrame,
    *,
    x: str | None = None,
    y: str | None = None,
    comparison: str | None = None,
    n_labels: int = 10,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Volcano plot of a differential-expression table from ``model.differential_expression``.

    Parameters
    ----------
    de
        The DE DataFrame (genes as index; or, as ``sc.get.rank_genes_groups_df`` gives, in a
        ``names`` column, with ``x="logfoldchanges", y="scores"``).
    x
        Column for the horizontal axis; None: the posterior mean log2 fold change
        ``lfc_mean`` (change and group modes), else (vanilla) ``log2(scale1 / scale2)``.
    y
        Column for the vertical axis; None: ``proba_de`` (change and group modes), else
        (vanilla) the absolute ``bayes_factor``. Neither is a p-value; no -log10 transform is
        applied.
    comparison
        Restrict to one value of the ``comparison`` column (needed when the table holds
        several, as one-vs-rest tables do).
    n_labels
        Label the genes with the largest ``y`` (ties by ``|x|``).
    ax, show
        As in :func:`history`.
    save
        As in :func:`history`; the file is named ``scvae_volcano``.

    Returns
    -------
    The matplotlib Axes; None when the figure was shown.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> table = pd.DataFrame({"lfc_mean": [2.0, -1.5, 0.1], "proba_de": [0.99, 0.95, 0.2],
    ...                       "comparison": "A vs B"}, index=["g1", "g2", "g3"])
    >>> volcano(table, show=False).get_ylabel()
    'proba_de'
    """
    import matplotlib.pyplot as plt

    table = de
    if comparison is not None and "comparison" not in table:
        raise ValueError("The table has no 'comparison' column (one comparison): drop comparison=.")
    present = table["comparison"].unique().tolist() if "comparison" in table else []
    if len(present) > 1 and comparison is None:
        raise ValueError(
            f"The table holds several comparisons ({', '.join(map(str, present[:5]))}"
            f"{', ...' if len(present) > 5 else ''}); pass comparison=."
        )
    if comparison is not None:
        table = table[table["comparison"] == comparison]
        if table.empty:
            raise ValueError(
                f"No rows with comparison == {comparison!r}; the table's comparisons: "
                f"{', '.join(map(str, present[:10]))}{', ...' if len(present) > 10 else ''}."
            )
    if y is None:
        y = "proba_de" if "proba_de" in table else "bayes_factor"
    if x is None and "lfc_mean" not in table and {"scale1", "scale2"} <= set(table):
        x = "log2(scale1 / scale2)"  # vanilla mode has no LFC column
        table = table.assign(**{x: np.log2(table["scale1"]) - np.log2(table["scale2"])})
    x = "lfc_mean" if x is None else x
    for col in (x, y):
        if col not in table:
            hint = (
                " For a table of sc.get.rank_genes_groups_df, pass x='logfoldchanges', y='scores'."
                if "names" in table
                else ""
            )
            raise ValueError(
                f"Column {col!r} is not in the DE table ({list(table.columns)}).{hint}"
            )
    yv = table[y].abs() if y == "bayes_factor" else table[y]
    own_figure = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(table[x], yv, s=6, c="0.5", alpha=0.6, linewidths=0)
    order = np.lexsort((-table[x].abs().to_numpy(), -yv.to_numpy()))[:n_labels]
    top = table.iloc[order]
    ax.scatter(top[x], yv.iloc[order], s=12, c="tab:red")
    genes = top["names"] if "names" in top else top.index  # scanpy's tables: a names column
    for gene, xi, yi in zip(genes, top[x], yv.iloc[order], strict=True):
        ax.annotate(str(gene), (xi, yi), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(
        xlabel=x,
        ylabel=f"|{y}|" if y == "bayes_factor" else y,
        title=comparison or "differential expression",
    )
    return _save_or_show(ax, "scvae_volcano", save, show, own_figure)
