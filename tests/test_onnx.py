"""ONNX export + ONNX Runtime backend on the tiny model: parity with torch, IO contract, errors."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install latentstage[onnx])")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])")

from engine.accel import onnx_export, onnxruntime_backend  # noqa: E402
from engine.accel.base import PREDICTION, UNET_INPUTS, UNetShape, VaeShape  # noqa: E402
from engine.accel.onnx_export import (  # noqa: E402
    OnnxExportError,
    OnnxUnavailableError,
    export_info,
    export_unet,
    export_vae_decoder,
    export_vae_encoder,
)
from engine.accel.onnxruntime_backend import (  # noqa: E402
    OnnxModelMismatchError,
    OrtUNet,
    OrtVae,
    choose_providers,
)
from engine.accel.torch_backend import TorchUNet, TorchVae  # noqa: E402
from engine.models.loader import ModelRequest, load_models  # noqa: E402
from engine.pipeline import Runners, StreamPipeline  # noqa: E402
from engine.runtime.changes import open_pipeline  # noqa: E402
from engine.stream.attention import CrossFrameAttnProcessor, batch_groups  # noqa: E402
from engine.stream.modes import CfgType  # noqa: E402
from tests.fakes import pipeline_settings  # noqa: E402

N = 2  # len(t_index_list)
LAYOUT_SIZES = {"self": (N,), "onetime": (1, N), "full": (N, N)}
"""Cross-frame groups per cfg mode, as ``StreamPipeline._attention_groups`` lays them out."""
SIZE = 256  # the tiny model's native size: 32x32 latents, shared by the pipeline test
LATENT = SIZE // 8
TEXT_DIM = 32
HAS_ONNXSCRIPT = bool(__import__("importlib.util").util.find_spec("onnxscript"))


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.float() - reference.float()).norm() / reference.float().norm())


def unet_shape(cfg: str, cross_frame: bool) -> UNetShape:
    groups = batch_groups(LAYOUT_SIZES[cfg])
    return UNetShape(
        batch=groups[-1][1],
        latent_channels=4,
        latent_height=LATENT,
        latent_width=LATENT,
        text_dim=TEXT_DIM,
        cross_frame_groups=groups if cross_frame else None,
    )


def with_cross_frame(unet, groups):
    """A copy of ``unet`` with cross-frame attention on its attn1 layers (the torch reference)."""
    unet = copy.deepcopy(unet)
    processor = CrossFrameAttnProcessor(groups)
    unet.set_attn_processor(
        {n: (processor if n.endswith("attn1.processor") else p) for n, p in unet.attn_processors.items()}
    )
    return unet


def unet_inputs(shape: UNetShape, seed: int = 0):
    g = torch.Generator("cpu").manual_seed(seed)
    return (
        torch.randn(shape.latents, generator=g),
        torch.randint(0, 1000, (shape.batch,), generator=g),
        torch.randn(shape.embeddings, generator=g),
    )


# ---------------------------------------------------------------------- shared exports
@pytest.fixture(scope="module")
def tiny():
    return load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def tiny_kl():
    return load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32", vae="full"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def source_unet(tiny):
    """The tiny UNet as a cross-frame pipeline leaves it: attn1 runs cross-frame attention with
    groups for another batch, so an export that kept them would fail or differ from torch."""
    return with_cross_frame(tiny.unet, ((0, 1), (1, 2)))


@pytest.fixture(scope="module")
def unet_onnx(source_unet, onnx_dir):
    """``shape -> path``: each UNet shape is exported once per module (exports take seconds)."""
    cache = {}

    def get(shape: UNetShape):
        if shape not in cache:
            name = f"unet_b{shape.batch}_{'xf' if shape.cross_frame_groups else 'plain'}.onnx"
            cache[shape] = export_unet(source_unet, shape, onnx_dir / name)
        return cache[shape]

    return get


@pytest.fixture(scope="module")
def vae_onnx(tiny, tiny_kl, onnx_dir):
    """``kind -> (encoder path, decoder path, bundle)`` for ``taesd`` and ``full``, exported once."""
    cache = {}
    shape = VaeShape(SIZE, SIZE)

    def get(kind: str):
        if kind not in cache:
            bundle = tiny if kind == "taesd" else tiny_kl
            scale = bundle.vae_scaling_factor
            encoder = export_vae_encoder(
                bundle.vae, shape, onnx_dir / f"{kind}_enc.onnx", scaling_factor=scale
            )
            decoder = export_vae_decoder(
                bundle.vae, shape, onnx_dir / f"{kind}_dec.onnx", scaling_factor=scale
            )
            cache[kind] = (encoder, decoder, bundle)
        return cache[kind]

    return get


# ---------------------------------------------------------------------- UNet parity
@pytest.mark.slow
@pytest.mark.parametrize("cross_frame", [False, True], ids=["plain", "cross_frame"])
@pytest.mark.parametrize("cfg", ["self", "onetime", "full"])
def test_unet_matches_torch(tiny, source_unet, unet_onnx, cfg, cross_frame):
    shape = unet_shape(cfg, cross_frame)
    processors = {name: id(p) for name, p in source_unet.attn_processors.items()}
    groups = [
        p.groups for p in source_unet.attn_processors.values() if isinstance(p, CrossFrameAttnProcessor)
    ]
    path = unet_onnx(shape)
    # the caller's UNet keeps its processors and their groups
    assert {name: id(p) for name, p in source_unet.attn_processors.items()} == processors
    assert [
        p.groups for p in source_unet.attn_processors.values() if isinstance(p, CrossFrameAttnProcessor)
    ] == groups

    inputs = unet_inputs(shape)
    output = OrtUNet(path, shape)(*inputs)
    plain = TorchUNet(tiny.unet)(*inputs)
    reference = (
        TorchUNet(with_cross_frame(tiny.unet, shape.cross_frame_groups))(*inputs) if cross_frame else plain
    )

    assert output.shape == shape.latents and output.dtype == torch.float32 and output.device.type == "cpu"
    assert rel_error(output, reference) <= 1e-4
    if cross_frame:  # the groups are really baked into the graph
        assert rel_error(output, plain) > 1e-3


# ---------------------------------------------------------------------- VAE parity
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["taesd", "full"])
def test_vae_matches_torch(vae_onnx, kind):
    encoder, decoder, bundle = vae_onnx(kind)
    torch_vae = TorchVae(bundle.vae, bundle.vae_scaling_factor)
    ort_vae = OrtVae(encoder, decoder, VaeShape(SIZE, SIZE))
    g = torch.Generator("cpu").manual_seed(1)
    images = torch.rand((1, 3, SIZE, SIZE), generator=g) * 2 - 1

    latents = torch_vae.encode(images)
    assert rel_error(ort_vae.encode(images), latents) <= 1e-4
    decoded = torch_vae.decode(latents)
    assert rel_error(ort_vae.decode(latents), decoded) <= 1e-4
    noise_latents = torch.randn(latents.shape, generator=g)
    assert rel_error(ort_vae.decode(noise_latents), torch_vae.decode(noise_latents)) <= 1e-4


def test_fp16_graph_runs_with_fp32_tensors(tiny, vae_onnx, onnx_dir):
    """An fp16 TAESD decoder takes and gives the caller's fp32 tensors (cast at the seam)."""
    shape = VaeShape(SIZE, SIZE)
    path = export_vae_decoder(tiny.vae, shape, onnx_dir / "taesd_dec_fp16.onnx", torch.float16, 1.0)
    assert export_info(path).dtype == "float16"
    graph = onnx.load(str(path), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    encoder, _, _ = vae_onnx("taesd")
    ort_vae = OrtVae(encoder, path, shape)
    latents = torch.randn(shape.latent, generator=torch.Generator("cpu").manual_seed(2))
    output = ort_vae.decode(latents)
    assert output.dtype == torch.float32
    assert rel_error(output, TorchVae(tiny.vae, 1.0).decode(latents)) <= 1e-2


# ---------------------------------------------------------------------- the graph contract
def test_graph_io_names_shapes_and_opset(unet_onnx, vae_onnx, onnx_dir):
    shape = unet_shape("full", cross_frame=True)
    path = unet_onnx(shape)
    model = onnx.load(str(path), load_external_data=False)
    float_, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64

    def io(values):
        return [
            (v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type)
            for v in values
        ]

    assert io(model.graph.input) == [
        (UNET_INPUTS[0], shape.latents, float_),
        (UNET_INPUTS[1], (shape.batch,), int64),
        (UNET_INPUTS[2], shape.embeddings, float_),
    ]
    assert io(model.graph.output) == [(PREDICTION, shape.latents, float_)]
    assert all(d.HasField("dim_value") for v in model.graph.input for d in v.type.tensor_type.shape.dim)
    assert model.ir_version <= 13  # onnxruntime 1.31 refuses IR 14
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]

    info = export_info(path)
    assert (info.kind, info.opset, info.dtype, info.torch_version) == (
        "unet",
        18,
        "float32",
        torch.__version__,
    )
    assert info.exporter == ("dynamo" if HAS_ONNXSCRIPT else "torchscript")
    assert info.extra["cross_frame_groups"] == repr(shape.cross_frame_groups)

    encoder, decoder, _ = vae_onnx("taesd")
    vae = VaeShape(SIZE, SIZE)
    assert io(onnx.load(str(encoder), load_external_data=False).graph.input) == [
        ("images", vae.image, float_)
    ]
    assert io(onnx.load(str(encoder), load_external_data=False).graph.output) == [
        ("latents", vae.latent, float_)
    ]
    assert io(onnx.load(str(decoder), load_external_data=False).graph.input) == [
        ("latents", vae.latent, float_)
    ]
    assert io(onnx.load(str(decoder), load_external_data=False).graph.output) == [
        ("images", vae.image, float_)
    ]
    assert export_info(decoder).kind == "vae_decoder"
    # atomic writes leave no staging folders or stray data files behind
    assert not [p for p in onnx_dir.iterdir() if p.name.startswith(".") or p.suffix == ".data"]


# ---------------------------------------------------------------------- the whole pipeline
def moving_frames(count: int):
    """A random image rolled a few pixels per frame (so every frame is new work)."""
    base = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator("cpu").manual_seed(5)) * 2 - 1
    return [torch.roll(base, shifts=(2 * i, 3 * i), dims=(2, 3)) for i in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("cross_frame", [False, True], ids=["plain", "cross_frame"])
def test_pipeline_with_ort_runners_matches_torch(unet_onnx, vae_onnx, cross_frame):
    settings = pipeline_settings(
        size=SIZE,
        t_index_list=[32, 45],
        cfg_type=CfgType.SELF,
        guidance_scale=1.4,
        prompt="a neon jellyfish",
        seed=7,
        cross_frame_attention=cross_frame,
    )
    encoder, decoder, _ = vae_onnx("taesd")
    shape = unet_shape("self", cross_frame)
    # fresh bundles: the torch pipeline puts cross-frame attention on its own UNet
    request = ModelRequest(id="builtin:tiny", device="cpu", dtype="float32")
    reference = StreamPipeline(load_models(request), settings)
    ort = StreamPipeline(
        load_models(request),
        settings,
        Runners(OrtUNet(unet_onnx(shape), shape), OrtVae(encoder, decoder, VaeShape(SIZE, SIZE))),
    )
    assert ort.unet_batch_size == shape.batch
    emitted = 0
    for frame in moving_frames(20):
        expected, actual = reference(frame), ort(frame)
        assert (expected is None) == (actual is None)
        if expected is None:
            continue
        emitted += 1
        assert actual is not None and actual.shape == expected.shape
        assert float((actual - expected).abs().max()) <= 1e-3
    assert emitted == 20 - (N - 1)


# ---------------------------------------------------------------------- errors and providers
def test_choose_providers_keeps_order_drops_missing_and_ends_with_cpu(monkeypatch, caplog):
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime_backend, "providers_available", lambda: list(available))
    with caplog.at_level(logging.WARNING, logger=onnxruntime_backend.__name__):
        chosen = choose_providers(
            [
                "CoreMLExecutionProvider",
                "CUDAExecutionProvider",
                "CPUExecutionProvider",
                "DmlExecutionProvider",
            ]
        )
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CoreMLExecutionProvider" in warnings[0].getMessage()
    assert "DmlExecutionProvider" in warnings[0].getMessage()

    assert choose_providers(
        ["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"]
    ) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers([]) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime_backend, "providers_available", lambda: [])
    with pytest.raises(RuntimeError, match="no usable ONNX Runtime provider"):
        choose_providers(["CUDAExecutionProvider"])


def test_real_providers_include_cpu():
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_ort_unet_refuses_a_model_of_another_shape(unet_onnx):
    path = unet_onnx(unet_shape("self", cross_frame=False))
    other = unet_shape("onetime", cross_frame=False)
    with pytest.raises(OnnxModelMismatchError) as err:
        OrtUNet(path, other)
    message = str(err.value)
    assert "(2, 4, 32, 32)" in message and "(3, 4, 32, 32)" in message and "batch=3" in message
    with pytest.raises(OnnxModelMismatchError, match="expects"):
        OrtVae(path, path, VaeShape(SIZE, SIZE))


def test_missing_files_and_bad_shapes_are_clear(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="export it first"):
        OrtUNet(tmp_path / "absent.onnx", unet_shape("self", False))
    bad_text = UNetShape(2, 4, LATENT, LATENT, text_dim=768)
    with pytest.raises(ValueError, match="text_dim=768"):
        export_unet(tiny.unet, bad_text, tmp_path / "u.onnx")
    gaps = UNetShape(4, 4, LATENT, LATENT, text_dim=TEXT_DIM, cross_frame_groups=((0, 2), (3, 4)))
    with pytest.raises(ValueError, match="covering"):
        export_unet(tiny.unet, gaps, tmp_path / "u.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_vae_decoder(tiny.vae, VaeShape(SIZE, SIZE), tmp_path / "d.onnx", opset=23)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(monkeypatch, unet_onnx, tiny, tmp_path):
    path = unet_onnx(unet_shape("self", cross_frame=False))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the lazy import now fails
    with pytest.raises(OnnxUnavailableError, match=r"pip install latentstage\[onnx\]"):
        OrtUNet(path, unet_shape("self", cross_frame=False))
    with pytest.raises(OnnxUnavailableError, match=r"pip install latentstage\[onnx\]"):
        onnxruntime_backend.providers_available()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(OnnxUnavailableError, match=r"pip install latentstage\[onnx\]"):
        export_vae_decoder(tiny.vae, VaeShape(SIZE, SIZE), tmp_path / "d.onnx")


# ---------------------------------------------------------------------- exporter fallback, atomicity
def test_falls_back_to_torchscript_when_dynamo_cannot_export(monkeypatch, caplog, tiny, vae_onnx, tmp_path):
    def refuse(*args, **kwargs):
        raise torch.onnx.errors.OnnxExporterError("cannot export this")

    monkeypatch.setattr(onnx_export, "_dynamo_export", refuse)
    shape = VaeShape(SIZE, SIZE)
    with caplog.at_level(logging.WARNING, logger=onnx_export.__name__):
        path = export_vae_decoder(tiny.vae, shape, tmp_path / "dec.onnx", scaling_factor=1.0)
    assert "falling back to the TorchScript exporter" in caplog.text and "cannot export this" in caplog.text
    info = export_info(path)
    assert (info.exporter, info.opset, info.kind) == ("torchscript", 18, "vae_decoder")
    assert onnx.load(str(path)).ir_version <= 13
    latents = torch.randn(shape.latent, generator=torch.Generator("cpu").manual_seed(4))
    encoder, _, _ = vae_onnx("taesd")
    assert (
        rel_error(OrtVae(encoder, path, shape).decode(latents), TorchVae(tiny.vae, 1.0).decode(latents))
        <= 1e-4
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx"]

    with pytest.raises(torch.onnx.errors.OnnxExporterError):  # no fallback when dynamo is asked for
        export_vae_decoder(tiny.vae, shape, tmp_path / "other.onnx", exporter="dynamo")


def test_a_failed_export_leaves_the_old_file_and_no_half_file(monkeypatch, tiny, tmp_path):
    target = tmp_path / "enc.onnx"
    target.write_bytes(b"previous model")

    def crash(*args, **kwargs):
        raise MemoryError("killed mid-export")

    monkeypatch.setattr(onnx_export, "_dynamo_export", crash)
    monkeypatch.setattr(onnx_export, "_torchscript_export", crash)
    with pytest.raises(MemoryError):
        export_vae_encoder(tiny.vae, VaeShape(SIZE, SIZE), target, scaling_factor=1.0)
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx"]


def test_a_graph_that_does_not_fit_its_shape_is_not_written(tiny, tmp_path):
    """VaeShape with the wrong scale factor: the traced latent is 32x32, the shape says 64x64."""
    target = tmp_path / "enc.onnx"
    with pytest.raises(OnnxExportError, match="expected"):
        export_vae_encoder(tiny.vae, VaeShape(SIZE, SIZE, scale_factor=4), target, scaling_factor=1.0)
    assert list(tmp_path.iterdir()) == []


def test_the_engine_imports_without_onnx_loaded():
    code = (
        "import sys, engine.accel.onnx_export, engine.accel.onnxruntime_backend; "
        "assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.sdk
def test_onnxruntime_cuda_iobinding_matches_torch_on_cuda(tmp_path):
    """Where onnxruntime-gpu and CUDA torch exist: the IOBinding path on its own stream, fed
    from torch's current stream (a side stream too), gives torch's frames without host syncs."""
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA build of torch and onnxruntime-gpu (CUDAExecutionProvider)")
    from engine.accel.backends import AccelSettings, BackendKind, create_backend

    settings = pipeline_settings(size=SIZE, t_index_list=[32, 45], cfg_type=CfgType.SELF, guidance_scale=1.4)
    request = ModelRequest(id="builtin:tiny", device="cuda", dtype="float32")
    bundle = load_models(request)
    accel = AccelSettings(
        backend=BackendKind.ONNXRUNTIME,
        engine_dir=str(tmp_path),
        onnx_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    backend = create_backend(bundle, VaeShape(SIZE, SIZE), accel)
    ort_pipe = open_pipeline(bundle, settings, backend)
    assert ort_pipe.runners.unet.graph._binding is not None, "the CUDA path binds, it does not copy"
    reference = StreamPipeline(load_models(request), settings)
    side = torch.cuda.Stream()
    for index, frame in enumerate(moving_frames(12)):
        frame = frame.cuda()
        with torch.cuda.stream(side if index % 2 else torch.cuda.current_stream()):
            actual, expected = ort_pipe(frame), reference(frame)
        if expected is not None:
            assert actual is not None and float((actual - expected).abs().max()) <= 1e-3
