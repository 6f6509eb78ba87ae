"""PipelineSettings: a StreamPipeline's start-up values, defaults from the parameter registry."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from engine import params
from engine.extensions.controlnet import ControlNetSettings
from engine.stream.modes import BlendMethod, CfgType, GenerationMode


def _live(name: str, kind: Callable[[Any], Any] = lambda v: v) -> Callable[[], Any]:
    """A default factory: the registry's default of ``name`` (``engine.params``), as ``kind``."""
    default = params.get(name).default
    return lambda: kind(copy.deepcopy(default))


@dataclass
class PipelineSettings:
    """Start-up settings of a StreamPipeline: the live parameters' starting values (defaults from
    the registry) and the fixed ones (mode, schedule length, noise, cross-frame attention)."""

    width: int = field(default_factory=lambda: _live("resolution")()[0])
    height: int = field(default_factory=lambda: _live("resolution")()[1])
    mode: GenerationMode = GenerationMode.IMG2IMG
    t_index_list: list[int] = field(default_factory=_live("t_index_list"))
    num_inference_steps: int = 50
    cfg_type: CfgType = field(default_factory=_live("cfg_type", CfgType))
    guidance_scale: float = field(default_factory=_live("guidance_scale"))
    delta: float = field(default_factory=_live("delta"))
    prompt: str = field(default_factory=_live("prompt"))
    negative_prompt: str = field(default_factory=_live("negative_prompt"))
    prompt_blend_method: BlendMethod = field(default_factory=_live("prompt_blend_method", BlendMethod))
    seed: int = field(default_factory=_live("seed"))
    add_noise: bool = True
    cross_frame_attention: bool = False
    similarity_filter_enabled: bool = field(default_factory=_live("similarity_filter_enabled"))
    similarity_filter_threshold: float = field(default_factory=_live("similarity_filter_threshold"))
    similarity_filter_max_skip_frames: int = field(default_factory=_live("similarity_filter_max_skip_frames"))
    feature_cache_enabled: bool = field(default_factory=_live("feature_cache_enabled"))
    feature_cache_frames: int = field(default_factory=_live("feature_cache_frames"))
    feature_cache_interval: int = field(default_factory=_live("feature_cache_interval"))
    feature_cache_strength: float = field(default_factory=_live("feature_cache_strength"))
    feature_cache_injection: float = field(default_factory=_live("feature_cache_injection"))
    feature_cache_threshold: float = field(default_factory=_live("feature_cache_threshold"))
    controlnets: tuple[ControlNetSettings, ...] = ()
    ip_adapter_scale: float = 0.6
    ip_adapter_image: str | None = None
    image_folder: str | None = None  # where /ip_adapter_image names files (the presets folder)
    ip_adapter_from_source: bool = False  # the reference comes from a bridge (set_reference_tokens)
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)  # config.yaml's extensions

    @classmethod
    def from_config(cls, config: Any) -> PipelineSettings:
        """Read the validated config: every live parameter from its registry ``config_key``."""
        stream = config.stream
        values = params.config_values(config, (name for name in params.REGISTRY if name in SETTINGS_FIELDS))
        return cls(
            width=stream.width,
            height=stream.height,
            mode=GenerationMode(stream.mode),
            num_inference_steps=stream.num_inference_steps,
            add_noise=stream.add_noise,
            cross_frame_attention=stream.cross_frame_attention,
            controlnets=tuple(ControlNetSettings.from_config(entry) for entry in config.model.controlnets),
            **_ip_adapter_settings(config.model.ip_adapter),
            extensions=copy.deepcopy(dict(config.extensions)),
            **values,
        )


def _ip_adapter_settings(section: Any) -> dict[str, Any]:
    """The starting IP-Adapter values of ``model.ip_adapter`` (none: nothing), images from presets/."""
    if section is None:
        return {}
    from engine.config.files import presets_dir

    return {
        "ip_adapter_scale": section.scale,
        "ip_adapter_image": section.image,
        "image_folder": str(presets_dir()),
        "ip_adapter_from_source": section.source is not None,
    }


SETTINGS_FIELDS = frozenset(f.name for f in fields(PipelineSettings))


def check_settings(settings: PipelineSettings, factor: int) -> None:
    """``ValueError`` for a size that is not a positive multiple of the model's latent ``factor``;
    ``ParamError`` for a bad ``t_index_list``."""
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value % factor or value <= 0:
            raise ValueError(f"{name} {value} is not a positive multiple of {factor}")
    params.get("t_index_list").coerce(settings.t_index_list)


def check_image(image: Any, height: int, width: int) -> None:
    """``ValueError`` unless ``image`` is a float tensor ``(1, 3, height, width)``."""
    expected = (1, 3, height, width)
    if image is None:
        raise ValueError(f"img2img needs an image of shape {expected}; got None")
    if tuple(image.shape) != expected or not image.is_floating_point():
        raise ValueError(
            f"image of shape {tuple(image.shape)} and dtype {image.dtype}; expected a float "
            f"tensor of shape {expected} in [-1, 1] (use engine.imageops.frame_to_tensor)"
        )
