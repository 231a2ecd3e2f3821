"""Densification strategies on crafted states, and the CPU path of the MCMC relocation."""

import math

import pytest
import torch

from agent.splat.strategy import (
    DefaultStrategy,
    MCMCStrategy,
    binomial_table,
    check_params,
    compute_relocation,
    inject_noise_to_position,
    relocate,
    relocation_formula_cpu,
    sample_add,
)


def make_params(means, log_scales, opacities, n_sh_rest=0):
    n = len(means)
    params = {
        "means": torch.nn.Parameter(torch.as_tensor(means, dtype=torch.float32)),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)),
        "scales": torch.nn.Parameter(torch.as_tensor(log_scales, dtype=torch.float32)),
        "opacities": torch.nn.Parameter(torch.logit(torch.as_tensor(opacities, dtype=torch.float32))),
        "sh0": torch.nn.Parameter(torch.arange(n, dtype=torch.float32)[:, None, None].repeat(1, 1, 3)),
        "shN": torch.nn.Parameter(torch.zeros(n, n_sh_rest, 3)),
    }
    optimizers = {k: torch.optim.Adam([p], lr=1e-3, eps=1e-15) for k, p in params.items()}
    # one step so the optimizers carry Adam moments that the strategies must keep aligned
    loss = sum((p**2).sum() for p in params.values())
    loss.backward()
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad()
    return params, optimizers


def kernel_formula(o: float, s: float, n: int) -> tuple[float, float]:
    """gsplat's relocation_kernel (RelocationCUDA.cu) written out with math.comb."""
    new_o = 1.0 - (1.0 - o) ** (1.0 / n)
    denom = 0.0
    for i in range(1, n + 1):
        for k in range(i):
            denom += math.comb(i - 1, k) * ((-1) ** k / math.sqrt(k + 1)) * new_o ** (k + 1)
    return new_o, o / denom * s


def test_relocation_cpu_matches_the_kernel_formula():
    g = torch.Generator().manual_seed(0)
    o = torch.rand(200, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = torch.rand(200, 3, generator=g, dtype=torch.float64) * 0.01 + 1e-4
    n = torch.randint(1, 9, (200,), generator=g)
    new_o, new_s = relocation_formula_cpu(o, s, n, binomial_table())
    for i in range(200):
        eo, es = kernel_formula(float(o[i]), 1.0, int(n[i]))
        assert new_o[i].item() == pytest.approx(eo, rel=1e-10)
        assert torch.allclose(new_s[i], s[i] * es, rtol=1e-9)


def test_relocation_preserves_opacity_and_identity_for_one_copy():
    o = torch.tensor([0.1, 0.5, 0.9, 0.99])
    s = torch.full((4, 3), 0.02)
    # one copy: unchanged
    o1, s1 = compute_relocation(o, s, torch.ones(4, dtype=torch.int64), binomial_table())
    assert torch.allclose(o1, o, atol=1e-6) and torch.allclose(s1, s, atol=1e-7)
    # N copies composite to the original opacity at the centre: 1 - (1 - o')^N = o
    for copies in (2, 3, 7):
        on, sn = compute_relocation(o, s, torch.full((4,), copies), binomial_table())
        assert torch.allclose(1 - (1 - on) ** copies, o, atol=1e-5)
        assert bool((sn <= s + 1e-9).all())  # copies are no larger than the original


def test_relocation_ratios_are_clamped_like_gsplat():
    o, s = torch.tensor([0.5]), torch.ones(1, 3)
    a = relocation_formula_cpu(o, s, torch.tensor([500]), binomial_table())
    b = relocation_formula_cpu(o, s, torch.tensor([51]), binomial_table())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_default_strategy_clones_splits_and_prunes():
    # 0: high gradient, small -> cloned; 1: high gradient, large -> split; 2: transparent -> pruned;
    # 3: quiet and fine -> untouched; 4: oversized (after the first reset) -> pruned
    scene = 1.0
    log_s = torch.log(torch.tensor([[0.005] * 3, [0.05] * 3, [0.005] * 3, [0.005] * 3, [0.5] * 3]))
    params, opts = make_params(torch.arange(15.0).reshape(5, 3), log_s, [0.6, 0.6, 0.001, 0.6, 0.6])
    strat = DefaultStrategy(grow_grad2d=0.0002, grow_scale3d=0.01, prune_scale3d=0.1, refine_start_iter=0, refine_every=10, reset_every=5)
    state = strat.initialize_state(scene)
    means2d = torch.zeros(1, 5, 2, requires_grad=True)
    info = {"means2d": means2d, "radii": torch.ones(1, 5, 2, dtype=torch.int32), "width": 100, "height": 100}
    strat.step_pre_backward(params, opts, state, 10, info)
    (means2d * torch.tensor([[[1e-5, 0.0]]] * 1) * torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])[None, :, None]).sum().backward()
    # NDC-scaled gradient of 0 and 1: 1e-5 * 100 / 2 = 5e-4 > 2e-4
    done = strat.step_post_backward(params, opts, state, 10, info)
    assert (done["cloned"], done["split"], done["pruned"]) == (1, 1, 2)
    ids = params["sh0"][:, 0, 0].detach().round().tolist()  # sh0 carries each original index (Adam moved it by 1e-3)
    assert sorted(ids) == [0.0, 0.0, 1.0, 1.0, 3.0]
    split_scales = torch.exp(params["scales"][torch.tensor(ids) == 1.0])
    assert torch.allclose(split_scales, torch.full_like(split_scales, 0.05 / 1.6), rtol=0.01)  # Adam moved the log by 1e-3
    for name, p in params.items():
        st = opts[name].state[p]
        assert opts[name].param_groups[0]["params"][0] is p
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape, name
    assert state["grad2d"].shape == (5,) and float(state["grad2d"].abs().sum()) == 0.0
    check_params(params, opts)


def test_default_strategy_resets_opacity_on_schedule():
    params, opts = make_params(torch.zeros(3, 3), torch.full((3, 3), -5.0), [0.9, 0.5, 0.005])
    strat = DefaultStrategy(refine_start_iter=1000, reset_every=4, prune_opa=0.005)
    state = strat.initialize_state()
    means2d = torch.zeros(1, 3, 2, requires_grad=True)
    info = {"means2d": means2d, "radii": torch.ones(1, 3, 2, dtype=torch.int32), "width": 10, "height": 10}
    for step in (1, 2, 3, 4):
        means2d.grad = torch.zeros_like(means2d)
        done = strat.step_post_backward(params, opts, state, step, info)
    assert done["reset"] == 1
    assert torch.allclose(torch.sigmoid(params["opacities"]), torch.tensor([0.01, 0.01, 0.005]), rtol=0.01)


def test_default_strategy_needs_the_retained_gradient():
    params, opts = make_params(torch.zeros(2, 3), torch.full((2, 3), -5.0), [0.5, 0.5])
    strat = DefaultStrategy()
    info = {"means2d": torch.zeros(1, 2, 2), "radii": torch.ones(1, 2, 2), "width": 10, "height": 10}
    with pytest.raises(ValueError, match="step_pre_backward"):
        strat.step_post_backward(params, opts, strat.initialize_state(), 1, info)


def test_mcmc_relocates_dead_gaussians_onto_live_ones():
    params, opts = make_params(torch.arange(12.0).reshape(4, 3), torch.full((4, 3), math.log(0.01)), [0.8, 0.001, 0.002, 0.6])
    original = torch.sigmoid(params["opacities"].detach()).clone()
    dead = original <= 0.005
    n = relocate(params, opts, dead, binomial_table(), 0.005, torch.Generator().manual_seed(0))
    assert n == 2 and len(params["means"]) == 4
    means = params["means"].detach()
    live = {tuple(means[0].tolist()), tuple(means[3].tolist())}
    assert tuple(means[1].tolist()) in live and tuple(means[2].tolist()) in live
    # every Gaussian sharing a place shares the relocated opacity and scale: together they keep the original opacity
    for src in (0, 3):
        orig = float(original[src])
        same = (means == means[src]).all(1)
        o = torch.sigmoid(params["opacities"].detach()[same])
        assert torch.allclose(o, o[0].expand_as(o))
        assert 1 - (1 - float(o[0])) ** int(same.sum()) == pytest.approx(orig, abs=1e-5)
    for name, p in params.items():
        assert opts[name].state[p]["exp_avg"].shape == p.shape


def test_mcmc_growth_respects_the_cap_and_noise_moves_only_transparent_gaussians():
    params, opts = make_params(torch.zeros(40, 3), torch.full((40, 3), math.log(0.01)), [0.9] * 20 + [0.001] * 20)
    strat = MCMCStrategy(cap_max=45, refine_start_iter=0, refine_every=1, noise_lr=5e5)
    state = strat.initialize_state()
    before = params["means"].detach().clone()
    done = strat.step_post_backward(params, opts, state, 1, {}, lr=0.0)
    assert done == {"relocated": 20, "added": 2}  # 5 % of 40
    assert len(params["means"]) == 42
    strat.step_post_backward(params, opts, state, 2, {}, lr=0.0)
    strat.step_post_backward(params, opts, state, 3, {}, lr=0.0)
    assert len(params["means"]) == 45
    assert torch.equal(params["means"].detach()[:40], before)  # lr 0: no noise
    # noise: near-transparent Gaussians move by ~ covariance * lr * noise_lr, opaque ones do not
    params, opts = make_params(torch.zeros(200, 3), torch.full((200, 3), math.log(0.01)), [0.95] * 100 + [0.001] * 100)
    inject_noise_to_position(params, scaler=1e-4 * 5e5, generator=torch.Generator().manual_seed(0))
    moved = params["means"].detach().norm(dim=1)
    assert float(moved[:100].max()) < 1e-8
    assert 1e-4 < float(moved[100:].mean()) < 1e-2  # sigma^2 = 1e-4 m^2 times 50


def test_sample_add_appends_copies():
    params, opts = make_params(torch.arange(6.0).reshape(2, 3), torch.full((2, 3), -4.0), [0.5, 0.5])
    sample_add(params, opts, 3, binomial_table(), 0.005, torch.Generator().manual_seed(1))
    assert len(params["means"]) == 5
    for name, p in params.items():
        assert opts[name].state[p]["exp_avg"].shape == p.shape
        assert float(opts[name].state[p]["exp_avg"][2:].abs().sum()) == 0.0
