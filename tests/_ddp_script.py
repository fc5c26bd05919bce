"""Run by tests/test_distributed.py under torchrun: train on every rank, save each one's end.

With a second argument ``mismatch``, rank 1 is given other cells and another learning rate
(what the ranks of a badly written script would do): train() must refuse, not hang. With
``tripled``, rank 1 has the same cells with every count tripled. With ``local-checkpoints N``,
each rank trains N epochs with a checkpoint folder of its own (as on nodes without a shared
file system).
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
    mode, rank_env = sys.argv[2:3], os.environ["RANK"]
    odd = mode == ["mismatch"] and rank_env == "1"
    adata = scvae.data.simulate(300 if odd else 400, 40, seed=0)
    if mode == ["tripled"] and rank_env == "1":
        adata.X = adata.X * 3
    local = mode == ["local-checkpoints"]
    model = scvae.SCVAE(adata, n_latent=4, n_hidden=32)
    model.train(
        max_epochs=int(sys.argv[3]) if local else 4,
        batch_size=64,
        lr=2e-3 if odd else 1e-3,
        progress_bar=False,
        early_stopping=True,
        seed=0,
        checkpoint_dir=out / f"checkpoint{rank_env}" if local else None,
    )
    rank = torch.distributed.get_rank()
    weights = {k: v.contiguous() for k, v in model.module.state_dict().items()}
    save_file(weights, out / f"{rank}.st")
    (out / f"{rank}.json").write_text(model.history.reset_index().to_json())


if __name__ == "__main__":
    main()
