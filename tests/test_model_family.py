"""Each modelling option and query does what it says: a test per option that fails if the
option were silently ignored."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import scvae
from scvae.data import RegistryError


def nb_counts(mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NB draws by the Gamma-Poisson mixture (numpy), at least one count per cell."""
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1
    return x


def two_group_data(n_cells=600, n_genes=40, thetas=(1.0, 50.0), key="batch", seed=0):
    """Cells in two groups that differ only in their NB dispersion."""
    rng = np.random.default_rng(seed)
    group = rng.integers(2, size=n_cells)
    rho = rng.dirichlet(np.ones(n_genes) * 2)
    mu = 2000 * np.tile(rho, (n_cells, 1))
    theta = np.where(group[:, None] == 0, thetas[0], thetas[1]) * np.ones((1, n_genes))
    adata = ad.AnnData(sp.csr_matrix(nb_counts(mu, theta, rng)))
    adata.obs[key] = pd.Categorical([f"g{g}" for g in group])
    return adata


def fitted_theta(model: scvae.SCVAE) -> np.ndarray:
    return torch.exp(model.module.px_r).detach().cpu().numpy()


@pytest.mark.parametrize("key", ["batch", "labels"])
def test_group_dispersion_recovers_simulated_dispersions(key):
    adata = two_group_data(key=key)
    kw = {"batch_key": "batch"} if key == "batch" else {"labels_key": "labels"}
    dispersion = {"batch": "gene-batch", "labels": "gene-label"}[key]
    model = scvae.SCVAE(adata, gene_likelihood="nb", dispersion=dispersion, **kw)
    model.train(max_epochs=60, lr=1e-2, n_epochs_kl_warmup=None, train_size=1.0)
    theta = fitted_theta(model)
    assert theta.shape == (40, 2)
    median = np.median(theta, axis=0)
    assert median[1] > 5 * median[0]  # the truth is 50 vs 1
    assert 0.3 < median[0] < 3


def test_gene_dispersion_is_one_per_gene():
    adata = two_group_data()
    model = scvae.SCVAE(adata, batch_key="batch", gene_likelihood="nb")
    assert fitted_theta(model).shape == (40, 1)


def test_gene_cell_dispersion_varies_by_cell():
    adata = two_group_data()
    model = scvae.SCVAE(adata, gene_likelihood="nb", dispersion="gene-cell")
    assert model.module.px_r is None
    model.train(max_epochs=2)
    theta = model.get_likelihood_parameters()["dispersions"]
    assert theta.shape == (600, 40)
    assert theta.std(axis=0).mean() > 0


def test_latent_library_tracks_simulated_library_sizes():
    adata = scvae.data.simulate(800, 100, library_log_sd=0.6, seed=2)
    model = scvae.SCVAE(adata, use_observed_lib_size=False)
    model.train(max_epochs=200, n_epochs_kl_warmup=50, train_size=1.0)  # q(l|x) learns slowly
    lib = model.get_latent_library_size()[:, 0]
    truth = adata.obs["library_size"].to_numpy()
    assert np.corrcoef(np.log(lib), np.log(truth))[0, 1] > 0.85
    observed_median = np.median(np.asarray(adata.X.sum(1)).ravel())
    assert 0.75 < np.median(lib) / observed_median < 1.33
    observed = scvae.SCVAE(adata).get_latent_library_size()[:, 0]
    np.testing.assert_allclose(observed, np.asarray(adata.X.sum(1)).ravel(), rtol=1e-5)


def test_poisson_scores_worse_than_nb_on_overdispersed_held_out_cells():
    adata = scvae.data.simulate(1000, 80, theta_range=(0.5, 2.0), zero_inflation=0.0, seed=3)
    scores = {}
    for likelihood in ("nb", "poisson"):
        model = scvae.SCVAE(adata, gene_likelihood=likelihood)
        model.train(max_epochs=40, seed=0)
        torch.manual_seed(0)
        scores[likelihood] = model.get_marginal_ll(
            indices=model.validation_indices, n_mc_samples=50
        )
    assert scores["nb"] > scores["poisson"] + 5


def test_likelihood_parameters_per_likelihood():
    adata = scvae.data.simulate(100, 20, seed=0)
    for likelihood, keys in [
        ("zinb", {"mean", "dispersions", "dropout"}),
        ("nb", {"mean", "dispersions"}),
        ("poisson", {"mean"}),
    ]:
        params = scvae.SCVAE(adata, gene_likelihood=likelihood).get_likelihood_parameters()
        assert set(params) == keys
        assert params["mean"].shape == (100, 20) and (params["mean"] > 0).all()


def linear_widths(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_architecture_options_shape_the_networks():
    adata = scvae.data.simulate(60, 30, n_batches=3, seed=0)
    model = scvae.SCVAE(
        adata, batch_key="batch", n_hidden=16, n_layers=2, n_latent=4, dropout_rate=0.3
    )
    enc = model.module.z_encoder.encoder
    assert linear_widths(enc) == [(30, 16), (16, 16)]  # batch not encoded by default
    assert [m.p for m in enc.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    dec = model.module.decoder.px_decoder
    assert linear_widths(dec) == [(4 + 3, 16), (16 + 3, 16)]  # deep injection of the batch
    shallow = scvae.SCVAE(
        adata,
        batch_key="batch",
        n_hidden=16,
        n_layers=2,
        deeply_inject_covariates=False,
        encode_covariates=True,
    )
    assert linear_widths(shallow.module.decoder.px_decoder) == [(10 + 3, 16), (16, 16)]
    assert linear_widths(shallow.module.z_encoder.encoder)[0] == (30 + 3, 16)


@pytest.mark.parametrize(
    ("batch_norm", "layer_norm", "enc_bn", "dec_bn", "enc_ln", "dec_ln"),
    [
        ("both", "none", True, True, False, False),
        ("none", "both", False, False, True, True),
        ("encoder", "decoder", True, False, False, True),
        ("decoder", "encoder", False, True, True, False),
    ],
)
def test_norm_options(batch_norm, layer_norm, enc_bn, dec_bn, enc_ln, dec_ln):
    adata = scvae.data.simulate(40, 10, seed=0)
    m = scvae.SCVAE(adata, use_batch_norm=batch_norm, use_layer_norm=layer_norm).module

    def has(part, kind):
        return any(isinstance(x, kind) for x in part.modules())

    assert has(m.z_encoder, nn.BatchNorm1d) == enc_bn
    assert has(m.decoder, nn.BatchNorm1d) == dec_bn
    assert has(m.z_encoder, nn.LayerNorm) == enc_ln
    assert has(m.decoder, nn.LayerNorm) == dec_ln


def test_encode_covariates_makes_latent_depend_on_batch():
    adata = scvae.data.simulate(200, 30, n_batches=2, seed=1)
    model = scvae.SCVAE(adata, batch_key="batch", encode_covariates=True)
    model.train(max_epochs=3)
    swapped = adata.copy()
    swapped.obs["batch"] = pd.Categorical(
        np.where(adata.obs["batch"] == "batch0", "batch1", "batch0"),
        categories=["batch0", "batch1"],
    )
    assert not np.allclose(
        model.get_latent_representation(swapped), model.get_latent_representation()
    )
    plain = scvae.SCVAE(adata, batch_key="batch")
    np.testing.assert_array_equal(
        plain.get_latent_representation(swapped), plain.get_latent_representation()
    )


def covariate_data():
    adata = scvae.data.simulate(200, 30, seed=4)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2", "d3"], adata.n_obs))
    adata.obs["percent_mito"] = rng.uniform(0, 0.2, adata.n_obs)
    adata.obs["size_factor"] = np.asarray(adata.X.sum(1)).ravel() / 1000.0
    return adata


def test_categorical_and_continuous_covariates_enter_the_decoder():
    adata = covariate_data()
    model = scvae.SCVAE(
        adata,
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["percent_mito"],
        n_latent=5,
    )
    assert linear_widths(model.module.decoder.px_decoder)[0] == (5 + 1 + 3, 128)
    model.train(max_epochs=2)
    torch.manual_seed(0)
    base = model.get_normalized_expression()
    changed = adata.copy()
    changed.obs["percent_mito"] = 0.9
    changed.obs["donor"] = pd.Categorical(["d1"] * adata.n_obs, categories=["d1", "d2", "d3"])
    torch.manual_seed(0)
    other = model.get_normalized_expression(changed)
    assert np.abs(base.to_numpy() - other.to_numpy()).max() > 1e-4
    unseen = adata.copy()
    unseen.obs["donor"] = pd.Categorical(["d9"] * adata.n_obs)
    with pytest.raises(RegistryError, match="not trained with: 'd9'"):
        model.get_latent_representation(unseen)
    nan = adata.copy()
    nan.obs["percent_mito"] = np.inf
    with pytest.raises(RegistryError, match="infinite"):
        model.get_latent_representation(nan)


def test_size_factors_are_the_library():
    adata = covariate_data()
    model = scvae.SCVAE(adata, size_factor_key="size_factor", use_observed_lib_size=False)
    assert model.module.l_encoder is None
    np.testing.assert_allclose(
        model.get_latent_library_size()[:, 0], adata.obs["size_factor"], rtol=1e-5
    )
    model.train(max_epochs=2)
    bad = adata.copy()
    bad.obs["size_factor"] = -1.0
    with pytest.raises(RegistryError, match="must be positive"):
        model.get_elbo(bad)


def test_size_factors_of_any_scale_fit_the_counts_as_in_scvi():
    # scVI's decoder with size factors: rho = softplus (not a softmax), so mu = sf x rho can
    # reach the counts with the usual mean-1 size factors (a softmax caps sum(mu) at sf ~ 1)
    adata = scvae.data.simulate(300, 400, seed=1)
    totals = np.asarray(adata.X.sum(1)).ravel()
    adata.obs["sf"] = totals / totals.mean()
    elbo, scale = {}, {}
    for key in (None, "sf"):
        model = scvae.SCVAE(adata, size_factor_key=key, n_hidden=32)
        model.train(max_epochs=50, train_size=1.0, seed=0, batch_size=32)
        elbo[key] = model.get_elbo()
        scale[key] = np.median(model.get_likelihood_parameters()["mean"].sum(1) / totals)
    assert model.module.config.scale_activation == "softplus"
    assert scvae.SCVAE(adata).module.config.scale_activation == "softmax"
    # softplus starts far from the counts' scale and learns it (as scvi-tools'); a softmax
    # would stay at sum(mu) = sf, a median of 0.0007 of the totals here
    assert scale[None] == pytest.approx(1.0) and scale["sf"] > 0.3
    assert elbo["sf"] > 1.3 * elbo[None]  # within 30 % of the observed library's ELBO


def test_normalized_expression_options(trained, sim):
    torch.manual_seed(1)
    rho = trained.get_normalized_expression()
    assert rho.shape == (sim.n_obs, sim.n_vars)
    assert list(rho.index) == list(sim.obs_names) and list(rho.columns) == list(sim.var_names)
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-4)
    torch.manual_seed(1)
    scaled = trained.get_normalized_expression(library_size=1e4, gene_list=["gene3", "gene7"])
    np.testing.assert_allclose(
        scaled.to_numpy(), rho[["gene3", "gene7"]].to_numpy() * 1e4, rtol=1e-5
    )
    torch.manual_seed(1)
    latent = trained.get_normalized_expression(library_size="latent", return_numpy=True)
    totals = np.asarray(sim.X.sum(1))
    np.testing.assert_allclose(latent, rho.to_numpy() * totals, rtol=1e-4)
    with pytest.warns(UserWarning, match="returning an ndarray") as caught:
        samples = trained.get_normalized_expression(
            n_samples=3, return_mean=False, indices=range(5)
        )
    assert caught[0].filename == __file__  # the warning points at the caller
    assert samples.shape == (3, 5, sim.n_vars)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = trained.get_normalized_expression(
            n_samples=3, return_mean=False, indices=range(5), return_numpy=True
        )
    assert kept.shape == (3, 5, sim.n_vars)
    assert not np.allclose(samples[0], samples[1])


def test_transform_batch_changes_and_averages(trained):
    args = {"indices": range(50), "n_samples": 1}
    outs = {}
    for tb in ("batch0", "batch1", ["batch0", "batch1"]):
        torch.manual_seed(2)
        outs[str(tb)] = trained.get_normalized_expression(transform_batch=tb, **args).to_numpy()
    assert np.abs(outs["batch0"] - outs["batch1"]).max() > 1e-4
    np.testing.assert_allclose(
        outs[str(["batch0", "batch1"])], (outs["batch0"] + outs["batch1"]) / 2, rtol=1e-5, atol=1e-8
    )
    with pytest.raises(ValueError, match="not a registered batch"):
        trained.get_normalized_expression(transform_batch="nope")


def test_posterior_predictive_sample_is_sparse_counts_with_the_right_mean(trained):
    torch.manual_seed(0)
    samples = trained.posterior_predictive_sample(indices=range(100), n_samples=30)
    # scvi-tools' shape (cells, genes, samples), as a scipy N-D sparse array
    assert isinstance(samples, sp.coo_array) and samples.shape == (100, 150, 30)
    assert samples.dtype == np.float32 and 0 < samples.nnz < 100 * 150 * 30
    stack = np.moveaxis(samples.todense(), 2, 0)
    # as scvi-tools' GCXS: one sample by indexing, a sum over the samples axis
    np.testing.assert_array_equal(samples[..., 3].toarray(), stack[3])
    np.testing.assert_array_equal(np.asarray(samples.sum(axis=2)), stack.sum(0))
    assert (stack >= 0).all() and np.array_equal(stack, np.round(stack))
    mean = trained.get_likelihood_parameters(indices=range(100), n_samples=200, give_mean=True)
    pi = mean["dropout"]
    assert pi.min() >= 0 and pi.max() <= 1  # a probability, as scvi-tools' zi_probs
    expected = ((1 - pi) * mean["mean"]).sum()
    assert abs(stack.mean(0).sum() - expected) / expected < 0.1
    one = trained.posterior_predictive_sample(indices=range(10), gene_list=["gene0", "gene1"])
    assert isinstance(one, sp.csr_array) and one.shape == (10, 2)
    # chunk by chunk (7 cells at a time), each cell's draws stay in its own row: the drawn
    # totals follow the cells' observed totals (the observed library)
    drawn = trained.posterior_predictive_sample(indices=range(40), n_samples=5, batch_size=7)
    totals = np.asarray(trained.adata.X[:40].sum(1)).ravel()
    assert np.corrcoef(drawn.todense().sum((1, 2)), totals)[0, 1] > 0.9


def test_feature_correlation_matrix(trained):
    corr = trained.get_feature_correlation_matrix(indices=range(200), n_samples=3)
    assert corr.shape == (150, 150)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T, atol=1e-12)
    pearson = trained.get_feature_correlation_matrix(
        indices=range(200), n_samples=3, correlation_type="pearson"
    )
    assert not np.allclose(pearson, corr)
    # several batches: one matrix per batch, then their mean (scvi-tools), not pooled draws
    torch.manual_seed(0)
    both = trained.get_feature_correlation_matrix(
        indices=range(100), n_samples=2, transform_batch=["batch0", "batch1"]
    )
    torch.manual_seed(0)  # the same draws, batch by batch
    each = [
        trained.get_feature_correlation_matrix(indices=range(100), n_samples=2, transform_batch=b)
        for b in ("batch0", "batch1")
    ]
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, atol=1e-12)


def test_ldvae_defaults_and_loadings_fold_in_batch_norm():
    adata = scvae.data.simulate(300, 25, n_batches=2, seed=0)
    model = scvae.LDVAE(adata, batch_key="batch", n_latent=3)
    c = model.module.config
    assert (c.gene_likelihood, c.use_observed_lib_size, c.linear_decoder) == ("nb", False, True)
    model.train(max_epochs=5)
    loadings = model.get_loadings()
    assert loadings.shape == (25, 3) and list(loadings.index) == list(adata.var_names)
    # the logits of rho move by loadings @ (z1 - z2) between two latent points (batch fixed)
    dec = model.module.decoder.factor_regressor
    z1, z2 = torch.randn(1, 3), torch.randn(1, 3)
    batch = torch.zeros(1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        diff = (dec(z1.to(model.device), batch) - dec(z2.to(model.device), batch)).cpu()
    np.testing.assert_allclose(
        diff[0].numpy(), loadings.to_numpy() @ (z1 - z2)[0].numpy(), rtol=1e-4, atol=1e-5
    )
    raw = dec.layers[0][0].weight[:, :3].detach().cpu().numpy()
    assert not np.allclose(raw, loadings.to_numpy())  # the batch norm was folded in
    plain = scvae.LDVAE(adata, batch_key="batch", n_latent=3, use_batch_norm=False)
    plain.train(max_epochs=1)
    assert plain.get_loadings().shape == (25, 3)  # the raw weights, without batch norm


def test_ldvae_save_load_and_class_check(tmp_path):
    adata = scvae.data.simulate(100, 15, seed=0)
    model = scvae.LDVAE(adata, n_latent=2)
    model.train(max_epochs=2)
    model.save(str(tmp_path / "ld"))
    loaded = scvae.LDVAE.load(str(tmp_path / "ld"), adata)
    pd.testing.assert_frame_equal(loaded.get_loadings(), model.get_loadings())
    assert repr(loaded).startswith("LDVAE(15 genes")  # it called itself SCVAE
    with pytest.raises(ValueError, match="holds a LDVAE model"):
        scvae.SCVAE.load(str(tmp_path / "ld"), adata)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"size_factor_key": "sf"}, ValueError, r"LDVAE does not take size factors.*'sf'"),
        ({"use_batch_norm": "none"}, TypeError, r"use_batch_norm must be True or False.*'none'"),
        ({"bias": "no"}, TypeError, r"bias must be True or False, got 'no'"),
        ({"dispersion": "gene-cell"}, ValueError, r"'gene', 'gene-batch' or 'gene-label'"),
    ],
)
def test_ldvae_refuses_options_it_cannot_honour(options, error, message):
    adata = scvae.data.simulate(60, 10, seed=0)
    adata.obs["sf"] = 1.0
    with pytest.raises(error, match=message):
        scvae.LDVAE(adata, **options)


def test_ldvae_passes_log_variational_on():
    adata = scvae.data.simulate(60, 10, seed=0)
    assert scvae.LDVAE(adata).module.config.log_variational is True
    assert scvae.LDVAE(adata, log_variational=False).module.config.log_variational is False
