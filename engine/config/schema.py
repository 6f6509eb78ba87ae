"""The pydantic schema of config.yaml: its sections, their field types, ranges and validators."""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal, get_args

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
    field_serializer,
    field_validator,
    model_validator,
)

from engine.accel.kinds import BackendKind, FallbackMode
from engine.config.errors import _Allowed, _Problem
from engine.models.kinds import ControlPreprocessor, DType, PredictionSetting, VaeKind
from engine.models.sources import (
    BUILTIN_IDS,
    BUILTIN_PREFIX,
    DEFAULT_DEPTH_ID,
    TINY_CONTROLNET_ID,
    TINY_DEPTH_ID,
    TINY_IP_ADAPTER_ID,
)
from engine.params import (
    IMAGE_FILE_PATTERN,
    IMAGE_FILE_TEXT,
    MAX_CONTROLNETS,
    MAX_PROMPT_CHARS,
    REGISTRY,
    SIDE_MULTIPLE,
    ParamSpec,
)
from engine.runtime.loss import OnLossMode
from engine.stream.modes import BlendMethod, CfgType, GenerationMode, allowed
from engine.tempo.clock import Quantum
from engine.tempo.kinds import TempoSource

_SIZE = REGISTRY["resolution"]
_T_INDEX_ITEMS = REGISTRY["t_index_list"].max_items
_FEEDBACK_RE = re.compile(r"^(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^:\s\[\]]+)):(?P<port>[0-9]{1,5})$")


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


def _no_dots(value: str) -> str:
    if ".." in value:
        raise _Problem("is not a plain file name", IMAGE_FILE_TEXT)
    return value


def _is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_address(target: str, host: str, port: int) -> bool:
    """Whether the ``host:port`` target is where ``host`` / ``port`` listens: the same port on the
    same host, every loopback name (127.x.x.x, ::1, localhost) counting as one, and a loopback or
    the literal target counting as the wildcard listener's (0.0.0.0, ::)."""
    match = _FEEDBACK_RE.match(target)
    if match is None or int(match["port"]) != port:
        return False
    name = (match["v6"] or match["host"]).lower()
    listen = host.strip().strip("[]").lower()
    if name == listen or (_is_loopback(name) and _is_loopback(listen)):
        return True
    return listen in ("0.0.0.0", "::") and (_is_loopback(name) or name in ("0.0.0.0", "::"))


_MODEL_ID_ALLOWED = "a hub id (org/name), a local folder, a .safetensors/.ckpt file, or " + " / ".join(
    BUILTIN_IDS
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
    StrictInt,
    Field(multiple_of=SIDE_MULTIPLE, ge=_SIZE.minimum, le=_SIZE.maximum),
    _Allowed(f"a multiple of {SIDE_MULTIPLE} between {_SIZE.minimum} and {_SIZE.maximum}"),
]
SourceDim = Annotated[StrictInt, Field(ge=16, le=8192)]
Codec = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]+$"), _Allowed("an FFmpeg encoder name")]
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
    Field(min_length=1, max_length=_T_INDEX_ITEMS),
    _Allowed(f"1 to {_T_INDEX_ITEMS} strictly increasing integers in [0, num_inference_steps - 1]"),
]


def _live(key: str, description: str, enum: type[Enum] | None = None) -> Any:
    """The field of live parameter ``key``: its default and its ge/le bounds from the registry.

    List values get a fresh copy per instance; an ``enum`` turns the default into its member.
    """
    spec: ParamSpec = next(s for s in REGISTRY.values() if s.config_key == key)
    if isinstance(spec.default, list):
        return Field(default_factory=lambda: list(spec.default), description=description)
    value = spec.default if enum is None else enum(spec.default)
    return Field(default=value, ge=spec.minimum, le=spec.maximum, description=description)


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
    taesd_id: Text | None = Field(
        default=None,
        description="hub id or folder of TAESD (null: madebyollin/taesd, for SDXL madebyollin/taesdxl)",
    )
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
    controlnets: list[ControlNetSpec] = Field(
        default_factory=list,
        max_length=MAX_CONTROLNETS,
        description="ControlNets steering the structure (several at once; /controlnet_scales live)",
    )
    ip_adapter: IpAdapterSpec | None = Field(
        default=None, description="IP-Adapter: a reference image steering the style (null: none)"
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


class FeatureCacheSettings(_Section):
    """StreamV2V-style feature cache: self-attention also attends to past frames' features."""

    enabled: StrictBool = _live("stream.feature_cache.enabled", "attend to cached past frames")
    frames: StrictInt = _live("stream.feature_cache.frames", "past frames kept")
    interval: StrictInt = _live("stream.feature_cache.interval", "refresh every n-th frame")
    strength: StrictFloat = _live("stream.feature_cache.strength", "weight of the cached frames")
    injection: StrictFloat = _live("stream.feature_cache.injection", "pull toward nearest cached (0: off)")
    threshold: StrictFloat = _live("stream.feature_cache.threshold", "cosine similarity for injection")


class StreamSettings(_Section):
    """The stream batch and the starting values of the live parameters."""

    mode: GenerationMode = Field(default=GenerationMode.IMG2IMG, description=allowed(GenerationMode))
    width: Dim = Field(default=_SIZE.default[0], description="output width in pixels")
    height: Dim = Field(default=_SIZE.default[1], description="output height in pixels")
    num_inference_steps: StrictInt = Field(
        default=50, ge=1, le=1000, description="length of the LCM schedule"
    )
    t_index_list: TIndexList = _live("stream.t_index_list", "denoising slots: indices into the schedule")
    cfg_type: CfgType = _live("stream.cfg_type", allowed(CfgType), CfgType)
    guidance_scale: StrictFloat = _live("stream.guidance_scale", "acts above 1")
    delta: StrictFloat = _live("stream.delta", "R-CFG residual-noise scale")
    prompt: Prompt = _live("stream.prompt", "starting prompt")
    negative_prompt: Prompt = _live("stream.negative_prompt", "cfg full/onetime")
    prompt_blend_method: BlendMethod = _live("stream.prompt_blend_method", allowed(BlendMethod), BlendMethod)
    seed: StrictInt = _live("stream.seed", "seed of the cached noise")
    add_noise: StrictBool = Field(default=True, description="re-noise the buffer between slots")
    cross_frame_attention: StrictBool = Field(default=False, description="attend across the batch")
    output_scale: StrictInt = Field(
        default=1,
        ge=1,
        le=4,
        description="upsample every output by this factor (bilinear) before the outputs: a small "
        "model's pictures at a size worth watching (builtin:shapes draws 128x128)",
    )
    feature_cache: FeatureCacheSettings = Field(default_factory=lambda: FeatureCacheSettings())

    @model_validator(mode="after")
    def _check_t_index_list(self) -> StreamSettings:
        steps = self.num_inference_steps
        text = (
            f"1 to {_T_INDEX_ITEMS} strictly increasing integers in [0, {steps - 1}] "
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

    enabled: StrictBool = _live("similarity_filter.enabled", "skip near-identical frames")
    threshold: StrictFloat = _live("similarity_filter.threshold", "cosine similarity")
    max_skip_frames: StrictInt = _live(
        "similarity_filter.max_skip_frames", "force a frame through after this many skips"
    )


_SHIFT = REGISTRY["feedback_translate"]
FeedbackShift = Annotated[StrictFloat | StrictInt, Field(ge=_SHIFT.minimum, le=_SHIFT.maximum)]


class FeedbackSettings(_Section):
    """The feedback loop: the previous output, transformed each frame, mixed into the next input."""

    amount: StrictFloat | StrictInt = _live("feedback.amount", "share of the fed-back picture (0: off)")
    zoom: StrictFloat | StrictInt = _live("feedback.zoom", "zoom per frame (> 1: in, content moves out)")
    rotate: StrictFloat | StrictInt = _live("feedback.rotate", "degrees per frame, counter-clockwise")
    translate: list[FeedbackShift] = Field(
        default_factory=lambda: list(_SHIFT.default),
        min_length=_SHIFT.min_items,
        max_length=_SHIFT.max_items,
        description="x (right) and y (up) per frame, fractions of the width and height",
    )
    hue: StrictFloat | StrictInt = _live("feedback.hue", "hue shift per frame in degrees")
    decay: StrictFloat | StrictInt = _live("feedback.decay", "fade toward mid-grey per frame")


class AccelerationSettings(_Section):
    """How the UNet and VAE are executed."""

    backend: BackendKind = Field(default=BackendKind.TORCH, description=allowed(BackendKind))
    fallback: FallbackMode = Field(default=FallbackMode.ERROR, description=allowed(FallbackMode))
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


class ScaleSettings(_Section):
    """Replicas of the whole pipeline on several devices (torch.distributed), frames round-robin."""

    replicas: StrictInt = Field(
        default=1, ge=1, le=8, description="pipeline replicas, each in its own process (1: in the engine)"
    )
    devices: list[Device] = Field(
        default_factory=list,
        max_length=8,
        description="the replicas' devices in turn, e.g. [cuda:0, cuda:1] ([]: model.device for all)",
    )
    threads: StrictInt = Field(default=0, ge=0, le=256, description="torch threads per replica (0: torch's)")
    hang_seconds: StrictFloat | StrictInt = Field(
        default=0.5,
        gt=0,
        le=60,
        description="a frame not back from a replica this long (or 4 frame times, the longer) = hung: out",
    )
    reorder_ms: StrictFloat | StrictInt = Field(
        default=50.0, ge=0, le=1000, description="how long a finished frame waits for an earlier one"
    )


class _InputBase(_Section):
    type: str
    on_loss: OnLossMode = Field(default=OnLossMode.HOLD, description=allowed(OnLossMode))
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

_CONTROL_SCALE = REGISTRY["controlnet_scales"]
_CONTROL_LOSS = (OnLossMode.HOLD, OnLossMode.BLACK)


def _bridge_source(value: Any, what: str, other: str = "") -> Any:
    """A second source's definition: a mapping with a ``type``, like ``input``'s."""
    if not isinstance(value, Mapping):
        raise _Problem(
            f"is not {what}", f"{other}a bridge definition like input's, e.g. {{type: shm, name: depth}}"
        )
    if "type" not in value:
        raise _Problem("has no type", " | ".join(INPUT_TYPES), key="type")
    return value


def _check_source_loss(source: Any, what: str) -> None:
    """A second source holds its last frame or goes black when lost (no passthrough of nothing)."""
    if source is not None and source.on_loss not in _CONTROL_LOSS:
        raise _Problem(
            f"is not allowed for {what}",
            " | ".join(mode.value for mode in _CONTROL_LOSS),
            key="source.on_loss",
            value=source.on_loss.value,
            has_value=True,
        )


def _check_controlnet_id(value: str) -> str:
    if not value.strip():
        raise _Problem("is empty", _CONTROLNET_ID_ALLOWED)
    if value.startswith(BUILTIN_PREFIX) and value != TINY_CONTROLNET_ID:
        raise _Problem("is not a built-in ControlNet", TINY_CONTROLNET_ID)
    return value


_CONTROLNET_ID_ALLOWED = f"a hub id (org/name), a local folder, a .safetensors file, or {TINY_CONTROLNET_ID}"
ControlNetId = Annotated[StrictStr, _Allowed(_CONTROLNET_ID_ALLOWED), AfterValidator(_check_controlnet_id)]
Share = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


class ControlNetSpec(_Section):
    """One ControlNet: its weights, its starting scale, its preprocessor and its frames."""

    id: ControlNetId = Field(description=_CONTROLNET_ID_ALLOWED)
    scale: StrictFloat = Field(
        default=1.0,
        ge=_CONTROL_SCALE.minimum,
        le=_CONTROL_SCALE.maximum,
        description="starting scale (/controlnet_scales changes it live; 0 switches it off)",
    )
    preprocessor: ControlPreprocessor = Field(
        default=ControlPreprocessor.NONE, description=allowed(ControlPreprocessor)
    )
    preprocessor_id: Text = Field(
        default=DEFAULT_DEPTH_ID,
        description=f"the depth model of preprocessor: depth (hub id, folder or {TINY_DEPTH_ID})",
    )
    low_threshold: Share = Field(default=0.1, description="Canny: weak-edge threshold")
    high_threshold: Share = Field(default=0.2, description="Canny: strong-edge threshold")
    source: InputSettings | None = Field(
        default=None,
        description="input (the frame being diffused) or a bridge definition like `input` (own frames)",
    )
    start: Share = Field(default=0.0, description="share of the schedule where it starts acting")
    end: Share = Field(default=1.0, description="share of the schedule where it stops acting")

    @field_validator("source", mode="before")
    @classmethod
    def _source_input(cls, value: Any) -> Any:
        """``source: input`` (the default) is the frame being diffused; a mapping is a bridge."""
        if value == "input" or value is None:
            return None
        return _bridge_source(value, "a ControlNet source", "input, or ")

    @field_serializer("source")
    def _show_source(self, source: Any) -> Any:
        return "input" if source is None else source.model_dump(mode="json")

    @property
    def from_input(self) -> bool:
        return self.source is None

    @model_validator(mode="after")
    def _consistent(self) -> ControlNetSpec:
        if self.low_threshold >= self.high_threshold:
            raise _Problem(
                "is not below high_threshold",
                f"low_threshold < high_threshold ({self.high_threshold})",
                key="low_threshold",
                value=self.low_threshold,
                has_value=True,
            )
        if self.start >= self.end:
            raise _Problem(
                "is not below end", f"start < end ({self.end})", key="start", value=self.start, has_value=True
            )
        _check_source_loss(self.source, "a ControlNet source")
        return self


_IP_SCALE = REGISTRY["ip_adapter_scale"]
ImageFile = Annotated[
    StrictStr, Field(pattern=f"^{IMAGE_FILE_PATTERN}$"), _Allowed(IMAGE_FILE_TEXT), AfterValidator(_no_dots)
]


class IpAdapterSpec(_Section):
    """The IP-Adapter: a reference image steering the style (``/ip_adapter_scale``, ``/ip_adapter_image``)."""

    id: Text = Field(
        description=f"the IP-Adapter weights: a .bin/.safetensors file, a hub file like "
        f"h94/IP-Adapter/models/ip-adapter_sd15.safetensors, or {TINY_IP_ADAPTER_ID}"
    )
    image_encoder: Text | None = Field(
        default=None,
        description="CLIP image encoder (hub id or folder; null: the adapter's models/image_encoder)",
    )
    scale: StrictFloat = Field(
        default=0.6,
        ge=_IP_SCALE.minimum,
        le=_IP_SCALE.maximum,
        description="starting scale (/ip_adapter_scale)",
    )
    image: ImageFile | None = Field(default=None, description="starting reference image (/ip_adapter_image)")
    source: InputSettings | None = Field(
        default=None,
        description="the reference image from a bridge instead (a definition like `input`), e.g. a live TOP",
    )
    refresh_seconds: StrictFloat = Field(
        default=0.5,
        ge=0.05,
        le=60.0,
        description="source: how often its newest frame is encoded as the reference (off the frame loop)",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source_bridge(cls, value: Any) -> Any:
        return None if value is None else _bridge_source(value, "an IP-Adapter source")

    @model_validator(mode="after")
    def _one_reference(self) -> IpAdapterSpec:
        _check_source_loss(self.source, "an IP-Adapter source")
        if self.source is not None and self.image is not None:
            raise _Problem(
                "and source exclude each other",
                "image (a file in presets/) or source (a bridge), not both",
                key="image",
                value=self.image,
                has_value=True,
            )
        return self


ModelSettings.model_rebuild()


class _OutputBase(_Section):
    type: str
    queue_size: QueueSize = Field(default=2, description="frames queued; the oldest is dropped")


class PreviewOutput(_OutputBase):
    """MJPEG preview in a browser."""

    type: Literal["preview"] = "preview"
    host: Host = Field(
        default="127.0.0.1",
        description="address the preview / operator page binds; non-loopback needs osc.allow",
    )
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


class _PublishedOutput(_OutputBase):
    """An output other applications find by name: an NDI source, a Spout sender, a Syphon server."""

    name: Text = Field(
        default="latentstage", description="the name receivers see (NDI source, Spout sender, Syphon server)"
    )


class NdiOutput(_PublishedOutput):
    """An NDI sender on the network (needs the [ndi] extra)."""

    type: Literal["ndi"] = "ndi"


class SpoutOutput(_PublishedOutput):
    """A Spout sender (Windows)."""

    type: Literal["spout"] = "spout"


class SyphonOutput(_PublishedOutput):
    """A Syphon server (macOS)."""

    type: Literal["syphon"] = "syphon"


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
    forward: list[Feedback] = Field(
        default_factory=list,
        description="host:port of other engines that receive every accepted change "
        "(several machines, one show)",
    )
    allow: list[Network] = Field(
        default_factory=list, description="IP addresses/CIDR networks obeyed ([] = loopback)"
    )
    status_hz: StrictFloat = Field(default=4.0, gt=0, le=60, description="status messages per s")
    modulation_hz: StrictFloat | StrictInt = Field(
        default=20.0, gt=0, le=60, description="modulated values (/engine/mod/...) sent at most this often"
    )
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
                "IP addresses or CIDR networks of the controllers, e.g. [192.168.1.20, 10.0.0.0/24]",
                key="allow",
                value=self.allow,
                has_value=True,
            )
        return self

    @model_validator(mode="after")
    def _forward_elsewhere(self) -> OscSettings:
        for index, target in enumerate(self.forward):
            if self.enabled and _same_address(target, self.host, self.port):
                raise _Problem(
                    f"is this engine's own OSC address (osc.host {self.host!r}, osc.port {self.port}): "
                    "it would feed every change back to itself",
                    "host:port of another engine (another machine or another port), e.g. 192.168.1.21:9000",
                    key=f"forward[{index}]",
                    value=target,
                    has_value=True,
                )
        return self


def _quantum(value: Any) -> Any:
    """YAML reads a bare ``off`` as false: that is the quantum ``off``."""
    return "off" if value is False else value


class TempoSettings(_Section):
    """Musical time: where the tempo comes from and where quantised changes land."""

    source: TempoSource = Field(default=TempoSource.INTERNAL, description=allowed(TempoSource))
    bpm: StrictFloat | StrictInt = _live("tempo.bpm", "starting tempo (internal, osc)")
    beats_per_bar: StrictInt = _live("tempo.beats_per_bar", "beats in a bar")
    quantize: Quantum = Field(default=Quantum(REGISTRY["quantize"].default), description=allowed(Quantum))
    offset_ms: StrictFloat | StrictInt = _live("tempo.offset_ms", "added to the measured latency")
    midi_port: Text | None = Field(
        default=None, description="midi_clock: the MIDI input whose name starts with this (null: the default)"
    )
    resolume_bpm_range: list[StrictFloat | StrictInt] = Field(
        default_factory=lambda: [20.0, 500.0],
        min_length=2,
        max_length=2,
        description="osc: the BPM of Resolume's tempo fader at 0 and at 1",
    )

    @field_validator("quantize", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return _quantum(value)


AUDIO_INPUTS = ("file", "device", "ndi")
"""The keys of ``audio`` that name an input; at most one is set."""


class AudioSettings(_Section):
    """The audio that audio-follower modulators read (at most one of file, device and ndi)."""

    file: Text | None = Field(default=None, description="a WAV (FLAC: extra audio) file, played in a loop")
    device: Text | None = Field(default=None, description="an input device name or number (extra audio)")
    ndi: Text | None = Field(
        default=None, description="an NDI sender's audio, by name, e.g. 'HOST (Ableton)' (extra ndi)"
    )
    loop: StrictBool = Field(default=True, description="play the file again at its end")
    gain: StrictFloat | StrictInt = Field(default=1.0, ge=0, le=1000, description="level scale (modulators)")

    @model_validator(mode="after")
    def _one_input(self) -> AudioSettings:
        given = [key for key in AUDIO_INPUTS if getattr(self, key) is not None]
        if len(given) > 1:
            raise _Problem(
                f"is given beside audio.{given[0]}", "at most one of audio.file, audio.device and audio.ndi",
                key=given[-1], value=getattr(self, given[-1]), has_value=True,
            )
        return self


class MidiSettings(_Section):
    """MIDI controllers: mapping files by name (presets/midi/NAME.yaml), each naming its port."""

    mappings: list[Name] = Field(
        default_factory=list,
        max_length=16,
        description="mapping files in presets/midi by name, one per controller (extra midi); [] = off",
    )
    poll_s: StrictFloat | StrictInt = Field(
        default=1.5, ge=0.2, le=10, description="seconds between looks for ports that came or went (hotplug)"
    )
    feedback_hz: StrictFloat | StrictInt = Field(
        default=30.0, gt=0, le=200, description="LED feedback sent at most this often"
    )
    backend: Text | None = Field(
        default=None,
        description="mido backend module (null: MIDO_BACKEND, else rtmidi); engine.midi.loopback: in memory",
    )


def _registry_check(name: str) -> Any:
    """A field validator that runs the registry's check of STRUCT parameter ``name``."""

    def check(value: Any) -> Any:
        try:
            return REGISTRY[name].coerce(value)
        except ValueError as err:
            raise _Problem(str(err).removeprefix(f"{name}: ")) from None

    return check


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
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    acceleration: AccelerationSettings = Field(default_factory=AccelerationSettings)
    scale: ScaleSettings = Field(default_factory=ScaleSettings)
    input: InputSettings = Field(default_factory=PatternInput)
    outputs: list[OutputSettings] = Field(default_factory=_default_outputs, max_length=16)
    osc: OscSettings = Field(default_factory=OscSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    supervise: SuperviseSettings = Field(default_factory=SuperviseSettings)
    tempo: TempoSettings = Field(default_factory=TempoSettings)
    audio: AudioSettings = Field(default_factory=AudioSettings)
    midi: MidiSettings = Field(default_factory=MidiSettings)
    modulators: Annotated[list[Any], AfterValidator(_registry_check("modulators"))] = Field(
        default_factory=list, description="LFOs, envelopes and audio followers on live parameters"
    )
    sequence: Annotated[dict[str, Any] | None, AfterValidator(_registry_check("sequence"))] = Field(
        default=None, description="a prompt sequence stepping on the beat ({steps, every, crossfade})"
    )
    extensions: dict[Name, dict[str, Any]] = Field(
        default_factory=dict,
        description="settings of registered UNet extensions by name (engine.extensions); the built-in "
        "ones (ControlNet, IP-Adapter, SDXL, feature cache, cross-frame attention) have their own keys",
    )

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

    @model_validator(mode="after")
    def _known_extensions(self) -> Config:
        """Each ``extensions`` entry names a registered extension that takes settings, and they fit."""
        if not self.extensions:
            return self
        from engine.extensions import registered  # torch: only where extensions are configured

        takes = {kind.name: kind.config_model for kind in registered() if kind.config_model is not None}
        for name, values in self.extensions.items():
            model = takes.get(name)
            if model is None:
                raise _Problem(
                    "is not a registered extension that takes settings",
                    " | ".join(sorted(takes)) or "none is registered",
                    key=f"extensions.{name}",
                    value=name,
                    has_value=True,
                )
            try:
                model.model_validate(values)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise _Problem(
                    f"is refused by the {name} extension: {first['msg']}",
                    f"the settings of {model.__name__}: {sorted(model.model_fields)}",
                    key=f"extensions.{name}" + (f".{where}" if where else ""),
                    value=first.get("input"),
                    has_value=True,
                ) from None
        return self

    @model_validator(mode="after")
    def _wide_preview_needs_allow(self) -> Config:
        """The preview's operator page steers the show: bound beyond this machine it takes the
        same allow-list as OSC."""
        for index, output in enumerate(self.outputs):
            if isinstance(output, PreviewOutput) and not self.osc.allow and not _is_loopback(output.host):
                raise _Problem(
                    "is reachable from other machines while osc.allow is empty: anyone on that network "
                    "could watch and steer the show from the operator page",
                    "127.0.0.1 (this machine), or set osc.allow to the addresses allowed, "
                    "e.g. [192.168.1.0/24]",
                    key=f"outputs[{index}].host",
                    value=output.host,
                    has_value=True,
                )
        return self


SECTIONS = tuple(Config.model_fields)
INPUT_TYPES = tuple(
    get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(InputSettings)[0])
)
OUTPUT_TYPES = tuple(
    get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(OutputSettings)[0])
)


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (for editors and documentation)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "latentstage config.yaml"
    return schema
