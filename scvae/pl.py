"""Plots scanpy does not have: the training history and a volcano plot of a DE table.

Everything else (UMAPs, dot plots, rank_genes_groups) goes through scanpy's own ``sc.pl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scvae.model import SCVAE

HISTORY_KEYS = ("elbo_train", "elbo_validation")


# Fewer epochs than this: each epoch's value gets a marker (one epoch is a single point,
# which a line alone does not draw).
MARKER_EPOCHS = 20


def _save_or_show(
    ax: Axes, writekey: str, save: bool | str | None, show: bool | None
) -> Axes | None:
    """scanpy's ``save``/``show`` by scanpy's own helper (``savefig_or_show``), and its return.

    ``save=True`` writes ``{figdir}/{writekey}{plot_suffix}.{file_format_figs}``; a string is
    appended to the name (an ending ".png", ".pdf" or ".svg" picks the format); None follows
    ``sc.settings.autosave``. ``show=None`` follows ``sc.settings.autoshow`` (True unless
    changed). A saved figure is closed. As scanpy's plots: None when shown, else the Axes.
    """
    import matplotlib.pyplot as plt
    import scanpy as sc
    from scanpy.plotting._utils import savefig_or_show

    figure = ax.figure.figure  # the root figure, also for Axes in a SubFigure
    saving = bool(sc.settings.autosave if save is None else save)
    if figure.canvas.manager is None:  # not made through pyplot: scanpy cannot save it
        if saving:
            raise ValueError(
                "save= needs a figure made through pyplot (plt.subplots or plt.figure); this "
                "Axes belongs to a Figure pyplot does not manage. Save it yourself with "
                "fig.savefig(path), and pass save=False."
            )
    else:
        plt.figure(figure)  # scanpy saves and closes the current figure: make it this one
    savefig_or_show(writekey, show=show, save=save)
    shown = sc.settings.autoshow if show is None else show
    return None if shown else ax


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
    (scvi-tools' convention), so the curves fall as the model learns. With fewer than
    ``MARKER_EPOCHS`` (20) epochs each epoch is drawn as a marker too, so that a single epoch
    shows.

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
        Show the figure (``plt.show()``), as scanpy's plots do; None: ``sc.settings.autoshow``
        (True unless changed), also with ``ax=``. Pass ``show=False`` to get the Axes back,
        e.g. to draw more into the figure.
    save
        As in scanpy (its own ``savefig_or_show`` saves): True writes
        ``{sc.settings.figdir}/scvae_history{sc.settings.plot_suffix}.{file_format_figs}``; a
        string is appended to that name (e.g. "_run1"; an ending ".png", ".pdf" or ".svg"
        picks the format); None: ``sc.settings.autosave``. A saved figure is closed.

    Returns
    -------
    As scanpy's plots: None when the figure was shown (``show=True``, or None with scanpy's
    ``autoshow``), else the matplotlib Axes.

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

    from scvae.model import SCVAE

    if not isinstance(model, SCVAE):
        raise TypeError(
            f"scvae.pl.history takes the model (scvae.pl.history(model)), got "
            f"{type(model).__name__}."
        )
    if model.history.empty:
        raise ValueError("The model has no training history yet; call model.train() first.")
    keys = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in keys if k not in model.history]
    if missing and (tuple(keys) != HISTORY_KEYS or missing != ["elbo_validation"]):
        raise ValueError(f"{missing} not in model.history (columns: {list(model.history)}).")
    present = [k for k in keys if k in model.history]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    marker = "o" if len(model.history) < MARKER_EPOCHS else None
    for key in present:
        ax.plot(model.history.index, model.history[key], label=key, marker=marker, markersize=4)
    ax.set(
        xlabel="epoch",
        ylabel="negative ELBO per cell" if all(k.startswith("elbo") for k in present) else "value",
        title="scvae training history",
    )
    ax.legend()
    return _save_or_show(ax, "scvae_history", save, show)


def _one_of(table: pd.DataFrame, column: str, value: str | None, plural: str) -> pd.DataFrame:
    """The rows of ``table`` with ``column == value`` (``value`` is the parameter of the same
    name); refuses a table holding several values of ``column`` when ``value`` is None."""
    if value is not None and column not in table:
        raise ValueError(f"The table has no {column!r} column (one {column}): drop {column}=.")
    present = table[column].astype(str).unique().tolist() if column in table else []
    listed = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
    if len(present) > 1 and value is None:
        raise ValueError(f"The table holds several {plural} ({listed}); pass {column}=.")
    if value is None:
        return table
    rows = table[table[column].astype(str) == str(value)]
    if rows.empty:
        raise ValueError(f"No rows with {column} == {value!r}; the table's {plural}: {listed}.")
    return rows


def volcano(
    de: pd.DataFrame,
    *,
    x: str | None = None,
    y: str | None = None,
    comparison: str | None = None,
    group: str | None = None,
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
        Restrict to one value of the ``comparison`` column of scvae's tables (needed when the
        table holds several, as one-vs-rest tables do), e.g. ``"B cells vs Rest"``.
    group
        Restrict to one value of the ``group`` column of scanpy's tables (needed when the
        table holds several, as ``sc.get.rank_genes_groups_df(adata, None)`` gives it), e.g.
        ``"0"``: the same name as ``sc.get.rank_genes_groups_df``'s ``group``.
    n_labels
        Label the genes with the largest ``y`` (ties by ``|x|``).
    ax, show
        As in :func:`history`.
    save
        As in :func:`history`; the file is named ``scvae_volcano``.

    Returns
    -------
    As scanpy's plots: None when the figure was shown, else the matplotlib Axes.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> table = pd.DataFrame({"lfc_mean": [2.0, -1.5, 0.1], "proba_de": [0.99, 0.95, 0.2],
    ...                       "comparison": "A vs B"}, index=["g1", "g2", "g3"])
    >>> volcano(table, show=False).get_ylabel()
    'proba_de'
    >>> every_group = pd.DataFrame({"group": ["0", "0", "1"], "names": ["g1", "g2", "g1"],
    ...                             "logfoldchanges": [2.0, -1.0, 0.5], "scores": [9.0, 4.0, 1.0]})
    >>> volcano(every_group, group="0", x="logfoldchanges", y="scores", show=False).get_title()
    '0'
    """
    import matplotlib.pyplot as plt

    if not isinstance(de, pd.DataFrame):
        raise TypeError(
            "scvae.pl.volcano takes a DE table (a DataFrame from model.differential_expression "
            f"or sc.get.rank_genes_groups_df), got {type(de).__name__}."
        )
    if isinstance(n_labels, bool) or not isinstance(n_labels, int | np.integer) or n_labels < 0:
        raise ValueError(f"n_labels must be a whole number >= 0, got {n_labels!r}.")
    table = _one_of(de, "comparison", comparison, "comparisons")
    table = _one_of(table, "group", group, "groups")
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
        title=comparison or group or "differential expression",
    )
    return _save_or_show(ax, "scvae_volcano", save, show)
