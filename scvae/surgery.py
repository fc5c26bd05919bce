"""Model surgery for reference mapping (scArches, Lotfollahi et al. 2022). Tensors only.

A reference module trained on batches ``0 .. B-1`` (and categorical covariates with ``C_j``
categories each) is given ``k`` more batch categories and ``k_j`` more categories of
covariate ``j`` (scvi-tools' ``extend_categories``):

* every linear layer that takes the categorical one-hots (the first layer of each network
  that gets them, and every injected layer) gets the new input columns, each after the
  reference's columns of its own block (``[inputs, batch, covariate 1, covariate 2, ...]``
  keeps that layout); a block of a single reference category had no column, so that category
  gets a zero column, which reproduces the reference exactly;
* per gene-batch dispersion gets ``k`` more columns; the library prior gets ``k`` more entries.

New columns start at the mean of the reference's columns of their block (a new batch or donor
starts as an average reference one; zero for a block of a single reference category).
:func:`freeze_reference` then freezes the reference's weights with scvi-tools'
``load_query_data`` option defaults, except that in those layers only the new columns get
gradients, where scvi-tools trains every categorical column, the reference's batches and
covariates included (a gradient mask, and the frozen entries are put back before each forward
pass and before ``state_dict``, so weight decay cannot move them either); the encoders' batch
norms are frozen (affine and running statistics); the decoder's batch-norm affine parameters
and the library encoder train; everything else is fixed.

Examples
--------
>>> from scvae.module import VAE, ModuleConfig
>>> ref = VAE(ModuleConfig(n_input=20, n_batch=2, encode_covariates=True))
>>> query = add_batches(ref, 1)
>>> query.config.n_batch, query.z_encoder.encoder.layers[0][0].weight.shape
(3, torch.Size([128, 23]))
>>> frozen = freeze_reference(query, n_reference_batches=2)
>>> sorted(frozen.masked)[:1]
['decoder.px_decoder.layers.0.0.weight']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from scvae import _checks
from scvae.module import VAE
from scvae.nn import FCLayers

LIBRARY_KEYS = ("library_log_means", "library_log_vars")


@dataclass(frozen=True)
class FreezeConfig:
    """What stays fixed while a query is trained on a reference (scvi-tools' defaults).

    Attributes
    ----------
    unfrozen
        Train everything (no freezing at all); overrides the other options.
    freeze_dropout
        Switch the encoders' dropout off.
    freeze_expression
        Keep the gene columns of the encoders' first layers fixed (False: the whole first
        layer of the encoders trains).
    freeze_decoder_first_layer
        Keep the decoder's first layer fixed except the new batch columns (False: it all
        trains).
    freeze_batchnorm_encoder, freeze_batchnorm_decoder
        Fix the batch norms' affine parameters and running statistics.

    Examples
    --------
    >>> FreezeConfig().freeze_batchnorm_decoder
    False
    """

    unfrozen: bool = False
    freeze_dropout: bool = False
    freeze_expression: bool = True
    freeze_decoder_first_layer: bool = True
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:  # a string such as "no" would read as True
            _checks.flag(name, getattr(self, name))


def check_mappable(module: VAE, *, model_class: str = "SCVAE") -> None:
    """Refuse a reference whose latent cannot move for a query.

    With ``encode_covariates=False`` the encoder never sees the batch, so adding batch columns
    changes only the decoder and the query's latent stays where the reference puts it.
    ``model_class`` (the reference's class name) picks the options the message recommends:
    ``LDVAE`` takes no ``use_layer_norm``.

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> check_mappable(VAE(ModuleConfig(n_input=5, encode_covariates=True)))
    """
    if not module.config.encode_covariates:
        options = "batch_key=..., encode_covariates=True"
        if model_class == "SCVAE":
            options += ', use_layer_norm="both", use_batch_norm="none"'
        raise ValueError(
            "This reference was trained with encode_covariates=False: its encoder never sees the "
            "batch, so surgery could only change the decoder and the query's latent could not "
            f"move. Train the reference with scvae.{model_class}(adata, {options}) to map "
            "queries onto it."
        )


def categorical_layers(module: nn.Module) -> dict[str, tuple[nn.Linear, int, list[int]]]:
    """Linear layers that take the categorical one-hots: ``name -> (layer, offset, widths)``.

    ``offset`` is the first categorical column (the layer's other inputs come before it);
    ``widths`` are the columns of each block in ``ModuleConfig.n_cat_list`` order (the batch
    first, then each categorical covariate; 0 for a block of a single category, which has no
    column).

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> layers = categorical_layers(VAE(ModuleConfig(n_input=5, n_batch=3, n_cats_per_cov=(1, 2))))
    >>> layers["decoder.px_decoder.layers.0.0"][1:]
    (10, [3, 0, 2])
    """
    found = {}
    for name, fc in module.named_modules():
        if not isinstance(fc, FCLayers) or not fc.n_cat_list:
            continue
        n_cov = sum(fc.n_cat_list)
        for i, block in enumerate(fc.layers):
            if i == 0 or fc.inject_covariates:
                linear = block[0]
                found[f"{name}.layers.{i}.0"] = (
                    linear,
                    linear.in_features - n_cov,
                    list(fc.n_cat_list),
                )
    return found


def batch_layers(module: nn.Module) -> dict[str, tuple[nn.Linear, int, int]]:
    """Linear layers that take the batch one-hot: ``name -> (layer, offset, n_batch_columns)``.

    ``offset`` is the first batch column (the layer's other inputs come before it); the batch
    is the first entry of each ``FCLayers``' categorical list (``ModuleConfig.n_cat_list``).
    :func:`categorical_layers` gives the covariates' blocks too.

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> sorted(batch_layers(VAE(ModuleConfig(n_input=5, n_batch=3))))
    ['decoder.px_decoder.layers.0.0']
    """
    return {
        name: (linear, offset, widths[0])
        for name, (linear, offset, widths) in categorical_layers(module).items()
    }


def _widen_block(block: torch.Tensor, n_old: int, n_new: int) -> torch.Tensor:
    """The ``block`` of the ``n_old`` reference categories' columns (none when ``n_old == 1``)
    with columns for ``n_new`` categories: the new ones at the mean of the old ones."""
    if n_new == n_old:
        return block
    if block.shape[1] == 0:  # a single reference category had no column: zero reproduces it
        block = torch.zeros(block.shape[0], n_old, dtype=block.dtype, device=block.device)
    added = block.mean(dim=1, keepdim=True).expand(-1, n_new - n_old)
    return torch.cat([block, added], dim=1)


def _widen(
    old: torch.Tensor,
    offset: int,
    widths: Sequence[int],
    n_old: Sequence[int],
    n_new: Sequence[int],
) -> torch.Tensor:
    """``old`` with the categorical blocks from column ``offset`` on (``widths`` columns each,
    for ``n_old`` categories each) widened to ``n_new`` categories each, block by block."""
    parts, pos = [old[:, :offset]], offset
    for width, before, after in zip(widths, n_old, n_new, strict=True):
        parts.append(_widen_block(old[:, pos : pos + width], before, after))
        pos += width
    parts.append(old[:, pos:])
    return torch.cat(parts, dim=1)


@torch.no_grad()
def add_batches(
    module: VAE,
    n_new: int,
    *,
    library_log_means: torch.Tensor | None = None,
    library_log_vars: torch.Tensor | None = None,
    new_cats_per_cov: Sequence[int] = (),
) -> VAE:
    """A new module with ``n_new`` more batch categories (and ``new_cats_per_cov`` more
    categories of each categorical covariate); ``module`` is left untouched.

    Parameters
    ----------
    module
        The trained reference.
    n_new
        Batches to add (codes ``B .. B + n_new - 1``).
    library_log_means, library_log_vars
        Library prior of the new batches, shape ``(n_new,)`` (None: the mean of the
        reference's).
    new_cats_per_cov
        Categories to add to each categorical covariate, in ``ModuleConfig.n_cats_per_cov``
        order (codes after the reference's); empty: none.

    Returns
    -------
    A :class:`~scvae.module.VAE` in eval mode, on the reference's device, whose outputs for
    the reference's categories equal the reference's.

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> add_batches(VAE(ModuleConfig(n_input=8)), 2).library_log_means.shape
    torch.Size([3])
    >>> ref = VAE(ModuleConfig(n_input=8, n_batch=2, n_cats_per_cov=(2,)))
    >>> add_batches(ref, 0, new_cats_per_cov=[1]).config.n_cats_per_cov
    (3,)
    """
    old_cats = tuple(module.config.n_cats_per_cov)
    added = tuple(int(k) for k in new_cats_per_cov) or (0,) * len(old_cats)
    if len(added) != len(old_cats):
        raise ValueError(
            f"new_cats_per_cov has {len(added)} entries, but the module has {len(old_cats)} "
            "categorical covariates: give one count per covariate."
        )
    if n_new < 0 or min(added, default=0) < 0:
        raise ValueError(
            f"Categories to add must be >= 0, got n_new={n_new}, new_cats_per_cov={added}."
        )
    old_b = module.config.n_batch
    new_b = old_b + n_new
    new_cats = tuple(n + k for n, k in zip(old_cats, added, strict=True))
    config = replace(module.config, n_batch=new_b, n_cats_per_cov=new_cats)
    with torch.random.fork_rng(devices=[]):
        query = VAE(config)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if n_new == 0 and not any(added):
        query.load_state_dict(state, strict=True)
        return query.to(next(module.parameters()).device).eval()
    for name, (linear, offset, widths) in categorical_layers(module).items():
        state[f"{name}.weight"] = _widen(
            linear.weight, offset, widths, [old_b, *old_cats], [new_b, *new_cats]
        )
    if config.dispersion == "gene-batch":
        state["px_r"] = _widen_block(module.px_r, old_b, new_b)
    for key, given in zip(LIBRARY_KEYS, (library_log_means, library_log_vars), strict=True):
        old = getattr(module, key)
        extra = old.mean().expand(n_new) if given is None else torch.as_tensor(given)
        state[key] = torch.cat([old, extra.to(old)])
    query.load_state_dict(state, strict=True)
    return query.to(next(module.parameters()).device).eval()


class _Mask:
    """Entries of one parameter that may train (``mask``) and the fixed values of the others."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        self.param = param
        self.mask = mask.to(param.device)
        self.fixed = torch.where(self.mask, torch.zeros_like(param), param.detach())

    def _on(self, device: torch.device) -> None:
        if self.mask.device != device:
            self.mask, self.fixed = self.mask.to(device), self.fixed.to(device)

    def grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        self._on(grad.device)
        return grad * self.mask

    @torch.no_grad()
    def restore(self) -> None:
        p = self.param
        self._on(p.device)
        # Only after weight decay moved a frozen entry: an unneeded in-place copy would bump
        # the parameter's version and break a graph that already used it.
        if not torch.equal(p.masked_fill(self.mask, 0.0), self.fixed):
            p.copy_(torch.where(self.mask, p, self.fixed))


@dataclass
class FrozenReference:
    """Handles of a frozen module: the masked parameters and what :meth:`remove` undoes.

    ``masked`` maps a parameter name to the boolean mask of its entries that train; every
    other parameter either trains whole (``requires_grad``) or not at all.
    """

    masked: dict[str, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the hooks and make every parameter trainable again (momenta and dropout
        back to their values from before)."""
        for handle in self._handles:
            handle.remove()
        for undo in self._undo:
            undo()
        self._handles.clear()
        self._undo.clear()
        self.masked.clear()


def _role(name: str) -> str:
    return name.split(".")[0]


def freeze_reference(
    module: VAE,
    n_reference_batches: int,
    config: FreezeConfig | None = None,
    *,
    reference_cats_per_cov: Sequence[int] | None = None,
) -> FrozenReference:
    """Freeze a widened module in place so only what the new categories need can train.

    Parameters
    ----------
    module
        A module from :func:`add_batches`.
    n_reference_batches
        Batches of the reference (codes below this are the reference's and stay fixed).
    config
        What to freeze (:class:`FreezeConfig`, default scvi-tools' defaults).
    reference_cats_per_cov
        Categories of each categorical covariate in the reference (codes below these are the
        reference's and their columns stay fixed); None: the module's own (no new ones).

    Returns
    -------
    :class:`FrozenReference` (call ``.remove()`` to undo).

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> m = add_batches(VAE(ModuleConfig(n_input=6, n_batch=2, encode_covariates=True)), 1)
    >>> f = freeze_reference(m, 2)
    >>> f.masked["z_encoder.encoder.layers.0.0.weight"][0].tolist()
    [False, False, False, False, False, False, False, False, True]
    >>> ref = VAE(ModuleConfig(n_input=2, n_batch=2, n_cats_per_cov=(2,), encode_covariates=True))
    >>> m = add_batches(ref, 0, new_cats_per_cov=[1])  # a third donor
    >>> f = freeze_reference(m, 2, reference_cats_per_cov=[2])
    >>> f.masked["z_encoder.encoder.layers.0.0.weight"][0].tolist()
    [False, False, False, False, False, False, True]
    """
    config = FreezeConfig() if config is None else config
    n_cats = module.config.n_cats_per_cov
    ref_cats = list(n_cats if reference_cats_per_cov is None else reference_cats_per_cov)
    if len(ref_cats) != len(n_cats) or any(r > n for r, n in zip(ref_cats, n_cats, strict=False)):
        raise ValueError(
            f"reference_cats_per_cov={ref_cats} does not fit the module's categorical "
            f"covariates {list(n_cats)}: give the reference's number of categories of each."
        )
    n_reference = [n_reference_batches, *ref_cats]
    frozen = FrozenReference()
    params = dict(module.named_parameters())

    def set_grad(p: nn.Parameter, flag: bool) -> None:
        p.requires_grad_(flag)

    frozen._undo.append(lambda: [set_grad(p, True) for p in params.values()])
    if config.unfrozen:
        return frozen
    for p in params.values():
        set_grad(p, False)

    def train_whole(prefix: str) -> None:
        for name, p in params.items():
            if name.startswith(prefix + "."):
                set_grad(p, True)

    train_whole("l_encoder")  # the library encoder trains whole, as in scvi-tools
    masks: dict[str, _Mask] = {}
    for name, (linear, offset, widths) in categorical_layers(module).items():
        role = _role(name)
        if role == "l_encoder":
            continue
        first = name.endswith("layers.0.0")
        if first and (
            (role == "z_encoder" and not config.freeze_expression)
            or (role == "decoder" and not config.freeze_decoder_first_layer)
        ):
            train_whole(name)
            continue
        mask = torch.zeros_like(linear.weight, dtype=torch.bool)
        start = offset
        for width, n_ref in zip(widths, n_reference, strict=True):
            if width:  # a block of one category has no column
                mask[:, start + n_ref : start + width] = True  # the new categories' columns
            start += width
        masks[f"{name}.weight"] = _Mask(linear.weight, mask)
        frozen._handles.append(
            linear.register_forward_pre_hook(_restorer([masks[f"{name}.weight"]]))
        )
    if module.config.dispersion == "gene-batch" and module.px_r is not None:
        mask = torch.zeros_like(module.px_r, dtype=torch.bool)
        mask[:, n_reference_batches:] = True
        masks["px_r"] = _Mask(module.px_r, mask)
        frozen._handles.append(module.decoder.register_forward_pre_hook(_restorer([masks["px_r"]])))
    for name, m in masks.items():
        set_grad(m.param, True)
        frozen._handles.append(m.param.register_hook(m.grad_hook))
        frozen.masked[name] = m.mask
    all_masks = list(masks.values())
    frozen._handles.append(
        module.register_state_dict_pre_hook(lambda *_args, **_kw: _restore_all(all_masks))
    )
    for name, sub in module.named_modules():
        role = _role(name)
        if isinstance(sub, nn.BatchNorm1d) and role in ("z_encoder", "decoder"):
            fix = (
                config.freeze_batchnorm_encoder
                if role == "z_encoder"
                else config.freeze_batchnorm_decoder
            )
            if fix:
                frozen._undo.append(_setter(sub, "momentum", sub.momentum))
                sub.momentum = 0.0  # running statistics stay the reference's
            else:
                for p in sub.parameters():
                    set_grad(p, True)
        if isinstance(sub, nn.Dropout) and config.freeze_dropout and role != "decoder":
            frozen._undo.append(_setter(sub, "p", sub.p))
            sub.p = 0.0
    return frozen


def trainable_modules(module: nn.Module, frozen: FrozenReference) -> list[str]:
    """Names of the submodules with a parameter that training can change under ``frozen``
    (a masked parameter counts only when its mask lets some entry train).

    Examples
    --------
    >>> from scvae.module import VAE, ModuleConfig
    >>> m = add_batches(VAE(ModuleConfig(n_input=6, n_batch=2, encode_covariates=True)), 0)
    >>> trainable_modules(m, freeze_reference(m, 2))
    ['decoder.px_decoder.layers.0.1']
    """
    names: list[str] = []
    for name, p in module.named_parameters():
        mask = frozen.masked.get(name)
        if p.requires_grad and (mask is None or bool(mask.any())):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            if owner not in names:
                names.append(owner)
    return names


def _restorer(masks: list[_Mask]) -> Callable:
    def hook(*_args) -> None:
        _restore_all(masks)

    return hook


def _restore_all(masks: list[_Mask]) -> None:
    for m in masks:
        m.restore()


def _setter(obj: object, attr: str, value: object) -> Callable[[], None]:
    return lambda: setattr(obj, attr, value)
