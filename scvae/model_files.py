"""Saving and loading a model: its directory's JSON description, ``save`` and ``load``.

The format and the atomic write are :mod:`scvae.io`'s; this file turns a model into the
description and weights that :mod:`scvae.io` writes, and back. ``save`` and ``load`` are
bound in :class:`scvae.SCVAE`'s class body (``load`` as a classmethod).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scvae import _checks, _rng
from scvae._settings import logger
from scvae.data.registry import Registry
from scvae.device import resolve_device
from scvae.io import DESCRIPTION_FILE, ModelFileError, checked_extra, load_model, save_model
from scvae.module import VAE, ModuleConfig

if TYPE_CHECKING:
    from scvae.model import SCVAE

#: The AnnData a model was saved with (``save_anndata=True``), in the model directory.
ADATA_FILE = "adata.h5ad"


def cells_fingerprint(adata: ad.AnnData) -> dict[str, Any]:
    """The cells of an AnnData, in order: their number and a SHA-256 of their names.

    Saved with a model, so that ``train_indices`` and ``validation_indices`` (positions in the
    AnnData the model was trained on) are not applied to other cells after a load.

    Examples
    --------
    >>> import scvae
    >>> cells_fingerprint(scvae.data.simulate(5, 3, seed=0))["n_obs"]
    5
    """
    names = "\n".join(map(str, adata.obs_names)).encode()
    return {"n_obs": int(adata.n_obs), "obs_names_sha256": hashlib.sha256(names).hexdigest()}


def _history(saved: Any) -> pd.DataFrame:
    """The saved training history (columns of equal length; epochs as integers), indexed by
    epoch; a ValueError names what is wrong."""
    if not isinstance(saved, dict) or not all(isinstance(v, list) for v in saved.values()):
        raise ValueError("history must map each column name to a list of values")
    epochs = saved.get("epoch", [])
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in epochs):
        raise ValueError("history's epochs must be integers")
    history = pd.DataFrame(saved)
    return history.set_index("epoch") if "epoch" in history else history


def _positions(saved: Any, name: str, n_obs: Any) -> np.ndarray:
    """Saved cell positions as int64, each an integer in ``[0, n_obs)``; a ValueError names
    what is wrong."""
    if not isinstance(saved, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in saved
    ):
        raise ValueError(f"{name} must be a list of non-negative integers")
    if isinstance(n_obs, int) and saved and max(saved) >= n_obs:
        raise ValueError(f"{name} holds a position at or past the {n_obs} cells it was saved with")
    return np.asarray(saved, dtype=np.int64)


def _description(
    model: SCVAE,
    history: pd.DataFrame,
    is_trained: bool,
    train_config: dict[str, Any],
    train_indices: np.ndarray,
    validation_indices: np.ndarray,
) -> dict[str, Any]:
    """The JSON description of a model directory (see :mod:`scvae.io`)."""
    return {
        "model_class": type(model).__name__,
        "registry": model.registry.to_dict(),
        "module_config": model.module.config.to_dict(),
        "is_trained": is_trained,
        "train_config": train_config,
        "history": history.reset_index().to_dict(orient="list"),
        "train_indices": np.asarray(train_indices).tolist(),
        "validation_indices": np.asarray(validation_indices).tolist(),
        # the cells those indices point into (None: not known, a model loaded without them)
        "cells": cells_fingerprint(model.adata)
        if model.adata is not None
        else getattr(model, "_cells", None),
    }


def save(
    model: SCVAE,
    dir_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    save_anndata: bool = False,
) -> None:
    """Save the weights (safetensors) and a JSON description into ``dir_path``, atomically.

    See :mod:`scvae.io` for the format. An existing directory is replaced only with
    ``overwrite=True``, in one step: a save that fails or is killed at any moment leaves
    the previous model intact and never a half-written directory. A path that cannot be
    written (under a file, without permission, disk full) raises the matching ``OSError``
    naming the path.

    Parameters
    ----------
    dir_path
        The model directory to write (created, with any missing parent folders).
    overwrite
        Replace an existing directory (else a ``FileExistsError`` naming it).
    save_anndata
        Also write the model's AnnData into the directory as ``adata.h5ad`` (as scvi-tools),
        listed with its checksum in ``model.json``; :meth:`load` without an AnnData then
        attaches it. Not for a backed AnnData (its cells are already in its file: load the
        model with ``ad.read_h5ad(path, backed="r")``) or a model loaded without one.

    Examples
    --------
    >>> import scvae, tempfile, os
    >>> model = scvae.SCVAE(scvae.data.simulate(50, 20, seed=0))
    >>> path = os.path.join(tempfile.mkdtemp(), "model")
    >>> model.save(path)
    >>> sorted(os.listdir(path))
    ['model.json', 'model.safetensors']
    >>> model.save(path, overwrite=True, save_anndata=True)
    >>> sorted(os.listdir(path))
    ['adata.h5ad', 'model.json', 'model.safetensors']
    >>> scvae.SCVAE.load(path).adata.n_obs
    50
    """
    overwrite = _checks.flag("overwrite", overwrite)
    save_anndata = _checks.flag("save_anndata", save_anndata)
    writers = {}
    if save_anndata:
        adata = model.adata
        if adata is None:
            raise ValueError(
                "save_anndata=True: this model has no AnnData attached (it was loaded without "
                "one). Attach it by loading with SCVAE.load(dir_path, adata), or save without "
                "save_anndata."
            )
        if adata.isbacked:
            raise ValueError(
                f"save_anndata=True: the model's AnnData is backed by {adata.filename}, which "
                "already holds its cells. Save without save_anndata and load the model with "
                "SCVAE.load(dir_path, ad.read_h5ad(that_file, backed='r'))."
            )

        def write_adata(path: Path) -> None:
            try:
                adata.write_h5ad(path)
            except OSError:
                raise  # disk full, permissions: save_model names the path
            except Exception as err:  # noqa: BLE001 - anndata's writers raise many kinds
                # anndata names the key that failed in a note
                why = "; ".join([str(err), *getattr(err, "__notes__", [])])
                raise ValueError(
                    f"save_anndata=True: the AnnData cannot be written as h5ad "
                    f"({type(err).__name__}: {why}). "
                    "Nothing was saved; remove what h5ad cannot hold (in uns, obsm...) or save "
                    "without save_anndata."
                ) from err

        writers[ADATA_FILE] = write_adata
    description = model._description(
        model.history,
        model.is_trained,
        model.train_config,
        model.train_indices,
        model.validation_indices,
    )
    save_model(
        dir_path, model.module.state_dict(), description, overwrite=overwrite, extra_writers=writers
    )


def load(
    cls: type[SCVAE],
    dir_path: str | os.PathLike,
    adata: ad.AnnData | None = None,
    *,
    device: str = "auto",
) -> SCVAE:
    """Load a model saved by :meth:`save`; reads JSON and safetensors only.

    Only ``model.json`` and ``model.safetensors`` are opened (the weights checked against
    the checksum in ``model.json``), and ``adata.h5ad`` when the model was saved with
    ``save_anndata=True`` and no ``adata`` is given (read by anndata, checked against its
    checksum first); other files in the directory, such as a pickle planted there, are
    ignored and never run. A missing, truncated, corrupted, foreign or
    newer-format directory raises :class:`~scvae.io.ModelFileError` naming the problem.
    A training checkpoint's ``latest/`` or ``best/`` directory loads the same way.

    Parameters
    ----------
    dir_path
        The model directory.
    adata
        An AnnData to attach; checked against the saved registry (same genes in the same
        order, known categories). None: the AnnData saved with the model
        (``save_anndata=True``), else none (queries then take ``adata=``).
    device
        Where to put the weights.

    Returns
    -------
    The model, of the class it was saved as, with its training history, options and split.

    Examples
    --------
    >>> import scvae, tempfile, os
    >>> adata = scvae.data.simulate(50, 20, seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "model")
    >>> scvae.SCVAE(adata).save(path)
    >>> scvae.SCVAE.load(path, adata).is_trained
    False
    """
    dev = resolve_device(device)  # a device that is not here is refused before any reading
    if adata is not None:
        _checks.anndata(
            "adata", adata, hint=" Read the file first: SCVAE.load(dir_path, ad.read_h5ad(path))."
        )
    weights, description = load_model(dir_path)
    saved_class = description.get("model_class", "SCVAE")
    if saved_class != cls.__name__:
        raise ModelFileError(
            f"{dir_path} holds a {saved_class} model; load it with scvae.{saved_class}.load."
        )
    if adata is None:
        saved_adata = checked_extra(dir_path, description, ADATA_FILE)
        if saved_adata is not None:
            try:
                adata = ad.read_h5ad(saved_adata)
            except Exception as err:  # noqa: BLE001 - h5py and anndata raise many kinds
                raise ModelFileError(
                    f"{saved_adata} cannot be read as h5ad ({type(err).__name__}: {err}). "
                    "Restore it from the original save, or pass the AnnData: "
                    "SCVAE.load(dir_path, adata)."
                ) from None
    malformed = f"{dir_path}: {DESCRIPTION_FILE} is malformed"
    try:
        registry = Registry.from_dict(description["registry"])
        config = ModuleConfig(**description["module_config"])
        history = _history(description.get("history", {}))
        cells = description.get("cells")
        n_obs = cells.get("n_obs") if isinstance(cells, dict) else None
        train_indices = _positions(description.get("train_indices", []), "train_indices", n_obs)
        val_indices = _positions(
            description.get("validation_indices", []), "validation_indices", n_obs
        )
        train_config = dict(description.get("train_config", {}))
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise ModelFileError(
            f"{malformed} ({type(err).__name__}: {err}). Restore it from the original save."
        ) from None
    try:
        consistent = (
            isinstance(registry.var_names, list)
            and all(isinstance(g, str) for g in registry.var_names)
            and (registry.n_vars, registry.n_batch, registry.n_labels)
            == (config.n_input, config.n_batch, config.n_labels)
            and tuple(registry.n_cats_per_cov) == config.n_cats_per_cov
        )
    except (KeyError, TypeError, AttributeError):
        consistent = False
    flags = [f.name for f in dataclasses.fields(ModuleConfig) if isinstance(f.default, bool)]
    not_bool = [name for name in flags if not isinstance(getattr(config, name), bool)]
    if not isinstance(description.get("is_trained", False), bool):
        not_bool.append("is_trained")
    if not_bool:  # "false" would read as True
        raise ModelFileError(
            f"{malformed}: {', '.join(not_bool)} must be true or false. Restore it from the "
            "original save."
        )
    if not consistent:
        raise ModelFileError(
            f"{malformed}: its registry (genes, batches, labels) does not match its module "
            "configuration. Restore it from the original save."
        )
    # Shapes are compared on the meta device first, so a tampered configuration cannot
    # make this allocate a huge module; every layer holds tensors, so more layers than the
    # weights hold tensors (n_layers 10**6: millions of module objects) is refused before.
    n_layers = getattr(config, "n_layers", None)
    if isinstance(n_layers, int) and n_layers > len(weights):
        raise ModelFileError(
            f"{malformed}: n_layers is {n_layers}, but the weights hold {len(weights)} "
            "tensors. Restore it from the original save."
        )
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in VAE(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ModelFileError(f"{malformed} ({err}). Restore it from the original save.") from None
    saved = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != saved:
        wrong = sorted(set(shapes) ^ set(saved)) or [k for k in shapes if shapes[k] != saved[k]]
        raise ModelFileError(
            f"{dir_path}: the weights do not fit the saved configuration (e.g. "
            f"{', '.join(wrong[:3])}). Restore the directory from the original save."
        )
    with _rng.kept_generators():  # the random initial weights, overwritten: the caller's
        module = VAE(config)  # generator is put back as it was
    module.load_state_dict(weights, strict=True)
    if adata is not None:
        from scvae.model import _refuse_backed_view

        _refuse_backed_view(adata)
        for _ in registry.check_blocks(adata):  # genes and keys, then the counts block by block
            pass
        attached = cells_fingerprint(adata)
        if (
            isinstance(cells, dict)
            and cells != attached
            and (train_indices.size or val_indices.size)
        ):
            how = (
                f"{adata.n_obs} cells, not {cells.get('n_obs')}"
                if cells.get("n_obs") != adata.n_obs
                else "other cell names, or another order"
            )
            _checks.warn_user(
                f"This AnnData's cells are not those the model was trained on ({how}), and "
                "model.train_indices / validation_indices are positions among those cells: "
                "they are left empty. Load with the training AnnData to keep them.",
            )
            train_indices = val_indices = np.array([], dtype=np.int64)
        cells = attached
    model = cls.__new__(cls)
    model._decoder_bias = config.decoder_bias
    model._setup(adata, registry, module.to(dev))
    model.is_trained = bool(description.get("is_trained", False))
    model.train_config = train_config
    model.history = history
    model.train_indices = train_indices
    model.validation_indices = val_indices
    model._cells = cells if isinstance(cells, dict) else None
    logger.debug("Loaded %r from %s", model, dir_path)
    return model
