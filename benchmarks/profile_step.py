"""Where the time of one training step goes: torch.profiler over steps of the default model.

20,000 simulated cells x 2,000 genes (10 % non-zero), batch 128, the default model (zinb,
n_hidden 128, n_latent 10), the step exactly as ``scvae.train.fit`` runs it (gather from the
device CSR, whose non-zeros go to the likelihood, forward, backward, finite check, fused
Adam). Prints and writes the operators by self time, grouped into the parts of the step.

    .venv/bin/python benchmarks/profile_step.py --threads 2 [--precision bf16-mixed] [--compile]

With ``--compile`` the step runs under ``torch.compile`` as ``train(compile=True)`` runs it;
the fused kernels that inductor generates are then listed under their own names.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from scvae.data.loader import DeviceCSR
from scvae.module import VAE, Covariates, ModuleConfig
from scvae.train import _all_finite
from scvae.train_step import StepRunner, make_optimizer

HERE = Path(__file__).resolve().parent
# the minibatch gather, labelled: on the CPU it is scipy's row gather, outside torch's operators
GATHER = "scvae::minibatch"
PARTS = {
    "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "Adam (fused)": ("aten::_fused_adam_",),
    "log-gamma terms and their gradient": ("aten::lgamma", "aten::digamma", "aten::polygamma"),
    "gather of non-zeros and minibatch rows": (
        GATHER,
        "aten::nonzero",
        "aten::index",
        "aten::index_add",
        "aten::_index_put_impl_",
        "aten::repeat_interleave",
        "aten::index_select",
    ),
}


def is_kernel(key: str) -> bool:
    """A graph of fused kernels that inductor generated (the compiled step)."""
    return key.startswith("## Call CompiledFxGraph")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="32")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd step")
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    n, g, b = 20000, 2000, a.batch_size
    x = sp.random(n, g, density=0.1, format="csr", random_state=0, dtype=np.float32)
    x.data = rng.negative_binomial(2, 0.4, size=x.nnz).astype(np.float32) + 1
    data = DeviceCSR(x, "cpu")
    torch.manual_seed(0)
    module = VAE(ModuleConfig(n_input=g))
    params = list(module.parameters())
    opt = make_optimizer(params, lr=1e-3, eps=0.01, weight_decay=1e-6)
    run = StepRunner(module, torch.device("cpu"), a.precision, compile=a.compile)
    codes = torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(n, generator=gen)[:b]
        with record_function(GATHER):
            batch = data.minibatch(idx)  # dense rows and their non-zeros, as fit gets them
        out = run(batch.x, codes[idx], Covariates(), kl_weight=0.5, nonzero=batch.nonzero)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert _all_finite(out.loss, params)
        opt.step()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    ms = (time.perf_counter() - start) / a.steps * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    events = [
        e
        for e in prof.key_averages()
        if e.key.startswith("aten::") or e.key == GATHER or is_kernel(e.key)
    ]
    total = sum(e.self_cpu_time_total for e in events)
    lines = [
        f"### One training step: {ms:.1f} ms ({b / ms * 1000:.0f} cells/s), batch {b}, "
        f"{a.threads} threads, precision {a.precision}{', compiled' if a.compile else ''}\n",
        "| part | share of operator time |",
        "|---|---|",
    ]
    rest = total
    for part, names in PARTS.items():
        t = sum(e.self_cpu_time_total for e in events if e.key in names)
        rest -= t
        lines.append(f"| {part} | {100 * t / total:.0f} % |")
    lines.append(
        f"| element-wise and reductions (softmax, exp, log1p, sums; compiled: fused graphs) | "
        f"{100 * rest / total:.0f} % |"
    )
    lines += ["", "| operator | self ms per step | share |", "|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        share = 100 * e.self_cpu_time_total / total
        per_step = e.self_cpu_time_total / 1000 / a.steps
        name = "compiled graph (fused kernels)" if is_kernel(e.key) else f"`{e.key}`"
        if e.key == GATHER:
            name = "minibatch gather (scipy row gather on the CPU; its own time)"
        lines.append(f"| {name} | {per_step:.2f} | {share:.0f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"profile_step_b{b}_t{a.threads}_{a.precision}{'_compiled' if a.compile else ''}.md"
    (a.out / name).write_text(text)


if __name__ == "__main__":
    main()
