"""scanpy-style functions: adata first, keyword-only options, results written into the AnnData.

- :func:`fit` trains an :class:`scvae.SCVAE`, writes the latent into ``obsm["X_scvae"]`` and
  records what was done in ``uns["scvae"]``;
- :func:`normalized_expression` writes the denoised expression into a layer;
- :func:`differential_expression` writes scVI's DE test where scanpy's
  ``rank_genes_groups`` plots read it.

Examples
--------
>>> import scvae
>>> adata = scvae.data.simulate(150, 20, seed=0)
>>> model = scvae.tl.fit(adata, max_epochs=2, progress_bar=False)
>>> _ = scvae.tl.differential_expression(adata, model, groupby="cell_type",
...                                      n_samples_overall=50)
>>> adata.uns["rank_genes_groups"]["names"].dtype.names
('type0', 'type1', 'type2')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scvae import _checks, _rng
from scvae.de import fdr_target_values
from scvae.train import KL_WARMUP_EPOCHS

if TYPE_CHECKING:
    import anndata as ad

    from scvae.model import SCVAE


def fit(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    allow_non_integer: bool = False,
    key_added: str = "X_scvae",
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    dropout_rate: float = 0.1,
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
    latent_distribution: Literal["normal", "ln"] = "normal",
    use_observed_lib_size: bool = True,
    encode_covariates: bool = False,
    deeply_inject_covariates: bool = True,
    use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both",
    use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none",
    log_variational: bool = True,
    max_epochs: int | None = None,
    batch_size: int = 128,
    train_size: float | None = 0.9,
    early_stopping: bool = False,
    lr: float = 1e-3,
    n_epochs_kl_warmup: int | None = KL_WARMUP_EPOCHS,
    seed: int | None = None,
    device: str = "auto",
    progress_bar: bool | None = None,
    n_processes: int = 1,
    copy: bool = False,
) -> SCVAE | tuple[ad.AnnData, SCVAE]:
    """Train scVI on ``adata`` and write the latent into ``adata.obsm[key_added]``.

    The same as ``model = scvae.SCVAE(adata, ...)``, ``model.train(...)`` and
    ``adata.obsm["X_scvae"] = model.get_latent_representation()``, in one scanpy-style call
    that also records what was done in ``adata.uns["scvae"]``. Then
    ``sc.pp.neighbors(adata, use_rep="X_scvae")``, ``sc.tl.umap``, ``sc.tl.leiden`` as usual.

    Parameters
    ----------
    adata
        Cells x genes of raw counts (in ``X`` or in ``layer``).
    layer
        Layer with the raw counts (None: ``X``).
    batch_key
        Column of ``obs`` with the batch (None: one batch).
    labels_key
        Column of ``obs`` with cell labels (used by ``dispersion="gene-label"``).
    size_factor_key
        Column of ``obs`` with positive size factors used as the library size.
    categorical_covariate_keys, continuous_covariate_keys
        Further columns of ``obs`` that enter the decoder like the batch.
    allow_non_integer
        Accept fractional counts (refused by default).
    key_added
        Key of ``adata.obsm`` for the latent (cells x ``n_latent``).
    n_latent, n_hidden, n_layers, dropout_rate
        Latent dimension, width and depth of the networks, encoder dropout.
    dispersion, gene_likelihood, latent_distribution
        As in :class:`scvae.SCVAE`.
    use_observed_lib_size, encode_covariates, deeply_inject_covariates
        As in :class:`scvae.SCVAE`.
    use_batch_norm, use_layer_norm, log_variational
        As in :class:`scvae.SCVAE`.
    max_epochs
        Passes over the training cells (None: ``min(round(20000 / n_cells * 400), 400)``, as
        scvi-tools).
    batch_size, train_size, early_stopping, lr, n_epochs_kl_warmup, device
        As in :meth:`scvae.SCVAE.train`.
    seed
        Seed of the initial weights, the train/validation split, the minibatch order and the
        sampling, the latent query's included, 0 to 2**32 - 1 (None: ``scvae.settings.seed``);
        the same seed gives the same latent on the CPU, bit for bit (with
        ``latent_distribution="ln"``, whose latent is sampled chunk by chunk, for the same
        ``scvae.settings.inference_batch_size``), and the caller's global generators are left
        as they were.
    progress_bar
        Show a progress bar while training (None: ``scvae.settings.progress_bar``).
    n_processes
        Train in this many new processes (DistributedDataParallel), as in
        :meth:`scvae.SCVAE.train`; under ``torchrun`` leave it at 1.
    copy
        Work on a copy of ``adata`` and return it with the model (scanpy's ``copy``; the
        model is registered with the copy).

    Returns
    -------
    The trained :class:`scvae.SCVAE` (scanpy's ``sc.tl`` functions return None; this one
    returns the model, which DE and expression queries need); with ``copy=True`` the tuple
    ``(adata_copy, model)`` and ``adata`` is left untouched.

    Notes
    -----
    ``adata.uns["scvae"]`` (one record, overwritten by the next ``fit``) holds ``version``
    (scvae's), ``key_added``, ``model`` (the model options passed here; options left at None
    are omitted), ``train`` (the resolved training options, e.g. ``max_epochs`` and ``seed``
    as used), ``n_epochs`` (epochs trained), ``elbo_train`` and ``elbo_validation`` (the
    last row of ``model.history``: the NEGATIVE ELBO per cell, scvi-tools' convention,
    positive and lower is better; no validation value with ``train_size=1``) and
    ``train_seconds``. It is written to h5ad with the AnnData.

    Examples
    --------
    >>> import scvae
    >>> adata = scvae.data.simulate(100, 20, seed=0)
    >>> model = scvae.tl.fit(adata, n_latent=4, max_epochs=3, progress_bar=False)
    >>> adata.obsm["X_scvae"].shape, adata.uns["scvae"]["n_epochs"]
    ((100, 4), 3)
    """
    from scvae import __version__
    from scvae._settings import settings
    from scvae.model import SCVAE

    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string (an obsm key), got {key_added!r}.")
    if _checks.flag("copy", copy):
        if adata.isbacked:  # anndata can copy a backed AnnData only to a new file
            raise ValueError(
                "copy=True cannot copy an AnnData opened in backed mode. Pass copy=False (the "
                "latent goes into adata.obsm, in memory), or load it first: adata.to_memory()."
            )
        adata = adata.copy()
    model_options: dict[str, Any] = {
        "layer": layer,
        "batch_key": batch_key,
        "labels_key": labels_key,
        "size_factor_key": size_factor_key,
        "categorical_covariate_keys": categorical_covariate_keys,
        "continuous_covariate_keys": continuous_covariate_keys,
        "allow_non_integer": allow_non_integer,
        "n_latent": n_latent,
        "n_hidden": n_hidden,
        "n_layers": n_layers,
        "dropout_rate": dropout_rate,
        "dispersion": dispersion,
        "gene_likelihood": gene_likelihood,
        "latent_distribution": latent_distribution,
        "use_observed_lib_size": use_observed_lib_size,
        "encode_covariates": encode_covariates,
        "deeply_inject_covariates": deeply_inject_covariates,
        "use_batch_norm": use_batch_norm,
        "use_layer_norm": use_layer_norm,
        "log_variational": log_variational,
    }
    seed = settings.seed if seed is None else seed  # checked by settings._weights_seed
    # the initial weights from this seed, for this model and thread only: settings.seed is
    # left as it is and the caller's global generators are not seeded (as setting it would)
    with settings._weights_seed(seed):
        model = SCVAE(adata, **model_options)
    model.train(
        max_epochs,
        batch_size=batch_size,
        train_size=train_size,
        early_stopping=early_stopping,
        lr=lr,
        n_epochs_kl_warmup=n_epochs_kl_warmup,
        seed=seed,
        device=device,
        progress_bar=progress_bar,
        n_processes=n_processes,
    )
    # the query samples with latent_distribution="ln": seeded too, so the latent is the
    # seed's, whatever the caller's global generators held, and those are left as they were
    with _rng.seeded(seed, model.device):
        adata.obsm[key_added] = model.get_latent_representation(adata)
    last = model.history.iloc[-1]
    record: dict[str, Any] = {
        "version": __version__,
        "key_added": key_added,
        # the covariate keys as a list of names: a tuple or a pandas Index, which registration
        # accepts, is nothing write_h5ad can hold
        "model": {
            k: [str(name) for name in v] if k.endswith("_keys") else v
            for k, v in model_options.items()
            if v is not None
        },
        "train": {
            k: v for k, v in model.train_config.items() if v is not None and k != "progress_bar"
        },
        "n_epochs": len(model.history),
        "elbo_train": float(last["elbo_train"]),
        "train_seconds": float(model.history["seconds"].sum()),
    }
    if "elbo_validation" in model.history:
        record["elbo_validation"] = float(last["elbo_validation"])
    adata.uns["scvae"] = record
    return (adata, model) if copy else model


def normalized_expression(
    adata: ad.AnnData,
    model: SCVAE,
    *,
    layer_added: str = "scvae_normalized",
    library_size: float | Literal["latent"] = 1e4,
    transform_batch: str | Sequence[str] | None = None,
    n_samples: int = 1,
    batch_size: int | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Write scVI's denoised expression of every cell and gene into ``adata.layers``.

    Runs :meth:`scvae.SCVAE.get_normalized_expression` on ``adata`` and stores the result as
    a dense float32 cells x genes layer (memory: 4 bytes per cell and gene).

    Parameters
    ----------
    adata
        The cells, with the genes of ``model`` in its order (the AnnData it was trained on,
        or one compatible with it).
    model
        A trained :class:`scvae.SCVAE`.
    layer_added
        Key of ``adata.layers``.
    library_size
        A number: rho times it, e.g. the default 1e4 for counts per 10,000 (the scale of
        ``sc.pp.normalize_total(target_sum=1e4)``, so ``sc.pp.log1p`` and the plots read it
        as usual; ``model.get_normalized_expression`` defaults to 1, rho itself);
        ``"latent"``: mu, the expected counts at each cell's own library size.
    transform_batch
        Decode every cell as if it came from this batch (a list: averaged over those
        batches): batch-corrected expression. None: each cell's own batch.
    n_samples
        Posterior samples of z per cell, averaged. z is drawn from q(z | x), as in
        scvi-tools' ``get_normalized_expression``, so the layer is a random draw: set
        ``scvae.settings.seed`` before the call for the same layer every time, and raise
        ``n_samples`` for less noise.
    batch_size
        Cells per chunk (None: ``scvae.settings.inference_batch_size``).
    copy
        Return a copy of ``adata`` with the layer and leave ``adata`` untouched (not for an
        AnnData opened in backed mode, which anndata copies only to a new file; refused
        before any work, as is a view of a backed AnnData, which cannot take a layer).

    Returns
    -------
    None (``adata`` gets the layer), or the copy with ``copy=True``.

    Examples
    --------
    >>> import numpy as np, scvae
    >>> adata = scvae.data.simulate(60, 20, seed=0)
    >>> model = scvae.SCVAE(adata)
    >>> model.train(max_epochs=1, progress_bar=False)
    >>> scvae.tl.normalized_expression(adata, model)
    >>> bool(np.allclose(adata.layers["scvae_normalized"].sum(1), 1e4, rtol=1e-3))
    True
    """
    copy = _checks.flag("copy", copy)
    _adata_and_model(adata, model)
    if not isinstance(layer_added, str) or not layer_added:
        raise ValueError(
            f"layer_added must be a non-empty string (a layers key), got {layer_added!r}."
        )
    if layer_added == model.registry.layer:
        raise ValueError(
            f"layer_added={layer_added!r} is the layer the model reads its counts from: writing "
            "denoised values there would replace the raw counts. Choose another name (default "
            "'scvae_normalized')."
        )
    if adata.isbacked and copy:  # anndata copies a backed AnnData only to a new file
        raise ValueError(
            "copy=True cannot copy an AnnData opened in backed mode. Pass copy=False (the "
            "layer goes into adata.layers, in memory), or load it first: adata.to_memory()."
        )
    if adata.isbacked and adata.is_view:  # a layer set on a view copies it: not when backed
        raise ValueError(
            "This AnnData is a view of a backed AnnData: anndata cannot add a layer to it (it "
            "would copy the view, which it does only to a new file). Pass the whole backed "
            "AnnData (the layer is held in memory), or load the cells first: "
            "view.to_memory()."
        )
    values = model.get_normalized_expression(
        adata,
        transform_batch=transform_batch,
        library_size=library_size,
        n_samples=n_samples,
        return_mean=True,
        return_numpy=True,
        batch_size=batch_size,
    )
    if copy:
        adata = adata.copy()
    adata.layers[layer_added] = np.asarray(values, dtype=np.float32)
    return adata if copy else None


def differential_expression(
    adata: ad.AnnData,
    model: SCVAE,
    *,
    groupby: str,
    groups: str | int | Sequence[str | int] | None = None,
    reference: str | int = "rest",
    mode: Literal["vanilla", "change", "group"] = "vanilla",
    delta: float | None = 0.25,
    fdr_target: float | Sequence[float] = 0.05,
    batch_correction: bool = False,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    test_mode: Literal["three", "two"] = "three",
    key_added: str = "rank_genes_groups",
    batch_size: int | None = None,
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
        Column of ``adata.obs`` with the groups: categorical (without categories that have no
        cells, which scanpy's ``rank_genes_groups`` refuses too) or strings; numeric and
        boolean columns are refused, as scanpy's plots cannot draw them as groups.
    groups
        Groups to test: a name, an integer label or a list of them (None or "all", as in
        scanpy: all but the reference; with ``reference="rest"``, every group, including one
        named "rest").
    reference
        "rest" (all other cells) or a group (its name, or an integer label) to compare every
        other group with; as in scanpy, the reference itself is not tested.
    mode, delta, fdr_target, batch_correction, n_samples_overall, pseudocounts, test_mode
        As in :meth:`scvae.SCVAE.differential_expression`.
    batch_size, seed
        As there: cells per chunk of the expression queries (None:
        ``scvae.settings.inference_batch_size``) and the seed of the sampling. The same seed
        gives the same result only with the same chunk size (both are recorded in
        ``params``).
    key_added
        Key of ``adata.uns``.

    Returns
    -------
    The full DE table (all columns of :meth:`scvae.SCVAE.differential_expression`).

    Notes
    -----
    ``uns[key_added]`` holds ``params`` (``groupby``, ``reference``, ``method`` =
    ``"scvae_vanilla"``, ``"scvae_change"`` or ``"scvae_group"``, ``use_raw=False``,
    ``corr_method="none"``, and the options used: ``mode``, ``delta`` and ``pseudocounts``
    (``"estimated"`` for None), ``fdr_target``, ``batch_correction``,
    ``n_samples_overall``, ``test_mode``, and ``batch_size`` and ``seed`` as resolved from
    ``scvae.settings`` when None; the same call with them on the same model gives the same
    result), then per group, genes ranked by score:

    - ``names``;
    - ``scores``: vanilla, the ``bayes_factor`` (log odds of P(rho1 > rho2): positive when higher
      in the group); change and group, ``sign(lfc_mean) * proba_de`` (near +1 confidently up,
      near -1 confidently down, near 0 not DE). Ties (to 6 decimals) are broken by
      ``logfoldchanges``;
    - ``logfoldchanges``: log2, group over reference: vanilla, ``log2(scale1 / scale2)`` (mean
      sampled rho); change and group, ``lfc_mean``;
    - ``pvals`` and ``pvals_adj``: all NaN. scVI's test has no p-values; the fields exist only
      because ``sc.get.rank_genes_groups_df`` reads them. Use ``proba_de`` and
      ``is_de_fdr_<t>`` of the returned table instead. So scanpy's readers that filter or
      colour by p-value find nothing, with no error: ``sc.get.rank_genes_groups_df(...,
      pval_cutoff=...)`` returns an empty table, ``sc.queries.enrich`` (whose default
      ``pval_cutoff`` is 0.05) sends an empty gene list, ``values_to_plot="pvals_adj"`` or
      ``"log10_pvals_adj"`` draws every gene at p = 1, and ``sc.tl.marker_gene_overlap`` with
      ``adj_pval_threshold`` finds no overlap. Select the genes from the returned table
      instead (e.g. ``table[table["is_de_fdr_0.05"]]``, or ``log2fc_min=`` of
      ``rank_genes_groups_df``);
    - ``pts`` (and ``pts_rest`` with ``reference="rest"``): the fraction of cells with a
      non-zero count, genes x groups (the reference group included), in the groups' order,
      as ``rank_genes_groups(pts=True)`` writes them.

    Examples
    --------
    >>> import scanpy as sc, scvae
    >>> adata = scvae.data.simulate(150, 20, seed=0)
    >>> model = scvae.SCVAE(adata)
    >>> model.train(max_epochs=2, progress_bar=False)
    >>> table = scvae.tl.differential_expression(adata, model, groupby="cell_type",
    ...                                          mode="change", n_samples_overall=50)
    >>> sc.get.rank_genes_groups_df(adata, "type0").columns.tolist()[:3]
    ['names', 'scores', 'logfoldchanges']
    """
    from scvae._settings import settings

    _adata_and_model(adata, model)
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string (a uns key), got {key_added!r}.")
    if groupby not in adata.obs:
        raise ValueError(f"groupby {groupby!r} is not a column of adata.obs.")
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype) and column.dtype.kind in "biuf":
        # bool too: scanpy's dot plots cannot bin a bool column
        kind = "boolean" if column.dtype.kind == "b" else "numeric"
        raise ValueError(
            f"adata.obs[{groupby!r}] is {kind} (dtype {column.dtype}); scanpy's plots of "
            "rank_genes_groups need a categorical column of groups, as sc.tl.rank_genes_groups "
            f"does. Make it one first: adata.obs[{groupby!r}] = adata.obs[{groupby!r}]"
            ".astype(str).astype('category')."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        unused = [str(c) for c in column.cat.categories[~column.cat.categories.isin(column)]]
        if unused:  # scanpy's rank_genes_groups refuses them and its plots fail on them
            raise ValueError(
                f"adata.obs[{groupby!r}] has categories without cells: "
                f"{', '.join(map(repr, unused[:10]))}{', ...' if len(unused) > 10 else ''}. "
                f"Remove them first: adata.obs[{groupby!r}] = "
                f"adata.obs[{groupby!r}].cat.remove_unused_categories()."
            )
    labels = column.astype("category")
    present = [str(c) for c in labels.cat.categories if (labels == c).any()]
    reference = str(reference)
    if reference != "rest" and reference not in present:
        raise ValueError(f"reference {reference!r} is not a group of {groupby!r} ({present}).")
    if groups is None or (isinstance(groups, str) and groups == "all"):  # scanpy's "all"
        chosen = present
    else:
        one = isinstance(groups, str) or not isinstance(groups, Iterable)  # "B", or a label 1
        chosen = [str(groups)] if one else list(dict.fromkeys(str(g) for g in groups))
    if reference != "rest":  # as scanpy: the reference is not tested (a group named "rest" is)
        chosen = [g for g in chosen if g != reference]
    if not chosen:
        raise ValueError(f"No group to test against the reference {reference!r}.")
    # resolved here, so that uns records the values used (the model checks them)
    seed = settings.seed if seed is None else seed
    batch_size = settings.inference_batch_size if batch_size is None else batch_size
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
        batch_size=batch_size,
        seed=seed,
    )
    targets = list(fdr_target_values(fdr_target))  # as the table's columns name them
    result = _rank_genes_groups_uns(table, chosen, adata.var_names, mode)
    result["params"] = {
        "groupby": groupby,
        "reference": reference,
        "method": f"scvae_{mode}",
        "use_raw": False,
        "corr_method": "none",
        "mode": mode,
        "delta": "estimated" if delta is None else float(delta),
        "fdr_target": targets[0] if len(targets) == 1 else targets,
        "batch_correction": bool(batch_correction),
        "n_samples_overall": int(n_samples_overall),
        "pseudocounts": "estimated" if pseudocounts is None else float(pseudocounts),
        "test_mode": str(test_mode),
        "batch_size": int(batch_size),
        "seed": int(seed),
    }
    if reference != "rest":  # as scanpy: the reference's fraction is a column of pts
        result["pts"][reference] = result.pop("pts_rest")[chosen[0]]
        result["pts"] = result["pts"][[g for g in present if g in result["pts"]]]  # their order
    adata.uns[key_added] = result  # only a complete result replaces a previous one
    return table


def _adata_and_model(adata: Any, model: Any) -> None:
    """The AnnData first and a model second, as every ``scvae.tl`` function takes them."""
    from scvae.model import SCVAE

    order = " scvae.tl functions take (adata, model), the AnnData first."
    _checks.anndata("adata", adata, hint=order)
    if not isinstance(model, SCVAE):
        raise TypeError(f"model must be an scvae model, got {type(model).__name__}.{order}")


def _records(arrays: list[np.ndarray], groups: list[str], dtype: Any) -> np.recarray:
    """One field per group, named exactly as the group (a list of (name, type) pairs would
    rename a group "" to "f0", where scanpy's readers look for "")."""
    spec = {"names": groups, "formats": [dtype] * len(groups)}
    return np.rec.fromarrays(arrays, dtype=spec)


def _rank_genes_groups_uns(
    table: pd.DataFrame, groups: list[str], var_names: pd.Index, mode: str
) -> dict:
    """scanpy's ``rank_genes_groups`` fields from the DE table, one column per group."""
    fields: dict[str, list[np.ndarray]] = {"names": [], "scores": [], "logfoldchanges": []}
    pts, pts_rest = {}, {}
    group1 = table["group1"].astype(str)  # the column keeps the labels' own type
    for g in groups:
        block = table[group1 == g]
        if mode == "vanilla":
            scores = block["bayes_factor"].to_numpy()
            lfc = np.log2(block["scale1"].to_numpy()) - np.log2(block["scale2"].to_numpy())
        else:
            lfc = block["lfc_mean"].to_numpy()
            scores = np.sign(lfc) * block["proba_de"].to_numpy()
        # rounded: group mode's closed-form probabilities differ by float noise near 1
        order = np.lexsort((-lfc, -np.round(scores, 6)))
        fields["names"].append(block.index.to_numpy(dtype=object)[order])
        fields["scores"].append(scores[order].astype(np.float32))
        fields["logfoldchanges"].append(lfc[order].astype(np.float32))
        pts[g] = block["non_zeros_proportion1"].reindex(var_names).to_numpy()
        pts_rest[g] = block["non_zeros_proportion2"].reindex(var_names).to_numpy()
    out: dict = {}
    for key, arrays in fields.items():
        dtype = object if key == "names" else np.float32
        out[key] = _records(arrays, groups, dtype)
    nan = [np.full(len(a), np.nan) for a in fields["scores"]]
    out["pvals"] = _records(nan, groups, np.float64)
    out["pvals_adj"] = _records(nan, groups, np.float64)
    out["pts"] = pd.DataFrame(pts, index=var_names)
    out["pts_rest"] = pd.DataFrame(pts_rest, index=var_names)
    return out
