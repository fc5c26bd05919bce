"""Plots scanpy does not have: the training history and a volcano plot of a DE table.

Everything else (UMAPs, dot plots, rank_genes_groups) goes through scanpy's own ``sc.pl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scvae.model import SCVAE


def history(
    model: SCVAE,
    *,
    keys: tuple[str, ...] = ("elbo_train", "elbo_validation"),
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Plot the per-epoch training history (by default the train and validation ELBO).

    The values are those of ``model.history``: ``elbo_*`` is the negative ELBO per cell
    (scvi-tools' convention), so the curves fall as the model learns.

    Parameters
    ----------
    model
        A trained model.
    keys
        Columns of ``model.history`` to draw (missing ones are skipped).
    ax
        Axes to draw into (a new figure when None).
    show
        Call ``plt.show()`` (None: only when no ``ax`` was given and matplotlib is
        interactive).

    Returns
    -------
    The matplotlib Axes.

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
    present = [k for k in keys if k in model.history]
    if not present:
        raise ValueError(f"None of {list(keys)} is in model.history ({list(model.history)}).")
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
    if show or (show is None and own_figure and plt.isinteractive()):
        plt.show()
    return ax


def volcano(
    de: pd.DataFrame,
    *,
    x: str | None = None,
    y: str | None = None,
    comparison: str | None = None,
    n_labels: int = 10,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Volcano plot of a differential-expression table from ``model.differential_expression``.

    Parameters
    ----------
    de
        The DE DataFrame (genes as index).
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

    Returns
    -------
    The matplotlib Axes.

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
    if "comparison" in table and table["comparison"].nunique() > 1:
        if comparison is None:
            raise ValueError(
                "The table holds several comparisons "
                f"({', '.join(map(str, table['comparison'].unique()[:5]))}); pass comparison=."
            )
    if comparison is not None:
        table = table[table["comparison"] == comparison]
        if table.empty:
            raise ValueError(f"No rows with comparison == {comparison!r}.")
    if y is None:
        y = "proba_de" if "proba_de" in table else "bayes_factor"
    if x is None and "lfc_mean" not in table and {"scale1", "scale2"} <= set(table):
        x = "log2(scale1 / scale2)"  # vanilla mode has no LFC column
        table = table.assign(**{x: np.log2(table["scale1"]) - np.log2(table["scale2"])})
    x = "lfc_mean" if x is None else x
    for col in (x, y):
        if col not in table:
            raise ValueError(f"Column {col!r} is not in the DE table ({list(table.columns)}).")
    yv = table[y].abs() if y == "bayes_factor" else table[y]
    own_figure = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(table[x], yv, s=6, c="0.5", alpha=0.6, linewidths=0)
    order = np.lexsort((-table[x].abs().to_numpy(), -yv.to_numpy()))[:n_labels]
    top = table.iloc[order]
    ax.scatter(top[x], yv.iloc[order], s=12, c="tab:red")
    for gene, xi, yi in zip(top.index, top[x], yv.iloc[order], strict=True):
        ax.annotate(str(gene), (xi, yi), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(
        xlabel=x,
        ylabel=f"|{y}|" if y == "bayes_factor" else y,
        title=comparison or "differential expression",
    )
    if show or (show is None and own_figure and plt.isinteractive()):
        plt.show()
    return ax
