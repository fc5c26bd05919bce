"""scanpy-style functions: ``scvae.tl.differential_expression`` writes ``uns`` as scanpy does.

Examples
--------
>>> import scvae
>>> adata = scvae.data.simulate(150, 20, seed=0)
>>> model = scvae.SCVAE(adata)
>>> _ = scvae.tl.differential_expression(adata, model, groupby="cell_type",
...                                      n_samples_overall=50)
>>> adata.uns["rank_genes_groups"]["names"].dtype.names
('type0', 'type1', 'type2')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad

    from scvae.model import SCVAE


def differential_expression(
    adata: ad.AnnData,
    model: SCVAE,
    *,
    groupby: str,
    groups: str | Sequence[str] | None = None,
    reference: str = "rest",
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    batch_correction: bool = False,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    test_mode: Literal["three", "two"] = "three",
    key_added: str = "rank_genes_groups",
    seed: int | None = None,
) -> pd.DataFrame:
    """scVI's differential expression of each group, stored where scanpy's plots read it.

    Runs :meth:`scvae.SCVAE.differential_expression` (each group against the rest, or against
    ``reference``) and writes ``adata.uns[key_added]`` in the structure of
    ``sc.tl.rank_genes_groups``, so that ``sc.get.rank_genes_groups_df``,
    ``sc.pl.rank_genes_groups`` and ``sc.pl.rank_genes_groups_dotplot`` (and the other
    ``rank_genes_groups_*`` plots) work on it.

    Parameters
    ----------
    adata
        The cells (registered with ``model`` or compatible with it).
    model
        A trained :class:`scvae.SCVAE`.
    groupby
        Column of ``adata.obs`` with the groups.
    groups
        Groups to test (None: all but the reference).
    reference
        "rest" (all other cells) or a group to compare every group with.
    mode, delta, fdr_target, batch_correction, n_samples_overall, pseudocounts, test_mode, seed
        As in :meth:`scvae.SCVAE.differential_expression`.
    key_added
        Key of ``adata.uns``.

    Returns
    -------
    The full DE table (all columns of :meth:`scvae.SCVAE.differential_expression`).

    Notes
    -----
    ``uns[key_added]`` holds ``params`` (``groupby``, ``reference``, ``method`` =
    ``"scvae_vanilla"`` or ``"scvae_change"``, ``use_raw=False``, ``corr_method="none"``, and
    the test's options), then per group, genes ranked by score:

    - ``names``;
    - ``scores``: vanilla, the ``bayes_factor`` (log odds of P(rho1 > rho2): positive when higher
      in the group); change, ``sign(lfc_mean) * proba_de`` (near +1 confidently up, near -1
      confidently down, near 0 not DE). Ties are broken by ``logfoldchanges``;
    - ``logfoldchanges``: log2, group over reference: vanilla, ``log2(scale1 / scale2)`` (mean
      sampled rho); change, ``lfc_mean``;
    - ``pvals`` and ``pvals_adj``: all NaN. scVI's test has no p-values; the fields exist only
      because ``sc.get.rank_genes_groups_df`` reads them. Use ``proba_de`` and
      ``is_de_fdr_<t>`` of the returned table instead;
    - ``pts`` (and ``pts_rest`` with ``reference="rest"``): the fraction of cells with a
      non-zero count, genes x groups, as ``rank_genes_groups(pts=True)`` writes them.

    Examples
    --------
    >>> import scanpy as sc, scvae
    >>> adata = scvae.data.simulate(150, 20, seed=0)
    >>> model = scvae.SCVAE(adata)
    >>> table = scvae.tl.differential_expression(adata, model, groupby="cell_type",
    ...                                          mode="change", n_samples_overall=50)
    >>> sc.get.rank_genes_groups_df(adata, "type0").columns.tolist()[:3]
    ['names', 'scores', 'logfoldchanges']
    """
    if groupby not in adata.obs:
        raise ValueError(f"groupby {groupby!r} is not a column of adata.obs.")
    labels = adata.obs[groupby].astype("category")
    present = [str(c) for c in labels.cat.categories if (labels == c).any()]
    if reference != "rest" and reference not in present:
        raise ValueError(f"reference {reference!r} is not a group of {groupby!r} ({present}).")
    if groups is None:
        chosen = [g for g in present if g != reference]
    else:
        chosen = [groups] if isinstance(groups, str) else [str(g) for g in groups]
    table = model.differential_expression(
        adata,
        groupby=groupby,
        group1=chosen,
        group2=None if reference == "rest" else reference,
        mode=mode,
        delta=delta,
        fdr_target=fdr_target,
        batch_correction=batch_correction,
        n_samples_overall=n_samples_overall,
        pseudocounts=pseudocounts,
        test_mode=test_mode,
        seed=seed,
    )
    adata.uns[key_added] = _rank_genes_groups_uns(table, chosen, adata.var_names, mode)
    adata.uns[key_added]["params"] = {
        "groupby": groupby,
        "reference": reference,
        "method": f"scvae_{mode}",
        "use_raw": False,
        "corr_method": "none",
        "mode": mode,
        "delta": float(delta),
        "fdr_target": float(fdr_target),
        "batch_correction": bool(batch_correction),
        "n_samples_overall": int(n_samples_overall),
    }
    if reference != "rest":
        del adata.uns[key_added]["pts_rest"]
    return table


def _rank_genes_groups_uns(
    table: pd.DataFrame, groups: list[str], var_names: pd.Index, mode: str
) -> dict:
    """scanpy's ``rank_genes_groups`` fields from the DE table, one column per group."""
    fields: dict[str, list[np.ndarray]] = {"names": [], "scores": [], "logfoldchanges": []}
    pts, pts_rest = {}, {}
    for g in groups:
        block = table[table["group1"] == g]
        if mode == "vanilla":
            scores = block["bayes_factor"].to_numpy()
            lfc = np.log2(block["scale1"].to_numpy()) - np.log2(block["scale2"].to_numpy())
        else:
            lfc = block["lfc_mean"].to_numpy()
            scores = np.sign(lfc) * block["proba_de"].to_numpy()
        order = np.lexsort((-lfc, -scores))
        fields["names"].append(block.index.to_numpy(dtype=object)[order])
        fields["scores"].append(scores[order].astype(np.float32))
        fields["logfoldchanges"].append(lfc[order].astype(np.float32))
        pts[g] = block["non_zeros_proportion1"].reindex(var_names).to_numpy()
        pts_rest[g] = block["non_zeros_proportion2"].reindex(var_names).to_numpy()
    out: dict = {}
    for key, arrays in fields.items():
        dtype = object if key == "names" else np.float32
        out[key] = np.rec.fromarrays(arrays, dtype=[(g, dtype) for g in groups])
    nan = [np.full(len(a), np.nan) for a in fields["scores"]]
    out["pvals"] = np.rec.fromarrays(nan, dtype=[(g, np.float64) for g in groups])
    out["pvals_adj"] = np.rec.fromarrays(nan, dtype=[(g, np.float64) for g in groups])
    out["pts"] = pd.DataFrame(pts, index=var_names)
    out["pts_rest"] = pd.DataFrame(pts_rest, index=var_names)
    return out
