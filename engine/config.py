"""The schema of config.yaml with preset overlays and --set overrides; clear errors per key."""

from __future__ import annotations

import copy
import difflib
import ipaddress
import itertools
import logging
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from engine.models.sources import BUILTIN_IDS, BUILTIN_PREFIX
from engine.params import MAX_PROMPT_CHARS, MAX_SEED, MAX_T_INDEX_ITEMS
from engine.stream.modes import BlendMethod, CfgType, GenerationMode, allowed

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_TYPES",
    "OUTPUT_TYPES",
    "AccelBackend",
    "AccelFallback",
    "AccelerationSettings",
    "Config",
    "ConfigError",
    "DType",
    "InputSettings",
    "LogLevel",
    "LoggingSettings",
    "LoraSpec",
    "ModelSettings",
    "NdiInput",
    "NdiOutput",
    "OnLoss",
    "OscSettings",
    "OutputSettings",
    "PatternInput",
    "PredictionSetting",
    "PreviewOutput",
    "RecordOutput",
    "ShmInput",
    "ShmOutput",
    "SimilarityFilterSettings",
    "SpoutInput",
    "SpoutOutput",
    "StreamSettings",
    "SuperviseSettings",
    "SyphonInput",
    "SyphonOutput",
    "VaeKind",
    "VideoInput",
    "config_from_dict",
    "config_json_schema",
    "default_config_path",
    "dump_config",
    "list_presets",
    "load_config",
    "merge_config",
    "parse_override",
    "preset_path",
    "presets_dir",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the default ``config.yaml`` and ``presets/`` (repo root when editable)."""

CONFIG_FILENAME = "config.yaml"
PRESETS_DIRNAME = "presets"
PRESET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FEEDBACK_RE = re.compile(r"^(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^:\s\[\]]+)):(?P<port>[0-9]{1,5})$")
_NULL_WORDS = ("null", "Null", "NULL", "~")


# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A configuration that was refused.

    ``str(error)`` has one line per problem, ``KEY.PATH: message``; ``errors`` holds the
    same as ``(key path, message)`` pairs (the key path is ``""`` for problems of a whole
    file or command line). Every message names the bad value and what is allowed.
    """

    def __init__(self, errors: Sequence[tuple[str, str]] | str) -> None:
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__("\n".join(f"{key}: {msg}" if key else msg for key, msg in self.errors))


class _Problem(ValueError):
    """Raised by our validators: what is wrong, what is allowed, and optionally which sub-key."""

    def __init__(
        self,
        problem: str,
        allowed_text: str | None = None,
        *,
        key: str = "",
        value: Any = None,
        has_value: bool = False,
    ) -> None:
        super().__init__(problem if allowed_text is None else f"{problem}; allowed: {allowed_text}")
        self.problem = problem
        self.allowed_text = allowed_text
        self.key = key
        self.value = value
        self.has_value = has_value


@dataclass(frozen=True)
class _Allowed:
    """Annotated marker: what a field accepts, in words, for error messages."""

    text: str


# --------------------------------------------------------------------------- enums


class VaeKind(str, Enum):
    """Which VAE encodes/decodes: the tiny TAESD (fast) or the model's own (full quality)."""

    TAESD = "taesd"
    FULL = "full"


class PredictionSetting(str, Enum):
    """What the UNet predicts; ``auto`` reads it from the scheduler config."""

    AUTO = "auto"
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class DType(str, Enum):
    """Weights/activations dtype; ``auto`` is float16 on CUDA/MPS and float32 on CPU."""

    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class AccelBackend(str, Enum):
    """How the UNet/VAE run: eager torch, ONNX Runtime, or a TensorRT engine."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class AccelFallback(str, Enum):
    """What to do when the chosen backend cannot start: stop, or fall back to torch."""

    ERROR = "error"
    TORCH = "torch"


class OnLoss(str, Enum):
    """What the engine shows while the input source is gone."""

    HOLD = "hold"
    BLACK = "black"
    PASSTHROUGH = "passthrough"


class LogLevel(str, Enum):
    """Logging threshold."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


# --------------------------------------------------------------------------- value validators


def _check_model_id(value: str) -> str:
    if not value.strip():
        raise _Problem("is empty", _MODEL_ID_ALLOWED)
    if value.startswith(BUILTIN_PREFIX) and value not in BUILTIN_IDS:
        raise _Problem("is not a built-in model", " | ".join(BUILTIN_IDS))
    return value


def _check_feedback(value: str) -> str:
    match = _FEEDBACK_RE.match(value)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise _Problem(
            "is not a host:port target",
            "host:port with port in [1, 65535], e.g. 127.0.0.1:9001 or [::1]:9001",
        )
    return value


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Problem(
            "is not an IP address or network",
            "IP addresses or CIDR networks, e.g. 192.168.1.20 or 10.0.0.0/24",
        ) from None
    return value


def _is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_MODEL_ID_ALLOWED = (
    "a hub id (org/name), a local folder, a .safetensors/.ckpt file, or " + " / ".join(BUILTIN_IDS)
)

ModelId = Annotated[StrictStr, _Allowed(_MODEL_ID_ALLOWED), AfterValidator(_check_model_id)]
Text = Annotated[StrictStr, Field(pattern=r"\S"), _Allowed("non-empty text")]
Name = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"),
    _Allowed("1 to 64 letters, digits, '_', '.' or '-' (no '/')"),
]
Host = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z0-9_.:%\[\]-]{1,253}$"),
    _Allowed("a host name or IP address, e.g. 127.0.0.1, 0.0.0.0 or localhost"),
]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Dim = Annotated[
    StrictInt, Field(multiple_of=8, ge=64, le=2048), _Allowed("a multiple of 8 between 64 and 2048")
]
SourceDim = Annotated[StrictInt, Field(ge=16, le=8192)]
Codec = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_]+$"), _Allowed("an FFmpeg encoder name")]
Prompt = Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]
Fps = Annotated[StrictFloat, Field(gt=0, le=240)]
QueueSize = Annotated[StrictInt, Field(ge=1, le=64)]
Feedback = Annotated[StrictStr, AfterValidator(_check_feedback)]
Network = Annotated[StrictStr, AfterValidator(_check_network)]
Device = Annotated[
    StrictStr,
    Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$"),
    _Allowed("auto | cuda | cuda:N | mps | cpu"),
]
OnnxProvider = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z0-9]+ExecutionProvider$"),
    _Allowed("ONNX Runtime provider names, e.g. CUDAExecutionProvider, CPUExecutionProvider"),
]
TIndexList = Annotated[
    list[StrictInt],
    Field(min_length=1, max_length=MAX_T_INDEX_ITEMS),
    _Allowed(
        f"1 to {MAX_T_INDEX_ITEMS} strictly increasing integers in [0, num_inference_steps - 1]"
    ),
]


# --------------------------------------------------------------------------- schema


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


class LoraSpec(_Section):
    """One extra LoRA fused into the UNet."""

    path: Text = Field(description="hub id or .safetensors file of the LoRA")
    scale: StrictFloat = Field(default=1.0, ge=-4, le=4, description="strength of the LoRA")
    adapter_name: Name | None = Field(default=None, description="adapter name (null: derived)")


class ModelSettings(_Section):
    """Which weights to load and where to run them."""

    id: ModelId = Field(default="stabilityai/sd-turbo", description=_MODEL_ID_ALLOWED)
    vae: VaeKind = Field(default=VaeKind.TAESD, description="taesd (fast tiny VAE) | full")
    taesd_id: Text = Field(default="madebyollin/taesd", description="hub id or folder of TAESD")
    lcm_lora: Text | None = Field(default=None, description="LCM-LoRA hub id or file")
    loras: list[LoraSpec] = Field(
        default_factory=list, max_length=16, description="extra LoRAs fused at load"
    )
    prediction_type: PredictionSetting = Field(
        default=PredictionSetting.AUTO, description=allowed(PredictionSetting)
    )
    device: Device = Field(default="auto", description="auto | cuda | cuda:N | mps | cpu")
    dtype: DType = Field(default=DType.AUTO, description=allowed(DType))
    cache_dir: Text | None = Field(default=None, description="model cache folder (null: HF_HOME)")
    local_files_only: StrictBool = Field(default=False, description="never download")
    single_file_config: Text | None = Field(
        default=None,
        description="diffusers folder or hub id whose configs describe a single-file checkpoint",
    )

    @model_validator(mode="after")
    def _unique_adapters(self) -> ModelSettings:
        seen: dict[str, int] = {}
        for index, lora in enumerate(self.loras):
            if lora.adapter_name is None:
                continue
            if lora.adapter_name in seen:
                raise _Problem(
                    f"is already used by loras[{seen[lora.adapter_name]}]",
                    "a distinct adapter_name per LoRA",
                    key=f"loras[{index}].adapter_name",
                    value=lora.adapter_name,
                    has_value=True,
                )
            seen[lora.adapter_name] = index
        return self


class StreamSettings(_Section):
    """The stream batch and the starting values of the live parameters."""

    mode: GenerationMode = Field(
        default=GenerationMode.IMG2IMG, description=allowed(GenerationMode)
    )
    width: Dim = Field(default=512, description="output width in pixels")
    height: Dim = Field(default=512, description="output height in pixels")
    num_inference_steps: StrictInt = Field(
        default=50, ge=1, le=1000, description="length of the LCM schedule"
    )
    t_index_list: TIndexList = Field(
        default_factory=lambda: [32, 45], description="denoising slots: indices into the schedule"
    )
    cfg_type: CfgType = Field(default=CfgType.SELF, description=allowed(CfgType))
    guidance_scale: StrictFloat = Field(default=1.2, ge=0, le=20, description="acts above 1")
    delta: StrictFloat = Field(default=1.0, ge=0, le=5, description="R-CFG residual-noise scale")
    prompt: Prompt = Field(
        default="a photograph of a neon jellyfish, studio lighting", description="starting prompt"
    )
    negative_prompt: Prompt = Field(default="low quality, blurry", description="cfg full/onetime")
    prompt_blend_method: BlendMethod = Field(
        default=BlendMethod.SLERP, description=allowed(BlendMethod)
    )
    seed: StrictInt = Field(default=2, ge=0, le=MAX_SEED, description="seed of the cached noise")
    add_noise: StrictBool = Field(default=True, description="re-noise the buffer between slots")
    cross_frame_attention: StrictBool = Field(default=False, description="attend across the batch")

    @model_validator(mode="after")
    def _check_t_index_list(self) -> StreamSettings:
        steps = self.num_inference_steps
        text = (
            f"1 to {MAX_T_INDEX_ITEMS} strictly increasing integers in [0, {steps - 1}] "
            f"(num_inference_steps is {steps})"
        )
        indices = self.t_index_list
        for index in indices:
            if not 0 <= index < steps:
                raise _Problem(
                    f"has {index}, outside [0, {steps - 1}]",
                    text,
                    key="t_index_list",
                    value=indices,
                    has_value=True,
                )
        if any(b <= a for a, b in itertools.pairwise(indices)):
            raise _Problem(
                "is not strictly increasing",
                text,
                key="t_index_list",
                value=indices,
                has_value=True,
            )
        return self


class SimilarityFilterSettings(_Section):
    """Stochastic similarity filter: skip near-identical input frames."""

    enabled: StrictBool = Field(default=False, description="skip near-identical frames")
    threshold: StrictFloat = Field(default=0.98, ge=0, le=0.9999, description="cosine similarity")
    max_skip_frames: StrictInt = Field(
        default=10, ge=0, le=10000, description="force a frame through after this many skips"
    )


class AccelerationSettings(_Section):
    """How the UNet and VAE are executed."""

    backend: AccelBackend = Field(default=AccelBackend.TORCH, description=allowed(AccelBackend))
    fallback: AccelFallback = Field(default=AccelFallback.ERROR, description=allowed(AccelFallback))
    compile: StrictBool = Field(default=False, description="torch.compile (torch backend)")
    engine_dir: Text = Field(default="engines", description="cache folder of built engines")
    onnx_providers: list[OnnxProvider] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime providers in order of preference",
    )
    cuda_graph: StrictBool = Field(
        default=False,
        description="replay the UNet as CUDA graphs (TensorRT, or torch.compile reduce-overhead); CUDA only",
    )
    refittable: StrictBool = Field(default=False, description="build refittable TensorRT engines")


class _InputBase(_Section):
    type: str
    on_loss: OnLoss = Field(default=OnLoss.HOLD, description=allowed(OnLoss))
    retry_seconds: StrictFloat = Field(
        default=1.0, gt=0, le=60, description="seconds between reconnect attempts"
    )
    stall_seconds: StrictFloat = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="a source that sends no new frame for this long counts as lost (0: never)",
    )


class PatternInput(_InputBase):
    """Built-in moving test pattern."""

    type: Literal["pattern"] = "pattern"
    fps: Fps = Field(default=30.0, description="frames per second")
    width: SourceDim = Field(default=512, description="pattern width")
    height: SourceDim = Field(default=512, description="pattern height")


class VideoInput(_InputBase):
    """A video file (needs the [video] extra)."""

    type: Literal["video"] = "video"
    path: Text = Field(description="video file")
    loop: StrictBool = Field(default=True, description="restart at the end")


class ShmInput(_InputBase):
    """Frames from another process over shared memory."""

    type: Literal["shm"] = "shm"
    name: Name = Field(default="latentstage_in", description="shared-memory block name")


class NdiInput(_InputBase):
    """An NDI source on the network (needs the [ndi] extra)."""

    type: Literal["ndi"] = "ndi"
    source: Text = Field(description="NDI source name, e.g. 'HOST (TouchDesigner)'")


class SpoutInput(_InputBase):
    """A Spout sender (Windows)."""

    type: Literal["spout"] = "spout"
    sender: Text = Field(default="TDSyphonSpoutOut", description="Spout sender name")


class SyphonInput(_InputBase):
    """A Syphon server (macOS); an empty name takes the first one found."""

    type: Literal["syphon"] = "syphon"
    server: StrictStr = Field(default="", description="Syphon server name ('' = first found)")


InputSettings = Annotated[
    PatternInput | VideoInput | ShmInput | NdiInput | SpoutInput | SyphonInput,
    Field(discriminator="type"),
]


class _OutputBase(_Section):
    type: str
    queue_size: QueueSize = Field(default=2, description="frames queued; the oldest is dropped")


class PreviewOutput(_OutputBase):
    """MJPEG preview in a browser."""

    type: Literal["preview"] = "preview"
    host: Host = Field(default="127.0.0.1", description="address the preview server binds")
    port: Port = Field(default=8080, description="HTTP port")


class RecordOutput(_OutputBase):
    """Record to a video file (needs the [video] extra)."""

    type: Literal["record"] = "record"
    path: Text = Field(default="out/demo.mp4", description="file to write")
    fps: Fps = Field(default=30.0, description="frame rate of the file")
    codec: Codec = Field(default="libx264", description="FFmpeg encoder name")


class ShmOutput(_OutputBase):
    """Frames to another process over shared memory."""

    type: Literal["shm"] = "shm"
    name: Name = Field(default="latentstage_out", description="shared-memory block name")


class NdiOutput(_OutputBase):
    """An NDI sender on the network (needs the [ndi] extra)."""

    type: Literal["ndi"] = "ndi"
    name: Text = Field(default="latentstage", description="NDI source name")


class SpoutOutput(_OutputBase):
    """A Spout sender (Windows)."""

    type: Literal["spout"] = "spout"
    name: Text = Field(default="latentstage", description="Spout sender name")


class SyphonOutput(_OutputBase):
    """A Syphon server (macOS)."""

    type: Literal["syphon"] = "syphon"
    name: Text = Field(default="latentstage", description="Syphon server name")


OutputSettings = Annotated[
    PreviewOutput | RecordOutput | ShmOutput | NdiOutput | SpoutOutput | SyphonOutput,
    Field(discriminator="type"),
]


class OscSettings(_Section):
    """The OSC control server and its feedback."""

    enabled: StrictBool = Field(default=True, description="listen for OSC")
    host: Host = Field(default="127.0.0.1", description="bind address; non-loopback needs allow")
    port: Port = Field(default=9000, description="UDP port to listen on")
    feedback: list[Feedback] = Field(
        default_factory=lambda: ["127.0.0.1:9001"], description="host:port feedback targets"
    )
    allow: list[Network] = Field(
        default_factory=list, description="IP addresses/CIDR networks obeyed ([] = loopback)"
    )
    status_hz: StrictFloat = Field(default=4.0, gt=0, le=60, description="status messages per s")
    oscquery_port: Port | None = Field(default=9002, description="OSCQuery HTTP port (null: off)")
    max_datagram_bytes: StrictInt = Field(
        default=65507, ge=512, le=65507, description="larger datagrams are dropped"
    )

    @model_validator(mode="after")
    def _network_needs_allow(self) -> OscSettings:
        if self.enabled and not self.allow and not _is_loopback(self.host):
            raise _Problem(
                f"is empty while osc.host is {self.host!r}: anyone on that network could drive "
                "the show (a host other than 127.x.x.x, ::1 or localhost needs an allow list)",
                "IP addresses or CIDR networks of the controllers, "
                "e.g. [192.168.1.20, 10.0.0.0/24]",
                key="allow",
                value=self.allow,
                has_value=True,
            )
        return self


class LoggingSettings(_Section):
    """Logging of the engine process."""

    level: LogLevel = Field(default=LogLevel.INFO, description=allowed(LogLevel))
    file: Text | None = Field(default=None, description="also log to this file (null: stderr)")


class SuperviseSettings(_Section):
    """``latentstage run --supervise``: restart the engine when it dies or hangs."""

    hang_seconds: StrictFloat = Field(
        default=10.0, ge=1, le=3600, description="no frame and no heartbeat this long = hung"
    )
    startup_seconds: StrictFloat = Field(
        default=300.0,
        ge=5,
        le=86400,
        description="time allowed to load the model and make the first frame (builds, compiles)",
    )
    max_restarts: StrictInt = Field(default=5, ge=1, le=1000, description="give up after this many")
    window_minutes: StrictFloat = Field(
        default=10.0, gt=0, le=10080, description="... restarts within this many minutes"
    )
    state_file: Text = Field(
        default="state/live.json",
        description="live parameters autosaved on every accepted change and restored on restart",
    )


def _default_outputs() -> list[OutputSettings]:
    return [PreviewOutput()]


class Config(_Section):
    """The whole of config.yaml."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    similarity_filter: SimilarityFilterSettings = Field(default_factory=SimilarityFilterSettings)
    acceleration: AccelerationSettings = Field(default_factory=AccelerationSettings)
    input: InputSettings = Field(default_factory=PatternInput)
    outputs: list[OutputSettings] = Field(default_factory=_default_outputs, max_length=16)
    osc: OscSettings = Field(default_factory=OscSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    supervise: SuperviseSettings = Field(default_factory=SuperviseSettings)

    @model_validator(mode="before")
    @classmethod
    def _input_defaults_to_pattern(cls, data: Any) -> Any:
        """``input: {fps: 60}`` (no ``type``) means the default pattern input."""
        section = data.get("input") if isinstance(data, Mapping) else None
        if isinstance(section, Mapping) and "type" not in section:
            data = {**data, "input": {"type": "pattern", **section}}
        return data

    @model_validator(mode="after")
    def _distinct_outputs(self) -> Config:
        seen: dict[tuple[str, Any], int] = {}
        if isinstance(self.input, ShmInput):
            seen[("shm", self.input.name)] = -1
        for index, output in enumerate(self.outputs):
            attr = {"preview": "port", "record": "path"}.get(output.type, "name")
            value = getattr(output, attr)
            other = seen.get((output.type, value))
            if other is not None:
                used_by = "input.name" if other < 0 else f"outputs[{other}]"
                raise _Problem(
                    f"is already used by {used_by}",
                    f"a distinct {attr} per output",
                    key=f"outputs[{index}].{attr}",
                    value=value,
                    has_value=True,
                )
            seen[(output.type, value)] = index
        return self


SECTIONS = tuple(Config.model_fields)
INPUT_TYPES = tuple(
    get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(InputSettings)[0])
)
OUTPUT_TYPES = tuple(
    get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(OutputSettings)[0])
)


# --------------------------------------------------------------------------- error translation


@dataclass
class _Located:
    """Where a pydantic ``loc`` points in the schema."""

    path: str = ""
    parent: type[BaseModel] | None = None
    leaf: Any = None
    nullable: bool = False
    metadata: list[Any] = field(default_factory=list)


def _unwrap(tp: Any) -> tuple[Any, list[Any], bool]:
    """Strip ``Annotated``/``Optional``: the core type, its metadata, whether None is allowed."""
    metadata: list[Any] = []
    nullable = False
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            tp = args[0]
            for meta in args[1:]:
                metadata.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) < len(get_args(tp)):
                nullable = True
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, metadata, nullable


def _tagged_members(tp: Any) -> dict[str, type[BaseModel]]:
    """``{tag: model}`` when ``tp`` is a union of models told apart by their ``type`` field."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for member in get_args(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            tag_field = member.model_fields.get("type")
            if tag_field is not None and get_origin(tag_field.annotation) is Literal:
                for tag in get_args(tag_field.annotation):
                    members[str(tag)] = member
    return members


def _locate(loc: Sequence[int | str]) -> _Located:
    """Walk the schema along ``loc``: display path (tags skipped, ``[i]`` indices), leaf type."""
    found = _Located()
    current: Any = Config
    for item in loc:
        core, metadata, _ = _unwrap(current)
        if isinstance(item, int) and get_origin(core) is list:
            found.path += f"[{item}]"
            item_type = get_args(core)[0]
            _, item_meta, _ = _unwrap(item_type)
            found.metadata = item_meta + metadata + found.metadata
            current = item_type
            continue
        tagged = _tagged_members(core)
        if tagged and str(item) in tagged:
            current = tagged[str(item)]
            continue
        key = str(item)
        found.path = f"{found.path}.{key}" if found.path else key
        if tagged:  # a key inside a union whose tag we don't know: use the first member having it
            core = next((m for m in tagged.values() if key in m.model_fields), core)
        if isinstance(core, type) and issubclass(core, BaseModel):
            found.parent = core
            info: FieldInfo | None = core.model_fields.get(key)
            current = info.annotation if info is not None else None
            found.metadata = list(info.metadata) if info is not None else []
        else:
            found.parent = None
            current = None
            found.metadata = []
    found.leaf, extra_meta, found.nullable = _unwrap(current)
    found.metadata = found.metadata + extra_meta
    return found


def _fmt(number: Any) -> str:
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


def _allowed_text(found: _Located) -> str | None:
    """What the located key accepts, in words."""
    for meta in found.metadata:
        if isinstance(meta, _Allowed):
            return meta.text
    leaf = found.leaf
    text: str | None = None
    if isinstance(leaf, type) and issubclass(leaf, Enum):
        text = allowed(leaf)
    elif get_origin(leaf) is Literal:
        text = " | ".join(str(a) for a in get_args(leaf))
    elif _tagged_members(leaf):
        text = "a mapping with type: " + " | ".join(_tagged_members(leaf))
    elif isinstance(leaf, type) and issubclass(leaf, BaseModel):
        text = "a mapping with keys: " + ", ".join(leaf.model_fields)
    elif leaf is bool:
        text = "true | false"
    elif leaf in (int, float):
        kind = "an integer" if leaf is int else "a number"
        low: Any = None
        high: Any = None
        low_open = high_open = False
        for meta in found.metadata:
            if isinstance(meta, annotated_types.Ge):
                low = meta.ge
            elif isinstance(meta, annotated_types.Gt):
                low, low_open = meta.gt, True
            elif isinstance(meta, annotated_types.Le):
                high = meta.le
            elif isinstance(meta, annotated_types.Lt):
                high, high_open = meta.lt, True
        if low is not None and high is not None:
            text = (
                f"{kind} in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}"
                f"{')' if high_open else ']'}"
            )
        elif low is not None:
            text = f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
        else:
            text = kind
    elif leaf is str:
        longest = next(
            (m.max_length for m in found.metadata if isinstance(m, annotated_types.MaxLen)), None
        )
        text = "text" if longest is None else f"text of at most {longest} characters"
    elif get_origin(leaf) is list:
        longest = next(
            (m.max_length for m in found.metadata if isinstance(m, annotated_types.MaxLen)), None
        )
        text = "a list" if longest is None else f"a list of at most {longest} items"
    if text is not None and found.nullable:
        text += " | null"
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PROBLEM_WORDS = {
    "int_type": "is not an integer",
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_type": "is not a number",
    "float_parsing": "is not a number",
    "bool_type": "is not true or false",
    "bool_parsing": "is not true or false",
    "string_type": "is not text",
    "list_type": "is not a list",
    "model_type": "is not a mapping",
    "model_attributes_type": "is not a mapping",
    "dict_type": "is not a mapping",
    "enum": "is not allowed",
    "literal_error": "is not allowed",
    "string_pattern_mismatch": "is not allowed",
    "multiple_of": "is not allowed",
    "greater_than": "is out of range",
    "greater_than_equal": "is out of range",
    "less_than": "is out of range",
    "less_than_equal": "is out of range",
    "finite_number": "is not finite",
    "string_too_long": "is too long",
    "string_too_short": "is too short",
    "too_long": "has too many items",
    "too_short": "has too few items",
}


def _translate_one(error: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as ``(key path, message)``."""
    kind = error["type"]
    found = _locate(error["loc"])
    path = found.path or "config"
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        names = list(found.parent.model_fields) if found.parent is not None else []
        key = path.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return path, f"unknown key{hint}; allowed keys: {', '.join(names)}"
    if kind == "missing":
        allowed_text = _allowed_text(found)
        suffix = f"; allowed: {allowed_text}" if allowed_text else ""
        return path, f"required key is missing{suffix}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = " | ".join(_tagged_members(found.leaf)) or str(ctx.get("expected_tags", ""))
        if kind == "union_tag_not_found":
            return f"{path}.type", f"required key is missing; allowed: {tags}"
        return f"{path}.type", f"{_show(ctx.get('tag'))} is not a known type; allowed: {tags}"
    cause = ctx.get("error")
    if isinstance(cause, _Problem):
        if cause.key:
            path = f"{path}.{cause.key}" if found.path else cause.key
        shown = cause.value if cause.has_value else value
        allowed_text = cause.allowed_text or _allowed_text(found)
        message = f"{_show(shown)} {cause.problem}"
        return path, message if allowed_text is None else f"{message}; allowed: {allowed_text}"
    if cause is not None:
        problem = str(cause)
    else:
        problem = _PROBLEM_WORDS.get(kind, f"is not valid ({error.get('msg', kind)})")
    allowed_text = _allowed_text(found)
    message = f"{_show(value)} {problem}"
    return path, message if allowed_text is None else f"{message}; allowed: {allowed_text}"


def _translate(error: ValidationError) -> ConfigError:
    lines: list[tuple[str, str]] = []
    for item in error.errors():
        line = _translate_one(item)
        if line not in lines:
            lines.append(line)
    return ConfigError(lines)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {error.problem}"
    return f"invalid YAML: {error}"


def _type_word(value: Any) -> str:
    return {
        list: "a list",
        str: "text",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file as a mapping (empty file → ``{}``); ``ConfigError`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([(str(path), f"{what} not found")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([(str(path), f"cannot read the {what}: {error}")]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError([(str(path), _yaml_problem(error))]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                (
                    str(path),
                    (
                        f"the top level is {_type_word(data)}, not a mapping; "
                        f"allowed: a mapping of sections: {', '.join(SECTIONS)}"
                    ),
                )
            ]
        )
    return data


# --------------------------------------------------------------------------- merging


def merge_config(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overlay`` over ``base`` into a new dict (inputs are left unchanged).

    Mappings merge key by key; anything else (lists included) is replaced. A mapping
    whose ``type`` changes (e.g. ``input: {type: video}`` over a pattern input) is
    replaced whole, so the old variant's keys do not leak into the new one.
    """
    result: dict[str, Any] = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in overlay.items():
        current = result.get(key)
        switches_type = (
            isinstance(current, Mapping)
            and isinstance(value, Mapping)
            and "type" in current
            and "type" in value
            and current["type"] != value["type"]
        )
        if isinstance(current, Mapping) and isinstance(value, Mapping) and not switches_type:
            result[key] = merge_config(current, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate plain data (as read from YAML) into a ``Config``; ``ConfigError`` if refused."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                (
                    "config",
                    (
                        f"{_show(data)} is {_type_word(data)}, not a mapping; "
                        f"allowed: a mapping of sections: {', '.join(SECTIONS)}"
                    ),
                )
            ]
        )
    try:
        return Config.model_validate(dict(data))
    except ValidationError as error:
        raise _translate(error) from None


# --------------------------------------------------------------------------- presets


def default_config_path() -> Path | None:
    """``./config.yaml`` if it exists, else the repository's ``config.yaml``, else ``None``."""
    for candidate in (Path.cwd() / CONFIG_FILENAME, REPO_ROOT / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def presets_dir(config_path: str | os.PathLike[str] | None = None) -> Path:
    """``presets/`` beside the config file used, falling back to the repository's ``presets/``."""
    base = Path(config_path) if config_path is not None else default_config_path()
    if base is not None:
        local = base.parent / PRESETS_DIRNAME
        if local.is_dir():
            return local
    return REPO_ROOT / PRESETS_DIRNAME


def _preset_dirs(config_path: str | os.PathLike[str] | None) -> list[Path]:
    dirs = [presets_dir(config_path)]
    repo = REPO_ROOT / PRESETS_DIRNAME
    if repo.is_dir() and repo.resolve() != dirs[0].resolve():
        dirs.append(repo)
    return dirs


def list_presets(config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the presets usable with this config (local ``presets/`` first, then the repo's)."""
    names: set[str] = set()
    for folder in _preset_dirs(config_path):
        if folder.is_dir():
            names.update(
                p.stem
                for p in folder.glob("*.yaml")
                if p.is_file() and PRESET_NAME_RE.match(p.stem)
            )
    return sorted(names)


def preset_path(name: str, config_path: str | os.PathLike[str] | None = None) -> Path:
    """The file of preset ``name``; ``ConfigError`` for a bad or unknown name."""
    if not isinstance(name, str) or not PRESET_NAME_RE.match(name):
        raise ConfigError(
            [
                (
                    "--preset",
                    (
                        f"{_show(name)} is not a preset name; allowed: a name of 1 to 64 "
                        "letters, digits, '_' or '-' (no paths); available: "
                        f"{', '.join(list_presets(config_path)) or 'none'}"
                    ),
                )
            ]
        )
    for folder in _preset_dirs(config_path):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in _preset_dirs(config_path))
    raise ConfigError(
        [
            (
                "--preset",
                (
                    f"{name!r} not found in {searched}; "
                    f"available: {', '.join(list_presets(config_path)) or 'none'}"
                ),
            )
        ]
    )


# --------------------------------------------------------------------------- overrides


def _parse_value(parts: Sequence[str], raw: str, text: str) -> Any:
    """The value of ``--set``: YAML-typed, but text keys take the text as is (``prompt=yes``)."""
    found = _locate(parts)
    stripped = raw.strip()
    if found.leaf is str:
        if found.nullable and stripped in _NULL_WORDS:
            return None
        if not stripped.startswith(("'", '"')):
            return raw
    if not stripped:
        return ""
    try:
        return yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError([(".".join(parts), f"--set {text!r}: {_yaml_problem(error)}")]) from None


def _split_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(
            [
                (
                    "--set",
                    (f"{_show(text)} has no '='; allowed: KEY=VALUE, e.g. stream.cfg_type=full"),
                )
            ]
        )
    parts = key.strip().split(".")
    if not all(_KEY_RE.match(part) for part in parts):
        raise ConfigError(
            [
                (
                    "--set",
                    (
                        f"{_show(text)} has an empty or malformed key path; "
                        "allowed: KEY=VALUE with a dotted key, e.g. stream.width=256"
                    ),
                )
            ]
        )
    for depth in range(1, len(parts)):
        if get_origin(_locate(parts[:depth]).leaf) is list:
            raise ConfigError(
                [
                    (
                        ".".join(parts[:depth]),
                        (
                            f"is a list: --set {text!r} cannot reach inside it; set the whole "
                            "list, e.g. --set "
                            "'outputs=[{type: preview}, {type: record, path: out/take1.mp4}]'"
                        ),
                    )
                ]
            )
    return parts, _parse_value(parts, raw, text)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` as the nested overlay ``{"a": {"b": value}}``; ``ConfigError`` if malformed."""
    parts, value = _split_override(text)
    overlay: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        overlay = {part: overlay}
    return overlay


# --------------------------------------------------------------------------- public entry points


def load_config(
    path: str | os.PathLike[str] | None = None,
    presets: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> Config:
    """Read a config file, merge presets and ``KEY=VALUE`` overrides in order, and validate.

    ``path`` ``None`` uses ``./config.yaml`` if it exists, else the repository's default
    (and only the schema defaults if neither exists). Presets are looked up in
    ``presets/`` beside that file, then in the repository's ``presets/``.
    Raises ``ConfigError`` naming the file, preset or key path of every problem.
    """
    if isinstance(presets, str):
        presets = [presets]
    if isinstance(overrides, str):
        overrides = [overrides]
    config_path = Path(path) if path is not None else default_config_path()
    if config_path is None:
        logger.debug("no config.yaml found; starting from the schema defaults")
        data: dict[str, Any] = {}
    else:
        data = _read_yaml(config_path, "config file")
        logger.debug("config from %s", config_path)
    for name in presets:
        file = preset_path(name, config_path)
        data = merge_config(data, _read_yaml(file, "preset"))
        logger.debug("preset %s from %s", name, file)
    for text in overrides:
        data = merge_config(data, parse_override(text))
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    """The validated config as YAML (enums as plain strings), loadable again by ``load_config``."""
    return yaml.dump(
        config.model_dump(mode="json"),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=1000,
    )


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (for editors and documentation)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "latentstage config.yaml"
    return schema


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing lists of plain values inline (``[35, 45]``) and mappings as blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    inline = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _represent_list)
