"""Worker (scvi-tools environment) of time_to_quality.py: scvi-tools with its own defaults.

Trains ``SCVI`` with ``train()``'s defaults on the training cells and, every ``--every`` epochs,
keeps a copy of the weights and the training seconds so far (the copy's time excluded). After
training, each snapshot's held-out marginal LL and latent of all cells are written to an npz.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import scvi
import torch
from _common import read_split
from lightning.pytorch.callbacks import Callback


class Snapshots(Callback):
    """Weights and cumulative training seconds every ``every`` epochs (and at the end)."""

    def __init__(self, every: int) -> None:
        self.every, self.seconds, self.kept = every, 0.0, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._start
        epoch = trainer.current_epoch + 1
        if epoch % self.every == 0 or epoch == trainer.max_epochs:
            state = copy.deepcopy(pl_module.module.state_dict())
            self.kept.append((epoch, self.seconds, state))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--n-mc-samples", type=int, default=500)
    a = p.parse_args()
    adata, train, test = read_split(a.h5ad)
    scvi.settings.seed = a.seed
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train)
    snaps = Snapshots(a.every)
    model.train(accelerator="cpu", enable_progress_bar=False, callbacks=[snaps])
    epochs, seconds, mll, latents = [], [], [], []
    full = adata.copy()
    scvi.model.SCVI.setup_anndata(full)
    for epoch, secs, state in snaps.kept:
        model.module.load_state_dict(state)
        model.module.eval()
        with torch.no_grad():
            # per cell, averaged here (return_mean=True averages minibatch means, which
            # over-weights the last, smaller minibatch): the same mean over cells as scvae's
            ll = model.get_marginal_ll(
                test, n_mc_samples=a.n_mc_samples, return_mean=False, n_mc_samples_per_pass=50
            ).mean()
        epochs.append(epoch)
        seconds.append(secs)
        mll.append(float(ll))
        latents.append(model.get_latent_representation(full))
    np.savez(
        a.out,
        epochs=epochs,
        seconds=seconds,
        mll=mll,
        latents=np.stack(latents),
        max_epochs=model.history["elbo_train"].shape[0],
    )


if __name__ == "__main__":
    main()
