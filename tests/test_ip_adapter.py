"""IP-Adapter: scale 0 equals none, live scale and image, files only from the presets folder, h94 layout."""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from engine.accel.torch_backend import TorchUNet
from engine.models.errors import ModelLoadError
from engine.models.ip_adapter import (
    build_tiny_ip_adapter,
    install_ip_adapter,
    load_ip_adapter,
    to_state_dict,
)
from engine.params import ParamError
from engine.pipeline import StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.modes import CfgType
from tests.fakes import SIZE, pipeline_settings


def _write_image(path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def adapted(bundle):
    """``bundle`` on a copy of its UNet carrying a tiny IP-Adapter (the shared UNet stays plain)."""
    unet = copy.deepcopy(bundle.unet)
    adapter = build_tiny_ip_adapter(unet, seed=3)
    install_ip_adapter(unet, adapter)
    return dataclasses.replace(
        bundle, unet=unet, ip_adapter=adapter, identity={**bundle.identity, "ip_adapter": adapter.identity}
    )


@pytest.fixture
def folder(tmp_path):
    _write_image(tmp_path / "a.png", 1)
    _write_image(tmp_path / "b.png", 2)
    return tmp_path


def settings(folder=None, **overrides):
    values = {"t_index_list": [20, 35], "cfg_type": CfgType.SELF, "image_folder": folder, **overrides}
    return pipeline_settings(**values)


def run(pipe: StreamPipeline, count: int = 5) -> list[torch.Tensor]:
    base = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3)) * 2 - 1
    outputs = []
    for k in range(count):
        out = pipe(torch.roll(base, shifts=4 * k, dims=3))
        if out is not None:
            outputs.append(out.clone())
    return outputs


# ---------------------------------------------------------------- the model side
def test_scale_zero_equals_the_plain_unet_exactly(bundle, adapted):
    shape_text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(1))
    image = adapted.ip_adapter.encode_image(torch.rand((1, 3, 40, 40)) * 2 - 1)
    assert image.shape == (1, 4, 32)
    embeddings = torch.cat([shape_text, image.expand(2, -1, -1)], dim=1)
    latents, t = torch.randn((2, 4, 8, 8)), torch.tensor([700, 400])
    plain = TorchUNet(bundle.unet)(latents, t, shape_text)
    from engine.accel.base import Conditioning
    from engine.extensions.ip_adapter import IpScalePart

    runner = TorchUNet(adapted.unet, parts=[IpScalePart(adapted.ip_tokens)])

    off = runner(latents, t, embeddings, Conditioning({"ip_scale": torch.zeros(1)}))
    on = runner(latents, t, embeddings, Conditioning({"ip_scale": torch.ones(1)}))
    assert torch.equal(off, plain)
    assert (on - plain).abs().mean() > 1e-4, "the image tokens steer the prediction"


def test_the_tiny_adapter_is_seeded_and_leaves_the_global_rng_alone(bundle):
    state = torch.random.get_rng_state()
    a, b = build_tiny_ip_adapter(bundle.unet, 5), build_tiny_ip_adapter(bundle.unet, 5)
    assert torch.equal(torch.random.get_rng_state(), state)
    first, second = to_state_dict(a), to_state_dict(b)
    assert all(torch.equal(first["ip_adapter"][k], v) for k, v in second["ip_adapter"].items())
    assert len(a.processors) == sum(name.endswith("attn2.processor") for name in bundle.unet.attn_processors)


def test_the_h94_layout_round_trips(adapted, tmp_path):
    from safetensors.torch import save_file

    state = to_state_dict(adapted.ip_adapter)
    flat = {
        f"{group}.{key}": tensor.contiguous() for group, part in state.items() for key, tensor in part.items()
    }
    save_file(flat, str(tmp_path / "ip-adapter_tiny.safetensors"))
    adapted.ip_adapter.image_encoder.save_pretrained(str(tmp_path / "image_encoder"))
    loaded = load_ip_adapter(
        str(tmp_path / "ip-adapter_tiny.safetensors"), adapted.unet, torch.device("cpu"), torch.float32
    )
    again = to_state_dict(loaded)
    for group, part in state.items():
        assert sorted(again[group]) == sorted(part)
        assert all(torch.equal(again[group][k], v) for k, v in part.items())
    pixels = torch.rand((1, 3, 40, 40), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(loaded.encode_image(pixels), adapted.ip_adapter.encode_image(pixels), atol=1e-6)
    assert loaded.identity["id"].endswith("ip-adapter_tiny.safetensors")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("builtin:nope", "unknown builtin IP-Adapter"),
        ("./no/such/ip-adapter.bin", "not an existing file nor a hub file"),
        ("nobody/no-such-repo/models/ip.safetensors", "could not be loaded"),
    ],
)
def test_load_errors_name_the_adapter(bundle, source, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        load_ip_adapter(source, bundle.unet, torch.device("cpu"), torch.float32)
    assert source in str(caught.value)


def test_a_plus_adapter_is_refused_with_what_is_supported(bundle, tmp_path):
    from safetensors.torch import save_file

    save_file({"image_proj.latents": torch.zeros(1, 16, 32)}, str(tmp_path / "ip-adapter-plus.safetensors"))
    build_tiny_ip_adapter(bundle.unet).image_encoder.save_pretrained(str(tmp_path / "image_encoder"))
    with pytest.raises(ModelLoadError, match="only the plain IP-Adapter"):
        load_ip_adapter(
            str(tmp_path / "ip-adapter-plus.safetensors"), bundle.unet, torch.device("cpu"), torch.float32
        )


# ---------------------------------------------------------------- the pipeline side
def test_ip_adapter_scale_zero_equals_no_adapter_exactly(bundle, adapted, folder):
    plain = run(StreamPipeline(bundle, settings()))
    off = run(StreamPipeline(adapted, settings(folder, ip_adapter_image="a.png", ip_adapter_scale=0.0)))
    no_image = run(StreamPipeline(adapted, settings(folder, ip_adapter_scale=1.0)))
    on = run(StreamPipeline(adapted, settings(folder, ip_adapter_image="a.png", ip_adapter_scale=1.0)))
    assert len(plain) == len(off) == len(no_image) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    assert all(torch.equal(a, b) for a, b in zip(plain, no_image)), "no image: nothing to steer by"
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(plain, on))


def test_live_scale_and_image_change_the_output_and_bad_values_keep_the_state(adapted, folder):
    pipe = StreamPipeline(adapted, settings(folder, ip_adapter_image="a.png", ip_adapter_scale=1.0))
    runner = pipe.runners.unet
    first = run(pipe)[-1]
    assert pipe.state["ip_adapter_image"] == "a.png" and pipe.state["ip_adapter_scale"] == 1.0
    for change, words in (
        ({"ip_adapter_image": "missing.png"}, "'missing.png' is not a file in"),
        ({"ip_adapter_image": "../a.png"}, "allowed"),
        ({"ip_adapter_image": str(folder / "a.png")}, "allowed"),
        ({"ip_adapter_scale": 2.5}, "2.5"),
        ({"ip_adapter_scale": float("nan")}, "nan"),
    ):
        with pytest.raises(ParamError, match=words):
            apply_change(pipe, change)
        assert pipe.state["ip_adapter_image"] == "a.png" and pipe.state["ip_adapter_scale"] == 1.0
    encodes = pipe.extensions["ip_adapter"].image_prompts.encodes
    assert apply_change(pipe, {"ip_adapter_image": "b.png"}) == {"ip_adapter_image": "b.png"}
    assert pipe.extensions["ip_adapter"].image_prompts.encodes == encodes + 1 and pipe.runners.unet is runner
    other = run(pipe)[-1]
    assert not torch.allclose(first, other, atol=1e-3), "another reference image, another picture"
    assert apply_change(pipe, {"ip_adapter_scale": 0.0}) == {"ip_adapter_scale": 0.0}
    assert pipe.runners.unet is runner
    plain = run(StreamPipeline(adapted, settings(folder, ip_adapter_scale=0.0)))[-1]
    assert torch.equal(run(pipe)[-1], plain), "scale 0 live equals no image"
    apply_change(pipe, {"ip_adapter_image": "a.png"})
    prompts = pipe.extensions["ip_adapter"].image_prompts
    assert prompts.encodes == encodes + 1, "a.png was encoded before: from the cache"


def test_a_changed_file_is_encoded_again_and_a_broken_one_refused(adapted, folder):
    pipe = StreamPipeline(adapted, settings(folder, ip_adapter_image="a.png"))
    prompts = pipe.extensions["ip_adapter"].image_prompts
    before = prompts.tokens("a.png").clone()
    _write_image(folder / "a.png", 7)
    stat = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not torch.allclose(prompts.tokens("a.png"), before, atol=1e-5)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ParamError, match="not a readable image"):
        apply_change(pipe, {"ip_adapter_image": "broken.png"})
    assert pipe.state["ip_adapter_image"] == "a.png"


def test_a_starting_image_outside_the_folder_is_refused(adapted, folder):
    with pytest.raises(ParamError, match="not a file in"):
        StreamPipeline(adapted, settings(folder, ip_adapter_image="nope.png"))


def test_ip_adapter_parameters_without_an_adapter_say_so(bundle):
    pipe = StreamPipeline(bundle, settings())
    assert pipe.state["ip_adapter_scale"] is None and pipe.state["ip_adapter_image"] is None
    for change in ({"ip_adapter_scale": 0.5}, {"ip_adapter_image": "a.png"}):
        with pytest.raises(ParamError, match=r"no model\.ip_adapter is configured"):
            apply_change(pipe, change)
    apply_change(pipe, {"ip_adapter_scale": None, "ip_adapter_image": None})  # a scene without one


def test_the_engine_cache_key_names_the_adapter(bundle, adapted, tmp_path):
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape

    def key(models):
        accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
        backend = OnnxRuntimeBackend(models, VaeShape(SIZE, SIZE), accel)
        return backend.unet_keys([StreamPipeline(models, settings(tmp_path)).unet_shape()])[0]

    plain, with_adapter = key(bundle), key(adapted)
    assert plain.digest() != with_adapter.digest()
    assert StreamPipeline(adapted, settings(tmp_path)).unet_shape().text_length == 77 + 4


def test_the_ip_scale_is_an_onnxruntime_graph_input(adapted, folder, tmp_path):
    pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])"
    )
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape
    from engine.accel.onnxruntime_backend import OrtUNet
    from engine.runtime.changes import open_pipeline

    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path / "engines"))
    backend = OnnxRuntimeBackend(adapted, VaeShape(SIZE, SIZE), accel)
    pipe = open_pipeline(adapted, settings(folder, ip_adapter_image="a.png", ip_adapter_scale=1.0), backend)
    runner = pipe.runners.unet
    assert isinstance(runner, OrtUNet) and "ip_scale" in pipe.unet_shape().io.inputs
    torch_pipe = StreamPipeline(adapted, settings(folder, ip_adapter_image="a.png", ip_adapter_scale=1.0))
    on, want = run(pipe)[-1], run(torch_pipe)[-1]
    assert torch.allclose(on, want, atol=2e-3), "the graph equals torch"
    exported = sorted(p.name for p in (tmp_path / "engines").rglob("*.onnx"))
    apply_change(pipe, {"ip_adapter_scale": 0.0}, backend)
    off = run(pipe)[-1]
    assert pipe.runners.unet is runner
    assert sorted(p.name for p in (tmp_path / "engines").rglob("*.onnx")) == exported, "no re-export"
    assert not torch.allclose(on, off, atol=1e-3)
    backend.close()


# ---------------------------------------------------------------- the reference from a bridge
def test_reference_tokens_from_a_source_steer_and_a_file_is_refused(bundle, adapted, folder):
    pipe = StreamPipeline(adapted, settings(folder, ip_adapter_from_source=True, ip_adapter_scale=1.0))
    plain = run(StreamPipeline(bundle, settings()))
    assert torch.equal(run(pipe)[-1], plain[-1]), "before the first frame of the source: no reference"
    with pytest.raises(ParamError, match=r"comes from model\.ip_adapter\.source"):
        apply_change(pipe, {"ip_adapter_image": "a.png"})
    runner = pipe.runners.unet
    tokens = adapted.ip_adapter.encode_image(torch.rand((1, 3, 40, 40)) * 2 - 1)
    pipe.set_reference_tokens(tokens)
    steered = run(pipe)[-1]
    assert pipe.runners.unet is runner and not torch.allclose(steered, plain[-1], atol=1e-3)
    apply_change(pipe, {"prompt": "another prompt"})
    reference = pipe.extensions["ip_adapter"].image_prompts.reference(None)
    assert torch.equal(reference, tokens), "a prompt change keeps the reference"
    with_file = StreamPipeline(adapted, settings(folder))
    with pytest.raises(ValueError, match="with a source"):
        with_file.set_reference_tokens(tokens)


def test_the_config_takes_an_image_or_a_source(tmp_path):
    from engine.config import ConfigError, load_config

    good = "model.ip_adapter={id: builtin:tiny-ip-adapter, source: {type: shm, name: style}}"
    config = load_config(overrides=[good])
    assert config.model.ip_adapter.source.type == "shm" and config.model.ip_adapter.refresh_seconds == 0.5
    for bad, words in (
        ("{id: builtin:tiny-ip-adapter, image: a.png, source: {type: shm, name: s}}", "exclude each other"),
        ("{id: builtin:tiny-ip-adapter, source: {type: shm, name: s, on_loss: passthrough}}", "hold | black"),
        ("{id: builtin:tiny-ip-adapter, source: shm}", "bridge definition"),
        ("{id: builtin:tiny-ip-adapter, source: {type: shm, name: s}, refresh_seconds: 0}", "0.05"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(overrides=[f"model.ip_adapter={bad}"])


def _engine_output(adapted, folder, shm_name: str, pixels: np.ndarray) -> torch.Tensor:
    """The engine's output once the IP-Adapter's shm source delivered ``pixels`` and it was encoded."""
    from bridges.base import Frame, open_source
    from bridges.shm import ShmSink
    from engine.runtime.engine import Engine
    from engine.runtime.reference_source import ReferenceSource
    from tests.fakes import RecordingSink, wait_until
    from tests.test_controlnet import StillSource

    pipe = StreamPipeline(
        adapted, settings(folder, ip_adapter_from_source=True, ip_adapter_scale=1.5, t_index_list=[30])
    )
    sink = RecordingSink()
    writer = ShmSink(shm_name)
    writer.send(Frame(pixels))
    reference = ReferenceSource(lambda: open_source("shm", name=shm_name), "shm test", refresh_seconds=0.05)
    engine = Engine(pipe, lambda: StillSource(), [("rec", lambda: sink)], reference_source=reference)
    import threading

    thread = threading.Thread(target=engine.run, kwargs={"duration": 20.0}, daemon=True)
    try:
        with engine:
            thread.start()
            assert wait_until(lambda: pipe.extensions["ip_adapter"].image_prompts.live is not None)
            count = len(sink.frames)
            assert wait_until(lambda: len(sink.frames) >= count + 3)
            assert engine.reference_feed is not None and engine.reference_feed.encodes >= 1
            engine.stop()
            thread.join(10)
    finally:
        writer.close()
    return torch.from_numpy(np.array(sink.frames[-1].pixels, dtype=np.float32))


def test_a_reference_from_a_second_shm_source_changes_the_output(adapted, folder):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    noise[..., 3] = 255
    white = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    a = _engine_output(adapted, folder, "ls_test_ip_a", white)
    b = _engine_output(adapted, folder, "ls_test_ip_b", noise)
    again = _engine_output(adapted, folder, "ls_test_ip_c", white)
    assert (a - again).abs().max() <= 1, "the same reference gives the same output"
    assert (a - b).abs().mean() > 0.5, "another reference frame changes the output"
