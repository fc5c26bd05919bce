"""``differential_expression`` of a model: the AnnData glue of :mod:`scvae.de`.

Cell sets from ``obs``, the registered counts checked in blocks and the expression query of
the model; :mod:`scvae.de` does the rest on numpy arrays. Bound in :class:`scvae.SCVAE`'s
class body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from scvae import _checks, _rng, de, de_group
from scvae._settings import settings
from scvae.queries import _untrained_warned, _warn_if_untrained

# Posterior samples of z averaged per cell in mode="group" (rho, likelihood parameters).
GROUP_POSTERIOR_SAMPLES = 10

if TYPE_CHECKING:
    from scvae.model import SCVAE


def differential_expression(
    model: SCVAE,
    adata: ad.AnnData | None = None,
    *,
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: Sequence[int] | Sequence[bool] | np.ndarray | str | None = None,
    idx2: Sequence[int] | Sequence[bool] | np.ndarray | str | None = None,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    fdr_target: float | Sequence[float] = 0.05,
    batch_correction: bool = False,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    test_mode: str = "three",
    batch_size: int | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """scVI's Bayesian differential expression, as in scvi-tools, in bounded memory.

    Cells are sampled first (``n_samples_overall`` per group, with replacement), then one
    posterior sample of rho is drawn for each sampled cell only, so memory is
    O(n_samples_overall x genes) whatever the number of cells. See :mod:`scvae.de`.

    ``mode="group"`` (scvae's own, not in scvi-tools) asks about the groups' mean expression
    rather than about pairs of cells: the model's mean rho of each group, times a per-gene
    factor fitted to the group's counts with the model's likelihood as offset, and an
    empirical-Bayes prior shared by the genes (:mod:`scvae.de_group`). Its posterior
    expected FDR holds on known truth and its power grows with the number of cells, where
    change mode's does not (benchmarks/README.md).

    Parameters
    ----------
    adata
        Cells (default: the registered AnnData).
    groupby, group1, group2
        Column of ``obs``; each of ``group1`` (None: every group, one-vs-rest) is compared
        with ``group2`` (None: all other cells, "Rest").
    idx1, idx2
        Instead of groups (not with ``groupby``, ``group1``, ``group2``): two cell sets
        (boolean masks, integer positions, negative ones counting from the end, or an
        ``obs.eval`` query string, where a missing value selects no cell, as in
        ``obs.query``); without ``idx2``, ``idx1`` against all other cells.
    mode
        "vanilla" (P(rho1 > rho2)), "change" (P(|LFC| >= delta) over pairs of cells) or
        "group" (P(|LFC| >= delta) of the groups' mean expression).
    delta, test_mode, pseudocounts
        Change and group modes: the LFC (log2) threshold (None: estimated per comparison
        from the genes' mean LFC, as scvi-tools does; the ``delta`` column holds the value
        used); "three" (up or down, the larger) or "two" (either). Change mode: the
        pseudocount (None: estimated from lowly expressed genes).
    fdr_target
        Change and group modes: a column ``is_de_fdr_<t>`` per target (posterior expected
        FDR).
    batch_correction
        Decode every sampled cell under each registered batch (``n_samples_overall``
        split over them, pairs matched by batch) instead of under its own batch; group
        mode: rho averaged over the batches (the count factor stays under each cell's own).
    n_samples_overall
        Cells sampled per group (group mode: at most this many, without replacement).
    batch_size, seed
        Cells per chunk of the expression query; seed of the sampling, 0 to 2**32 - 1
        (None: ``scvae.settings.seed``). The same seed gives the same result only with the
        same chunk size (None: ``scvae.settings.inference_batch_size``): the cells are
        drawn chunk by chunk, as in scvi-tools.

    Returns
    -------
    DataFrame indexed by gene, one block of rows per comparison. Vanilla: ``proba_m1``
    (P(rho1 > rho2)), ``proba_m2``, ``bayes_factor`` (log odds, saturating near +-18.4).
    Change: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``pseudocounts``,
    ``delta``, ``lfc_mean/median/std/min/max`` (log2, group1 over group2),
    ``is_de_fdr_<t>``. Group: ``proba_de``, ``proba_not_de``, ``bayes_factor``,
    ``lfc_mean`` and ``lfc_std`` (posterior, after the empirical-Bayes shrinkage),
    ``lfc_estimate`` and ``lfc_se`` (before it), ``delta``, ``is_de_fdr_<t>``, and
    ``scale1``/``scale2`` (each group's estimated mean expression). All: ``scale1``/``scale2``
    (vanilla and change: mean sampled rho), ``raw_mean1/2``,
    ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2`` (counts per 10,000),
    ``comparison`` ("A vs B", "A vs Rest"), ``group1``, ``group2``. Sorted within each
    comparison: vanilla by ``bayes_factor``, ties by ``log2(scale1 / scale2)``; change by
    ``proba_de``, ties by ``|lfc_mean|``; group by ``proba_de`` rounded to 6 decimals, ties
    by ``|lfc_mean|``; all decreasing. No p-values: the tests have none.
    Vanilla and change rank how often a cell of group 1 exceeds one of group 2, so a marker shared
    with a type in "Rest" ranks low; for marker lists, keep the genes of ``is_de_fdr_<t>``
    with ``lfc_mean > 0`` and sort them by ``lfc_mean - lfc_std`` (benchmarks/README.md).

    Warns (``UserWarning``) on a model that has not been trained, as
    ``get_latent_representation`` does: its encoder is random, so is the result.

    Examples
    --------
    >>> import scvae
    >>> model = scvae.SCVAE(scvae.data.simulate(120, 20, seed=0))
    >>> model.train(max_epochs=2, progress_bar=False)
    >>> de = model.differential_expression(groupby="cell_type", n_samples_overall=50)
    >>> de["comparison"].unique().tolist()
    ['type0 vs Rest', 'type1 vs Rest', 'type2 vs Rest']
    """
    _warn_if_untrained(model, "differential_expression")  # as the latent query: a random encoder
    if adata is None:
        adata = model.registry_adata()
    else:
        _checks.anndata(
            "adata", adata, hint=" To compare cells of the model's AnnData, pass idx1=/idx2=."
        )
    if groupby is not None and not isinstance(groupby, str):
        raise TypeError(f"groupby must be the name of a column of adata.obs, got {groupby!r}.")
    if adata.isbacked and adata.is_view:  # its cells cannot be subset again (anndata)
        raise ValueError(
            "This AnnData is a view of a backed AnnData, whose cells anndata cannot subset "
            "again. Pass the whole backed AnnData with the cells to compare as idx1= / idx2= "
            "(boolean masks; read in blocks), or load the view with .to_memory()."
        )
    model.registry.check(adata[:1])  # genes and obs keys; the counts are checked in blocks
    masks = [_obs_query(adata, i, name) for i, name in ((idx1, "idx1"), (idx2, "idx2"))]
    if groupby is not None and groupby not in adata.obs:
        raise ValueError(f"groupby {groupby!r} is not a column of adata.obs.")
    comparisons = de.define_comparisons(
        adata.n_obs,
        labels=None if groupby is None else adata.obs[groupby],
        groupby=groupby or "groupby",
        group1=group1,
        group2=group2,
        idx1=masks[0],
        idx2=masks[1],
    )
    if not isinstance(batch_correction, bool | np.bool_):
        raise ValueError(f"batch_correction must be True or False, got {batch_correction!r}.")
    seed = _checks.seed("seed", seed, none=True)
    options = de.DEOptions(mode, delta, fdr_target, n_samples_overall, pseudocounts, test_mode)
    batches = model.registry.batch_categories
    codes = list(range(len(batches))) if batch_correction else [None]

    def expression(cells: np.ndarray, code: int | None) -> np.ndarray:
        # a view of the sampled cells only: validation and chunks never touch the rest
        unique, position = np.unique(cells, return_inverse=True)
        return model.get_normalized_expression(
            adata[unique],
            position,
            transform_batch=None if code is None else batches[code],
            return_numpy=True,
            batch_size=batch_size,
        )

    config = model.module.config
    fixed_library = config.use_observed_lib_size or config.use_size_factor
    corrected = batch_correction and len(batches) > 1

    def group_inputs(cells: np.ndarray) -> de_group.GroupInputs:
        # mode="group": the subsampled cells of one side, never more
        sub = adata[cells]
        counts = model.registry.check(sub).toarray()
        params = model.get_likelihood_parameters(
            sub, n_samples=GROUP_POSTERIOR_SAMPLES, give_mean=True, batch_size=batch_size
        )
        mean = params.pop("mean").astype(np.float64)
        if fixed_library and not corrected:
            # the library is the same in every sample: the mean is library x mean rho
            library = model.get_latent_library_size(sub, batch_size=batch_size)
            rho = mean / np.asarray(library, dtype=np.float64).reshape(-1, 1)
        else:
            rho = model.get_normalized_expression(
                sub,
                transform_batch=list(batches) if corrected else None,
                n_samples=GROUP_POSTERIOR_SAMPLES,
                return_mean=True,
                return_numpy=True,
                batch_size=batch_size,
            )
        theta = params.get("dispersions")
        weight = None
        if "dropout" in params:
            dropout = params.pop("dropout")
            weight = np.empty_like(mean)
            # in blocks of genes: the float64 temporaries of the whole matrix were most of
            # group mode's memory (about 100 bytes per sampled cell and gene in all)
            for cols in de_group.gene_blocks(*mean.shape):
                pi, mu = dropout[:, cols].astype(np.float64), mean[:, cols]
                if theta is None:
                    nb_zero = np.exp(-mu)
                else:
                    th = theta[:, cols].astype(np.float64)
                    nb_zero = np.exp(th * (np.log(th) - np.log(th + mu)))
                weight[:, cols] = (1.0 - pi) * nb_zero / (pi + (1.0 - pi) * nb_zero)
        return de_group.GroupInputs(rho, counts, mean, theta, weight)

    count_blocks = model.registry.check_blocks(adata)

    seed = settings.seed if seed is None else seed
    # the CPU's and the model device's generators seeded; every caller's generator put back
    with _rng.seeded(seed, model.device), _untrained_warned():  # warned once, above
        return de.run(
            comparisons,
            count_blocks,
            expression,
            batch_codes=codes,
            gene_names=list(model.var_names),
            options=options,
            rng=np.random.default_rng(seed),
            group_inputs=group_inputs,
        )


def _obs_query(adata: ad.AnnData, selection: object, name: str) -> object:
    """A string selection evaluated on ``adata.obs`` (as scvi-tools' ``idx1="..."``), the
    others as they are; an expression pandas cannot evaluate is named with the columns."""
    if not isinstance(selection, str):
        return selection
    try:
        result = adata.obs.eval(selection)
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds here
        columns = ", ".join(map(repr, adata.obs.columns[:20]))
        raise ValueError(
            f"{name}={selection!r} could not be evaluated on adata.obs ({type(err).__name__}: "
            f"{err}); it must be a pandas query of obs columns (columns: {columns}), e.g. "
            "\"cell_type == 'B'\"."
        ) from None
    if isinstance(result, pd.Series) and result.dtype == "boolean":
        result = result.fillna(False)  # as obs.query: a missing value is not selected
    return np.asarray(result)
