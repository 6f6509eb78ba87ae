"""ControlNet: several at once, per-slot conditions, live scales, their own sources."""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pytest
import torch

from engine.accel.base import Conditioning
from engine.accel.torch_backend import TorchUNet
from engine.extensions.controlnet import ControlNetPart
from engine.models.conditioned import ConditionedUNet
from engine.models.controlnet import build_random_controlnet, load_controlnet
from engine.models.errors import ModelLoadError
from engine.params import ParamError
from engine.pipeline import ControlNetSettings, StreamPipeline
from engine.runtime.changes import apply_change
from engine.runtime.control_sources import ControlSource
from engine.runtime.engine import Engine
from engine.stream.control import ControlSlots, slot_scales
from engine.stream.modes import CfgType
from tests.fakes import SIZE, FakeSource, RecordingSink, pipeline_settings, wait_until


def with_controlnets(bundle, count: int):
    """``bundle`` with ``count`` random ControlNets (seeds 0, 1, ...) shaped for its UNet."""
    nets = [build_random_controlnet(bundle.unet, seed=index) for index in range(count)]
    ids = [{"id": "builtin:tiny-controlnet", "seed": index} for index in range(count)]
    return dataclasses.replace(bundle, controlnets=nets, identity={**bundle.identity, "controlnets": ids})


def settings(*controls: ControlNetSettings, **overrides):
    values = {"t_index_list": [20, 35], "cfg_type": CfgType.SELF, "controlnets": tuple(controls), **overrides}
    return pipeline_settings(**values)


def frames(count: int) -> list[torch.Tensor]:
    base = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3)) * 2 - 1
    return [torch.roll(base, shifts=4 * k, dims=3) for k in range(count)]


def run(pipe: StreamPipeline, inputs, controls=None) -> list[torch.Tensor]:
    outputs = []
    for frame in inputs:
        out = pipe(frame) if controls is None else pipe(frame, controls)
        if out is not None:
            outputs.append(out.clone())
    return outputs


# ---------------------------------------------------------------- the model side
def test_two_controlnets_add_the_sum_of_their_residuals(bundle):
    nets = [build_random_controlnet(bundle.unet, seed=s) for s in (0, 1)]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700, 400])
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(1))
    images = torch.rand((2, 2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    scales = torch.tensor([[0.5, 1.0], [1.5, 0.25]])
    with torch.inference_mode():
        both = ConditionedUNet(bundle.unet, [ControlNetPart(nets)])(latents, timesteps, text, images, scales)
        down_total = mid_total = None
        for k, net in enumerate(nets):
            down, mid = net(
                latents, timesteps, encoder_hidden_states=text, controlnet_cond=images[k], return_dict=False
            )
            row = scales[k].view(-1, 1, 1, 1)
            down, mid = [d * row for d in down], mid * row
            down_total = down if down_total is None else [a + b for a, b in zip(down_total, down)]
            mid_total = mid if mid_total is None else mid_total + mid
        expected = bundle.unet(
            latents,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=down_total,
            mid_block_additional_residual=mid_total,
        ).sample
        plain = bundle.unet(latents, timesteps, encoder_hidden_states=text).sample
    assert torch.allclose(both, expected, atol=1e-6)
    assert (both - plain).abs().mean() > 1e-3, "the ControlNets steer the prediction"


def test_an_inactive_controlnet_is_not_run_and_a_zero_row_adds_nothing(bundle):
    net = build_random_controlnet(bundle.unet)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    runner = TorchUNet(bundle.unet, parts=[ControlNetPart([net])])
    latents, t, text = torch.randn((2, 4, 8, 8)), torch.tensor([700, 400]), torch.randn((2, 77, 32))
    images = torch.rand((1, 2, 3, SIZE, SIZE))
    plain = TorchUNet(bundle.unet)(latents, t, text)
    def conditioning(scales, active):
        return Conditioning({"control_images": images, "control_scales": scales}, {"active": active})

    off = runner(latents, t, text, conditioning(torch.zeros((1, 2)), (False,)))
    assert torch.equal(off, plain) and calls == []
    half = runner(latents, t, text, conditioning(torch.tensor([[0.0, 1.0]]), (True,)))
    assert calls == [1]
    assert torch.allclose(half[0], plain[0], atol=1e-6) and not torch.allclose(half[1], plain[1], atol=1e-4)


def test_the_random_controlnet_is_seeded_and_leaves_the_global_rng_alone(bundle):
    state = torch.random.get_rng_state()
    a, b = build_random_controlnet(bundle.unet, 5), build_random_controlnet(bundle.unet, 5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(p.abs().sum() > 0 for p in a.controlnet_mid_block.parameters()), "zero convs randomized"


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("builtin:nope", "unknown builtin ControlNet"),
        ("./no/such/controlnet", "not an existing file or folder"),
        ("nobody/no-such-controlnet", "could not be loaded"),
    ],
)
def test_load_errors_name_the_controlnet(bundle, source, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        load_controlnet(source, bundle.unet, torch.device("cpu"), torch.float32)
    assert source in str(caught.value)


def test_a_controlnet_of_another_model_family_is_refused(bundle):
    from diffusers import ControlNetModel

    other = ControlNetModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 8, 8, 8),
    )
    from engine.models.controlnet import check_fits

    with pytest.raises(ModelLoadError, match="block_out_channels"):
        check_fits(other, bundle.unet, "other")


# ---------------------------------------------------------------- the stream side
def test_slot_scales_follow_the_window_and_the_cfg_layout():
    scales, active = slot_scales([0.5, 2.0], [(0.0, 1.0), (0.0, 0.5)], [10, 30], 50, CfgType.FULL)
    assert scales.tolist() == [[0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 2.0, 0.0]]
    assert active == (True, True)
    scales, active = slot_scales([1.0, 0.0], [(0.7, 1.0), (0.0, 1.0)], [10, 30], 50, CfgType.ONETIME)
    assert scales.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] and active == (False, False)


def test_each_slot_holds_the_condition_of_its_own_frame():
    slots = ControlSlots(1, 3, (2, 2), CfgType.ONETIME, torch.device("cpu"), torch.float32)
    for value in (1.0, 2.0, 3.0, 4.0):
        slots.push([torch.full((1, 3, 2, 2), value)])
    # slot 0 has the newest frame (4), slot 1 the one before (3), slot 2 the oldest (2);
    # onetime puts slot 0 once more in front
    assert slots.unet_images()[0, :, 0, 0, 0].tolist() == [4.0, 4.0, 3.0, 2.0]
    bigger = slots.resized(2, (4, 4), CfgType.NONE)
    assert bigger.unet_images().shape == (1, 2, 3, 4, 4) and bool((bigger.unet_images() == 4.0).all())


def test_scale_zero_equals_no_controlnet_exactly(bundle):
    inputs = frames(6)
    plain = run(StreamPipeline(bundle, settings()), inputs)
    controlled = with_controlnets(bundle, 1)
    off = run(StreamPipeline(controlled, settings(ControlNetSettings(scale=0.0))), inputs)
    on = run(StreamPipeline(controlled, settings(ControlNetSettings(scale=1.0))), inputs)
    assert len(plain) == len(off) == 5
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(plain[1:], on[1:]))


def test_live_scales_are_validated_echoed_and_switch_one_off_without_new_runners(bundle):
    controlled = with_controlnets(bundle, 2)
    pipe = StreamPipeline(controlled, settings(ControlNetSettings(scale=0.8), ControlNetSettings(scale=0.5)))
    runner = pipe.runners.unet
    assert pipe.state["controlnet_scales"] == [0.8, 0.5]
    for bad, words in (([0.3], "exactly 2"), ([0.3, 2.5], "2.5"), ([0.3, float("nan")], "nan")):
        with pytest.raises(ParamError, match=words):
            apply_change(pipe, {"controlnet_scales": bad})
        assert pipe.state["controlnet_scales"] == [0.8, 0.5]
    accepted = apply_change(pipe, {"controlnet_scales": [0.0, 1.5]})
    assert accepted == {"controlnet_scales": [0.0, 1.5]}
    control = pipe.extensions["controlnet"].control
    assert pipe.runners.unet is runner and control is not None
    assert control.active == (False, True)
    assert control.scales[1].tolist() == [1.5, 1.5]


def test_controlnet_scales_without_controlnets_say_so(bundle):
    pipe = StreamPipeline(bundle, settings())
    assert pipe.state["controlnet_scales"] is None
    with pytest.raises(ParamError, match=r"no model\.controlnets are configured"):
        apply_change(pipe, {"controlnet_scales": [0.5]})
    apply_change(pipe, {"controlnet_scales": None})  # a scene without ControlNets: nothing to do


def test_canny_and_its_own_source_change_the_output(bundle):
    pytest.importorskip("engine.conditioning.canny")
    from engine.models.kinds import ControlPreprocessor

    controlled = with_controlnets(bundle, 1)
    inputs = frames(5)
    own = ControlNetSettings(preprocessor=ControlPreprocessor.CANNY, from_input=False)
    square = -torch.ones((1, 3, SIZE, SIZE))
    square[..., 16:48, 16:48] = 1.0
    stripes = -torch.ones((1, 3, SIZE, SIZE))
    stripes[..., ::8, :] = 1.0
    a = run(StreamPipeline(controlled, settings(own)), inputs, [square])
    b = run(StreamPipeline(controlled, settings(own)), inputs, [stripes])
    again = run(StreamPipeline(controlled, settings(own)), inputs, [square])
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not torch.allclose(a[-1], b[-1], atol=1e-3)


def test_txt2img_needs_an_own_source_for_each_controlnet(bundle):
    from engine.stream.modes import GenerationMode

    with pytest.raises(ValueError, match="own source"):
        StreamPipeline(
            with_controlnets(bundle, 1), settings(ControlNetSettings(), mode=GenerationMode.TXT2IMG)
        )


def test_settings_must_match_the_loaded_controlnets(bundle):
    with pytest.raises(ValueError, match=r"one per model\.controlnets entry"):
        StreamPipeline(with_controlnets(bundle, 2), settings(ControlNetSettings()))


# ---------------------------------------------------------------- a second shm source
class StillSource(FakeSource):
    """The same mid-gray frame at 20 fps (n = 1: each output depends on this frame alone)."""

    def __init__(self) -> None:
        super().__init__(fps=20.0)

    def recv(self, timeout: float):
        frame = super().recv(timeout)
        if frame is not None:
            frame.pixels[...] = 128
        return frame


def _engine_output(controlled, shm_name: str, pixels: np.ndarray) -> torch.Tensor:
    """The engine's output once the ControlNet's shm source delivered ``pixels``."""
    from bridges.base import Frame, open_source
    from bridges.shm import ShmSink

    pipe = StreamPipeline(controlled, settings(ControlNetSettings(from_input=False), t_index_list=[30]))
    sink = RecordingSink()
    writer = ShmSink(shm_name)
    writer.send(Frame(pixels))
    source = ControlSource(0, lambda: open_source("shm", name=shm_name), "shm test")
    engine = Engine(pipe, lambda: StillSource(), [("rec", lambda: sink)], control_sources=[source])
    thread = threading.Thread(target=engine.run, kwargs={"duration": 20.0}, daemon=True)
    try:
        with engine:
            thread.start()
            assert wait_until(lambda: pipe.extensions["controlnet"].control_frames[0] is not None)
            count = len(sink.frames)
            assert wait_until(lambda: len(sink.frames) >= count + 3)
            engine.stop()
            thread.join(10)
    finally:
        writer.close()
    return torch.from_numpy(np.array(sink.frames[-1].pixels, dtype=np.float32))


def test_a_control_image_from_a_second_shm_source_changes_the_output(bundle):
    controlled = with_controlnets(bundle, 1)
    white = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    checker = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    checker[::2, ::2] = 255
    checker[..., 3] = 255
    a = _engine_output(controlled, "ls_test_ctl_a", white)
    b = _engine_output(controlled, "ls_test_ctl_b", checker)
    again = _engine_output(controlled, "ls_test_ctl_c", white)
    assert (a - again).abs().max() <= 1, "the same control image gives the same output"
    assert (a - b).abs().mean() > 1.0, "another control image changes the output"


# ---------------------------------------------------------------- TensorRT path and cache key
def test_the_tensorrt_profile_has_the_control_inputs():
    from engine.accel import tensorrt_backend as trtb
    from engine.accel.base import UNetShape

    shape = UNetShape(batch=3, latent_channels=4, latent_height=64, latent_width=80, controlnets=2)
    profile = trtb.static_profile(shape, "unet")
    assert list(profile) == ["latents", "timesteps", "embeddings", "control_images", "control_scales"]
    assert profile["control_images"] == ((2, 3, 3, 512, 640),) * 3
    assert profile["control_scales"] == ((2, 3),) * 3
    with_ip = UNetShape(
        batch=2, latent_channels=4, latent_height=8, latent_width=8, text_length=81, ip_adapter=True
    )
    assert trtb.static_profile(with_ip, "unet")["ip_scale"] == ((1,),) * 3


def test_the_engine_cache_key_names_the_controlnets(bundle, tmp_path):
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape

    def key(models):
        accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
        backend = OnnxRuntimeBackend(models, VaeShape(SIZE, SIZE), accel)
        pipe = StreamPipeline(models, settings(*[ControlNetSettings()] * len(models.controlnets)))
        return backend.unet_keys([pipe.unet_shape()])[0]

    plain, one = key(bundle), key(with_controlnets(bundle, 1))
    other = with_controlnets(bundle, 1)
    other.identity["controlnets"] = [{"id": "lllyasviel/control_v11f1p_sd15_depth"}]
    assert len({plain.digest(), one.digest(), key(other).digest()}) == 3
    reseeded = with_controlnets(bundle, 1)
    reseeded.controlnets = [build_random_controlnet(bundle.unet, 9)]
    assert key(reseeded).weights_hash != one.weights_hash, "the ControlNet weights are in the hash"


def test_the_torch_backend_runs_the_controlnets(bundle):
    """`latentstage run` goes through a TorchBackend: its UNet runner must carry the ControlNets."""
    from engine.accel.backends import TorchBackend
    from engine.runtime.changes import open_pipeline

    controlled = with_controlnets(bundle, 1)
    backend = TorchBackend(controlled)
    off = run(open_pipeline(controlled, settings(ControlNetSettings(scale=0.0)), backend), frames(4))
    on = run(open_pipeline(controlled, settings(ControlNetSettings(scale=1.0)), backend), frames(4))
    assert not torch.allclose(on[-1], off[-1], atol=1e-3)


def test_a_second_source_is_reported_gone_once_and_back_once(caplog):
    from engine.runtime.control_sources import LossWatch
    from engine.runtime.loss import OnLossMode
    from engine.runtime.workers import InputHealth

    class Worker:
        health_now = InputHealth.LIVE

        def health(self, now, stall):
            return self.health_now

    caplog.set_level(logging.INFO, logger="engine.runtime.control_sources")
    worker, watch = Worker(), LossWatch("ControlNet 0 source shm", OnLossMode.BLACK, "holding", "on black")
    assert not watch.gone(worker, 2.0), "live: nothing to do"
    worker.health_now = InputHealth.STALLED
    assert watch.gone(worker, 2.0) and not watch.gone(worker, 2.0), "gone exactly once"
    watch.seen()
    watch.seen()
    assert [r.getMessage() for r in caplog.records] == [
        "ControlNet 0 source shm is gone: on black",
        "ControlNet 0 source shm is back",
    ]


def test_second_sources_are_read_from_the_config():
    from engine.config import load_config
    from engine.runtime.engine import control_sources, reference_source
    from engine.runtime.loss import OnLossMode

    config = load_config(
        overrides=[
            "model.controlnets=[{id: builtin:tiny-controlnet}, "
            "{id: builtin:tiny-controlnet, source: {type: shm, name: depth, on_loss: black}}]",
            "model.ip_adapter={id: builtin:tiny-ip-adapter, source: {type: shm, name: style}, "
            "refresh_seconds: 2}",
        ]
    )
    (depth,) = control_sources(config)
    assert depth.index == 1 and depth.label == "shm (model.controlnets[1].source)"
    assert depth.on_loss is OnLossMode.BLACK
    style = reference_source(config)
    assert style is not None and style.label == "shm (model.ip_adapter.source)"
    assert style.refresh_seconds == 2.0 and style.on_loss is OnLossMode.HOLD
    assert reference_source(load_config()) is None and control_sources(load_config()) == []
