"""Model surgery (scvae.surgery): new batch columns reproduce the reference, and only they train."""

from __future__ import annotations

import pytest
import torch

from scvae import surgery
from scvae.module import VAE, Covariates, ModuleConfig

N_GENES = 12

CONFIGS = {
    "batchnorm": {},
    "layernorm-2layers": {"use_layer_norm": "both", "use_batch_norm": "none", "n_layers": 2},
    "gene-batch-latent-library": {"dispersion": "gene-batch", "use_observed_lib_size": False},
    "categorical-covariate": {"n_cats_per_cov": (3,)},
    "linear-decoder": {"linear_decoder": True},
    "not-deeply-injected": {"deeply_inject_covariates": False, "n_layers": 2},
}


def _module(n_batch: int, **options) -> VAE:
    torch.manual_seed(0)
    config = ModuleConfig(n_input=N_GENES, n_batch=n_batch, encode_covariates=True, **options)
    module = VAE(config)
    with torch.no_grad():  # non-trivial running statistics and batch columns
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        module.library_log_means.normal_(7.0, 0.5)
    return module.eval()


def _data(n: int, n_batch: int, n_cats: tuple[int, ...] = (), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((n, N_GENES), 3.0), generator=g) + 1
    batch = torch.randint(0, n_batch, (n,), generator=g)
    cats = [torch.randint(0, k, (n,), generator=g) for k in n_cats]
    cov = Covariates(categorical=torch.stack(cats, 1)) if cats else None
    return x, batch, cov


def _outputs(module: VAE, x, batch, cov):
    with torch.no_grad():
        inf = module.inference(x, batch, cov)
        z = inf["qz"].loc
        library = torch.log(x.sum(-1, keepdim=True))
        gen = module.generative(z, library, batch, cov)
        return z, inf["qz"].scale, gen["rho"], gen["theta"], gen["zi_logits"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_ref", [1, 3])
def test_new_batches_leave_reference_outputs_unchanged(name, n_ref):
    options = CONFIGS[name]
    ref = _module(n_ref, **options)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    query = surgery.add_batches(ref, 2)
    assert query.config.n_batch == n_ref + 2
    x, batch, cov = _data(40, n_ref, options.get("n_cats_per_cov", ()))
    for a, b in zip(_outputs(ref, x, batch, cov), _outputs(query, x, batch, cov), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the reference module itself is untouched
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


def test_new_columns_start_at_the_mean_of_the_reference_batches():
    ref = _module(3, dispersion="gene-batch")
    query = surgery.add_batches(
        ref, 1, library_log_means=torch.tensor([5.0]), library_log_vars=torch.tensor([0.3])
    )
    for name, (linear, offset, n_cols) in surgery.batch_layers(query).items():
        old = dict(ref.named_modules())[name].weight[:, offset : offset + 3]
        torch.testing.assert_close(linear.weight[:, offset + 3], old.mean(1))
        assert n_cols == 4
    torch.testing.assert_close(query.px_r[:, 3], ref.px_r.mean(1))
    assert query.library_log_means[3] == 5.0 and query.library_log_vars[3] == pytest.approx(0.3)
    # a single reference batch had no batch column: its column and the new one start at zero
    single = surgery.add_batches(_module(1), 1)
    for linear, offset, _ in surgery.batch_layers(single).values():
        assert torch.count_nonzero(linear.weight[:, offset : offset + 2]) == 0


def _train_steps(module: VAE, n_batch: int, steps: int = 5, weight_decay: float = 1e-2):
    x, batch, _ = _data(64, n_batch, seed=1)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=weight_decay)
    module.train()
    for _ in range(steps):
        opt.zero_grad()
        module(x, batch).loss.backward()
        opt.step()
    module.eval()


def test_only_new_columns_train_even_with_weight_decay():
    ref = _module(2, dispersion="gene-batch")
    query = surgery.add_batches(ref, 1)
    start = {k: v.clone() for k, v in query.state_dict().items()}
    frozen = surgery.freeze_reference(query, n_reference_batches=2)
    _train_steps(query, 3)
    end = query.state_dict()  # the state_dict hook puts back what weight decay moved
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    changed = {k for k in changed if not k.endswith("num_batches_tracked")}  # a step counter
    for name, mask in frozen.masked.items():
        assert name in changed
        torch.testing.assert_close(end[name][~mask], start[name][~mask], rtol=0, atol=0)
    for name in changed - set(frozen.masked):
        # the decoder's batch norm trains (scvi-tools' default); nothing else
        assert name.startswith("decoder.") and ".1." in name, name
    for name in start:
        if name.startswith("z_encoder") and "running" in name:
            assert torch.equal(start[name], end[name]), name  # encoder statistics frozen


def test_freeze_options():
    query = surgery.add_batches(_module(2), 1)
    frozen = surgery.freeze_reference(
        query, 2, surgery.FreezeConfig(freeze_expression=False, freeze_dropout=True)
    )
    first = query.z_encoder.encoder.layers[0]
    assert first[0].weight.requires_grad and first[0].bias.requires_grad
    assert "z_encoder.encoder.layers.0.0.weight" not in frozen.masked
    assert all(m.p == 0 for m in query.z_encoder.modules() if isinstance(m, torch.nn.Dropout))
    frozen.remove()
    assert all(p.requires_grad for p in query.parameters())
    assert all(m.p == 0.1 for m in query.z_encoder.modules() if isinstance(m, torch.nn.Dropout))
    everything = surgery.freeze_reference(query, 2, surgery.FreezeConfig(unfrozen=True))
    assert not everything.masked and all(p.requires_grad for p in query.parameters())


def test_library_encoder_trains_whole():
    query = surgery.add_batches(_module(2, use_observed_lib_size=False), 1)
    surgery.freeze_reference(query, 2)
    assert all(p.requires_grad for p in query.l_encoder.parameters())


def test_reference_that_cannot_move_the_query_is_refused():
    module = VAE(ModuleConfig(n_input=N_GENES, n_batch=2))
    with pytest.raises(ValueError, match="encode_covariates=True"):
        surgery.check_mappable(module)


def test_no_new_batches_is_a_copy():
    ref = _module(2)
    query = surgery.add_batches(ref, 0)
    assert query is not ref
    for k, v in ref.state_dict().items():
        assert torch.equal(v, query.state_dict()[k])


# ---------------------------------------------- new categorical covariate values (a new donor)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("ref_cats", "added"), [((1,), (2,)), ((3, 2), (1, 2)), ((3, 2), (0, 1))])
def test_new_covariate_categories_leave_reference_outputs_unchanged(name, ref_cats, added):
    """scvi-tools appends new columns at the end of the weight matrix, which shifts the
    reference's columns unless only the last covariate grew; scvae widens each block."""
    options = {**CONFIGS[name], "n_cats_per_cov": ref_cats}
    ref = _module(2, **options)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    query = surgery.add_batches(ref, 1, new_cats_per_cov=added)
    assert query.config.n_cats_per_cov == tuple(r + a for r, a in zip(ref_cats, added, strict=True))
    assert query.config.n_batch == 3
    x, batch, cov = _data(40, 2, ref_cats)
    for a, b in zip(_outputs(ref, x, batch, cov), _outputs(query, x, batch, cov), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


def test_new_covariate_columns_start_at_the_mean_of_their_block():
    ref = _module(2, n_cats_per_cov=(3, 1))
    query = surgery.add_batches(ref, 0, new_cats_per_cov=(1, 1))
    layers = surgery.categorical_layers(query)
    assert layers  # encoder and decoder
    for name, (linear, offset, widths) in layers.items():
        assert widths == [2, 4, 2]
        old_linear, old_offset, old_widths = surgery.categorical_layers(ref)[name]
        assert old_widths == [2, 3, 0] and old_offset == offset
        old = old_linear.weight
        w = linear.weight
        torch.testing.assert_close(w[:, : offset + 2], old[:, : offset + 2], rtol=0, atol=0)
        block = old[:, offset + 2 : offset + 5]
        torch.testing.assert_close(w[:, offset + 2 : offset + 5], block, rtol=0, atol=0)
        torch.testing.assert_close(w[:, offset + 5], block.mean(1))
        # a single reference category had no column: its column and the new one are zero
        assert torch.count_nonzero(w[:, offset + 6 : offset + 8]) == 0


def test_wrong_covariate_counts_are_refused():
    ref = _module(2, n_cats_per_cov=(3,))
    with pytest.raises(ValueError, match="one count per covariate"):
        surgery.add_batches(ref, 0, new_cats_per_cov=(1, 1))
    with pytest.raises(ValueError, match=r"must be >= 0.*new_cats_per_cov=\(-1,\)"):
        surgery.add_batches(ref, 0, new_cats_per_cov=(-1,))
    query = surgery.add_batches(ref, 0, new_cats_per_cov=(1,))
    with pytest.raises(ValueError, match=r"reference_cats_per_cov=\[5\] does not fit"):
        surgery.freeze_reference(query, 2, reference_cats_per_cov=[5])


def test_only_new_covariate_columns_train_even_with_weight_decay():
    ref = _module(2, n_cats_per_cov=(2, 2), n_layers=2)
    query = surgery.add_batches(ref, 1, new_cats_per_cov=(1, 0))
    frozen = surgery.freeze_reference(query, 2, reference_cats_per_cov=(2, 2))
    for name, (_, offset, widths) in surgery.categorical_layers(query).items():
        if name.startswith("l_encoder"):
            continue
        mask = frozen.masked[f"{name}.weight"]
        assert widths == [3, 3, 2]
        trained_columns = torch.nonzero(mask[0]).ravel().tolist()
        assert trained_columns == [offset + 2, offset + 5], name  # the new batch and donor
        assert bool((mask == mask[0]).all())
    start = {k: v.clone() for k, v in query.state_dict().items()}
    x, batch, cov = _data(64, 3, (3, 2), seed=1)
    params = [p for p in query.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
    query.train()
    for _ in range(5):
        opt.zero_grad()
        query(x, batch, cov).loss.backward()
        opt.step()
    query.eval()
    end = query.state_dict()
    for name, mask in frozen.masked.items():
        torch.testing.assert_close(end[name][~mask], start[name][~mask], rtol=0, atol=0)
        assert not torch.equal(end[name][mask], start[name][mask]), name
