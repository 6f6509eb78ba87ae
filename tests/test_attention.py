"""Cross-frame attention on the tiny UNet: plain at batch 1, couples the stream batch when on."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.attention import CrossFrameAttnProcessor, batch_groups
from engine.stream.modes import CfgType


def with_processor(unet, processor):
    unet = copy.deepcopy(unet)
    unet.set_attn_processor(
        {
            name: (processor if name.endswith("attn1.processor") else AttnProcessor2_0())
            for name in unet.attn_processors
        }
    )
    return unet


def run(unet, latents, timesteps, emb):
    with torch.inference_mode():
        return unet(latents, timesteps, encoder_hidden_states=emb, return_dict=False)[0]


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([999, 679, 359, 99][:batch])
    emb = torch.randn(1, 77, 32, generator=g).expand(batch, -1, -1)
    return latents, timesteps, emb


def test_identical_to_plain_attention_at_batch_one(bundle):
    plain = with_processor(bundle.unet, AttnProcessor2_0())
    cross = with_processor(bundle.unet, CrossFrameAttnProcessor())
    latents, timesteps, emb = inputs(1)
    assert torch.allclose(run(plain, latents, timesteps, emb), run(cross, latents, timesteps, emb), atol=1e-6)


def test_batch_elements_influence_each_other_only_when_on(bundle):
    plain = with_processor(bundle.unet, AttnProcessor2_0())
    cross = with_processor(bundle.unet, CrossFrameAttnProcessor())
    latents, timesteps, emb = inputs(4)
    changed = latents.clone()
    changed[3] = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(42))
    off_a, off_b = run(plain, latents, timesteps, emb), run(plain, changed, timesteps, emb)
    on_a, on_b = run(cross, latents, timesteps, emb), run(cross, changed, timesteps, emb)
    assert torch.allclose(off_a[:3], off_b[:3], atol=1e-6)  # off: others untouched
    assert (on_a[:3] - on_b[:3]).abs().max() > 1e-4  # on: others change
    assert not torch.allclose(on_a, off_a, atol=1e-4)


def test_groups_keep_guidance_halves_apart(bundle):
    groups = batch_groups((2, 2))
    assert groups == ((0, 2), (2, 4))
    cross = with_processor(bundle.unet, CrossFrameAttnProcessor(groups))
    latents, timesteps, emb = inputs(4)
    changed = latents.clone()
    changed[3] += 1.0
    a, b = run(cross, latents, timesteps, emb), run(cross, changed, timesteps, emb)
    assert torch.allclose(a[:2], b[:2], atol=1e-6)
    assert (a[2] - b[2]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("cfg", "groups"),
    [
        ("none", ((0, 3),)),
        ("self", ((0, 3),)),
        ("full", ((0, 3), (3, 6))),
        ("onetime", ((0, 1), (1, 4))),
    ],
)
def test_pipeline_installs_and_regroups(bundle, cfg, groups):
    unet = copy.deepcopy(bundle.unet)
    local = copy.copy(bundle)
    local.unet = unet
    pipe = StreamPipeline(
        local,
        PipelineSettings(
            width=64,
            height=64,
            t_index_list=[0, 16, 32],
            cross_frame_attention=True,
            cfg_type=CfgType.NONE,
        ),
    )
    apply_change(pipe, {"cfg_type": cfg, "guidance_scale": 1.5})
    processors = unet.attn_processors
    attn1 = [p for name, p in processors.items() if name.endswith("attn1.processor")]
    attn2 = [p for name, p in processors.items() if name.endswith("attn2.processor")]
    assert attn1 and all(isinstance(p, CrossFrameAttnProcessor) for p in attn1)
    assert not any(isinstance(p, CrossFrameAttnProcessor) for p in attn2)
    assert attn1[0].groups == groups
    frame = torch.zeros(1, 3, 64, 64)
    outs = [pipe(frame) for _ in range(4)]
    assert outs[2] is not None and torch.isfinite(outs[3]).all()
