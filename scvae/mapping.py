"""Reference mapping: the AnnData glue of :mod:`scvae.data.query` and :mod:`scvae.surgery`.

``prepare_query_anndata`` and ``load_query_data`` are bound as classmethods in
:class:`scvae.SCVAE`'s class body, so ``scvae.LDVAE.load_query_data`` makes an ``LDVAE``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import anndata as ad
import numpy as np
import torch

from scvae import _checks, surgery
from scvae._settings import logger
from scvae.data.query import library_prior, pad_query_genes, query_registry
from scvae.data.registry import RegistryError
from scvae.device import resolve_device

if TYPE_CHECKING:
    from scvae.model import SCVAE


def prepare_query_anndata(
    cls: type[SCVAE], adata: ad.AnnData, reference_model: SCVAE | str | os.PathLike
) -> ad.AnnData:
    """A copy of a query AnnData with the reference's genes, in the reference's order.

    Genes the query lacks are added as zeros (in ``X`` and in every layer) and genes the
    reference lacks are dropped; how many of each is logged (``scvae`` logger, INFO; a
    warning when under 80 % of the reference's genes are present). Unlike scvi-tools,
    whose version changes ``adata`` in place by default, this returns a new AnnData and
    leaves ``adata`` as it was.

    Parameters
    ----------
    adata
        The query's raw counts.
    reference_model
        The reference, as a model or a directory saved by :meth:`save`; only its genes are
        read, so any scvae model (an :class:`~scvae.LDVAE` too) will do.

    Returns
    -------
    A new AnnData with the reference's genes in its order (``adata`` is not changed).

    Examples
    --------
    >>> import scvae
    >>> data = scvae.data.simulate(60, 20, n_batches=2, seed=0)
    >>> ref = scvae.SCVAE(data, batch_key="batch", encode_covariates=True)
    >>> query = data[:10, ::-1][:, 2:].copy()  # genes reversed, two of them missing
    >>> scvae.SCVAE.prepare_query_anndata(query, ref).var_names.equals(ref.var_names)
    True
    """
    _checks.anndata("adata", adata, hint=_ORDER)
    reference = _reference(cls, reference_model, any_class=True)
    return pad_query_genes(adata, reference.registry.var_names)


def load_query_data(
    cls: type[SCVAE],
    adata: ad.AnnData,
    reference_model: SCVAE | str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    unfrozen: bool = False,
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
) -> SCVAE:
    """A new model that maps a query onto a trained reference (scArches architecture surgery).

    The query's batches that the reference does not know are added as new batch
    categories (codes after the reference's; the library prior of each from the query's
    cells); cells of a batch the reference knows keep that batch's code. Values of a
    categorical covariate (``categorical_covariate_keys``) that the reference does not know,
    e.g. a new donor, are added to that covariate's categories the same way (after the
    reference's, in order: scvi-tools' ``extend_categories=True``); the query may lack some
    of the reference's values. Then everything the reference learnt is frozen except what
    the new categories need (their columns; see :mod:`scvae.surgery`; the defaults are
    scvi-tools'), and ``train`` fits them on the query's cells alone. The reference model
    and its files are not changed, and the query model gives the reference's cells the
    reference's latent until trained (and afterwards too, for cells of reference categories,
    unless options that train more are given).

    Mapping needs a reference trained with ``encode_covariates=True`` (otherwise its
    encoder never sees the batch and the query's latent cannot move: refused), and works
    best with ``use_layer_norm="both", use_batch_norm="none"``, whose normalisation has no
    running statistics fitted to the reference's batches.

    Warnings (:class:`UserWarning`): a reference that was never trained (its encoder is
    random; until the query model is trained, its queries warn too, where scvi-tools
    raises), and a query with no new batch or covariate value. scvae keeps the columns of
    the reference's batches and categorical covariate values frozen (scvi-tools trains
    them), so a query of reference categories only gets nothing that fits it to the
    query's cells: the warning names what ``train`` would still fit (e.g. the decoder's
    batch norm).

    Parameters
    ----------
    adata
        The query's raw counts with the reference's genes in its order (see
        :meth:`prepare_query_anndata`) and the reference's ``batch_key`` and
        ``categorical_covariate_keys`` columns.
    reference_model
        The reference, as a model or a directory saved by :meth:`save`.
    device
        Where the new model lives.
    unfrozen, freeze_dropout, freeze_expression, freeze_decoder_first_layer,
    freeze_batchnorm_encoder, freeze_batchnorm_decoder
        What trains (:class:`scvae.surgery.FreezeConfig`).

    Returns
    -------
    A new, untrained model (``is_trained=False``) on ``adata``; train it, e.g.
    ``model.train(max_epochs=200, weight_decay=0.0)``. ``model.frozen`` holds the masks
    of the parameters that train in part.

    Examples
    --------
    >>> import scvae
    >>> ref_data = scvae.data.simulate(100, 30, n_batches=2, seed=0)
    >>> ref = scvae.SCVAE(ref_data, batch_key="batch", encode_covariates=True)
    >>> ref.train(max_epochs=1, progress_bar=False)
    >>> query = scvae.data.simulate(40, 30, seed=1)
    >>> query.obs["batch"] = "lab2"
    >>> model = scvae.SCVAE.load_query_data(query, ref)
    >>> model.registry.batch_categories
    ['batch0', 'batch1', 'lab2']

    A new value of a categorical covariate gets a category (and trainable columns) too:

    >>> ref_data.obs["donor"] = ["d1", "d2"] * 50
    >>> ref = scvae.SCVAE(
    ...     ref_data, batch_key="batch", categorical_covariate_keys=["donor"],
    ...     encode_covariates=True,
    ... )
    >>> ref.train(max_epochs=1, progress_bar=False)
    >>> query.obs["donor"] = "d3"
    >>> scvae.SCVAE.load_query_data(query, ref).registry.categorical_covariate_categories
    {'donor': ['d1', 'd2', 'd3']}
    >>> model.train(max_epochs=1, weight_decay=0.0, progress_bar=False)
    """
    from scvae.model import _refuse_backed_view  # at call time, as in _reference

    _checks.anndata("adata", adata, hint=_ORDER)
    freeze = surgery.FreezeConfig(  # its options checked before any work
        unfrozen=unfrozen,
        freeze_dropout=freeze_dropout,
        freeze_expression=freeze_expression,
        freeze_decoder_first_layer=freeze_decoder_first_layer,
        freeze_batchnorm_encoder=freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
    )
    _refuse_backed_view(adata)
    reference = _reference(cls, reference_model)
    surgery.check_mappable(reference.module, model_class=type(reference).__name__)
    if list(map(str, adata.var_names)) != reference.registry.var_names:
        raise RegistryError(
            "The query's genes are not the reference's, in the reference's order; run "
            "query = scvae.SCVAE.prepare_query_anndata(query, reference_model) first."
        )
    keep_labels = reference.module.config.dispersion == "gene-label"
    registry, new = query_registry(reference.registry, adata, keep_labels=keep_labels)
    # checked (genes and keys first) and summed block by block: a backed query is never
    # read whole
    totals = np.concatenate(
        [np.asarray(block.sum(axis=1)).ravel() for block in registry.check_blocks(adata)]
    )
    n_ref = reference.registry.n_batch
    ref_cats = reference.registry.n_cats_per_cov
    new_cats = {  # each categorical covariate's values the reference lacks
        key: registry.categorical_covariate_categories[key][n:]
        for key, n in zip(registry.categorical_covariate_keys, ref_cats, strict=True)
    }
    means, variances = library_prior(
        totals, registry.batch_codes(adata), range(n_ref, registry.n_batch)
    )
    module = surgery.add_batches(
        reference.module,
        len(new),
        library_log_means=torch.from_numpy(means),
        library_log_vars=torch.from_numpy(variances),
        new_cats_per_cov=[len(v) for v in new_cats.values()],
    )
    model = cls.__new__(cls)
    model._decoder_bias = module.config.decoder_bias
    model._setup(adata, registry, module.to(resolve_device(device)))
    model.frozen = surgery.freeze_reference(
        model.module, n_ref, freeze, reference_cats_per_cov=ref_cats
    )
    model._untrained_reference = not reference.is_trained
    if not reference.is_trained:
        _checks.warn_user(
            f"The reference {type(reference).__name__} has not been trained: its encoder is "
            "random, and so would be the query's latent. Train the reference first "
            "(reference.train(...)), then map the query onto it.",
        )
    if not new and not any(new_cats.values()) and not unfrozen:
        parts = surgery.trainable_modules(model.module, model.frozen)
        fits = f"only {', '.join(parts)}" if parts else "nothing (every weight is frozen)"
        if not any(part.startswith("z_encoder.") for part in parts):
            fits += (
                ", and the query's latent stays the reference's "
                "(reference_model.get_latent_representation(query) gives it without training)"
            )
        covariates = (
            " nor any value of its categorical covariates"
            if registry.categorical_covariate_keys
            else ""
        )
        _checks.warn_user(
            f"None of the query's batches is new (all are in the reference's "
            f"adata.obs[{registry.batch_key!r}]){covariates}, so mapping adds no columns to "
            "train. scvae keeps the reference's batch and covariate columns frozen (scvi-tools "
            f"trains them): model.train() fits {fits}. To fit the query's own batch effect, "
            "give its cells a new batch name.",
        )
    logger.info(
        "Query of %d cells: %d new batch(es) %s added to the reference's %d; %d cells of "
        "reference batches keep their codes.",
        adata.n_obs,
        len(new),
        new,
        n_ref,
        int((registry.batch_codes(adata) < n_ref).sum()),
    )
    for key, values in new_cats.items():
        if values:
            logger.info(
                "Categorical covariate %r: %d new value(s) %s added after the reference's %d.",
                key,
                len(values),
                values,
                len(reference.registry.categorical_covariate_categories[key]),
            )
    return model


_ORDER = " The query's AnnData comes first: (adata, reference_model)."


def _reference(
    cls: type[SCVAE], reference_model: SCVAE | str | os.PathLike, *, any_class: bool = False
) -> SCVAE:
    """The reference model itself, or the one saved in the directory ``reference_model``.

    A reference of another scvae class than ``cls`` is refused with the class to use
    (``load_query_data`` makes a model of the reference's class), or taken as it is when
    ``any_class`` (``prepare_query_anndata`` reads only its genes).
    """
    from scvae.model import SCVAE  # at call time: scvae.model binds this module's functions

    if not isinstance(reference_model, SCVAE | str | os.PathLike):
        raise TypeError(
            "reference_model must be a model or the directory of a saved one, got "
            f"{type(reference_model).__name__}.{_ORDER}"
        )
    if isinstance(reference_model, SCVAE):
        reference = reference_model
    else:
        saved = _saved_class(reference_model)
        load_cls = saved if saved is not None and any_class else cls
        if saved is not None and saved is not cls and not any_class:
            _wrong_class(saved.__name__, f" saved in {reference_model}")
        reference = load_cls.load(reference_model, device="cpu")
    if type(reference) is not cls and not any_class:
        _wrong_class(type(reference).__name__, "")
    return reference


def _wrong_class(name: str, where: str) -> NoReturn:
    raise TypeError(
        f"The reference{where} is a {name}, and a query model is of its reference's class: "
        f"use scvae.{name}.load_query_data."
    )


def _saved_class(dir_path: str | os.PathLike) -> type[SCVAE] | None:
    """The scvae class named in a model directory's description; None when it names none
    that exists here (``load`` then says what is wrong with the directory)."""
    from scvae.model import SCVAE

    try:
        name = json.loads((Path(dir_path) / "model.json").read_text()).get("model_class", "SCVAE")
    except (OSError, ValueError, AttributeError):
        return None
    classes = [SCVAE]
    for c in classes:  # SCVAE and its subclasses (LDVAE), however deep
        classes.extend(c.__subclasses__())
    return next((c for c in classes if c.__name__ == name), None)
