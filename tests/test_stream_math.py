"""The stream math on hand-built tensors: schedule, batch step, residual noise, blending."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import LCMScheduler

from engine.stream.batch import StreamBatch
from engine.stream.blend import blend_embeddings, blend_noise, slerp
from engine.stream.guidance import (
    expand_for_unet,
    guide,
    next_residual_noise,
    successor_coefficients,
    unet_batch_size,
)
from engine.stream.modes import BlendMethod, CfgType, PredictionType
from engine.stream.schedule import (
    boundary_scalings,
    build_schedule,
    lcm_timesteps,
    strength_to_t_index_list,
)
from tests.lcm_reference import sequential_reference

SHAPE = (4, 8, 8)


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class AnalyticDenoiser:
    """A deterministic, batch-independent ε-predictor standing in for a UNet in the math tests."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(4, 4, generator=g) * 0.3
        self.calls: list[int] = []

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        self.calls.append(latents.shape[0])
        mixed = torch.einsum("oc,bchw->bohw", self.weight, latents)
        scale = (timesteps.float() / 1000.0).view(-1, 1, 1, 1)
        return torch.tanh(mixed + scale) + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def make_batch(
    t_index_list,
    cfg=CfgType.NONE,
    add_noise=True,
    prediction=PredictionType.EPSILON,
    guidance=1.0,
    delta=1.0,
    seed=1,
):
    schedule = build_schedule(sd_alphas_cumprod(), t_index_list)
    noise = torch.randn((len(t_index_list), *SHAPE), generator=torch.Generator().manual_seed(seed))
    return StreamBatch(schedule, noise, cfg, prediction, add_noise, guidance, delta)


def embeddings_for(batch: StreamBatch, cond: float = 0.1, uncond: float = -0.2) -> torch.Tensor:
    pos = torch.full((1, 3, 2), cond)
    neg = torch.full((1, 3, 2), uncond)
    from engine.stream.guidance import layout_embeddings

    return layout_embeddings(batch.cfg_type, batch.n, pos, neg)


# ---------------------------------------------------------------- schedule


def test_timesteps_match_design_examples_and_diffusers():
    schedule = lcm_timesteps(50)
    assert [schedule[i] for i in (32, 45)] == [359, 99]
    assert [schedule[i] for i in (0, 16, 32, 45)] == [999, 679, 359, 99]
    scheduler = LCMScheduler()
    for steps in (1, 2, 4, 7, 10, 25, 50):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == lcm_timesteps(steps)


def test_coefficients_match_diffusers_scheduler():
    scheduler = LCMScheduler()
    s = build_schedule(scheduler.alphas_cumprod, [0, 16, 32, 45])
    for i, t in enumerate([999, 679, 359, 99]):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert s.c_skip[i].item() == pytest.approx(float(c_skip), rel=1e-6)
        assert s.c_out[i].item() == pytest.approx(float(c_out), rel=1e-6)
        assert s.alpha[i].item() == pytest.approx(scheduler.alphas_cumprod[t].sqrt().item(), rel=1e-6)
        assert s.beta[i].item() == pytest.approx((1 - scheduler.alphas_cumprod[t]).sqrt().item(), rel=1e-6)
    assert boundary_scalings(0) == (1.0, 0.0)


@pytest.mark.parametrize("bad", [[], [45, 32], [3, 3], [0, 50], [-1, 4]])
def test_schedule_rejects_bad_index_lists(bad):
    with pytest.raises(ValueError, match="t_index_list"):
        build_schedule(sd_alphas_cumprod(), bad)


def test_strength_maps_onto_increasing_indices():
    assert strength_to_t_index_list(1.0, 4, 50) == [0, 16, 32, 49]
    assert strength_to_t_index_list(0.4, 2, 50) == [29, 49]
    assert strength_to_t_index_list(0.0, 3, 50) == [47, 48, 49]
    for strength in (0.0, 0.01, 0.3, 0.77, 1.0):
        for n in (1, 2, 4, 8):
            idx = strength_to_t_index_list(strength, n, 50)
            assert len(idx) == n and all(b > a for a, b in itertools.pairwise(idx))
            assert idx[0] == min(math.floor(49 * (1 - strength)), 50 - n)
            assert n == 1 or idx[-1] == 49
    with pytest.raises(ValueError, match="strength"):
        strength_to_t_index_list(1.5, 2, 50)


# ---------------------------------------------------------------- stream batch


@pytest.mark.parametrize("t_index_list", [[45], [32, 45], [0, 16, 32, 45]])
@pytest.mark.parametrize("cfg", [CfgType.NONE, CfgType.FULL])
@pytest.mark.parametrize("add_noise", [True, False])
def test_stream_batch_equals_sequential_lcm_on_constant_input(t_index_list, cfg, add_noise):
    guidance = 1.8 if cfg is CfgType.FULL else 1.0
    batch = make_batch(t_index_list, cfg, add_noise=add_noise, guidance=guidance)
    denoise = AnalyticDenoiser()
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(7))
    emb = embeddings_for(batch)
    outputs = [batch.step(batch.noised_input(z), denoise, emb) for _ in range(batch.n + 3)]
    assert all(o is None for o in outputs[: batch.n - 1])
    expected = sequential_reference(
        batch, z, denoise, torch.full((1, 3, 2), 0.1), torch.full((1, 3, 2), -0.2), guidance
    )
    for out in outputs[batch.n - 1 :]:
        assert out is not None
        rel = (out - expected).norm() / expected.norm()
        assert rel <= 1e-5


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [(CfgType.NONE, 3), (CfgType.SELF, 3), (CfgType.ONETIME, 4), (CfgType.FULL, 6)],
)
def test_unet_batch_per_frame_is_counted(cfg, expected):
    batch = make_batch([0, 16, 32], cfg, guidance=1.5)
    denoise = AnalyticDenoiser()
    z = torch.zeros((1, *SHAPE))
    for _ in range(5):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
    assert denoise.calls == [expected] * 5
    assert unet_batch_size(cfg, 3) == expected == batch.unet_batch


def test_stream_outputs_follow_frames_in_order():
    """Frame k's result comes out at step k + n − 1 (latency n − 1)."""
    batch = make_batch([0, 16, 32])
    denoise = AnalyticDenoiser()
    frames = [torch.full((1, *SHAPE), float(k)) for k in range(6)]
    outs = [batch.step(batch.noised_input(f), denoise, embeddings_for(batch)) for f in frames]
    for k in range(4):
        solo = make_batch([0, 16, 32])
        ref = sequential_reference(solo, frames[k], denoise, torch.full((1, 3, 2), 0.1), None, 1.0)
        assert torch.allclose(outs[k + 2], ref, rtol=1e-5, atol=1e-6)


def test_v_prediction_converts_to_epsilon():
    """With v = a ε − b x0 the step must recover the same x0 as from ε."""
    batch_eps = make_batch([32], prediction=PredictionType.EPSILON)
    batch_v = make_batch([32], prediction=PredictionType.V_PREDICTION)
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(3))
    eps = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(4))
    s = batch_v.schedule
    x = batch_v.noised_input(z)
    x0_true = (x - s.beta * eps) / s.alpha
    v = s.alpha * eps - s.beta * x0_true
    out_eps = batch_eps.step(x, lambda *a: eps, torch.zeros(1, 3, 2))
    out_v = batch_v.step(x, lambda *a: v, torch.zeros(1, 3, 2))
    assert out_eps is not None and out_v is not None
    assert torch.allclose(out_eps, out_v, atol=1e-5)


# ---------------------------------------------------------------- residual CFG


def test_residual_noise_keeps_the_paper_invariant_self_negative():
    """S_i = (x_i − a_i z) / b_i for every slot, every frame, z = that slot's input latent."""
    batch = make_batch([0, 16, 32, 45], CfgType.SELF, guidance=1.6, delta=0.8)
    denoise = AnalyticDenoiser(seed=5)
    s = batch.schedule
    zs = [torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(100 + k)) for k in range(8)]
    for k, z in enumerate(zs):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
        # after step k the buffer slot j (1..n-1) holds frame k - j + 1, and stock[j] its residual
        for j in range(1, batch.n):
            frame = k - j + 1
            if frame < 0:
                continue
            expected = (batch.latents[j : j + 1] - s.alpha[j] * zs[frame]) / s.beta[j]
            assert torch.allclose(batch.stock[j : j + 1], expected, atol=1e-4), (k, j)


def test_residual_noise_formula_on_hand_built_tensors():
    alpha = torch.tensor([0.3, 0.6, 0.9]).view(3, 1, 1, 1)
    beta = (1 - alpha**2).sqrt()
    g = torch.Generator().manual_seed(0)
    x, x0, stock, noise = (torch.randn(3, 2, 2, 2, generator=g) for _ in range(4))
    ratio, noise_next = successor_coefficients(alpha, beta, noise)
    got = next_residual_noise(stock, x, x0, alpha, beta, ratio, noise_next)
    for i in range(2):
        ref = (x[i] - beta[i] * stock[i]) / alpha[i]
        x_next = alpha[i + 1] * x0[i] + beta[i + 1] * noise[i + 1]
        assert torch.allclose(got[i], (x_next - alpha[i + 1] * ref) / beta[i + 1], atol=1e-5)
    got_plain = next_residual_noise(stock, x, x0, alpha, beta, ratio, None)
    ref0 = (x[0] - beta[0] * stock[0]) / alpha[0]
    assert torch.allclose(got_plain[0], alpha[1] * (x0[0] - ref0) / beta[1], atol=1e-5)


def test_self_guidance_applies_the_rcfg_formula():
    """First frame, n = 1: ε = δ n_0 + γ (ε_c − δ n_0) exactly."""
    gamma, delta = 1.7, 0.6
    batch = make_batch([32], CfgType.SELF, guidance=gamma, delta=delta)
    eps_c = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(9))
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(10))
    x = batch.noised_input(z)
    out = batch.step(x, lambda *a: eps_c, torch.zeros(1, 3, 2))
    s = batch.schedule
    eps = delta * batch.noise[:1] + gamma * (eps_c - delta * batch.noise[:1])
    expected = s.c_out * (x - s.beta * eps) / s.alpha + s.c_skip * x
    assert out is not None and torch.allclose(out, expected, atol=1e-6)


def test_onetime_uses_the_negative_prediction_as_residual():
    gamma, delta = 2.0, 1.0
    batch = make_batch([16, 32], CfgType.ONETIME, guidance=gamma, delta=delta)
    g = torch.Generator().manual_seed(11)
    eps_neg, eps_c0, eps_c1 = (torch.randn((1, *SHAPE), generator=g) for _ in range(3))
    preds = torch.cat([eps_neg, eps_c0, eps_c1])
    seen = []

    def denoise(latents, t, emb):
        seen.append((latents.clone(), t.clone()))
        return preds

    x_new = batch.noised_input(torch.zeros((1, *SHAPE)))
    stock_before = batch.stock.clone()
    batch.step(x_new, denoise, torch.zeros(3, 3, 2))
    latents, t = seen[0]
    assert latents.shape[0] == 3 and torch.equal(latents[0], latents[1]) and t[0] == t[1]
    s = batch.schedule
    eps0 = delta * eps_neg + gamma * (eps_c0 - delta * eps_neg)
    x0_0 = s.c_out[0] * (x_new - s.beta[0] * eps0) / s.alpha[0] + s.c_skip[0] * x_new
    # slot 1's residual for the next frame follows from S_0 = ε_neg by the derived update
    ref = (x_new - s.beta[0] * eps_neg) / s.alpha[0]
    x1 = s.alpha[1] * x0_0 + s.beta[1] * batch.noise[1:2]
    assert torch.allclose(batch.stock[1:2], (x1 - s.alpha[1] * ref) / s.beta[1], atol=1e-4)
    assert torch.allclose(batch.latents[1:2], x1, atol=1e-5)
    assert not torch.equal(stock_before[1:2], batch.stock[1:2])


def test_guidance_off_at_or_below_one():
    eps_c, eps_u = torch.ones(2, 2), torch.zeros(2, 2)
    assert torch.equal(guide(eps_c, eps_u, 1.0), eps_c)
    assert torch.equal(guide(eps_c, eps_u, 0.5), eps_c)
    assert torch.allclose(guide(eps_c, eps_u, 3.0), 3 * eps_c)
    x = torch.arange(3.0).view(3, 1)
    assert expand_for_unet(CfgType.ONETIME, x).flatten().tolist() == [0, 0, 1, 2]
    assert expand_for_unet(CfgType.FULL, x).flatten().tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------- live changes


def test_seed_change_swaps_buffered_noise_exactly():
    batch = make_batch([0, 32], CfgType.NONE)
    denoise = AnalyticDenoiser()
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
    s = batch.schedule
    x0_est = (batch.latents[1] - s.beta[1] * batch.noise[1]) / s.alpha[1]
    new_noise = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(99))
    batch.set_noise(new_noise)
    assert torch.allclose(batch.latents[1], s.alpha[1] * x0_est + s.beta[1] * new_noise[1], atol=1e-5)


def test_schedule_change_keeps_output_flowing_and_resizes():
    batch = make_batch([16, 32], CfgType.SELF, guidance=1.4)
    denoise = AnalyticDenoiser()
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
    for t_list in ([20, 40], [0, 16, 32, 45], [45]):
        schedule = build_schedule(sd_alphas_cumprod(), t_list)
        noise = torch.randn((len(t_list), *SHAPE), generator=torch.Generator().manual_seed(2))
        batch.set_schedule(schedule, noise)
        assert batch.latents.shape[0] == len(t_list) and batch.ready
        out = batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
        assert out is not None and torch.isfinite(out).all()
        assert denoise.calls[-1] == len(t_list)


def test_cfg_change_keeps_the_buffer_bit_for_bit():
    """Only S restarts; re-deriving the latents from their clean estimates would drift them."""
    batch = make_batch([0, 16, 32], CfgType.NONE)
    denoise = AnalyticDenoiser()
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
    latents = batch.latents.clone()
    batch.set_cfg_type(CfgType.SELF)
    assert torch.equal(batch.latents, latents) and torch.equal(batch.stock, batch.noise)
    assert batch.cfg_type is CfgType.SELF and batch.ready


def test_reset_warms_up_again():
    batch = make_batch([0, 16, 32])
    denoise = AnalyticDenoiser()
    z = torch.zeros((1, *SHAPE))
    for _ in range(4):
        batch.step(batch.noised_input(z), denoise, embeddings_for(batch))
    batch.reset()
    outs = [batch.step(batch.noised_input(z), denoise, embeddings_for(batch)) for _ in range(3)]
    assert outs[0] is None and outs[1] is None and outs[2] is not None


# ---------------------------------------------------------------- blending


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    b = b * (a.norm() / b.norm())
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-4)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-5)


def test_noise_blends_stay_unit_variance():
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(4, 64, 64, generator=g) for _ in range(3)]
    for method in BlendMethod:
        mixed = blend_noise(noises, [1.0, 2.0, 0.5], method)
        assert mixed.std().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(blend_noise(noises, [0.0, 1.0, 0.0], BlendMethod.LINEAR), noises[1])


def test_embedding_blend_linear_is_weighted_mean():
    e1, e2 = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    out = blend_embeddings([e1, e2], [1.0, 3.0], BlendMethod.LINEAR)
    assert torch.allclose(out, torch.full((1, 3, 2), 0.75))
    with pytest.raises(ValueError, match="weights"):
        blend_embeddings([e1, e2], [0.0, 0.0], BlendMethod.LINEAR)
    assert math.isclose(
        blend_embeddings([e2, e2 * 2], [1.0, 1.0], BlendMethod.SLERP).mean().item(),
        1.5,
        rel_tol=1e-4,
    )


# ---------------------------------------------------------------- similarity filter


def test_skip_probability_formula():
    from engine.stream.similarity import skip_probability

    cos = torch.tensor([0.5, 0.98, 0.99, 1.0])
    assert torch.allclose(skip_probability(cos, 0.98), torch.tensor([0.0, 0.0, 0.5, 1.0]), atol=1e-6)
    assert torch.allclose(skip_probability(cos, 0.0), cos)


def near_duplicates(count: int, sigma: float, seed: int = 0) -> list[torch.Tensor]:
    """Frames R + σ ε_k: any two have nearly the same cosine, whichever is the reference."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 32, 32, generator=g)
    return [base + sigma * torch.randn(3, 32, 32, generator=g) for _ in range(count)]


def test_skip_rate_matches_the_probability_for_a_seeded_rng():
    from engine.stream.similarity import SimilarityFilter, skip_probability

    frames = near_duplicates(3001, sigma=0.1)
    cos = torch.nn.functional.cosine_similarity(frames[1].flatten(), frames[2].flatten(), dim=0)
    threshold = 0.98
    expected = skip_probability(cos, threshold).item()
    assert 0.3 < expected < 0.8
    decisions = []
    for seed in (1, 1, 2):
        ssf = SimilarityFilter(threshold, max_skip_frames=10_000, seed=seed)
        decisions.append([ssf.should_skip(f) for f in frames])
    assert decisions[0] == decisions[1]  # same seed, same decisions
    assert decisions[0] != decisions[2]
    rate = sum(decisions[0][1:]) / 3000
    assert rate == pytest.approx(expected, abs=0.035)


def test_max_skip_frames_forces_processing():
    from engine.stream.similarity import SimilarityFilter

    ssf = SimilarityFilter(0.5, max_skip_frames=4, seed=0)
    frame = torch.ones(3, 8, 8)
    decisions = [ssf.should_skip(frame) for _ in range(11)]
    assert decisions == [False, True, True, True, True, False, True, True, True, True, False]
    none_allowed = SimilarityFilter(0.5, max_skip_frames=0, seed=0)
    assert not any(none_allowed.should_skip(frame) for _ in range(5))


def test_dissimilar_frames_are_never_skipped():
    from engine.stream.similarity import SimilarityFilter

    g = torch.Generator().manual_seed(0)
    ssf = SimilarityFilter(0.9, max_skip_frames=100, seed=0)
    assert not any(ssf.should_skip(torch.randn(3, 16, 16, generator=g)) for _ in range(200))
    with pytest.raises(ValueError, match="threshold"):
        ssf.configure(1.0, 3)
