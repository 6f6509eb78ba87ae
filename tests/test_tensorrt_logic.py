"""engine.accel cache keys, engine cache and TensorRT backend logic against stand-in SDKs; GPU tests (sdk)."""

from __future__ import annotations

import copy
import dataclasses
import enum
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.accel import tensorrt_backend as trtb
from engine.accel.base import UNET_INPUTS, UNetShape, VaeShape
from engine.accel.cache import (
    MANIFEST_NAME,
    EngineCache,
    EngineKey,
    atomic_write_bytes,
    model_slug,
    weights_fingerprint,
    windows_safe_name,
)
from engine.stream.guidance import unet_batch_size
from engine.stream.modes import CfgType
from tests.fakes import record_durability

SDK_REASON = trtb.unavailable_reason()
sdk = pytest.mark.sdk
needs_trt = pytest.mark.skipif(SDK_REASON is not None, reason=f"TensorRT/CUDA missing: {SDK_REASON}")

WINDOWS_NAME = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
RESERVED = (
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)


def _valid_on_windows(name: str) -> bool:
    return (
        bool(WINDOWS_NAME.match(name))
        and not name.endswith((".", " "))
        and name.split(".")[0].upper() not in RESERVED
    )


# =========================================================================== cache key
BASE_IDENTITY = {
    "model": "stabilityai/sd-turbo",
    "vae": "taesd",
    "lcm_lora": None,
    "loras": [["styles/ink.safetensors", 0.8]],
}


def _key_fields(**changes: Any) -> dict[str, Any]:
    fields = {
        "component": "unet",
        "model": json.dumps(BASE_IDENTITY, sort_keys=True),
        "weights_hash": "ab" * 32,
        "height": 512,
        "width": 512,
        "batch": 2,
        "cfg_mode": "self",
        "cross_frame": False,
        "precision": "fp16",
        "io_dtypes": (("embeddings", "float16"), ("latents", "float16"), ("timesteps", "int64")),
        "opset": 18,
        "exporter": "torch.onnx-dynamo 2.15.0",
        "tensorrt_version": "10.13.0.35",
        "gpu_name": "NVIDIA GeForce RTX 4090",
        "compute_capability": "sm89",
        "os": "windows",
        "refittable": False,
    }
    fields.update(changes)
    return fields


CHANGED = {
    "component": "vae_decoder",
    "model": json.dumps({**BASE_IDENTITY, "loras": [["styles/ink.safetensors", 0.9]]}, sort_keys=True),
    "weights_hash": "cd" * 32,
    "height": 768,
    "width": 768,
    "batch": 4,
    "cfg_mode": "full",
    "cross_frame": True,
    "precision": "fp32",
    "io_dtypes": (("embeddings", "float16"), ("latents", "float16"), ("timesteps", "int32")),
    "opset": 20,
    "exporter": "torch.onnx-dynamo 2.16.0",
    "tensorrt_version": "11.4.0",
    "gpu_name": "NVIDIA RTX 6000 Ada Generation",
    "compute_capability": "sm90",
    "os": "linux",
    "refittable": True,
}


def test_every_key_field_is_covered_by_the_change_table() -> None:
    assert set(CHANGED) == {field.name for field in dataclasses.fields(EngineKey)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_changing_any_one_key_field_changes_the_digest_and_folder(name: str) -> None:
    base = EngineKey(**_key_fields())
    changed = EngineKey(**_key_fields(**{name: CHANGED[name]}))
    assert changed.digest() != base.digest()
    assert changed.folder_name() != base.folder_name()


def test_equal_inputs_give_equal_digests_whatever_the_identity_order() -> None:
    def key(identity: dict[str, Any]) -> EngineKey:
        return EngineKey.create(
            component="unet",
            identity=identity,
            weights_hash="ab" * 32,
            height=512,
            width=512,
            batch=2,
            cfg_mode=CfgType.SELF,
            precision="fp16",
            io_dtypes={"latents": torch.float16, "timesteps": torch.int64, "embeddings": torch.float16},
            opset=18,
            exporter="torch.onnx-dynamo 2.15.0",
            tensorrt_version="10.13.0.35",
            gpu_name="NVIDIA GeForce RTX 4090",
            compute_capability="sm89",
            os_name="windows",
        )

    reordered = dict(reversed(list(BASE_IDENTITY.items())))
    assert list(reordered) != list(BASE_IDENTITY)
    first, second = key(BASE_IDENTITY), key(reordered)
    assert first == second and first.digest() == second.digest()
    assert first.digest() == key(copy.deepcopy(BASE_IDENTITY)).digest()
    assert first.cfg_mode == "self" and dict(first.io_dtypes)["timesteps"] == "int64"
    # a LoRA scale or the LoRA set is part of the identity
    assert key({**BASE_IDENTITY, "loras": [["styles/ink.safetensors", 0.5]]}).digest() != first.digest()
    assert key({**BASE_IDENTITY, "loras": []}).digest() != first.digest()
    assert key({**BASE_IDENTITY, "lcm_lora": "latent-consistency/lcm-lora-sdv1-5"}).digest() != first.digest()
    # the digest is stable text: same on every run and platform
    assert re.fullmatch(r"[0-9a-f]{64}", first.digest())


def test_key_refuses_unknown_component_or_precision() -> None:
    with pytest.raises(ValueError, match="component"):
        EngineKey(**_key_fields(component="text_encoder"))
    with pytest.raises(ValueError, match="precision"):
        EngineKey(**_key_fields(precision="int3"))


def test_folder_name_is_readable() -> None:
    key = EngineKey(**_key_fields())
    name = key.folder_name()
    assert name == f"unet_sd-turbo_512x512_b2_self_xfa0_fp16_trt10.13_sm89_{key.digest()[:8]}"
    vae = EngineKey(**_key_fields(component="vae_decoder", batch=1, refittable=True))
    assert vae.folder_name().startswith("vae_decoder_sd-turbo_512x512_b1_fp16_trt10.13_sm89_refit_")
    wide = EngineKey(**_key_fields(width=768, height=512))
    assert wide.folder_name().startswith("unet_sd-turbo_768x512_b2_"), "width x height, as /resolution"
    by_batch = EngineKey(**_key_fields(cfg_mode="b2"))
    assert by_batch.folder_name().startswith("unet_sd-turbo_512x512_b2_xfa0_"), "not b2_b2"


WEIRD_IDS = [
    "stabilityai/sd-turbo",
    "C:\\models\\My Model!.safetensors",
    "C:\\models\\",
    "/home/vj/models/dreamshaper_8.safetensors",
    "builtin:tiny",
    "con",
    "CON.safetensors",
    "nul.x",
    "lpt1",
    "Ünïcödé 模型 ✨",
    "模型",
    "...",
    "   ",
    "",
    "a" * 500,
    "org/" + "ä" * 300 + ".ckpt",
    "trailing.dot.",
    "trailing space ",
]


@pytest.mark.parametrize("model_id", WEIRD_IDS)
def test_folder_names_are_valid_on_windows_for_any_model_id(model_id: str) -> None:
    for component in ("unet", "vae_encoder", "vae_decoder"):
        key = EngineKey(**_key_fields(model=json.dumps({"model": model_id}), component=component))
        name = key.folder_name()
        assert _valid_on_windows(name), name
        assert len(name) <= 80
        assert name.endswith(key.digest()[:8])
    slug = model_slug(model_id)
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", slug) and len(slug) <= 32 and not slug.endswith((".", "-"))


def test_model_slugs() -> None:
    assert model_slug("stabilityai/sd-turbo") == "sd-turbo"
    assert model_slug("C:\\models\\My Model!.safetensors") == "my-model"
    assert model_slug("/home/vj/models/dreamshaper_8.safetensors") == "dreamshaper-8"
    assert model_slug("builtin:tiny") == "builtin-tiny"
    assert model_slug("Ünïcödé") == "unicode"
    assert model_slug("模型") == "model"


def test_long_fields_still_fit_in_80_characters() -> None:
    key = EngineKey(
        **_key_fields(
            model=json.dumps({"model": "x" * 300}),
            tensorrt_version="weird-version-string-" * 5,
            compute_capability="sm" + "9" * 40,
            cfg_mode="onetime",
            refittable=True,
        )
    )
    assert _valid_on_windows(key.folder_name())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("con.x", "_con.x"),
        ("CON", "_CON"),
        ("Aux", "_Aux"),
        ("nul.tar.gz", "_nul.tar.gz"),
        ("com1", "_com1"),
        ("LPT9.txt", "_LPT9.txt"),
        ("com10", "com10"),
        ("console", "console"),
        ("a b/c:d*e?", "a-b-c-d-e"),
        ("name.", "name"),
        ("name ", "name"),
        ("", "_"),
        ("..", "_"),
    ],
)
def test_windows_safe_name(name: str, expected: str) -> None:
    result = windows_safe_name(name)
    assert result == expected
    assert _valid_on_windows(result) or result == "_"


def test_timing_cache_name_is_per_tensorrt_and_gpu() -> None:
    key = EngineKey(**_key_fields())
    assert _valid_on_windows(key.timing_cache_name())
    other = EngineKey(**_key_fields(compute_capability="sm90"))
    assert other.timing_cache_name() != key.timing_cache_name()
    assert EngineKey(**_key_fields(height=768)).timing_cache_name() == key.timing_cache_name()


# =========================================================================== weights hash
def test_weights_fingerprint_of_a_small_module() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    first = weights_fingerprint(module)
    assert first == weights_fingerprint(module) == weights_fingerprint(copy.deepcopy(module))
    assert first == weights_fingerprint(dict(reversed(list(module.state_dict().items()))))
    with torch.no_grad():
        module[0].weight[1, 2] += 1e-3
    changed = weights_fingerprint(module)
    assert changed != first
    with torch.no_grad():
        module[0].weight[1, 2] -= 1e-3
    state = module.state_dict()
    assert torch.equal(state["0.weight"], copy.deepcopy(module).state_dict()["0.weight"])
    # a buffer counts too
    with torch.no_grad():
        module[1].running_mean[0] = 5.0
    assert weights_fingerprint(module) not in (first, changed)


def test_weights_fingerprint_sees_dtype_names_and_odd_tensors() -> None:
    weights = {"a": torch.ones(2, 3), "b": torch.zeros(()), "c": torch.empty(0)}
    base = weights_fingerprint(weights)
    assert weights_fingerprint({**weights, "a": weights["a"].half()}) != base
    assert weights_fingerprint({**weights, "a": weights["a"].bfloat16()}) != base
    assert weights_fingerprint({"A": weights["a"], "b": weights["b"], "c": weights["c"]}) != base
    assert weights_fingerprint({**weights, "a": weights["a"].reshape(3, 2)}) != base
    assert weights_fingerprint({**weights, "a": weights["a"].t().contiguous().t()}) == base
    assert weights_fingerprint({**weights, "m": torch.tensor([True, False])}) != base


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    from engine.models.loader import ModelRequest, load_models

    return load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32")).unet


def test_weights_fingerprint_of_the_tiny_unet(tiny_unet: torch.nn.Module) -> None:
    first = weights_fingerprint(tiny_unet)
    assert first == weights_fingerprint(tiny_unet)
    name, tensor = next(iter(tiny_unet.state_dict().items()))
    original = tensor.view(-1)[0].clone()
    with torch.no_grad():
        tensor.view(-1)[0] += 1.0
    try:
        assert weights_fingerprint(tiny_unet) != first
    finally:
        with torch.no_grad():
            tensor.view(-1)[0] = original
    assert weights_fingerprint(tiny_unet) == first, name


# =========================================================================== engine cache
def _built(cache: EngineCache, key: EngineKey, plan: bytes = b"PLAN" * 100) -> Path:
    folder = cache.path_for(key)
    atomic_write_bytes(folder / "unet.plan", plan)
    atomic_write_bytes(folder / "unet.onnx", b"ONNX")
    cache.write_manifest(
        key, {"plan": "unet.plan", "onnx": "unet.onnx"}, extra={"onnx_source": "x"}, build_seconds=12.5
    )
    return folder


def test_manifest_round_trip_and_lookup(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key = EngineKey(**_key_fields())
    assert cache.lookup(key) is None
    folder = _built(cache, key)
    assert cache.lookup(key) == folder == cache.path_for(key)
    manifest = cache.read_manifest(key)
    assert manifest is not None
    assert manifest["digest"] == key.digest()
    assert manifest["key"] == key.as_dict()
    assert set(manifest["key"]) == {f.name for f in dataclasses.fields(EngineKey)}
    assert manifest["files"] == {
        "plan": {"name": "unet.plan", "size": 400},
        "onnx": {"name": "unet.onnx", "size": 4},
    }
    assert manifest["build_seconds"] == 12.5 and manifest["extra"] == {"onnx_source": "x"}
    assert manifest["created"] and manifest["folder"] == folder.name
    assert cache.manifest_path(key) == folder / MANIFEST_NAME
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    text = cache.describe([key, EngineKey(**_key_fields(height=768))])
    assert "ready" in text and "to build" in text and str(folder) in text and "built in 12 s" in text
    entries = cache.entries()
    assert [(e.path, e.complete) for e in entries] == [(folder, True)]


def test_lookup_refuses_short_missing_or_foreign_folders(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = EngineKey(**_key_fields())
    folder = _built(cache, key)
    (folder / "unet.plan").write_bytes(b"PLAN")  # short: a build cut off mid-write
    assert cache.lookup(key) is None
    _built(cache, key)
    (folder / "unet.onnx").unlink()
    assert cache.lookup(key) is None
    _built(cache, key)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["digest"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert cache.lookup(key) is None
    (folder / MANIFEST_NAME).write_text("{not json")
    assert cache.lookup(key) is None
    (folder / MANIFEST_NAME).unlink()  # files but no manifest: half built
    assert cache.lookup(key) is None
    assert [e.complete for e in cache.entries()] == [False]
    _built(cache, key)
    assert cache.lookup(key) == folder
    assert cache.remove(key) and cache.lookup(key) is None and not cache.remove(key)


def test_write_manifest_wants_the_files_first_and_plain_names(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = EngineKey(**_key_fields())
    with pytest.raises(FileNotFoundError):
        cache.write_manifest(key, {"plan": "unet.plan"})
    for bad in ("../escape.plan", "sub/unet.plan", "..", ""):
        with pytest.raises(ValueError):
            cache.write_manifest(key, {"plan": bad})
    with pytest.raises(ValueError):
        cache.file_path(key, "../x")
    assert cache.lookup(key) is None


def test_atomic_write_leaves_the_old_file_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.plan"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.plan"]


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot fsync a folder")
def test_atomic_write_fsyncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_durability(monkeypatch)
    atomic_write_bytes(tmp_path / "unet.plan", b"PLAN")
    assert calls == [("fsync", "file"), ("replace", "unet.plan"), ("fsync", "folder")]


# =========================================================================== shapes & dtypes
@pytest.mark.parametrize("cfg", list(CfgType))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_static_profile_of_the_unet_for_every_cfg_mode(cfg: CfgType, n: int) -> None:
    batch = unet_batch_size(cfg, n)
    assert batch == {"none": n, "self": n, "onetime": n + 1, "full": 2 * n}[cfg.value]
    shape = UNetShape(batch=batch, latent_channels=4, latent_height=64, latent_width=80, text_dim=1024)
    profile = trtb.static_profile(shape, "unet")
    assert tuple(profile) == UNET_INPUTS
    assert profile["latents"] == ((batch, 4, 64, 80),) * 3
    assert profile["timesteps"] == ((batch,),) * 3
    assert profile["embeddings"] == ((batch, 77, 1024),) * 3


def test_static_profile_of_the_vae() -> None:
    shape = VaeShape(height=512, width=768)
    assert trtb.static_profile(shape, "vae_encoder") == {"images": ((1, 3, 512, 768),) * 3}
    assert trtb.static_profile(shape, "vae_decoder") == {"latents": ((1, 4, 64, 96),) * 3}
    with pytest.raises(TypeError):
        trtb.static_profile(shape, "unet")
    with pytest.raises(TypeError):
        trtb.static_profile(UNetShape(2, 4, 64, 64), "vae_decoder")
    with pytest.raises(ValueError):
        trtb.static_profile(shape, "vae")


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class DataTypeNoBf16(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3


def test_dtype_mapping_both_ways() -> None:
    fake = type("trt", (), {"DataType": DataType})
    pairs = {
        DataType.FLOAT: torch.float32,
        DataType.HALF: torch.float16,
        DataType.BF16: torch.bfloat16,
        DataType.INT32: torch.int32,
        DataType.INT64: torch.int64,
        DataType.BOOL: torch.bool,
        DataType.INT8: torch.int8,
        DataType.UINT8: torch.uint8,
    }
    for trt_dtype, torch_dtype in pairs.items():
        assert trtb.trt_dtype_to_torch(trt_dtype, fake) is torch_dtype
        assert trtb.torch_to_trt(torch_dtype, fake) is trt_dtype
    with pytest.raises(TypeError):
        trtb.trt_dtype_to_torch(DataType.FP8, fake)
    with pytest.raises(TypeError):
        trtb.torch_to_trt(torch.float64, fake)
    old = type("trt", (), {"DataType": DataTypeNoBf16})
    assert trtb.torch_to_trt(torch.float16, old) is DataTypeNoBf16.HALF
    with pytest.raises(TypeError):
        trtb.torch_to_trt(torch.bfloat16, old)


# =========================================================================== stand-in TensorRT
class Removed:
    """An enum namespace whose removed members raise like the real module would."""

    def __init__(self, **members: int) -> None:
        self.__dict__.update(members)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"stand-in TensorRT has no {name}")


class Logger:
    WARNING = 2

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class IProgressMonitor:
    def __init__(self) -> None:
        self.base_initialised = True


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+tactics"


class Config:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.flags: list[Any] = []
        self.profiles: list[Any] = []
        self.cache: TimingCache | None = None
        self.progress_monitor: Any = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.calls.append(("pool", pool, size))

    def create_timing_cache(self, data: bytes) -> TimingCache | None:
        return None if data.startswith(b"corrupt") else TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.calls.append(("timing_cache", cache.data, ignore_mismatch))
        if cache.data.startswith(b"foreign"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.cache

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile)
        return 0


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = (low, opt, high)


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[str] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> Any:
        return type("ITensor", (), {"name": self.inputs[index]})()


def make_trt(
    *,
    v11: bool = False,
    parse_errors: list[str] | None = None,
    inputs: list[str] | None = None,
    plan: bytes | None = b"SERIALIZED-PLAN",
) -> Any:
    """A stand-in ``tensorrt`` module: 10.x-like, or 11-like (no EXPLICIT_BATCH, no FP16 flags)."""
    log: dict[str, Any] = {}

    class Builder:
        def __init__(self, logger: Logger) -> None:
            log["builder"] = self

        def create_network(self, flags: int) -> Network:
            self.network = Network(flags)
            return self.network

        def create_builder_config(self) -> Config:
            self.config = Config()
            return self.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            log["built_with"] = (network, config)
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Build", None, 2)
                monitor.phase_start("Tactics", "Build", 3)
                for step in range(3):
                    if not monitor.step_complete("Tactics", step):
                        return None
                monitor.phase_finish("Tactics")
                if not monitor.step_complete("Build", 0):
                    return None
                monitor.phase_finish("Build")
            return plan

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors = list(parse_errors or [])

        def parse_from_file(self, path: str) -> bool:
            log["parsed"] = path
            self.network.inputs = list(inputs if inputs is not None else UNET_INPUTS)
            return not self.errors

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return f"In node {index}: {self.errors[index]}"

    builder_flags = {"REFIT": 10, "STRIP_PLAN": 11} if v11 else {"FP16": 0, "BF16": 1, "INT8": 2, "REFIT": 10}
    creation = {"STRONGLY_TYPED": 1} if v11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    module = type("tensorrt", (), {})()
    module.__dict__.update(
        __version__="11.4.0" if v11 else "10.13.0.35",
        Logger=Logger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        IProgressMonitor=IProgressMonitor,
        DataType=DataType,
        MemoryPoolType=Removed(WORKSPACE=0),
        BuilderFlag=Removed(**builder_flags),
        NetworkDefinitionCreationFlag=Removed(**creation),
        log=log,
    )
    return module


def test_network_flags_on_10_and_11() -> None:
    assert trtb.network_flags(make_trt()) == (1 << 0) | (1 << 1)
    assert trtb.network_flags(make_trt(v11=True)) == 1 << 1
    assert trtb.network_flags(type("t", (), {"NetworkDefinitionCreationFlag": Removed()})()) == 0


@pytest.mark.parametrize("v11", [False, True])
@pytest.mark.parametrize("refittable", [False, True])
def test_builder_config(v11: bool, refittable: bool) -> None:
    trt = make_trt(v11=v11)
    builder = trt.Builder(Logger())
    monitor = object()
    config = trtb.builder_config(trt, builder, 3 << 30, b"cached", refittable, monitor)
    assert ("pool", 0, 3 << 30) in config.calls
    assert ("timing_cache", b"cached", False) in config.calls
    assert config.get_timing_cache().data == b"cached"
    assert config.flags == ([10] if refittable else [])
    assert config.progress_monitor is monitor
    if not v11:
        assert trt.BuilderFlag.FP16 not in config.flags and trt.BuilderFlag.BF16 not in config.flags


@pytest.mark.parametrize("blob", [b"foreign-gpu", b"corrupt-file"])
def test_builder_config_replaces_a_foreign_or_unreadable_timing_cache(blob: bytes) -> None:
    trt = make_trt()
    config = trtb.builder_config(trt, trt.Builder(Logger()), 1 << 30, blob, False)
    assert config.get_timing_cache().data == b""
    assert config.progress_monitor is None


def test_progress_monitor_reports_nested_phases_and_cancels() -> None:
    reports: list[tuple[str, int, int]] = []
    cancel = threading.Event()
    monitor = trtb.make_progress_monitor(make_trt(), lambda *r: reports.append(r), cancel)
    assert isinstance(monitor, IProgressMonitor) and monitor.base_initialised
    monitor.phase_start("Build", None, 2)
    monitor.phase_start("Tactics", "Build", 3)
    assert monitor.step_complete("Tactics", 0) is True
    monitor.phase_start("Kernel", "Tactics", -1)
    assert monitor.step_complete("Kernel", 4) is True
    monitor.phase_finish("Kernel")
    cancel.set()
    assert monitor.step_complete("Tactics", 1) is False
    monitor.phase_finish("Tactics")
    monitor.phase_finish("Build")
    assert reports == [
        ("Build", 0, 2),
        ("Build > Tactics", 0, 3),
        ("Build > Tactics", 1, 3),
        ("Build > Tactics > Kernel", 0, 0),
        ("Build > Tactics > Kernel", 5, 0),
        ("Build > Tactics > Kernel", 0, 0),
        ("Build > Tactics", 2, 3),
        ("Build > Tactics", 3, 3),
        ("Build", 2, 2),
    ]
    assert monitor.phases == {}
    assert trtb.make_progress_monitor(type("t", (), {})(), lambda *r: None) is None


def test_tqdm_progress_draws_and_closes_bars() -> None:
    out = io.StringIO()
    bars = trtb.TqdmProgress(file=out)
    bars("Build", 0, 2)
    bars("Build > Tactics", 3, 0)
    bars("Build", 2, 2)
    assert "Build" not in bars.bars and "Build > Tactics" in bars.bars
    bars.close()
    assert bars.bars == {} and "Build" in out.getvalue()


# =========================================================================== build flow
@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "unet.onnx"
    path.write_bytes(b"onnx")
    return path


UNET = UNetShape(batch=2, latent_channels=4, latent_height=64, latent_width=64)


def test_build_engine_writes_plan_and_timing_cache(tmp_path: Path, onnx_file: Path) -> None:
    trt = make_trt()
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    out = tmp_path / "engines" / "unet.plan"
    reports: list[tuple[str, int, int]] = []
    path = trtb.build_engine(
        onnx_file,
        UNET,
        "unet",
        out,
        timing,
        refittable=True,
        progress=lambda *r: reports.append(r),
        workspace_bytes=1 << 30,
        trt_module=trt,
    )
    assert path == out and out.read_bytes() == b"SERIALIZED-PLAN"
    assert timing.read_bytes() == b"old+tactics"
    assert not [p for p in out.parent.iterdir() if p.name != "unet.plan"]
    network, config = trt.log["built_with"]
    assert network.flags == 0b11 and trt.log["parsed"] == str(onnx_file)
    assert config.flags == [10] and ("pool", 0, 1 << 30) in config.calls
    assert config.profiles[0].shapes == trtb.static_profile(UNET, "unet")
    assert ("Build > Tactics", 3, 3) in reports and reports[-1] == ("Build", 2, 2)


def test_build_engine_starts_a_timing_cache_on_11(tmp_path: Path, onnx_file: Path) -> None:
    trt = make_trt(v11=True)
    timing = tmp_path / "new" / "timing.cache"
    trtb.build_engine(onnx_file, UNET, "unet", tmp_path / "u.plan", timing, workspace_bytes=1, trt_module=trt)
    assert timing.read_bytes() == b"+tactics"
    network, config = trt.log["built_with"]
    assert network.flags == 0b10 and config.flags == []


def test_build_engine_reports_every_parser_error(tmp_path: Path, onnx_file: Path) -> None:
    trt = make_trt(parse_errors=["Unsupported op Attention", "bad initializer"])
    out = tmp_path / "u.plan"
    with pytest.raises(trtb.EngineBuildError) as info:
        trtb.build_engine(onnx_file, UNET, "unet", out, tmp_path / "t", workspace_bytes=1, trt_module=trt)
    message = str(info.value)
    assert "2 error(s)" in message and "Unsupported op Attention" in message and "bad initializer" in message
    assert not out.exists()


def test_build_engine_failure_keeps_the_old_plan(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "u.plan"
    out.write_bytes(b"previous")
    timing = tmp_path / "t"
    with pytest.raises(trtb.EngineBuildError, match="build_serialized_network returned None"):
        trtb.build_engine(
            onnx_file, UNET, "unet", out, timing, workspace_bytes=1, trt_module=make_trt(plan=None)
        )
    assert out.read_bytes() == b"previous" and not timing.exists()


def test_build_engine_checks_inputs_and_files(tmp_path: Path, onnx_file: Path) -> None:
    trt = make_trt(inputs=["sample", "timestep", "encoder_hidden_states"])
    with pytest.raises(trtb.EngineBuildError, match="needs exactly"):
        trtb.build_engine(
            onnx_file, UNET, "unet", tmp_path / "u", tmp_path / "t", workspace_bytes=1, trt_module=trt
        )
    with pytest.raises(trtb.EngineBuildError, match="does not exist"):
        trtb.build_engine(
            tmp_path / "missing.onnx", UNET, "unet", tmp_path / "u", tmp_path / "t", trt_module=trt
        )


def test_build_engine_can_be_cancelled(tmp_path: Path, onnx_file: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "u.plan"
    with pytest.raises(trtb.BuildCancelledError):
        trtb.build_engine(
            onnx_file,
            UNET,
            "unet",
            out,
            tmp_path / "t",
            cancel=cancel,
            workspace_bytes=1,
            trt_module=make_trt(),
        )
    assert not out.exists()


def test_vae_build_uses_its_own_profile(tmp_path: Path, onnx_file: Path) -> None:
    trt = make_trt(inputs=["latents"])
    shape = VaeShape(512, 512)
    trtb.build_engine(
        onnx_file,
        shape,
        "vae_decoder",
        tmp_path / "d.plan",
        tmp_path / "t",
        workspace_bytes=1,
        trt_module=trt,
    )
    _, config = trt.log["built_with"]
    assert config.profiles[0].shapes == {"latents": ((1, 4, 64, 64),) * 3}


# =========================================================================== runner IO discovery
class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeEngine:
    def __init__(self, tensors: list[tuple[str, TensorIOMode, DataType, tuple[int, ...]]]) -> None:
        self.tensors = tensors

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0]

    def _find(self, name: str) -> tuple[str, TensorIOMode, DataType, tuple[int, ...]]:
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._find(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._find(name)[2]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._find(name)[3]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)]


def test_tensor_specs_by_name() -> None:
    trt = type("trt", (), {"DataType": DataType, "TensorIOMode": TensorIOMode})
    engine = FakeEngine(
        [
            ("latents", TensorIOMode.INPUT, DataType.HALF, (-1, 4, 8, 8)),
            ("timesteps", TensorIOMode.INPUT, DataType.INT64, (2,)),
            ("embeddings", TensorIOMode.INPUT, DataType.HALF, (2, 77, 32)),
            ("prediction", TensorIOMode.OUTPUT, DataType.HALF, (2, 4, 8, 8)),
        ]
    )
    specs = trtb.tensor_specs(engine, trt)
    assert [(s.name, s.is_input, s.dtype, s.shape) for s in specs] == [
        ("latents", True, torch.float16, (2, 4, 8, 8)),
        ("timesteps", True, torch.int64, (2,)),
        ("embeddings", True, torch.float16, (2, 77, 32)),
        ("prediction", False, torch.float16, (2, 4, 8, 8)),
    ]


# =========================================================================== LoRA
@pytest.mark.parametrize(
    ("refittable", "old", "new", "expected"),
    [
        (False, [], [], "none"),
        (True, [("a", 1.0)], [("a", 1.0)], "none"),
        (False, [("a", 1.0), ("b", 0.5)], [["b", 0.5], ["a", 1]], "none"),
        (False, [("a", 1.0)], [("a", 1.0), ("z", 0.0)], "none"),
        (False, None, [], "none"),
        (True, [("a", 1.0)], [("a", 0.7)], "refit"),
        (True, [("a", 1.0)], [("b", 1.0)], "refit"),
        (True, [], [("a", 1.0)], "refit"),
        (True, [("a", 1.0)], [], "refit"),
        (False, [("a", 1.0)], [("a", 0.7)], "rebuild"),
        (False, [("a", 1.0)], [("b", 1.0)], "rebuild"),
        (False, [], [("a", 1.0)], "rebuild"),
    ],
)
def test_lora_change_plan(refittable: bool, old: Any, new: Any, expected: str) -> None:
    assert trtb.lora_change_plan(refittable, old, new) == expected


def test_refit_payload_restores_what_the_old_set_touched() -> None:
    base = {"w1": "base1", "w2": "base2", "w3": "base3"}
    with_a = {"w1": "a1", "w2": "a2"}  # LoRA A touched w1, w2
    with_b = {"w2": "b2", "w3": "b3"}  # LoRA B touches w2, w3
    assert trtb.refit_payload(base, with_b, old_touched=with_a) == {"w1": "base1", "w2": "b2", "w3": "b3"}
    back_to_a = trtb.refit_payload(base, with_a, old_touched=with_b)
    assert back_to_a == {"w1": "a1", "w2": "a2", "w3": "base3"}
    with pytest.raises(trtb.EngineRefitError, match="w9"):
        trtb.refit_payload(base, with_a, old_touched=["w9"])


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


def make_refit_trt(
    all_weights: list[str],
    missing: list[str] | None = None,
    ok: bool = True,
    prototypes: dict[str, tuple[DataType, int]] | None = None,
) -> Any:
    calls: list[tuple[str, Any, TensorLocation]] = []

    class Weights:
        def __init__(self, dtype: Any, ptr: int, count: int) -> None:
            self.dtype, self.ptr, self.count = dtype, ptr, count
            self.size = count

    class Refitter:
        def __init__(self, engine: Any, logger: Logger) -> None:
            self.engine = engine

        def get_all_weights(self) -> list[str]:
            return list(all_weights)

        def set_named_weights(self, name: str, weights: Weights, location: TensorLocation) -> bool:
            calls.append((name, weights, location))
            return True

        def get_missing_weights(self) -> list[str]:
            return list(missing or [])

        def refit_cuda_engine(self) -> bool:
            calls.append(("<refit>", None, TensorLocation.HOST))
            return ok

    if prototypes is not None:  # TensorRT 10+: the engine's own dtype and count per weight

        def get_weights_prototype(self: Any, name: str) -> Weights:
            dtype, count = prototypes[name]
            return Weights(dtype, 0, count)

        Refitter.get_weights_prototype = get_weights_prototype  # type: ignore[attr-defined]

    module = type("tensorrt", (), {})()
    for cls in (Logger, Refitter, Weights, DataType, TensorLocation):
        setattr(module, cls.__name__, cls)
    module.calls = calls
    return module


def test_refit_lora_sets_named_weights_then_refits() -> None:
    trt = make_refit_trt(["unet.w1", "unet.w2", "unet.w3"])
    w1 = torch.ones(2, 3, dtype=torch.float16)
    w2 = np.zeros((4,), dtype=np.float32)
    trtb.refit_lora(object(), {"unet.w1": w1, "unet.w2": w2}, trt)
    (n1, weights1, loc1), (n2, weights2, loc2), (last, _, _) = trt.calls
    assert (n1, weights1.dtype, weights1.count, loc1) == ("unet.w1", DataType.HALF, 6, TensorLocation.HOST)
    assert weights1.ptr == w1.data_ptr()
    assert (n2, weights2.dtype, weights2.count, loc2) == ("unet.w2", DataType.FLOAT, 4, TensorLocation.HOST)
    assert last == "<refit>"


def test_refit_lora_casts_to_the_engine_dtype_and_checks_the_count() -> None:
    """LoRA-fused weights come as fp32; an fp16 engine's refitter rejects them uncast."""
    trt = make_refit_trt(["w1", "w2"], prototypes={"w1": (DataType.HALF, 6), "w2": (DataType.HALF, 4)})
    trtb.refit_lora(object(), {"w1": torch.ones(2, 3), "w2": np.zeros((2, 2), np.float32)}, trt)
    (n1, weights1, _), (n2, weights2, _), _ = trt.calls
    assert (n1, weights1.dtype, weights1.count) == ("w1", DataType.HALF, 6)
    assert (n2, weights2.dtype, weights2.count) == ("w2", DataType.HALF, 4)
    trt = make_refit_trt(["w1"], prototypes={"w1": (DataType.HALF, 6)})
    with pytest.raises(trtb.EngineRefitError, match="'w1' has 5 values; the engine's has 6"):
        trtb.refit_lora(object(), {"w1": torch.ones(5)}, trt)
    assert trt.calls == [], "nothing was sent"


def test_refit_lora_names_unknown_and_missing_weights() -> None:
    trt = make_refit_trt(["w1"])
    with pytest.raises(trtb.EngineRefitError, match=r"not refittable.*lora_up"):
        trtb.refit_lora(object(), {"lora_up": torch.ones(1)}, trt)
    trt = make_refit_trt(["w1", "w2"], missing=["w2"])
    with pytest.raises(trtb.EngineRefitError, match=r"also needs 1 weight.*w2"):
        trtb.refit_lora(object(), {"w1": torch.ones(1)}, trt)
    trt = make_refit_trt(["w1"], ok=False)
    with pytest.raises(trtb.EngineRefitError, match="refit_cuda_engine failed"):
        trtb.refit_lora(object(), {"w1": torch.ones(1)}, trt)


# =========================================================================== availability
@pytest.mark.parametrize(
    ("backend", "fallback", "reason", "decision"),
    [
        ("tensorrt", "error", None, "use"),
        ("tensorrt", "torch", None, "use"),
        ("torch", "error", "anything", "use"),
        ("tensorrt", "torch", "TensorRT is not installed", "fallback"),
        ("tensorrt", "error", "TensorRT is not installed", "error"),
        ("onnxruntime", "torch", "onnxruntime is not installed", "fallback"),
    ],
)
def test_fallback_decision(backend: str, fallback: str, reason: str | None, decision: str) -> None:
    result, message = trtb.fallback_decision(backend, fallback, reason)
    assert result == decision
    assert backend in message
    if reason is not None and backend != "torch":
        assert reason in message
    if decision == "error":
        assert "acceleration.fallback: torch" in message
    if decision == "fallback":
        assert "torch" in message


def test_fallback_decision_takes_config_enums_and_refuses_unknown_modes() -> None:
    from engine.config import AccelBackend, AccelFallback

    assert trtb.fallback_decision(AccelBackend.TENSORRT, AccelFallback.TORCH, "x")[0] == "fallback"
    with pytest.raises(ValueError, match="fallback"):
        trtb.fallback_decision("tensorrt", "ignore", "x")


def test_unavailable_reason_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'tensorrt'")

    monkeypatch.setattr(trtb, "_import_tensorrt", missing)
    reason = trtb.unavailable_reason()
    assert reason is not None and "TensorRT is not installed" in reason
    assert "pip install latentstage[tensorrt]" in reason and "CUDA build of torch" in reason
    assert trtb.tensorrt_version() is None
    with pytest.raises(trtb.TensorRTUnavailableError, match=r"latentstage\[tensorrt\]"):
        trtb.build_engine(Path("x.onnx"), UNET, "unet", Path("x.plan"), Path("t"))

    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: make_trt())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = trtb.unavailable_reason()
    assert reason is not None and "CUDA is not available" in reason and "TensorRT" not in reason.split(".")[0]
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not built with CUDA" in (trtb.unavailable_reason() or "")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trtb.unavailable_reason() is None
    assert trtb.tensorrt_version() == "10.13.0.35"


def test_the_module_imports_without_tensorrt() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import engine.accel.tensorrt_backend, engine.accel.cache; "
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported at module level'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# =========================================================================== on a GPU with TensorRT
def _export_tiny(tmp_path: Path, shape: UNetShape) -> tuple[Any, Path]:
    """The tiny fp16 UNet on CUDA and its ONNX (exported by engine.accel.onnx_export)."""
    from engine.accel.onnx_export import export_unet
    from engine.models.loader import ModelRequest, load_models

    bundle = load_models(ModelRequest(id="builtin:tiny", device="cuda", dtype="float16"))
    path = tmp_path / "unet.onnx"
    export_unet(bundle.unet, shape, path, dtype=torch.float16)
    return bundle.unet, path


def _tiny_shape() -> UNetShape:
    return UNetShape(batch=2, latent_channels=4, latent_height=32, latent_width=32, text_dim=32)


def _unet_inputs(shape: UNetShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(shape.latents, generator=generator, device="cuda", dtype=torch.float16)
    embeddings = torch.randn(shape.embeddings, generator=generator, device="cuda", dtype=torch.float16)
    timesteps = torch.tensor([999, 499][: shape.batch], device="cuda", dtype=torch.int64)
    return latents, timesteps, embeddings


@sdk
@needs_trt
def test_tiny_unet_engine_matches_torch(tmp_path: Path) -> None:
    from engine.accel.torch_backend import TorchUNet

    shape = _tiny_shape()
    unet, onnx_path = _export_tiny(tmp_path, shape)
    reports: list[tuple[str, int, int]] = []
    plan = trtb.build_engine(
        onnx_path,
        shape,
        "unet",
        tmp_path / "unet.plan",
        tmp_path / "timing.cache",
        progress=lambda *r: reports.append(r),
    )
    assert plan.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    runner = trtb.TrtUNet(plan)
    inputs = _unet_inputs(shape)
    expected = TorchUNet(unet)(*inputs).float()
    got = runner(*inputs).float()
    torch.cuda.current_stream().synchronize()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()
    assert reports


@sdk
@needs_trt
def test_cuda_graph_replay_equals_plain_runs(tmp_path: Path) -> None:
    shape = _tiny_shape()
    _, onnx_path = _export_tiny(tmp_path, shape)
    plan = trtb.build_engine(onnx_path, shape, "unet", tmp_path / "unet.plan", tmp_path / "timing.cache")
    plain = trtb.TrtUNet(plan)
    graphed = trtb.TrtUNet(plan, use_cuda_graph=True)
    for seed_shift in range(3):  # run 1 plain, run 2 captures, run 3 replays
        latents, timesteps, embeddings = _unet_inputs(shape)
        latents = latents + seed_shift
        expected = plain(latents, timesteps, embeddings)
        got = graphed(latents, timesteps, embeddings)
        torch.cuda.current_stream().synchronize()
        assert torch.equal(got, expected)
    assert graphed._graph is not None


@sdk
@needs_trt
def test_refittable_engine_refits_to_new_weights(tmp_path: Path) -> None:
    shape = _tiny_shape()
    _, onnx_path = _export_tiny(tmp_path, shape)
    plan = trtb.build_engine(
        onnx_path, shape, "unet", tmp_path / "unet.plan", tmp_path / "timing.cache", refittable=True
    )
    runner = trtb.TrtUNet(plan, use_cuda_graph=True)
    inputs = _unet_inputs(shape)
    before = runner(*inputs)
    before = runner(*inputs)
    refitter_names = runner._trt.Refitter(runner.engine, runner._logger).get_all_weights()
    name = next(n for n in refitter_names if n.endswith("weight"))
    import onnx

    model = onnx.load(str(onnx_path))
    original = next(i for i in model.graph.initializer if i.name == name)
    array = onnx.numpy_helper.to_array(original)
    runner.refit({name: torch.from_numpy(array * 0).to("cuda")})
    after = runner(*inputs)
    runner.refit({name: torch.from_numpy(array).to("cuda")})
    again = runner(*inputs)
    torch.cuda.current_stream().synchronize()
    assert not torch.equal(before, after)
    assert torch.allclose(before.float(), again.float(), atol=1e-3)


@sdk
@needs_trt
def test_tiny_taesd_engines_match_torch(tmp_path: Path) -> None:
    from engine.accel.onnx_export import export_vae_decoder, export_vae_encoder
    from engine.accel.torch_backend import TorchVae
    from engine.models.loader import ModelRequest, load_models

    bundle = load_models(ModelRequest(id="builtin:tiny", device="cuda", dtype="float16"))
    shape = VaeShape(height=64, width=64, latent_channels=bundle.latent_channels)
    scale = bundle.vae_scaling_factor
    enc = export_vae_encoder(bundle.vae, shape, tmp_path / "enc.onnx", torch.float16, scale)
    dec = export_vae_decoder(bundle.vae, shape, tmp_path / "dec.onnx", torch.float16, scale)
    timing = tmp_path / "timing.cache"
    vae = trtb.TrtVae.from_plans(
        trtb.build_engine(enc, shape, "vae_encoder", tmp_path / "enc.plan", timing),
        trtb.build_engine(dec, shape, "vae_decoder", tmp_path / "dec.plan", timing),
    )
    reference = TorchVae(bundle.vae, scale)
    images = torch.rand(shape.image, device="cuda", dtype=torch.float16) * 2 - 1
    latents = vae.encode(images)
    decoded = vae.decode(latents)
    expected_latents = reference.encode(images)
    expected_images = reference.decode(expected_latents)
    torch.cuda.current_stream().synchronize()
    assert torch.allclose(latents.float(), expected_latents.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(decoded.float(), expected_images.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("enqueued", [True, False])
def test_cuda_graph_capture_keeps_a_graph_only_when_tensorrt_enqueued(
    monkeypatch: pytest.MonkeyPatch, enqueued: bool
) -> None:
    """execute_async_v3 returning False inside a capture leaves an empty graph: replaying it
    would silently repeat stale outputs, so the runner must run without a graph instead."""
    import contextlib
    import types

    captured: list[tuple[Any, int, str]] = []

    class FakeGraph:
        pass

    @contextlib.contextmanager
    def fake_graph(graph: Any, stream: Any = None, capture_error_mode: str = "global") -> Any:
        captured.append((graph, stream.cuda_stream, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    runner = trtb.TrtRunner.__new__(trtb.TrtRunner)
    runner.context = types.SimpleNamespace(execute_async_v3=lambda handle: enqueued)
    runner.stream = types.SimpleNamespace(cuda_stream=7)
    runner.use_cuda_graph, runner._graph = True, None
    runner._capture()
    assert captured and captured[0][1:] == (7, "thread_local")
    assert (runner._graph is not None) is enqueued
    assert runner.use_cuda_graph is enqueued


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("text_embeds", "time_ids"),  # SDXL: refused as "not a UNet engine" before
        ("control_images", "control_scales", "ip_scale"),
        ("feature_bank", "feature_bias", "feature_injection"),
    ],
)
def test_unet_engine_io_with_each_optional_group(extra: tuple[str, ...]) -> None:
    inputs = ("latents", "timesteps", "embeddings", *extra)
    outputs = ("prediction", "features") if "feature_bank" in extra else ("prediction",)
    trtb.check_unet_io(inputs, outputs)
    with pytest.raises(trtb.EngineLoadError, match="not a UNet engine"):
        trtb.check_unet_io((*inputs, "mystery"), outputs)
    with pytest.raises(trtb.EngineLoadError, match="not a UNet engine"):
        trtb.check_unet_io(inputs, ("prediction", "other"))
