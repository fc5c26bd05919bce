"""Run by tests/test_distributed.py under torchrun: train on every rank, save each one's end.

With a second argument ``mismatch``, rank 1 is given other cells and another learning rate
(what the ranks of a badly written script would do): train() must refuse, not hang.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import scvae


def main() -> None:
    out = Path(sys.argv[1])
    scvae.settings.verbosity = "warning"
    odd = sys.argv[2:] == ["mismatch"] and os.environ["RANK"] == "1"
    adata = scvae.data.simulate(300 if odd else 400, 40, seed=0)
    model = scvae.SCVAE(adata, n_latent=4, n_hidden=32)
    model.train(
        max_epochs=4,
        batch_size=64,
        lr=2e-3 if odd else 1e-3,
        progress_bar=False,
        early_stopping=True,
        seed=0,
    )
    rank = torch.distributed.get_rank()
    weights = {k: v.contiguous() for k, v in model.module.state_dict().items()}
    save_file(weights, out / f"{rank}.st")
    (out / f"{rank}.json").write_text(model.history.reset_index().to_json())


if __name__ == "__main__":
    main()
