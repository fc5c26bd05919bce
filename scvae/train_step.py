"""How the training step runs fast: a fused Adam, bf16 autocast, torch.compile with a fallback.

Tensors only. :func:`make_optimizer` builds Adam with the fused kernel where the parameters'
device has one (one kernel for all parameters instead of a dozen small ops per tensor), else
the multi-tensor ("foreach") form. :class:`StepRunner` runs the module's forward pass for
:func:`scvae.train.fit`: optionally under bf16 autocast (the matrix products in bfloat16; the
decoder's and encoder's outputs, and so the likelihood and the KL terms, stay float32) and
optionally through ``torch.compile``; if compiling fails (no C++ compiler, an unsupported
operation), it says so once and goes on eagerly with the same results. Compiled steps compute
the same function as eager ones (tested step by step), but inductor draws its own random numbers
for the reparameterisation and dropout, so a compiled run is a different random draw from an
eager run with the same seed (reproducible between compiled runs in fresh processes on the same
machine; a second compiled run in the same process can differ in the last bits, by about 1e-7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal

import torch

from scvae._settings import logger
from scvae.distributions import Nonzero
from scvae.module import VAE, Covariates, LossOutput

Precision = Literal["32", "bf16-mixed"]
PRECISIONS: tuple[str, ...] = ("32", "bf16-mixed")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], *, lr: float, eps: float, weight_decay: float
) -> torch.optim.Adam:
    """Adam (L2 weight decay, as scvi-tools), fused where the device supports it.

    Examples
    --------
    >>> opt = make_optimizer(torch.nn.Linear(3, 2).parameters(), lr=1e-3, eps=0.01,
    ...                      weight_decay=1e-6)
    >>> opt.defaults["lr"], opt.defaults["fused"]
    (0.001, True)
    """
    params = list(params)
    devices = {p.device.type for p in params}
    fused_ok = devices <= {"cpu", "cuda"} and all(p.dtype == torch.float32 for p in params)
    options = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    if fused_ok:
        try:
            return torch.optim.Adam(params, fused=True, **options)
        except (RuntimeError, ValueError) as err:  # a build without the fused kernel
            logger.info("Fused Adam is not available here (%s); using foreach Adam.", err)
    return torch.optim.Adam(params, foreach=True, **options)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision="bf16-mixed"``, else nothing.

    Examples
    --------
    >>> with autocast(torch.device("cpu"), "bf16-mixed"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StepRunner:
    """The forward pass of one training step, under the run's precision, compiled or not.

    Parameters
    ----------
    module
        The model; evaluation elsewhere keeps calling it directly (eagerly).
    device
        The training device (for autocast).
    precision
        "32" or "bf16-mixed".
    compile
        Run the forward pass (and, through AOTAutograd, its backward) as ``torch.compile``
        graphs. The first minibatch pays the compilation (tens of seconds on a CPU); worth it
        for long runs. The likelihood's data-dependent gather of non-zero counts is captured in
        the graph (``capture_dynamic_output_shape_ops``), so the step is one graph.

    Examples
    --------
    >>> from scvae.module import ModuleConfig
    >>> module = VAE(ModuleConfig(n_input=5))
    >>> run = StepRunner(module, torch.device("cpu"), "32", compile=False)
    >>> x = torch.ones(4, 5)
    >>> out = run(x, torch.zeros(4, dtype=torch.long), Covariates(), kl_weight=1.0)
    >>> out.loss.dim(), run.compiled
    (0, False)
    """

    def __init__(self, module: VAE, device: torch.device, precision: str, *, compile: bool):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        self.module = module
        self.device = device
        self.precision = precision
        self._compiled = torch.compile(module) if compile else None

    @property
    def compiled(self) -> bool:
        """Whether steps run through ``torch.compile`` (False after a fallback)."""
        return self._compiled is not None

    def __call__(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        covariates: Covariates,
        *,
        kl_weight: float,
        nonzero: Nonzero | None = None,
    ) -> LossOutput:
        """Loss and per-cell terms of one minibatch, with the graph for ``backward``.

        ``nonzero``: the minibatch's non-zeros, where the count source has them
        (:class:`scvae.data.loader.Minibatch`); see :meth:`scvae.module.VAE.loss`.
        """
        with autocast(self.device, self.precision):
            if self._compiled is not None:
                # a tensor, so that a new KL weight each epoch is not a new graph
                weight = torch.tensor(kl_weight, device=x.device)
                for t in nonzero or ():  # their number changes with every minibatch
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                try:
                    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
                        return self._compiled(
                            x, batch_index, covariates, kl_weight=weight, nonzero=nonzero
                        )
                except Exception as err:  # noqa: BLE001 - any compiler failure falls back
                    logger.warning(
                        "torch.compile failed (%s: %s); training goes on without it "
                        "(same results, slower).",
                        type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "",
                    )
                    self._compiled = None
            return self.module(x, batch_index, covariates, kl_weight=kl_weight, nonzero=nonzero)
