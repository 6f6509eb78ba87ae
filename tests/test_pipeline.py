"""StreamPipeline on the builtin tiny model: stream equivalence, guidance, filter, live changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import LCMScheduler

from engine.params import ParamError
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.modes import CfgType, GenerationMode

SIZE = 64  # 64x64 image -> 8x8 latent: fast on CPU


class CountingUNet:
    """Wraps the pipeline's UNet runner and records the batch of every call."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[int] = []

    def __call__(self, latents, timesteps, embeddings):
        self.batches.append(latents.shape[0])
        return self.inner(latents, timesteps, embeddings)


class CountingVae:
    def __init__(self, inner):
        self.inner = inner
        self.encodes = 0
        self.decodes = 0

    def encode(self, images):
        self.encodes += 1
        return self.inner.encode(images)

    def decode(self, latents):
        self.decodes += 1
        return self.inner.decode(latents)


class CountingTextEncoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def make_pipeline(bundle, **overrides) -> StreamPipeline:
    settings = PipelineSettings(
        width=SIZE,
        height=SIZE,
        prompt="a neon jellyfish",
        negative_prompt="blurry",
        cfg_type=CfgType.NONE,
        guidance_scale=1.0,
        **overrides,
    )
    pipe = StreamPipeline(bundle, settings)
    pipe.runners = dataclasses.replace(pipe.runners, unet=CountingUNet(pipe.runners.unet))
    pipe.runners = dataclasses.replace(pipe.runners, vae=CountingVae(pipe.runners.vae))
    return pipe


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sequential(pipe: StreamPipeline, frame: torch.Tensor, guidance: float) -> torch.Tensor:
    """The n LCM steps run one after another on one frame with the pipeline's noise."""
    b = pipe.batch
    s = b.schedule
    unet = pipe.runners.unet.inner
    cond, uncond = pipe.layout.positive, pipe.layout.negative
    with torch.inference_mode():
        z = pipe.runners.vae.inner.encode(frame)
        x = s.alpha[0] * z + s.beta[0] * b.noise[:1]
        for i in range(b.n):
            t = s.timesteps[i : i + 1]
            eps = unet(x, t, cond)
            if b.cfg_type is CfgType.FULL and guidance > 1:
                eps_u = unet(x, t, uncond)
                eps = eps_u + guidance * (eps - eps_u)
            x0 = s.c_out[i] * (x - s.beta[i] * eps) / s.alpha[i] + s.c_skip[i] * x
            if i < b.n - 1:
                x = s.alpha[i + 1] * x0 + s.beta[i + 1] * b.noise[i + 1 : i + 2]
        return pipe.runners.vae.inner.decode(x0)


@pytest.mark.parametrize("t_index_list", [[45], [32, 45], [0, 16, 32, 45]])
@pytest.mark.parametrize("cfg", [CfgType.NONE, CfgType.FULL])
def test_stream_batch_equals_sequential_multistep(bundle, t_index_list, cfg):
    guidance = 1.5 if cfg is CfgType.FULL else 1.0
    pipe = make_pipeline(bundle, t_index_list=t_index_list)
    apply_change(pipe, {"cfg_type": cfg.value, "guidance_scale": guidance})
    frame = image(1)
    outputs = [pipe(frame) for _ in range(len(t_index_list) + 2)]
    n = len(t_index_list)
    assert all(o is None for o in outputs[: n - 1])
    expected = sequential(pipe, frame, guidance)
    for out in outputs[n - 1 :]:
        assert out is not None
        # compare before the final clamp: the decode of random weights stays well inside [-1, 1]
        rel = (out - expected.clamp(-1, 1)).norm() / expected.clamp(-1, 1).norm()
        assert rel <= 1e-5


def test_one_step_equals_diffusers_lcm_scheduler_step(bundle):
    pipe = make_pipeline(bundle, t_index_list=[32])
    frame = image(2)
    scheduler = LCMScheduler(prediction_type="epsilon")
    t = 359
    scheduler.set_timesteps(timesteps=[t])
    unet = pipe.runners.unet.inner
    latents: dict[str, torch.Tensor] = {}

    def spy(x, ts, emb):
        latents["x"] = x.clone()
        return unet(x, ts, emb)

    pipe.runners = dataclasses.replace(pipe.runners, unet=spy)
    with torch.inference_mode():
        z = pipe.runners.vae.inner.encode(frame)
        x0_ours = pipe.batch.step(pipe.batch.noised_input(z), spy, pipe.layout.embeddings)
        x = latents["x"]
        eps = unet(x, torch.tensor([t]), pipe.layout.positive)
        reference = scheduler.step(eps, t, x, return_dict=True).denoised
    assert pipe.batch.schedule.timesteps.tolist() == [t]
    assert x0_ours is not None
    assert torch.allclose(x0_ours, reference, rtol=1e-5, atol=1e-6)
    assert torch.allclose(
        x,
        bundle.alphas_cumprod[t].sqrt() * z + (1 - bundle.alphas_cumprod[t]).sqrt() * pipe.batch.noise[:1],
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("cfg", "factor"), [("none", (1, 0)), ("self", (1, 0)), ("onetime", (1, 1)), ("full", (2, 0))]
)
def test_unet_batch_per_frame_counted(bundle, cfg, factor):
    pipe = make_pipeline(bundle, t_index_list=[0, 16, 32])
    apply_change(pipe, {"cfg_type": cfg, "guidance_scale": 1.5})
    for k in range(4):
        pipe(image(k))
    mult, extra = factor
    assert pipe.runners.unet.batches == [3 * mult + extra] * 4
    assert pipe.unet_batch_size == 3 * mult + extra


def test_warm_up_emits_nothing_for_n_minus_one_frames(bundle):
    pipe = make_pipeline(bundle, t_index_list=[0, 16, 32, 45])
    outs = [pipe(image(k)) for k in range(6)]
    assert [o is None for o in outs] == [True, True, True, False, False, False]
    assert pipe.runners.vae.decodes == 3 and pipe.runners.vae.encodes == 6
    assert outs[3].shape == (1, 3, SIZE, SIZE) and outs[3].abs().max() <= 1.0


def test_prompt_change_calls_text_encoder_once(bundle):
    counting = CountingTextEncoder(bundle.text_encoder)
    pipe = StreamPipeline(
        dataclasses.replace(bundle, text_encoder=counting),
        PipelineSettings(width=SIZE, height=SIZE, prompt="a", negative_prompt="b", t_index_list=[32]),
    )
    assert counting.calls == 2  # prompt + negative prompt at start
    before = pipe.layout.embeddings.clone()
    apply_change(pipe, {"prompt": "a glowing forest"})
    assert counting.calls == 3
    for k in range(3):
        pipe(image(k))
    apply_change(pipe, {"guidance_scale": 1.3, "seed": 5})  # no prompt change: no encoding
    apply_change(pipe, {"prompt": "a glowing forest"})  # same prompt: no encoding
    assert counting.calls == 3
    assert not torch.equal(before, pipe.layout.embeddings)
    apply_change(pipe, {"prompt": "a"})  # cached from the start
    assert counting.calls == 3 and torch.equal(before, pipe.layout.embeddings)


def test_prompt_change_reaches_the_next_output(bundle):
    pipe = make_pipeline(bundle, t_index_list=[32])
    frame = image(3)
    first = pipe(frame)
    again = pipe(frame)
    apply_change(pipe, {"prompt": "something completely different"})
    changed = pipe(frame)
    assert torch.allclose(first, again)
    assert not torch.allclose(again, changed)


@pytest.mark.parametrize("t_index_list", [[32], [16, 32]])
def test_seed_change_takes_effect_on_next_frame(bundle, t_index_list):
    pipe = make_pipeline(bundle, t_index_list=t_index_list)
    frame = image(4)
    outs = [pipe(frame) for _ in range(3)]
    apply_change(pipe, {"seed": 12345})
    after = pipe(frame)
    assert torch.allclose(outs[-1], outs[-2], atol=1e-6)
    assert not torch.allclose(after, outs[-1], atol=1e-4)


def test_t_index_list_change_takes_effect_on_next_frame(bundle):
    pipe = make_pipeline(bundle, t_index_list=[16, 32])
    frame = image(5)
    outs = [pipe(frame) for _ in range(3)]
    apply_change(pipe, {"t_index_list": [0, 20, 40, 45]})
    after = pipe(frame)
    assert after is not None and not torch.allclose(after, outs[-1], atol=1e-4)
    assert pipe.runners.unet.batches[-1] == 4
    apply_change(pipe, {"strength": 0.3})
    assert pipe.state["t_index_list"] == [34, 39, 44, 49] and pipe.state["strength"] == 0.3
    assert pipe(frame) is not None


def test_strength_with_a_list_in_the_same_change_maps_onto_that_lists_n(bundle):
    """/t_index_list then /strength between two frames coalesce into one change: strength keeps
    the n of the list it came with (it used to be refused as ambiguous)."""
    from engine.stream.schedule import strength_to_t_index_list

    pipe = make_pipeline(bundle, t_index_list=[32, 45])
    apply_change(pipe, {"t_index_list": [10, 20, 30], "strength": 0.4})
    assert pipe.state["t_index_list"] == strength_to_t_index_list(0.4, 3, 50) and pipe.batch.n == 3
    assert pipe.state["strength"] == 0.4
    apply_change(pipe, {"t_index_list": [5, 40]})  # a later list replaces what strength made
    assert pipe.state["strength"] is None and pipe.state["t_index_list"] == [5, 40]


def test_bad_changes_are_refused_and_change_nothing(bundle):
    pipe = make_pipeline(bundle, t_index_list=[32, 45])
    frame = image(6)
    for _ in range(3):
        pipe(frame)
    state = dict(pipe.state)
    embeddings = pipe.layout.embeddings.clone()
    bad = [
        {"guidance_scale": float("nan")},
        {"cfg_type": "bogus"},
        {"t_index_list": [45, 32]},
        {"t_index_list": [10, 60]},
        {"seed": -1},
        {"prompt": 42},
        {"prompt": "ok", "delta": 99},
        {"strength": 0.5, "t_index_list": [1, 2, 60]},
        {"strength": 1.5, "t_index_list": [1, 2]},
        {"bypass": 1},
        {"no_such_param": 1},
    ]
    for change in bad:
        with pytest.raises(ParamError):
            apply_change(pipe, change)
        assert pipe.state == state
        assert torch.equal(pipe.layout.embeddings, embeddings)
    assert pipe(frame) is not None


def test_txt2img_mode_runs_without_input(bundle):
    pipe = make_pipeline(bundle, t_index_list=[0], mode=GenerationMode.TXT2IMG)
    a = pipe()
    b = pipe()
    assert a is not None and torch.allclose(a, b)
    apply_change(pipe, {"prompt": "another"})
    assert not torch.allclose(pipe(), a)
    assert pipe.runners.vae.encodes == 0


def test_prompt_and_seed_blends(bundle):
    pipe = make_pipeline(bundle, t_index_list=[32])
    apply_change(pipe, {"prompt_blend": [("a cat", 1.0), ("a dog", 1.0)], "prompt_blend_method": "linear"})
    cat, dog = pipe.prompts.encode("a cat"), pipe.prompts.encode("a dog")
    assert torch.allclose(pipe.layout.positive, (cat + dog) / 2, atol=1e-6)
    apply_change(pipe, {"seed_blend": [(1, 1.0), (2, 0.0)]})
    solo = torch.randn(pipe.batch.noise.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(pipe.batch.noise, solo)
    apply_change(pipe, {"prompt": "plain"})
    assert pipe.state["prompt_blend"] is None
    apply_change(pipe, {"seed": 3})
    assert pipe.state["seed_blend"] is None


class TestSimilarityFilter:
    def test_static_input_is_skipped_and_costs_no_work(self, bundle):
        pipe = make_pipeline(
            bundle,
            t_index_list=[32],
            similarity_filter_enabled=True,
            similarity_filter_threshold=0.5,
            similarity_filter_max_skip_frames=1000,
        )
        frame = image(7)
        first = pipe(frame)
        unet_calls, encodes = len(pipe.runners.unet.batches), pipe.runners.vae.encodes
        outs = [pipe(frame) for _ in range(20)]
        # identical frames: cos = 1 -> P(skip) = 1
        assert all(o is first for o in outs)
        assert len(pipe.runners.unet.batches) == unet_calls and pipe.runners.vae.encodes == encodes
        assert pipe.stats.skipped == 20

    def test_max_skip_frames_forces_a_frame(self, bundle):
        pipe = make_pipeline(
            bundle,
            t_index_list=[32],
            similarity_filter_enabled=True,
            similarity_filter_threshold=0.5,
            similarity_filter_max_skip_frames=3,
        )
        frame = image(8)
        for _ in range(13):
            pipe(frame)
        # frame 1 processed, then every 4th: skip, skip, skip, forced
        assert len(pipe.runners.unet.batches) == 4 and pipe.stats.skipped == 9

    def test_differing_frames_are_never_skipped(self, bundle):
        pipe = make_pipeline(
            bundle,
            t_index_list=[32],
            similarity_filter_enabled=True,
            similarity_filter_threshold=0.9,
            similarity_filter_max_skip_frames=100,
        )
        for k in range(10):
            pipe(image(100 + k))  # independent random frames: cosine ~0.75 < 0.9
        assert pipe.stats.skipped == 0 and len(pipe.runners.unet.batches) == 10

    def test_disable_live(self, bundle):
        pipe = make_pipeline(
            bundle,
            t_index_list=[32],
            similarity_filter_enabled=True,
            similarity_filter_threshold=0.5,
        )
        frame = image(9)
        pipe(frame)
        pipe(frame)
        assert pipe.stats.skipped == 1
        apply_change(pipe, {"similarity_filter_enabled": False})
        pipe(frame)
        assert pipe.stats.skipped == 1


def test_bad_input_image_is_refused(bundle):
    pipe = make_pipeline(bundle, t_index_list=[32])
    with pytest.raises(ValueError, match="expected a float tensor of shape"):
        pipe(torch.zeros((1, 3, SIZE + 8, SIZE)))
    with pytest.raises(ValueError, match="img2img needs an image"):
        pipe(None)
    assert pipe(image(0)) is not None
