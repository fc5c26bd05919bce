"""Worker (project environment) of time_to_quality.py: scvae with its own defaults.

Trains ``SCVAE`` with ``train()``'s defaults (plus any options given) on the training cells,
once for each of ``--epochs`` from the same initial weights and seeds (so each run is the
prefix of the longer ones); the training seconds are the sum of the history's epoch seconds
(evaluation excluded). Each stop's held-out marginal LL
and latent of all cells go to an npz.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _common import read_split

import scvae


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("h5ad")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, nargs="+", required=True)
    p.add_argument("--n-mc-samples", type=int, default=500)
    p.add_argument("--train-options", default="{}", help="JSON of extra train() options")
    a = p.parse_args()
    adata, train, test = read_split(a.h5ad)
    options = json.loads(a.train_options)
    scvae.settings.seed = a.seed  # the same initial weights for every stop
    epochs, seconds, mll, latents = [], [], [], []
    for e in sorted(a.epochs):
        # a fresh model per stop: with the same seeds its first e epochs are those of any
        # longer run (KL warm-up depends on the epoch, not on max_epochs)
        model = scvae.SCVAE(train)
        model.train(max_epochs=e, seed=a.seed, progress_bar=False, **options)
        done = len(model.history)
        epochs.append(done)
        seconds.append(float(model.history["seconds"].sum()))
        mll.append(float(model.get_marginal_ll(test, n_mc_samples=a.n_mc_samples)))
        latents.append(model.get_latent_representation(adata))
        if done < e:  # early stopping ended the run
            break
    np.savez(a.out, epochs=epochs, seconds=seconds, mll=mll, latents=np.stack(latents))


if __name__ == "__main__":
    main()
