"""SCVAE end to end: training, queries and their signs, reproducibility, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import scvae
from scvae.io import ModelFileError


def knn_accuracy(
    latent: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    clf = KNeighborsClassifier(n_neighbors=15).fit(latent[train], labels[train])
    return float((clf.predict(latent[test]) == labels[test]).mean())


def test_latent_separates_cell_types(sim, trained):
    latent = trained.get_latent_representation()
    assert latent.shape == (sim.n_obs, 10)
    labels = sim.obs["cell_type"].cat.codes.to_numpy()
    acc = knn_accuracy(latent, labels, trained.train_indices, trained.validation_indices)
    chance = np.bincount(labels).max() / len(labels)
    assert acc > 0.9 > chance + 0.4


def test_untrained_latent_is_worse_than_trained(sim, trained):
    """The training, not the architecture, separates the types: a guard on the test above."""
    untrained = scvae.SCVAE(sim.copy(), batch_key="batch")
    labels = sim.obs["cell_type"].cat.codes.to_numpy()
    idx = np.arange(sim.n_obs)
    acc_untrained = knn_accuracy(untrained.get_latent_representation(), labels, idx[::2], idx[1::2])
    acc_trained = knn_accuracy(trained.get_latent_representation(), labels, idx[::2], idx[1::2])
    assert trained.get_elbo() > untrained.get_elbo() + 50
    assert acc_trained >= acc_untrained


def test_elbo_rises_during_training(trained):
    hist = trained.history
    assert list(hist.index) == list(range(40))
    # history holds the negative ELBO (scvi-tools' convention): it must fall.
    assert hist["elbo_train"].iloc[-5:].mean() < hist["elbo_train"].iloc[:5].mean() - 20
    assert hist["elbo_validation"].iloc[-1] < hist["elbo_validation"].iloc[0]
    # the default warm-up: 0 at the first epoch, 1 from epoch 10 on
    assert hist["kl_weight"].tolist() == [min(1.0, e / 10) for e in range(40)]


def test_signs_of_queries(trained):
    elbo = trained.get_elbo()
    recon = trained.get_reconstruction_error()
    assert elbo < 0 < recon
    assert recon < -elbo  # the KL term is positive
    per_cell = trained.get_elbo(return_mean=False)
    assert per_cell.shape == (trained.adata.n_obs,)
    assert np.all(per_cell < 0)
    # floats, as CONTRACT.md fixes, that keep scvi-tools' model.get_elbo().item() working
    for value in (elbo, recon, trained.get_marginal_ll(indices=[0, 1], n_mc_samples=5)):
        assert isinstance(value, float) and isinstance(value.item(), float)


def test_test_indices_are_the_cells_neither_trained_on_nor_validated(sim):
    model = scvae.SCVAE(sim, n_hidden=16, n_latent=3)
    assert model.test_indices.size == 0
    model.train(max_epochs=1, train_size=0.5, validation_size=0.2, progress_bar=False)
    parts = [model.train_indices, model.validation_indices, model.test_indices]
    assert [len(p) for p in parts] == [sim.n_obs // 2, sim.n_obs // 5, sim.n_obs * 3 // 10]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(sim.n_obs))


def test_test_indices_of_a_model_loaded_without_its_cells(sim, tmp_path):
    # the split is saved with the number of cells, so a property read needs no AnnData
    model = scvae.SCVAE(sim, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, train_size=0.5, validation_size=0.2, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = scvae.SCVAE.load(tmp_path / "m")
    assert np.array_equal(loaded.test_indices, model.test_indices)


def test_reconstruction_error_is_a_number_as_the_contract_says_and_its_docstring_tells(trained):
    # CONTRACT.md fixes a float (per-cell array with return_mean=False); scvi-tools returns
    # {"reconstruction_loss": value}, which the docstring must say
    assert isinstance(trained.get_reconstruction_error(indices=[0, 1]), float)
    per_cell = trained.get_reconstruction_error(indices=[0, 1], return_mean=False)
    assert isinstance(per_cell, np.ndarray) and per_cell.shape == (2,)
    doc = " ".join(scvae.SCVAE.get_reconstruction_error.__doc__.split())
    assert 'scvi-tools 1.4.2 returns a dict {"reconstruction_loss": value}' in doc.replace("`", "")


def test_marginal_ll_is_at_least_elbo(trained):
    torch.manual_seed(0)
    cells = trained.validation_indices
    mll = trained.get_marginal_ll(indices=cells, n_mc_samples=200, return_mean=False)
    elbo = np.mean([trained.get_elbo(indices=cells, return_mean=False) for _ in range(10)], axis=0)
    assert mll.shape == elbo.shape == (len(cells),)
    assert np.all(mll < 0)
    assert mll.mean() >= elbo.mean()
    assert (mll >= elbo - 1.0).mean() > 0.95


def test_same_seed_gives_bit_identical_latent(sim):
    def run(seed):
        model = scvae.SCVAE(sim.copy(), batch_key="batch", n_latent=4)
        model.train(max_epochs=3, seed=seed, device="cpu")
        return model.get_latent_representation()

    first, second, other = run(7), run(7), run(8)
    assert np.array_equal(first, second)
    assert not np.allclose(first, other)


def test_setting_the_seed_seeds_the_global_generators_as_scvi_tools(trained):
    import random

    def draws() -> tuple:
        return (
            trained.posterior_predictive_sample(indices=range(20)).toarray(),
            trained.get_elbo(indices=range(20), return_mean=False),
            trained.get_normalized_expression(indices=range(5), n_samples=3).to_numpy(),
            trained.get_latent_representation(indices=range(5), give_mean=False),
            np.random.rand(3),  # noqa: NPY002 (the global generator)
            random.random(),
        )

    try:
        scvae.settings.seed = 5
        first = draws()
        scvae.settings.seed = 5
        second = draws()
        scvae.settings.seed = 6
        other = draws()
    finally:
        scvae.settings.seed = 0
    for a, b, c in zip(first, second, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match=r"from 0 to 2\*\*32 - 1.*got 4294967296"):
        scvae.settings.seed = 2**32
    assert scvae.settings.seed == 0


def test_the_settings_seed_is_no_global_reseed_for_new_models_or_tl_fit(sim, monkeypatch):
    # new models and tl.fit(seed=...) read the settings seed for the initial weights only:
    # they never seed the caller's global generators (setting scvae.settings.seed does)
    import scvae._settings

    seeded: list[int] = []
    monkeypatch.setattr(scvae._settings, "_seed_everything", seeded.append)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    scvae.SCVAE(sim[:100].copy(), n_hidden=8).train(max_epochs=1, seed=3)
    assert torch.equal(torch.rand(3), expected)
    scvae.tl.fit(sim[:100].copy(), n_hidden=8, max_epochs=1, seed=4)
    assert seeded == [] and scvae.settings.seed == 0
    scvae.settings.seed = 0
    assert seeded == [0]


def test_seeded_calls_reseed_no_gpu_generator(sim, monkeypatch):
    # torch.manual_seed also reseeds every CUDA device (or queues that seed until CUDA starts),
    # which a fork of the CPU generator does not put back: new models, train and DE seed only
    # the generators they draw from (no GPU here: record what would reach every GPU)
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    data = sim[:100].copy()
    model = scvae.SCVAE(data, n_hidden=8, n_latent=3)
    model.train(max_epochs=1, seed=11, device="cpu")
    model.differential_expression(data, groupby="cell_type", n_samples_overall=20, seed=5)
    assert reseeded == []


def test_seeded_blocks_put_back_every_gpu_generator(monkeypatch):
    # a block keeps every CUDA device's generator once CUDA has started (a checkpoint's
    # resume sets them all) and seeds only its own device's; faked, as there is no GPU here
    from scvae import _rng

    states = {0: torch.tensor([0]), 1: torch.tensor([1])}
    fakes = (torch.Generator(), torch.Generator())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "default_generators", fakes)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: states[i].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: states.__setitem__(i, s))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert _rng.kept_cuda_devices(torch.device("cpu")) == []  # never started: left alone
    assert _rng.kept_cuda_devices(torch.device("cuda:1")) == [0, 1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert _rng.kept_cuda_devices(torch.device("cpu")) == [0, 1]
    before = torch.get_rng_state()
    fakes[0].manual_seed(99)
    untouched = fakes[0].get_state()
    with _rng.seeded(7, torch.device("cuda:1")):
        assert fakes[1].initial_seed() == 7  # its own device's generator
        states[0] = states[1] = torch.tensor([-1])  # e.g. a checkpoint resume set them all
        torch.rand(3)
    assert torch.equal(fakes[0].get_state(), untouched)  # the other GPU was not reseeded
    assert [int(states[i]) for i in (0, 1)] == [0, 1]
    assert torch.equal(torch.get_rng_state(), before)


def test_save_load_gives_identical_outputs(trained, sim, tmp_path):
    path = tmp_path / "model"
    trained.save(str(path))
    loaded = scvae.SCVAE.load(str(path), sim.copy())
    assert loaded.is_trained
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    torch.manual_seed(3)
    a = trained.get_elbo(return_mean=False)
    torch.manual_seed(3)
    b = loaded.get_elbo(return_mean=False)
    if trained.device.type == "cpu":
        np.testing.assert_array_equal(a, b)
    else:  # CUDA reductions are not bit-reproducible run to run
        np.testing.assert_allclose(a, b, rtol=1e-6)
    pd.testing.assert_frame_equal(loaded.history, trained.history, check_dtype=False)
    np.testing.assert_array_equal(loaded.validation_indices, trained.validation_indices)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(str(path))
    trained.save(str(path), overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_leaves_the_callers_generator(sim, tmp_path):
    # load builds the module (random initial weights) before putting the saved ones in: that
    # drew from the caller's global generator
    for cls in (scvae.SCVAE, scvae.LDVAE):
        path = tmp_path / cls.__name__
        cls(sim[:60].copy(), n_hidden=8, n_latent=2).save(str(path))
        torch.manual_seed(1)
        before = torch.get_rng_state()
        cls.load(str(path))
        assert torch.equal(torch.get_rng_state(), before), cls.__name__


def test_load_without_adata_then_query_other_adata(trained, sim, tmp_path):
    trained.save(str(tmp_path / "m"))
    loaded = scvae.SCVAE.load(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="no AnnData attached"):
        loaded.get_elbo()
    sub = sim[:50].copy()
    np.testing.assert_allclose(
        loaded.get_latent_representation(sub),
        trained.get_latent_representation(indices=range(50)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_load_with_other_cells_drops_the_split_they_do_not_share(trained, sim, tmp_path):
    trained.save(str(tmp_path / "m"))
    assert trained.validation_indices.size
    order = np.random.default_rng(0).permutation(sim.n_obs)
    for other, how in (
        (sim[order].copy(), "other cell names, or another order"),
        (sim[:500].copy(), "500 cells, not 1200"),
    ):
        with pytest.warns(UserWarning, match=rf"not those the model was trained on \({how}\)"):
            loaded = scvae.SCVAE.load(str(tmp_path / "m"), other)
        assert loaded.train_indices.size == loaded.validation_indices.size == 0
    # without cells, the split is kept, with the fingerprint of the cells it points into
    bare = scvae.SCVAE.load(str(tmp_path / "m"))
    np.testing.assert_array_equal(bare.validation_indices, trained.validation_indices)
    bare.save(str(tmp_path / "again"))
    again = scvae.SCVAE.load(str(tmp_path / "again"), sim.copy())
    np.testing.assert_array_equal(again.validation_indices, trained.validation_indices)
    with pytest.warns(UserWarning, match="not those the model was trained on"):
        scvae.SCVAE.load(str(tmp_path / "again"), sim[order].copy())


def test_load_refuses_other_genes(trained, sim, tmp_path):
    trained.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="genes are missing"):
        scvae.SCVAE.load(str(tmp_path / "m"), sim[:, :100].copy())
    reordered = sim[:, ::-1].copy()
    with pytest.raises(ValueError, match="another order"):
        scvae.SCVAE.load(str(tmp_path / "m"), reordered)


def test_load_refuses_corrupted_weights(trained, tmp_path):
    path = tmp_path / "m"
    trained.save(str(path))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="checksum"):
        scvae.SCVAE.load(str(path))


def test_latent_options(trained):
    mean, var = trained.get_latent_representation(return_dist=True)
    assert np.all(var > 0)
    np.testing.assert_array_equal(mean, trained.get_latent_representation())
    torch.manual_seed(0)
    sample = trained.get_latent_representation(give_mean=False)
    assert not np.allclose(sample, mean)
    assert np.abs(sample - mean).mean() < 3 * np.sqrt(var).mean()


def test_ln_latent_mean_is_on_simplex(sim):
    model = scvae.SCVAE(sim.copy(), latent_distribution="ln", n_latent=5)
    model.train(max_epochs=2)
    z = model.get_latent_representation(mc_samples=200)
    np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-5)
    assert np.all(z > 0)


def test_query_chunks_do_not_change_results(trained):
    full = trained.get_latent_representation()
    chunked = trained.get_latent_representation(batch_size=7)
    np.testing.assert_allclose(full, chunked, rtol=1e-5, atol=1e-6)


def test_latent_library_prior_from_training_cells(sim):
    model = scvae.SCVAE(sim.copy(), batch_key="batch", use_observed_lib_size=False)
    model.train(max_epochs=2)
    counts = sim.X[model.train_indices]
    batch = sim.obs["batch"].cat.codes.to_numpy()[model.train_indices]
    log_totals = np.log(np.asarray(counts.sum(1)).ravel())
    expected = [log_totals[batch == b].mean() for b in range(2)]
    np.testing.assert_allclose(model.module.library_log_means.cpu().numpy(), expected, rtol=1e-5)
    assert model.get_marginal_ll(indices=range(20), n_mc_samples=20) < 0


def test_latent_library_prior_of_a_batch_with_no_training_cells(sim):
    adata = sim[:100].copy()
    _, held_out = scvae.train.split_indices(100, 0.9, None, 0)
    small = held_out[:2]  # a batch whose only cells are held out
    adata.obs["batch"] = np.where(np.isin(np.arange(100), small), "small", "big")
    model = scvae.SCVAE(adata, batch_key="batch", use_observed_lib_size=False, n_hidden=16)
    with pytest.warns(UserWarning, match="Batch 'small' has no training cells"):
        model.train(max_epochs=1, seed=0)
    log_totals = np.log(np.asarray(adata.X[small].sum(1)).ravel())
    code = model.registry.batch_categories.index("small")
    # from its own cells, not the N(0, 1) of a module never fitted (a library of ~1 count)
    assert model.module.library_log_means[code].item() == pytest.approx(log_totals.mean(), rel=1e-5)


def test_train_size_one_has_no_validation(sim):
    model = scvae.SCVAE(sim[:300].copy())
    model.train(max_epochs=2, train_size=1.0)
    assert len(model.validation_indices) == 0
    assert "elbo_validation" not in model.history


def test_default_epochs_follow_scvi_tools(sim):
    model = scvae.SCVAE(sim[:200].copy())
    # min(round(20000 / 200 * 400), 400) = 400 epochs would be slow; check the rule itself
    n = 200
    assert min(round(20000 / n * 400), 400) == 400
    model.train(max_epochs=1)
    assert len(model.history) == 1


def test_early_stopping_stops(sim):
    model = scvae.SCVAE(sim[:400].copy())
    model.train(
        max_epochs=200,
        early_stopping=True,
        early_stopping_patience=2,
        lr=0.05,
        n_epochs_kl_warmup=None,
    )
    assert len(model.history) < 200


def test_early_stopping_options_as_scvi_tools(sim):
    # a reconstruction loss that cannot improve by 1e9 nats: the first watched epoch (after
    # the warm-up) sets the mark, and patience epochs later training stops
    model = scvae.SCVAE(sim[:300].copy(), n_hidden=16)
    model.train(
        max_epochs=50,
        early_stopping=True,
        early_stopping_patience=3,
        early_stopping_monitor="reconstruction_loss_validation",
        early_stopping_min_delta=1e9,
        early_stopping_warmup_epochs=5,
    )
    assert len(model.history) == 5 + 1 + 3
    assert model.train_config["early_stopping_monitor"] == "reconstruction_loss_validation"
    # mode "max" on a loss that falls: never better than its first value after the warm-up
    falling = scvae.SCVAE(sim[:300].copy(), n_hidden=16)
    falling.train(
        max_epochs=50, early_stopping=True, early_stopping_patience=4, early_stopping_mode="max"
    )
    assert len(falling.history) < 50
    for bad, match in (
        ({"early_stopping_monitor": "elbo_train"}, "early_stopping_monitor must be one of"),
        ({"early_stopping_mode": "lowest"}, "early_stopping_mode must be 'min' or 'max'"),
        ({"early_stopping_warmup_epochs": -1}, "early_stopping_warmup_epochs must be a whole"),
    ):
        with pytest.raises(ValueError, match=match):
            falling.train(max_epochs=1, early_stopping=True, **bad)


def test_early_stopping_stops_on_a_value_that_is_not_finite(sim, monkeypatch):
    values = iter([10.0, 9.0, float("nan"), 8.0, 7.0, 6.0])

    def validation(*args, **kwargs):  # as Lightning's check_finite: stop at the NaN
        v = next(values)
        return {k: v for k in ("elbo_validation", "reconstruction_loss_validation")} | {
            "kl_local_validation": 0.0
        }

    monkeypatch.setattr(scvae.train, "evaluate", validation)
    model = scvae.SCVAE(sim[:200].copy(), n_hidden=16)
    model.train(max_epochs=6, early_stopping=True, early_stopping_patience=3)
    assert len(model.history) == 3


def test_each_train_call_draws_new_randomness_from_the_seed(sim):
    def first_batches(calls: int) -> list[list[float]]:
        model = scvae.SCVAE(sim[:300].copy(), n_hidden=16)
        seen: list[list[float]] = []

        def hook(mod, args, out):
            if mod.training and len(seen) <= len(model.history):
                seen.append(args[0].sum(1)[:5].tolist())  # the first minibatch of a call

        model.module.register_forward_hook(hook)
        for _ in range(calls):
            model.train(max_epochs=1, progress_bar=False, seed=0)
        return seen

    once, again = first_batches(3), first_batches(3)
    assert once == again  # determined by the seed
    assert once[0] != once[1] != once[2]  # but not the same order in every call (scvi-tools)


def test_train_size_none_is_scvi_tools_default(sim):
    adata = sim[:143].copy()  # 0.9 x 143 -> 129 training cells: a last minibatch of 1
    model = scvae.SCVAE(adata, n_hidden=16)
    model.train(max_epochs=1, train_size=None)
    assert (len(model.train_indices), len(model.validation_indices)) == (128, 15)
    model.train(max_epochs=1)  # scvae's default 0.9: the cell stays (dropped each epoch)
    assert (len(model.train_indices), len(model.validation_indices)) == (129, 14)


def test_failed_training_restores_weights(sim):
    model = scvae.SCVAE(sim[:200].copy())
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match="device"):
        model.train(max_epochs=1, device="nonsense")
    with pytest.raises(ValueError, match="batch_size"):
        model.train(max_epochs=1, batch_size=1)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model.is_trained


def test_latent_goes_into_scanpy(sim, trained):
    import scanpy as sc

    adata = sim.copy()
    adata.obsm[scvae.LATENT_KEY] = trained.get_latent_representation(adata)
    sc.pp.neighbors(adata, use_rep="X_scvae", n_neighbors=10)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
    assert adata.obs["leiden"].nunique() >= 3


def test_boolean_mask_indices_select_those_cells(sim, trained):
    mask = np.zeros(sim.n_obs, dtype=bool)
    mask[[3, 7]] = True
    np.testing.assert_array_equal(
        trained.get_latent_representation(indices=mask),
        trained.get_latent_representation(indices=[3, 7]),
    )
    expr = trained.get_normalized_expression(indices=mask, n_samples=2)
    assert expr.index.tolist() == sim.obs_names[[3, 7]].tolist()
    with pytest.raises(IndexError, match="boolean mask of 5 entries"):
        trained.get_latent_representation(indices=mask[:5])
    with pytest.raises(IndexError, match="integer positions or a boolean mask"):
        trained.get_latent_representation(indices=[0.5, 1.0])


def test_another_train_call_numbers_its_epochs_on(sim):
    model = scvae.SCVAE(sim[:200].copy(), n_hidden=16)
    model.train(max_epochs=2)
    model.train(max_epochs=3)
    assert model.history.index.tolist() == [0, 1, 2, 3, 4]


def test_early_stopping_without_validation_cells_is_refused(sim):
    model = scvae.SCVAE(sim[:200].copy(), n_hidden=16)
    with pytest.raises(
        ValueError,
        match=r"early_stopping \(watching 'elbo_validation'\) needs validation cells, but "
        r"train_size=1.0 leaves none of 200: use train_size <= 0.995",
    ):
        model.train(max_epochs=2, early_stopping=True, train_size=1.0)
    small = scvae.SCVAE(sim[:5].copy(), n_hidden=16)
    with pytest.raises(ValueError, match=r"train_size=0.9 leaves none of 5: use train_size <= 0.8"):
        small.train(max_epochs=2, early_stopping=True)  # the default train_size, not a fix
    assert not model.is_trained


@pytest.mark.parametrize(
    "query",
    [
        "get_latent_representation",
        "get_elbo",
        "get_reconstruction_error",
        "get_marginal_ll",
        "get_normalized_expression",
        "get_likelihood_parameters",
        "get_latent_library_size",
        "posterior_predictive_sample",
        "get_feature_correlation_matrix",
    ],
)
def test_every_query_of_an_untrained_model_warns_once(sim, trained, query):
    import warnings

    untrained = scvae.SCVAE(sim[:50].copy(), n_hidden=16)
    options = {"n_mc_samples": 5} if query == "get_marginal_ll" else {}
    with pytest.warns(UserWarning, match=f"{query} on a model that has not been trained") as got:
        getattr(untrained, query)(indices=[0, 1], **options)
    assert len([w for w in got if "not been trained" in str(w.message)]) == 1
    assert got[0].filename == __file__  # the caller's line
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not been trained")  # trained: no warning
        getattr(trained, query)(indices=[0, 1], **options)


def test_sample_counts_numbers_and_single_genes_are_checked(trained):
    for call in (
        lambda: trained.get_marginal_ll(indices=[0], n_mc_samples=0),
        lambda: trained.get_latent_representation(indices=[0], mc_samples=0),
        lambda: trained.get_normalized_expression(indices=[0], n_samples=1.5),
    ):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            call()
    a = trained.get_normalized_expression(indices=[0, 1], library_size=np.int64(10_000))
    np.testing.assert_allclose(a.sum(1), 10_000, rtol=1e-4)
    one = trained.get_normalized_expression(indices=[0, 1], gene_list="gene3")
    assert one.columns.tolist() == ["gene3"]
    # as scvi-tools: the model's gene order, not the list's, each gene once
    torch.manual_seed(0)
    two = trained.get_normalized_expression(indices=[0, 1], gene_list=["gene7", "gene3", "gene7"])
    assert two.columns.tolist() == ["gene3", "gene7"]
    torch.manual_seed(0)
    full = trained.get_normalized_expression(indices=[0, 1])
    np.testing.assert_allclose(two.to_numpy(), full[["gene3", "gene7"]].to_numpy(), rtol=1e-6)
    drawn = trained.posterior_predictive_sample(indices=[0, 1], gene_list=["gene7", "gene3"])
    assert drawn.shape == (2, 2)


def test_transform_batch_takes_integer_categories_and_none(sim):
    adata = sim[:300].copy()
    adata.obs["b"] = adata.obs["batch"].cat.codes.astype(int)
    model = scvae.SCVAE(adata, batch_key="b", n_hidden=16)
    model.train(max_epochs=1)
    torch.manual_seed(0)
    by_int = model.get_normalized_expression(indices=[0, 1], transform_batch=1)
    torch.manual_seed(0)
    by_name = model.get_normalized_expression(indices=[0, 1], transform_batch="1")
    pd.testing.assert_frame_equal(by_int, by_name)
    torch.manual_seed(0)  # a float column's value, as the cells' batches are matched
    by_float = model.get_normalized_expression(indices=[0, 1], transform_batch=np.float64(1.0))
    pd.testing.assert_frame_equal(by_int, by_float)
    torch.manual_seed(0)
    own = model.get_normalized_expression(indices=[0, 1], transform_batch=[None])
    torch.manual_seed(0)
    pd.testing.assert_frame_equal(own, model.get_normalized_expression(indices=[0, 1]))
    with pytest.raises(ValueError, match="cannot mix None"):
        model.get_normalized_expression(transform_batch=[None, 0])


def test_marginal_ll_chunks_keep_every_live_sample_tensor_under_the_bound(trained, monkeypatch):
    # a pass holds about a dozen samples x cells x genes tensors: sized for all of them
    seen = []
    original = scvae.inference.marginal_ll

    def spy(module, chunks, n_mc_samples):
        chunks = list(chunks)
        seen.extend(x.shape[0] for x, _, _ in chunks)
        return original(module, chunks, n_mc_samples)

    monkeypatch.setattr(scvae.inference, "SAMPLE_ELEMENTS", 12 * 100 * trained.adata.n_vars * 4)
    monkeypatch.setattr(scvae.queries, "_SAMPLE_ELEMENTS", scvae.inference.SAMPLE_ELEMENTS)
    monkeypatch.setattr(scvae.inference, "marginal_ll", spy)
    trained.get_marginal_ll(indices=np.arange(10), n_mc_samples=100)
    assert max(seen) == 4


def test_feature_correlation_is_numpy_s_and_pearson_streams(trained, monkeypatch):
    import tracemalloc

    rng = np.random.default_rng(0)
    n_genes = trained.registry.n_vars
    blocks = [rng.gamma(2.0, 1.0, (n, n_genes)).astype(np.float32) for n in (30, 30, 20)]
    blocks[0][:, 0] = 1.0  # ties in the first block
    # denoised_samples yields (cells, samples, genes): here one sample per cell
    monkeypatch.setattr(
        scvae.inference, "denoised_samples", lambda *a, **k: (b[:, None] for b in blocks)
    )
    whole = np.vstack(blocks)
    pearson = trained.get_feature_correlation_matrix(
        indices=range(80), n_samples=1, correlation_type="pearson"
    )
    np.testing.assert_allclose(pearson.to_numpy(), np.corrcoef(whole, rowvar=False), atol=1e-12)
    spearman = trained.get_feature_correlation_matrix(indices=range(80), n_samples=1)
    ranked = pd.DataFrame(whole).rank().to_numpy()
    np.testing.assert_allclose(spearman.to_numpy(), np.corrcoef(ranked, rowvar=False), atol=1e-7)
    # memory: pearson keeps genes x genes sums, not the cells x genes draws (here 40 MiB)
    many = [rng.gamma(2.0, 1.0, (1000, n_genes)).astype(np.float32) for _ in range(500)]
    n_draws = sum(len(b) for b in many)
    monkeypatch.setattr(
        scvae.inference, "denoised_samples", lambda *a, **k: (b[:, None] for b in many)
    )
    monkeypatch.setattr(
        scvae.SCVAE, "_chunks", lambda *a: type("C", (), {"__len__": lambda s: n_draws})()
    )
    tracemalloc.start()
    trained.get_feature_correlation_matrix(n_samples=1, correlation_type="pearson")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n_draws * n_genes * 4 / 4, peak


def test_a_float64_default_dtype_changes_nothing(sim):
    # torch.set_default_dtype(torch.float64) built float64 weights that the float32 counts
    # could not be multiplied with (train failed deep inside), and load turned weights float64
    adata = sim[:200, :40].copy()
    reference = scvae.SCVAE(adata)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = scvae.SCVAE(adata)
        assert torch.get_default_dtype() == torch.float64  # the caller's default is kept
        for (name, a), b in zip(
            model.module.state_dict().items(), reference.module.state_dict().values(), strict=True
        ):
            assert a.dtype == b.dtype and torch.equal(a, b), name  # same seed, same weights
        model.train(max_epochs=1, seed=0)
        assert model.get_latent_representation().dtype == np.float32
        ldvae = scvae.LDVAE(adata)
        assert {p.dtype for p in ldvae.module.parameters()} == {torch.float32}
    finally:
        torch.set_default_dtype(previous)


def test_to_device_moves_the_weights_and_refuses_a_device_that_is_not_here(trained):
    # scvi-tools' model.to_device; the docs sent users to train(device=), which trains more
    model = trained
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.to_device("cpu")
    assert model.device == torch.device("cpu") and len(model.history) == len(trained.history)
    for bad, message in (
        (1, "cuda:1"),
        ("gpu", "torch calls GPUs 'cuda'"),
        ("mps", "use 'auto' or 'cpu'"),
    ):
        if bad == "mps" and torch.backends.mps.is_available():
            continue
        if bad == 1 and torch.cuda.device_count() > 1:
            continue
        with pytest.raises(ValueError, match=message):
            model.to_device(bad)
    assert model.device == torch.device("cpu")
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_refuses_a_missing_device_before_reading_anything(tmp_path, sim):
    model = scvae.SCVAE(sim[:60, :20].copy())
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"broken")  # not reached
    with pytest.raises(ValueError, match="torch calls GPUs 'cuda'"):
        scvae.SCVAE.load(tmp_path / "m", device="gpu")


def test_the_latent_mean_draws_nothing_from_the_callers_generator(trained):
    # the encoder samples z in every pass: the mean advanced torch's global generator
    state = torch.get_rng_state()
    trained.get_latent_representation()
    trained.get_latent_representation(return_dist=True)
    assert torch.equal(state, torch.get_rng_state())
    trained.get_latent_representation(give_mean=False)  # a draw, as documented
    assert not torch.equal(state, torch.get_rng_state())
