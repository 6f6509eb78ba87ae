"""Backend selection, fallback, the ONNX Runtime backend's cache, and builds off the frame loop."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from engine.accel import backends
from engine.accel.backends import (
    AccelSettings,
    BackendKind,
    BackendUnavailableError,
    OnnxRuntimeBackend,
    TorchBackend,
    create_backend,
)
from engine.accel.base import UNetShape, VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.cli import main
from engine.models.loader import ModelRequest, load_models
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import apply_change, open_pipeline, ready_runners
from engine.runtime.engine import Engine
from engine.stream.modes import CfgType
from tests.fakes import SIZE, FakeSource, RecordingSink

VAE_SHAPE = VaeShape(SIZE, SIZE)


def settings(**overrides) -> PipelineSettings:
    return PipelineSettings(
        width=SIZE,
        height=SIZE,
        t_index_list=[32, 45],
        cfg_type=CfgType.SELF,
        guidance_scale=1.4,
        prompt="a test",
        **overrides,
    )


def test_tensorrt_here_stops_with_error_fallback(bundle):
    with pytest.raises(BackendUnavailableError, match="tensorrt") as info:
        create_backend(bundle, VAE_SHAPE, AccelSettings(backend=BackendKind.TENSORRT, fallback="error"))
    assert "pip install latentstage[tensorrt]" in str(info.value)


def test_tensorrt_here_falls_back_to_torch_and_warns_once(bundle, caplog):
    backends._warned.clear()
    accel = AccelSettings(backend=BackendKind.TENSORRT, fallback="torch")
    with caplog.at_level(logging.WARNING, logger="engine.accel.backends"):
        first = create_backend(bundle, VAE_SHAPE, accel)
        second = create_backend(bundle, VAE_SHAPE, accel)
    assert isinstance(first, TorchBackend) and isinstance(second, TorchBackend)
    warnings = [r for r in caplog.records if "tensorrt" in r.getMessage()]
    assert len(warnings) == 1 and "torch" in warnings[0].getMessage()


def test_build_command_without_tensorrt_explains(capsys):
    assert main(["build", "--preset", "demo", "--set", "acceleration.backend=tensorrt"]) == 5
    err = capsys.readouterr().err
    assert "TensorRT" in err and "pip install latentstage[tensorrt]" in err
    assert main(["build", "--preset", "demo"]) == 0
    assert "nothing to build" in capsys.readouterr().out


def moving_frames(count: int) -> list[torch.Tensor]:
    base = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return [torch.roll(base, shifts=3 * k, dims=3) for k in range(count)]


def test_onnxruntime_backend_matches_torch_and_reuses_its_cache(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path / "engines"))
    backend = create_backend(bundle, VAE_SHAPE, accel)
    assert isinstance(backend, OnnxRuntimeBackend)
    ort_pipe = open_pipeline(bundle, settings(), backend)
    torch_pipe = StreamPipeline(bundle, settings())
    for frame in moving_frames(20):
        a, b = ort_pipe(frame), torch_pipe(frame)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() < 1e-3
    folders = sorted(p.name for p in (tmp_path / "engines").iterdir())
    assert len(folders) == 3 and any(f.startswith("unet_") for f in folders)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "engines").rglob("*.onnx")}
    again = create_backend(bundle, VAE_SHAPE, accel)
    open_pipeline(bundle, settings(), again)  # loads from the cache, exports nothing
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "engines").rglob("*.onnx")} == stamps


class SlowBackend:
    """A backend that needs ``delay`` seconds to prepare each new UNet shape."""

    name = "slow"

    def __init__(self, models, delay: float) -> None:
        self._unet = TorchUNet(models.unet)
        self._vae = TorchVae(models.vae, models.vae_scaling_factor)
        self.ready: set[UNetShape] = set()
        self.ready_vaes: set[VaeShape] = set()
        self.retained: list[tuple[set[UNetShape], set[VaeShape]]] = []
        self.delay = delay
        self.prepared: list[tuple[int, float, float]] = []
        self.cancelled: list[set] = []
        self.closed = 0

    def unet_for(self, shape):
        return self._unet if shape in self.ready else None

    def prepare_unet(self, shape, progress=None):
        start = time.monotonic()
        if shape not in self.ready:
            time.sleep(self.delay)
            self.ready.add(shape)
        self.prepared.append((shape.batch, start, time.monotonic()))
        return self._unet

    def vae_for(self, shape):
        return self._vae if shape in self.ready_vaes else None

    def prepare_vae(self, shape, progress=None):
        if shape not in self.ready_vaes:
            time.sleep(self.delay)
            self.ready_vaes.add(shape)
        return self._vae

    def retain(self, unet_shapes, vae_shapes):
        self.retained.append((set(unet_shapes), set(vae_shapes)))
        self.ready &= set(unet_shapes)
        self.ready_vaes &= set(vae_shapes)

    def cancel(self, shapes):
        self.cancelled.append(set(shapes))

    def set_lora_scales(self, old, new):
        raise AssertionError("no LoRA change reaches this backend in these tests")

    def describe(self) -> str:
        return "slow test backend"

    def close(self):
        self.closed += 1


def test_pipeline_refuses_a_shape_the_backend_lacks_and_changes_nothing(bundle):
    backend = SlowBackend(bundle, delay=0.0)
    pipe = open_pipeline(bundle, settings(), backend)
    state = dict(pipe.state)
    need = pipe.target_for({"t_index_list": [10, 20, 30], "seed": 5})
    assert need is not None and need.unet.batch == 3 and ready_runners(pipe, backend, need) is None
    with pytest.raises(RuntimeError, match="batch 3 are not built yet"):
        apply_change(pipe, {"t_index_list": [10, 20, 30], "seed": 5}, backend)
    assert pipe.state == state
    apply_change(pipe, {"guidance_scale": 1.1}, backend)  # same shape: fine
    assert pipe.state["guidance_scale"] == 1.1


def test_shape_change_builds_off_the_loop_while_output_continues(bundle):
    backend = SlowBackend(bundle, delay=1.5)
    pipe = open_pipeline(bundle, settings(), backend)
    sink = RecordingSink()
    engine = Engine(pipe, lambda: FakeSource(fps=20), [("rec", lambda: sink)], backend=backend)
    thread = threading.Thread(target=engine.run, kwargs={"duration": 6.0}, daemon=True)
    with engine:
        thread.start()
        while len(sink.frames) < 5:
            time.sleep(0.05)
        engine.submit({"t_index_list": [10, 25, 40], "seed": 9})
        deadline = time.monotonic() + 10
        while pipe.state["t_index_list"] != [10, 25, 40] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipe.state["t_index_list"] == [10, 25, 40], "applied once the engine was ready"
        assert pipe.state["seed"] == 9
        thread.join(10)
    build = next(p for p in backend.prepared if p[0] == 3)
    _, start, end = build
    during = [t for t in sink.times if start <= t <= end]
    assert end - start >= 1.4 and len(during) >= 10, "the old configuration kept running"
    assert np.diff(during).max() < 0.5


def test_build_command_prebuilds_every_size_a_show_switches_to(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    engines = tmp_path / "engines"
    base = ["build", "--preset", "demo", "--set", "acceleration.backend=onnxruntime"]
    base += ["--set", f"acceleration.engine_dir={engines}"]
    base += ["--set", "stream.width=64", "--set", "stream.height=64"]
    assert main([*base, "--size", "96x64", "--size", "64x128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ready = [line for line in lines if " ready " in line]
    assert len(ready) == 9, lines  # UNet, encoder, decoder for 64x64, 96x64 and 64x128
    for size in ("_64x64_", "_96x64_", "_64x128_"):
        assert sum(size in line for line in ready) == 3, size
    assert main([*base, "--size", "100x64"]) == 2
    assert "--size resolution: 100 is not a multiple of 8" in capsys.readouterr().err


def test_torch_backend_compiles_and_ignores_cuda_graphs_off_cuda(caplog):
    from engine.accel.backends import TorchBackend

    models = load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))
    with caplog.at_level(logging.WARNING, logger="engine.accel.backends"):
        graphs = TorchBackend(models, cuda_graph=True)
    assert graphs.describe() == "torch (eager)"
    assert "acceleration.cuda_graph needs CUDA" in caplog.text
    compiled = TorchBackend(models, compile_unet=True, compile_backend="aot_eager")
    assert compiled.describe() == "torch (compile)"
    settings = PipelineSettings(width=64, height=64, t_index_list=[32, 45], prompt="x")
    frame = torch.rand(1, 3, 64, 64) * 2 - 1
    eager_pipe = StreamPipeline(models, settings)
    compiled_pipe = open_pipeline(models, settings, compiled)
    outputs = [(eager_pipe(frame), compiled_pipe(frame)) for _ in range(3)][-1]
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_a_graph_replaying_unet_hands_back_a_copy():
    """CUDA graph replays overwrite their output buffer on the next replay: the runner copies."""
    buffer = torch.randn(2, 4, 8, 8)

    def replay(latents, timesteps, encoder_hidden_states, return_dict):
        return (buffer,)

    plain, replaying = TorchUNet(replay), TorchUNet(replay, replays_graphs=True)
    inputs = (torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 77, 32))
    assert plain(*inputs) is buffer
    copy = replaying(*inputs)
    assert torch.equal(copy, buffer) and copy.data_ptr() != buffer.data_ptr()
