"""The configuration: schema of config.yaml, preset overlays, --set overrides and clear errors."""

from engine.accel.kinds import BackendKind as AccelBackend
from engine.accel.kinds import FallbackMode as AccelFallback
from engine.config.errors import ConfigError
from engine.config.files import (
    config_from_dict,
    default_config_path,
    dump_config,
    list_presets,
    load_config,
    media_dir,
    merge_config,
    parse_override,
    presets_dir,
)
from engine.config.schema import (
    AccelerationSettings,
    AudioSettings,
    Config,
    FeatureCacheSettings,
    FeedbackSettings,
    LoggingSettings,
    ModelSettings,
    OscSettings,
    PatternInput,
    PreviewOutput,
    ScaleSettings,
    SimilarityFilterSettings,
    StreamSettings,
    SuperviseSettings,
    TempoSettings,
    VideoInput,
    config_json_schema,
)
from engine.models.kinds import VaeKind

__all__ = [
    "AccelBackend",
    "AccelFallback",
    "AccelerationSettings",
    "AudioSettings",
    "Config",
    "ConfigError",
    "FeatureCacheSettings",
    "FeedbackSettings",
    "LoggingSettings",
    "ModelSettings",
    "OscSettings",
    "PatternInput",
    "PreviewOutput",
    "ScaleSettings",
    "SimilarityFilterSettings",
    "StreamSettings",
    "SuperviseSettings",
    "TempoSettings",
    "VaeKind",
    "VideoInput",
    "config_from_dict",
    "config_json_schema",
    "default_config_path",
    "dump_config",
    "list_presets",
    "load_config",
    "media_dir",
    "merge_config",
    "parse_override",
    "presets_dir",
]
