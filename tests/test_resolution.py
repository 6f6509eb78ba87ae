"""Live resolution changes: pipeline, stream batch, backends and the running engine."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend, create_backend
from engine.accel.base import VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.models.loader import ModelRequest, load_models
from engine.params import ParamError
from engine.pipeline import Runners, StreamPipeline
from engine.runtime.changes import apply_change, open_pipeline, ready_runners
from engine.runtime.engine import Engine
from engine.stream.batch import _resample
from engine.stream.modes import CfgType
from tests.fakes import SIZE, FakeSource, RecordingSink, playing, wait_until
from tests.test_backends import SlowBackend, settings

WIDE = [96, 64]  # width, height: 12x8 latents for the tiny model


def frames(count: int, width: int = SIZE, height: int = SIZE, start: int = 0) -> list[torch.Tensor]:
    base = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return [torch.roll(base, shifts=3 * (start + k), dims=3) for k in range(count)]


def start_build(engine, change: dict) -> None:
    """Submit ``change`` and wait until the engines it needs are being built."""
    engine.submit(change)
    assert wait_until(lambda: engine.stats.snapshot()["building"] is not None)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"similarity_filter_enabled": True, "similarity_filter_threshold": 0.5},
        {"cross_frame_attention": True, "cfg_type": CfgType.FULL},
        {"t_index_list": [40], "cfg_type": CfgType.ONETIME},
    ],
    ids=["self", "similarity-filter", "cross-frame-full", "n1-onetime"],
)
def test_torch_pipeline_changes_size_between_frames_without_a_new_warmup(bundle, options):
    if options.get("cross_frame_attention"):  # it installs attention processors: own model
        bundle = load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))
    pipe = StreamPipeline(bundle, replace(settings(), **options))
    outputs = [pipe(f) for f in frames(4)]
    assert outputs[-1] is not None
    clean_before = pipe.batch._clean_estimates()[1:].clone()

    assert apply_change(pipe, {"resolution": WIDE}) == {"resolution": WIDE}

    assert (pipe.width, pipe.height) == (96, 64) and pipe.state["resolution"] == WIDE
    assert pipe.latent_shape == (bundle.latent_channels, 8, 12)
    # the buffered slot keeps its picture, resampled to the new latent size
    if pipe.batch.n > 1:
        expected = _resample(clean_before, (8, 12))
        assert (pipe.batch._clean_estimates()[1:] - expected).abs().max() < 1e-4
    else:  # n = 1 buffers nothing; the last output is resampled for the similarity filter
        assert pipe.batch.last_output is not None and pipe.batch.last_output.shape[-2:] == (8, 12)
    after = [pipe(f) for f in frames(3, 96, 64)]
    assert all(o is not None and o.shape == (1, 3, 64, 96) for o in after), "no second warm-up"
    assert torch.isfinite(torch.cat(after)).all()
    with pytest.raises(ValueError, match=r"\(1, 3, 64, 96\)"):
        pipe(frames(1)[0])  # a frame of the old size is refused, not silently resized

    # and back: the stream follows again
    apply_change(pipe, {"resolution": [SIZE, SIZE]})
    assert pipe(frames(1)[0]).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"resolution": [100, 64]}, "100 is not a multiple of 8"),
        ({"resolution": [32, 64]}, "out of range"),
        ({"resolution": [96, 64], "seed": -1}, "seed"),
        ({"resolution": "96 by 64"}, "is not WIDTHxHEIGHT"),
    ],
)
def test_refused_size_changes_nothing(bundle, change, needle):
    pipe = StreamPipeline(bundle, settings())
    for f in frames(3):
        pipe(f)
    state, noise = dict(pipe.state), pipe.batch.noise.clone()
    with pytest.raises(ParamError, match=needle):
        apply_change(pipe, change)
    assert pipe.state == state and (pipe.width, pipe.height) == (SIZE, SIZE)
    assert torch.equal(pipe.batch.noise, noise)
    assert pipe(frames(1, start=3)[0]).shape == (1, 3, SIZE, SIZE)


def test_fixed_runners_without_a_backend_refuse_another_size(bundle):
    torch_unet = TorchUNet(bundle.unet)
    fixed = Runners(lambda x, t, e: torch_unet(x, t, e), TorchVae(bundle.vae, bundle.vae_scaling_factor))
    pipe = StreamPipeline(bundle, settings(), fixed)
    with pytest.raises(ParamError, match="fixed to 64x64"):
        apply_change(pipe, {"resolution": WIDE})
    assert pipe.state["resolution"] == [SIZE, SIZE]


def test_backend_without_the_new_size_names_the_target_then_switches_and_releases(bundle):
    backend = SlowBackend(bundle, delay=0.0)
    pipe = open_pipeline(bundle, settings(), backend)
    old_unet, old_vae = pipe.unet_shape(), pipe.vae_shape()
    state = dict(pipe.state)
    change = {"resolution": WIDE, "guidance_scale": 1.1}
    need = pipe.target_for(change)
    assert need is not None and ready_runners(pipe, backend, need) is None
    with pytest.raises(RuntimeError, match="not built yet"):
        apply_change(pipe, change, backend)
    assert pipe.state == state, "nothing changed while the engines are missing"
    assert need.vae == VaeShape(64, 96, bundle.latent_channels, bundle.vae_scale_factor)
    assert (need.unet.latent_width, need.unet.latent_height, need.unet.batch) == (12, 8, 2)
    assert need.label == "batch 2 at 96x64"

    backend.prepare_vae(need.vae)
    backend.prepare_unet(need.unet)
    apply_change(pipe, {"resolution": WIDE}, backend)
    assert pipe.vae_shape() == need.vae and pipe.unet_shape() == need.unet
    assert backend.retained[-1] == ({old_unet, need.unet}, {old_vae, need.vae})
    # a third size releases the first: only the current and the previous stay loaded
    third = StreamPipeline.vae_shape(pipe, 64, 128)
    backend.prepare_vae(third)
    backend.prepare_unet(pipe.unet_shape(latent_shape=(bundle.latent_channels, 16, 8)))
    apply_change(pipe, {"resolution": [64, 128]}, backend)
    assert old_vae not in backend.ready_vaes and need.vae in backend.ready_vaes


def test_engine_keeps_the_old_size_running_until_the_new_engines_are_ready(bundle):
    backend = SlowBackend(bundle, delay=0.8)  # VAE then UNet: about 1.6 s of "building"
    pipe = open_pipeline(bundle, settings(), backend)
    building_seen: list[str] = []
    with playing(pipe, 8.0, backend=backend) as (engine, sink, _):
        asked = time.monotonic()
        engine.submit({"resolution": WIDE, "prompt": "a wider test"})
        deadline = asked + 10
        while pipe.width != 96 and time.monotonic() < deadline:
            label = engine.stats.snapshot()["building"]
            if label:
                building_seen.append(label)
            time.sleep(0.02)
        switched = time.monotonic()
        while time.monotonic() < switched + 1.0:
            time.sleep(0.05)
    assert pipe.state["resolution"] == WIDE and pipe.state["prompt"] == "a wider test"
    assert "batch 2 at 96x64" in building_seen and engine.stats.snapshot()["building"] is None
    assert switched - asked >= 1.5, "the switch waited for the build"
    sizes = [(f.pixels.shape[1], f.pixels.shape[0]) for f in sink.frames]
    times = np.array(sink.times)
    during = times[(times > asked) & (times < switched)]
    assert len(during) >= 15 and np.diff(during).max() < 0.5, "the old size kept playing"
    first_new = sizes.index((96, 64))
    assert set(sizes[:first_new]) == {(SIZE, SIZE)} and set(sizes[first_new:]) == {(96, 64)}
    assert len(sizes) - first_new >= 10
    assert engine.stats.last_error is None, "no frame failed across the switch"


def test_onnxruntime_backend_follows_a_size_change_and_matches_torch(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path / "engines"))
    backend = create_backend(bundle, VaeShape(SIZE, SIZE), accel)
    assert isinstance(backend, OnnxRuntimeBackend)
    ort_pipe = open_pipeline(bundle, settings(), backend)
    torch_pipe = StreamPipeline(bundle, settings())
    for f in frames(4):
        ort_pipe(f), torch_pipe(f)
    need = ort_pipe.target_for({"resolution": WIDE})
    assert need is not None and ready_runners(ort_pipe, backend, need) is None
    backend.prepare_vae(need.vae)  # what the engine's build thread does
    backend.prepare_unet(need.unet)
    apply_change(ort_pipe, {"resolution": WIDE}, backend)
    apply_change(torch_pipe, {"resolution": WIDE})
    for f in frames(6, 96, 64):
        a, b = ort_pipe(f), torch_pipe(f)
        assert a is not None and b is not None and a.shape == (1, 3, 64, 96)
        assert (a - b).abs().max() < 1e-3
    folders = sorted(p.name for p in (tmp_path / "engines").iterdir())
    assert sum("_96x64_" in name for name in folders) == 3, folders  # UNet + encoder + decoder
    assert sum("_64x64_" in name for name in folders) == 3, folders


def test_a_newer_change_during_a_build_wins_over_the_waiting_one(bundle):
    """Asking for 96x64, then (before it is built) for the size already playing, must stay at the
    size playing: the finished build must not switch to a size nobody wants any more."""
    backend = SlowBackend(bundle, delay=0.6)
    pipe = open_pipeline(bundle, settings(), backend)
    with playing(pipe, 6.0, backend=backend) as (engine, sink, _thread):
        start_build(engine, {"resolution": WIDE})
        engine.submit({"resolution": [SIZE, SIZE]})
        assert wait_until(lambda: engine.stats.snapshot()["building"] is None)
        time.sleep(0.5)  # the loop has seen the finished build by now
        assert pipe.state["resolution"] == [SIZE, SIZE] and pipe.width == SIZE
    assert {f.pixels.shape for f in sink.frames} == {(SIZE, SIZE, 4)}


def test_shape_changes_sent_during_a_build_are_all_applied(bundle):
    """/t_index_list of another length, then /resolution while the first build runs: both land."""
    backend = SlowBackend(bundle, delay=0.4)
    pipe = open_pipeline(bundle, settings(), backend)
    with playing(pipe, 8.0, backend=backend) as (engine, sink, _thread):
        start_build(engine, {"t_index_list": [10, 25, 40]})
        engine.submit({"resolution": WIDE, "seed": 11})
        assert wait_until(lambda: pipe.state["resolution"] == WIDE and pipe.batch.n == 3)
        assert pipe.state["t_index_list"] == [10, 25, 40] and pipe.state["seed"] == 11
        assert wait_until(lambda: sink.frames[-1].pixels.shape == (64, 96, 4))
    assert engine.stats.last_error is None


class FailingBackend(SlowBackend):
    def prepare_unet(self, shape, progress=None):
        if shape.latent_width == 12:
            time.sleep(0.2)
            raise RuntimeError("out of GPU memory (test)")
        return super().prepare_unet(shape, progress)


def test_a_failed_build_reports_and_keeps_playing_the_old_size(bundle):
    backend = FailingBackend(bundle, delay=0.0)
    pipe = open_pipeline(bundle, settings(), backend)
    errors: list[str] = []
    with playing(pipe, 6.0, errors, backend=backend) as (engine, sink, _thread):
        engine.submit({"resolution": WIDE})
        assert wait_until(lambda: any("failed" in e for e in errors))
        assert "engine build for batch 2 at 96x64 failed: out of GPU memory (test)" in errors[0]
        frames_then = len(sink.frames)
        assert wait_until(lambda: len(sink.frames) >= frames_then + 10), "still playing"
        engine.submit({"t_index_list": [20, 40]})  # an unrelated later change is not held back
        assert wait_until(lambda: pipe.state["t_index_list"] == [20, 40])
    assert pipe.state["resolution"] == [SIZE, SIZE]
    assert {f.pixels.shape for f in sink.frames} == {(SIZE, SIZE, 4)}


def test_closing_during_a_build_cancels_it_and_says_so(bundle, caplog):
    import logging

    backend = SlowBackend(bundle, delay=3.0)
    pipe = open_pipeline(bundle, settings(), backend)
    sink = RecordingSink()
    engine = Engine(pipe, lambda: FakeSource(fps=20), [("rec", lambda: sink)], backend=backend)
    thread = threading.Thread(target=engine.run, kwargs={"duration": 10.0}, daemon=True)
    with caplog.at_level(logging.WARNING, logger="engine.runtime.builds"):
        with engine:
            thread.start()
            assert wait_until(lambda: len(sink.frames) >= 2)
            start_build(engine, {"resolution": WIDE})
            started = time.monotonic()
        assert time.monotonic() - started < 2.5, "close() does not wait for the build"
    thread.join(5)
    assert any("batch 2 at 96x64" in r.getMessage() and "cancelled" in r.getMessage() for r in caplog.records)


def test_out_of_memory_while_preparing_a_size_changes_nothing(bundle, monkeypatch):
    pipe = StreamPipeline(bundle, settings())
    for f in frames(3):
        pipe(f)
    state, noise, latents = dict(pipe.state), pipe.batch.noise, pipe.batch.latents

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    monkeypatch.setattr(pipe.batch, "plan", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_change(pipe, {"resolution": [2048, 2048], "guidance_scale": 1.3})
    assert pipe.state == state and (pipe.width, pipe.height) == (SIZE, SIZE)
    assert pipe.batch.noise is noise and pipe.batch.latents is latents
    monkeypatch.undo()
    assert pipe(frames(1, start=3)[0]).shape == (1, 3, SIZE, SIZE)


def test_the_engine_reports_a_failing_change_and_plays_on(bundle, monkeypatch):
    pipe = StreamPipeline(bundle, settings())
    errors: list[str] = []

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (test)")

    monkeypatch.setattr(pipe.batch, "plan", no_memory)
    with playing(pipe, 5.0, errors) as (engine, sink, thread):
        engine.submit({"resolution": WIDE})
        assert wait_until(lambda: bool(errors))
        assert "change of resolution failed, nothing changed: CUDA out of memory (test)" in errors[0]
        count = len(sink.frames)
        assert wait_until(lambda: len(sink.frames) >= count + 10), "the engine plays on"
    assert thread.is_alive() is False and pipe.state["resolution"] == [SIZE, SIZE]


def test_strength_sent_while_a_longer_list_waits_keeps_the_waiting_n(bundle):
    from engine.stream.schedule import strength_to_t_index_list

    backend = SlowBackend(bundle, delay=0.5)
    pipe = open_pipeline(bundle, settings(), backend)
    with playing(pipe, 6.0, backend=backend) as (engine, _sink, _thread):
        start_build(engine, {"t_index_list": [10, 25, 40]})
        engine.submit({"strength": 0.5})
        assert wait_until(lambda: pipe.batch.n == 3)
    assert pipe.state["t_index_list"] == strength_to_t_index_list(0.5, 3, 50)


def test_a_refused_part_of_a_change_refuses_its_shape_part_too(bundle):
    """{resolution, lora_scales} where lora_scales is refused (no LoRAs): nothing may wait."""
    backend = SlowBackend(bundle, delay=0.3)
    pipe = open_pipeline(bundle, settings(), backend)
    errors: list[str] = []
    with playing(pipe, 5.0, errors, backend=backend) as (engine, _sink, _thread):
        engine.submit({"resolution": WIDE, "lora_scales": [0.5]})
        assert wait_until(lambda: any("no model.loras" in e for e in errors))
        time.sleep(1.2)
        assert engine.stats.snapshot()["building"] is None and pipe.width == SIZE


def test_one_load_per_shape_when_two_threads_ask_at_once(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    backend = create_backend(bundle, VaeShape(SIZE, SIZE), accel)
    loads: list[VaeShape] = []

    def slow_load(shape, progress):
        loads.append(shape)
        time.sleep(0.3)
        return object()

    backend._load_vae = slow_load  # type: ignore[method-assign]
    shape = VaeShape(64, 96, bundle.latent_channels, bundle.vae_scale_factor)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(backend.prepare_vae(shape))) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert backend.busy
    for t in threads:
        t.join(5)
    assert loads == [shape] and results[0] is results[1] and not backend.busy
