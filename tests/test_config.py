"""Tests of engine.config: defaults, presets, overlays, --set overrides and clear errors."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from engine import config as cfg
from engine.cli import main
from engine.config import Config, ConfigError, load_config
from engine.config import files as cfg_files
from engine.params import REGISTRY, SIDE_MULTIPLE, ParamKind
from engine.stream.modes import CfgType, GenerationMode

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "stream", "similarity_filter", "feedback", "acceleration", "scale", "input", "outputs",
            "osc", "logging", "supervise", "tempo", "audio", "midi", "modulators", "sequence", "extensions")


@pytest.fixture()
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty folder, so the repository's config.yaml and presets/ are the fallback."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _get(config: Config, dotted: str) -> Any:
    value: Any = config.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# --------------------------------------------------------------------------- defaults


def test_default_config_loads_from_the_repository(elsewhere: Path) -> None:
    config = load_config()
    assert config.model.id == "stabilityai/sd-turbo"
    assert config.model.vae is cfg.VaeKind.TAESD
    assert config.stream.mode is GenerationMode.IMG2IMG
    assert (config.stream.width, config.stream.height) == (512, 512)
    assert config.stream.t_index_list == [35, 45]
    assert config.stream.cfg_type is CfgType.SELF
    assert config.stream.guidance_scale == 1.2
    assert isinstance(config.input, cfg.PatternInput)
    assert [o.type for o in config.outputs] == ["preview"]
    assert config.osc.host == "127.0.0.1"
    assert config.osc.port == 9000
    assert config.osc.feedback == ["127.0.0.1:9001"]


def test_empty_file_gives_the_schema_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "# only a comment\n")) == Config()
    assert cfg_files.config_from_dict({}) == Config()


def test_repository_config_lists_and_comments_every_key() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert tuple(data) == SECTIONS
    for section, model in [("model", cfg.ModelSettings), ("stream", cfg.StreamSettings),
                           ("similarity_filter", cfg.SimilarityFilterSettings),
                           ("feedback", cfg.FeedbackSettings),
                           ("acceleration", cfg.AccelerationSettings), ("osc", cfg.OscSettings),
                           ("logging", cfg.LoggingSettings), ("input", cfg.PatternInput),
                           ("supervise", cfg.SuperviseSettings), ("tempo", cfg.TempoSettings),
                           ("audio", cfg.AudioSettings)]:
        assert set(data[section]) == set(model.model_fields), section
    assert set(data["stream"]["feature_cache"]) == set(cfg.FeatureCacheSettings.model_fields)
    assert set(data["outputs"][0]) == set(cfg.PreviewOutput.model_fields)
    for line in text.splitlines():
        if line.startswith("  ") and ":" in line and not line.lstrip().startswith(("#", "-")):
            assert "#" in line, f"undocumented key: {line.strip()}"


def test_cwd_config_yaml_is_preferred(elsewhere: Path) -> None:
    _write(elsewhere, "stream:\n  width: 256\n")
    assert load_config().stream.width == 256
    assert cfg_files.presets_dir() == REPO / "presets"  # no presets/ here: the repository's
    (elsewhere / "presets").mkdir()
    assert cfg_files.presets_dir() == elsewhere / "presets"


def test_missing_default_files_fall_back_to_schema(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cfg_files, "REPO_ROOT", elsewhere / "nowhere")
    assert cfg.default_config_path() is None
    assert load_config() == Config()


def _bounds(model: type[BaseModel], key: str) -> tuple[Any, Any, Any]:
    """The ge, le and max_length a schema field declares (``None`` where it has none)."""
    metadata = model.model_fields[key].metadata
    ge = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    le = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    longest = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
    return ge, le, longest


LIVE_SPECS = [spec for spec in REGISTRY.values() if spec.config_key]


def test_every_section_key_of_a_live_parameter_exists() -> None:
    keys = {spec.config_key for spec in LIVE_SPECS}
    assert len(keys) == len(LIVE_SPECS) >= 11
    assert {"stream.prompt", "stream.t_index_list", "similarity_filter.max_skip_frames"} <= keys


@pytest.mark.parametrize("spec", LIVE_SPECS, ids=lambda spec: spec.config_key)
def test_live_defaults_and_ranges_come_from_the_registry(spec: Any) -> None:
    *sections, key = spec.config_key.split(".")

    def owner_of(config: Config) -> Any:
        return functools.reduce(getattr, sections, config)

    owner = owner_of(Config())
    value = getattr(owner, key)
    assert getattr(value, "value", value) == spec.default
    model = type(owner)
    ge, le, longest = _bounds(model, key)
    if spec.kind is ParamKind.STRUCT:  # checked by its model (tests/test_music.py), not by bounds
        assert REGISTRY[spec.name].coerce(value) == value
        return
    if spec.name == "t_index_list":  # items are checked against num_inference_steps instead
        assert (ge, le, longest) == (None, None, spec.max_items)
        steps = _bounds(model, "num_inference_steps")
        assert (spec.minimum, spec.maximum) == (0, steps[1] - 1)
    elif isinstance(spec.default, list):  # a number list: its length, and each item's bounds
        assert (ge, le, longest) == (None, None, spec.max_items)
        shortest, longest = spec.min_items or 1, spec.max_items or 1

        def section(items: list[float]) -> dict[str, Any]:
            return functools.reduce(lambda inner, name: {name: inner}, reversed(sections), {key: items})

        edges = [spec.minimum, spec.maximum] * longest
        loaded = cfg_files.config_from_dict(section(edges[:shortest]))
        assert getattr(owner_of(loaded), key) == edges[:shortest]
        for bad in ([spec.maximum + 0.1] * shortest, [spec.minimum - 0.1] * shortest, [0.0] * (longest + 1),
                    [0.0] * (shortest - 1)):
            with pytest.raises(ConfigError):
                cfg_files.config_from_dict(section(bad))
    else:
        assert (ge, le) == (spec.minimum, spec.maximum)
    annotation = model.model_fields[key].annotation
    if spec.choices:
        assert tuple(member.value for member in annotation) == spec.choices


def test_output_size_comes_from_the_registry() -> None:
    size = REGISTRY["resolution"]
    stream = Config().stream
    assert [stream.width, stream.height] == size.default
    for key in ("width", "height"):
        ge, le, _ = _bounds(cfg.StreamSettings, key)
        assert (ge, le) == (size.minimum, size.maximum)
        multiple = [m for m in cfg.StreamSettings.model_fields[key].metadata
                    if isinstance(m, annotated_types.MultipleOf)]
        assert [m.multiple_of for m in multiple] == [SIDE_MULTIPLE]


# --------------------------------------------------------------------------- presets

PRESET_EXPECTATIONS: dict[str, dict[str, Any]] = {
    "demo": {
        "model.id": "builtin:shapes", "model.device": "auto",
        "stream.width": 128, "stream.height": 128, "stream.output_scale": 4, "stream.t_index_list": [40, 45],
        "input.type": "pattern", "input.width": 128, "input.height": 128, "input.fps": 30.0,
        "outputs.0.type": "preview", "outputs.1.type": "record", "outputs.1.path": "out/demo.mp4",
    },
    "sd-turbo-512": {
        "model.id": "stabilityai/sd-turbo", "stream.width": 512, "stream.height": 512,
        "stream.t_index_list": [35, 45], "stream.cfg_type": "self", "stream.guidance_scale": 1.2,
    },
    "sd15-lcm-4step": {
        "model.id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "model.lcm_lora": "latent-consistency/lcm-lora-sdv1-5",
        "stream.t_index_list": [0, 16, 32, 45], "stream.cfg_type": "self",
        "stream.guidance_scale": 1.4, "stream.delta": 0.8,
    },
    "txt2img": {
        "stream.mode": "txt2img", "stream.cfg_type": "none", "stream.t_index_list": [0],
        "model.id": "stabilityai/sd-turbo",
    },
    "sd-turbo-canny": {
        "model.id": "stabilityai/sd-turbo",
        "model.controlnets.0.id": "thibaud/controlnet-sd21-canny-diffusers",
        "model.controlnets.0.preprocessor": "canny", "model.controlnets.0.scale": 0.8,
        "model.controlnets.0.source": "input",
    },
    "sd15-controlnet-depth": {
        "model.id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "model.controlnets.0.id": "lllyasviel/control_v11f1p_sd15_depth",
        "model.controlnets.0.source.type": "shm", "model.controlnets.0.source.name": "depth",
        "model.controlnets.0.end": 0.9,
    },
    "sdxl-turbo-512": {
        "model.id": "stabilityai/sdxl-turbo", "model.lcm_lora": None, "model.taesd_id": None,
        "stream.width": 512, "stream.height": 512, "stream.t_index_list": [35, 45],
    },
    "sdxl-lcm-4step": {
        "model.id": "stabilityai/stable-diffusion-xl-base-1.0",
        "model.lcm_lora": "latent-consistency/lcm-lora-sdxl",
        "stream.width": 768, "stream.height": 768, "stream.t_index_list": [0, 16, 32, 45],
    },
}


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("[{id: builtin:foo}]", ["model.controlnets[0].id", "builtin:tiny-controlnet"]),
        ("[{id: builtin:tiny-controlnet, scale: 3}]", ["controlnets[0].scale", "[0, 2]"]),
        ("[{id: builtin:tiny-controlnet, preprocessor: hed}]", ["none | canny | depth"]),
        ("[{id: builtin:tiny-controlnet, start: 0.8, end: 0.2}]", ["start", "start < end"]),
        ("[{id: builtin:tiny-controlnet, low_threshold: 0.5}]", ["low_threshold", "< high"]),
        ("[{id: builtin:tiny-controlnet, source: webcam}]", ["source", "'webcam'", "input"]),
        ("[{id: builtin:tiny-controlnet, source: {type: shm, on_loss: passthrough}}]", ["hold | black"]),
        ("[" + ", ".join(["{id: builtin:tiny-controlnet}"] * 5) + "]", ["controlnets", "4"]),
    ],
)
def test_bad_controlnet_entries_name_the_key_and_what_is_allowed(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(presets=["demo"], overrides=["model.controlnets=" + override])
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_controlnet_defaults_and_limits_come_from_the_registry() -> None:
    spec = REGISTRY["controlnet_scales"]
    field = cfg.schema.ControlNetSpec.model_fields["scale"]
    bounds = {type(m).__name__: m for m in field.metadata}
    assert (bounds["Ge"].ge, bounds["Le"].le) == (spec.minimum, spec.maximum)
    assert cfg.schema.ModelSettings.model_fields["controlnets"].metadata[0].max_length == spec.max_items


def test_list_presets_has_the_shipped_ones(elsewhere: Path) -> None:
    assert set(PRESET_EXPECTATIONS) <= set(cfg_files.list_presets())
    assert "scenes" not in cfg_files.list_presets()


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTATIONS))
def test_preset_loads_with_expected_values(elsewhere: Path, name: str) -> None:
    config = load_config(presets=[name])
    for dotted, expected in PRESET_EXPECTATIONS[name].items():
        assert _get(config, dotted) == expected, dotted


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTATIONS))
def test_preset_files_are_commented_overlays(name: str) -> None:
    text = (REPO / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("#")
    data = yaml.safe_load(text)
    assert isinstance(data, dict) and set(data) <= set(SECTIONS)


def test_presets_merge_in_order(elsewhere: Path) -> None:
    config = load_config(presets=["demo", "sd-turbo-512"])
    assert config.model.id == "stabilityai/sd-turbo"
    assert config.stream.width == 512
    assert [o.type for o in config.outputs] == ["preview", "record"]  # from demo, untouched
    assert load_config(presets=["sd-turbo-512", "demo"]).stream.width == 128


def test_local_presets_dir_then_repository(tmp_path: Path) -> None:
    path = _write(tmp_path, "stream:\n  seed: 7\n")
    (tmp_path / "presets").mkdir()
    _write(tmp_path / "presets", "stream:\n  delta: 0.7\n", "mine.yaml")
    assert cfg_files.presets_dir(path) == tmp_path / "presets"
    assert {"mine", "demo"} <= set(cfg_files.list_presets(path))
    config = load_config(path, presets=["mine", "demo"])
    assert config.stream.delta == 0.7
    assert config.stream.seed == 7
    assert config.model.id == "builtin:shapes"


def test_preset_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    (tmp_path / "presets").mkdir()
    _write(tmp_path / "presets", "- 1\n- 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not a mapping"):
        load_config(path, presets=["broken"])


# --------------------------------------------------------------------------- merging


def test_merge_config_is_deep_and_lists_replace() -> None:
    base = {"stream": {"width": 512, "height": 512, "t_index_list": [32, 45]},
            "osc": {"feedback": ["127.0.0.1:9001", "10.0.0.2:9001"]}}
    overlay = {"stream": {"width": 256, "t_index_list": [0]}, "osc": {"feedback": []},
               "logging": {"level": "DEBUG"}}
    merged = cfg_files.merge_config(base, overlay)
    assert merged == {"stream": {"width": 256, "height": 512, "t_index_list": [0]},
                      "osc": {"feedback": []}, "logging": {"level": "DEBUG"}}
    assert base["stream"] == {"width": 512, "height": 512, "t_index_list": [32, 45]}
    merged["stream"]["t_index_list"].append(9)
    assert overlay["stream"]["t_index_list"] == [0]


def test_merge_config_replaces_a_mapping_whose_type_changes() -> None:
    base = {"input": {"type": "pattern", "fps": 60, "on_loss": "black"}}
    assert cfg_files.merge_config(base, {"input": {"type": "video", "path": "a.mp4"}}) == {
        "input": {"type": "video", "path": "a.mp4"}}
    assert cfg_files.merge_config(base, {"input": {"type": "pattern", "fps": 24}}) == {
        "input": {"type": "pattern", "fps": 24, "on_loss": "black"}}


def test_config_from_dict_validates_programmatic_overlays() -> None:
    data = cfg_files.merge_config(Config().model_dump(mode="json"), {"stream": {"cfg_type": "full"}})
    assert cfg_files.config_from_dict(data).stream.cfg_type is CfgType.FULL
    with pytest.raises(ConfigError, match=r"stream\.cfg_type"):
        cfg_files.config_from_dict(cfg_files.merge_config(data, {"stream": {"cfg_type": "wrong"}}))
    with pytest.raises(ConfigError, match="not a mapping"):
        cfg_files.config_from_dict([1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- --set overrides


def test_overrides_are_yaml_typed(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), overrides=[
        "stream.t_index_list=[0,16,32,45]",
        "stream.width=256",
        "model.id=builtin:tiny",
        "stream.guidance_scale=1.5",
        "similarity_filter.enabled=true",
        "osc.oscquery_port=9020",
        "model.lcm_lora=latent-consistency/lcm-lora-sdv1-5",
    ])
    assert config.stream.t_index_list == [0, 16, 32, 45]
    assert config.stream.width == 256
    assert config.model.id == "builtin:tiny"
    assert config.stream.guidance_scale == 1.5
    assert config.similarity_filter.enabled is True
    assert config.osc.oscquery_port == 9020
    assert config.model.lcm_lora == "latent-consistency/lcm-lora-sdv1-5"
    assert load_config(_write(tmp_path, "model:\n  lcm_lora: x/y\n"),
                       overrides=["model.lcm_lora=null"]).model.lcm_lora is None


def test_text_overrides_stay_text(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    assert load_config(path, overrides=["stream.prompt=yes"]).stream.prompt == "yes"
    assert load_config(path, overrides=["stream.prompt=cat: dog, 4k"]).stream.prompt == \
        "cat: dog, 4k"
    assert load_config(path, overrides=["stream.prompt=#1 neon = light"]).stream.prompt == \
        "#1 neon = light"
    assert load_config(path, overrides=["stream.prompt='quoted'"]).stream.prompt == "quoted"
    assert load_config(path, overrides=["stream.negative_prompt="]).stream.negative_prompt == ""


def test_overrides_set_whole_lists_and_switch_input_type(tmp_path: Path) -> None:
    path = _write(tmp_path, "input:\n  type: pattern\n  fps: 60\n")
    config = load_config(path, overrides=[
        "outputs=[{type: preview, port: 8081}, {type: record, path: out/take1.mp4}]",
        "input.type=video",
        "input.path=clips/loop.mp4",
    ])
    assert [(o.type, getattr(o, "port", None)) for o in config.outputs] == [
        ("preview", 8081), ("record", None)]
    assert isinstance(config.input, cfg.VideoInput)
    assert config.input.path == "clips/loop.mp4"


def test_overrides_apply_after_presets(elsewhere: Path) -> None:
    config = load_config(presets=["demo"], overrides=["stream.width=320"])
    assert config.stream.width == 320
    assert config.model.id == "builtin:shapes"


def test_parse_override_nests() -> None:
    assert cfg_files.parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert cfg_files.parse_override("stream.t_index_list=[1, 2]") == {"stream": {"t_index_list": [1, 2]}}


# --------------------------------------------------------------------------- dump and schema


def test_dump_round_trips_with_plain_strings(tmp_path: Path, elsewhere: Path) -> None:
    config = load_config(presets=["demo"], overrides=["stream.cfg_type=onetime"])
    text = cfg_files.dump_config(config)
    assert "!!python" not in text
    assert "cfg_type: onetime" in text
    assert "t_index_list: [40, 45]" in text
    assert load_config(_write(tmp_path, text, "dumped.yaml")) == config


def test_json_schema_has_every_section() -> None:
    schema = cfg.config_json_schema()
    assert isinstance(schema, dict)
    assert set(SECTIONS) <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    json.dumps(schema)


def _all_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Config]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field_info in model.model_fields.values():
            stack: list[Any] = [field_info.annotation]
            while stack:
                tp = stack.pop()
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    todo.append(tp)
                stack.extend(getattr(tp, "__args__", ()))
    return seen


def test_every_model_forbids_unknown_keys() -> None:
    models = _all_models()
    assert len(models) >= 20
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__


def test_import_is_light() -> None:
    code = "import sys, engine.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- accepted edge cases


@pytest.mark.parametrize("overrides", [
    ["osc.host=0.0.0.0", "osc.allow=[192.168.1.20, 10.0.0.0/24]"],
    ["osc.host=localhost"],
    ["osc.host=::1"],
    ["osc.host=127.0.0.2"],
    ["osc.enabled=false", "osc.host=0.0.0.0"],
    ["osc.feedback=['[::1]:9001', 'td.local:7000']"],
    ["model.device=cuda:1"],
    ["model.id=./models/dreamshaper.safetensors"],
    ["stream.width=64", "stream.height=2048"],
    ["stream.t_index_list=[0, 1, 2, 3, 4, 5, 6, 49]"],
    ["stream.num_inference_steps=4", "stream.t_index_list=[0, 3]"],
    ["similarity_filter.threshold=0.9999"],
    ["model.loras=[{path: a/b, scale: -4}, {path: c.safetensors, adapter_name: c}]"],
    ["outputs=[]"],
    ["outputs=[{type: ndi}, {type: spout}, {type: syphon}, {type: shm}]"],
    ["input={type: ndi, source: 'HOST (TouchDesigner)'}"],
    ["input={type: syphon}"],
    ["input.fps=60"],
    ["input={fps: 24, on_loss: black}"],
])
def test_accepted(tmp_path: Path, overrides: list[str]) -> None:
    load_config(_write(tmp_path, ""), overrides=overrides)


# --------------------------------------------------------------------------- refused configs

BAD: list[Any] = [
    # (id, file text, presets, overrides, substrings the message must contain)
    ("cfg_type", "", [], ["stream.cfg_type=bogus"],
     ["stream.cfg_type", "'bogus'", "none | full | self | onetime"]),
    ("unknown-key", "stream:\n  cfg_typo: full\n", [], [],
     ["stream.cfg_typo", "unknown key", "did you mean 'cfg_type'", "allowed keys:"]),
    ("unknown-key-set", "", [], ["stream.cfg_typo=full"], ["stream.cfg_typo", "unknown key"]),
    ("unknown-section", "streams:\n  width: 256\n", [], [], ["streams", "allowed keys:", "osc"]),
    ("width-not-multiple", "stream:\n  width: 500\n", [], [],
     ["stream.width", "500", "a multiple of 8 between 64 and 2048"]),
    ("height-too-big", "", [], ["stream.height=4096"],
     ["stream.height", "a multiple of 8 between 64 and 2048"]),
    ("wrong-type", "stream:\n  width: big\n", [], [], ["stream.width", "'big'", "not an integer"]),
    ("float-for-int", "stream:\n  seed: 2.5\n", [], [], ["stream.seed", "not an integer"]),
    ("nan-guidance", "stream:\n  guidance_scale: .nan\n", [], [],
     ["stream.guidance_scale", "nan", "not finite", "[0, 20]"]),
    ("inf-delta", "", [], ["stream.delta=.inf"], ["stream.delta", "inf", "[0, 5]"]),
    ("guidance-range", "", [], ["stream.guidance_scale=25"],
     ["stream.guidance_scale", "25", "a number in [0, 20]"]),
    ("t-index-not-increasing", "", [], ["stream.t_index_list=[45, 32]"],
     ["stream.t_index_list", "strictly increasing"]),
    ("t-index-duplicate", "", [], ["stream.t_index_list=[32, 32]"],
     ["stream.t_index_list", "strictly increasing"]),
    ("t-index-too-big", "stream:\n  num_inference_steps: 40\n  t_index_list: [32, 45]\n", [], [],
     ["stream.t_index_list", "45", "[0, 39]"]),
    ("t-index-negative", "", [], ["stream.t_index_list=[-1, 45]"],
     ["stream.t_index_list", "-1"]),
    ("t-index-empty", "", [], ["stream.t_index_list=[]"], ["stream.t_index_list", "too few"]),
    ("t-index-too-long", "", [], ["stream.t_index_list=[1,2,3,4,5,6,7,8,9]"],
     ["stream.t_index_list", "too many", "1 to 8"]),
    ("t-index-item-type", "", [], ["stream.t_index_list=[a, 45]"],
     ["stream.t_index_list[0]", "not an integer"]),
    ("negative-seed", "", [], ["stream.seed=-1"], ["stream.seed", "-1", "[0, 2147483647]"]),
    ("mode", "", [], ["stream.mode=video2video"], ["stream.mode", "img2img | txt2img"]),
    ("prompt-too-long", "", [], ["stream.prompt=" + "x" * 2001],
     ["stream.prompt", "too long", "2000"]),
    ("threshold", "", [], ["similarity_filter.threshold=1.5"],
     ["similarity_filter.threshold", "1.5", "[0, 0.9999]"]),
    ("bool-as-text", "similarity_filter:\n  enabled: 'yes'\n", [], [],
     ["similarity_filter.enabled", "true | false"]),
    ("section-not-mapping", "stream: 5\n", [], [], ["stream", "not a mapping", "cfg_type"]),
    ("builtin-foo", "", [], ["model.id=builtin:foo"], ["model.id", "builtin:foo", "builtin:tiny"]),
    ("model-id-empty", "model:\n  id: ''\n", [], [], ["model.id", "empty"]),
    ("vae", "", [], ["model.vae=huge"], ["model.vae", "taesd | full"]),
    ("device", "", [], ["model.device=gpu"], ["model.device", "auto | cuda | cuda:N | mps | cpu"]),
    ("dtype", "", [], ["model.dtype=int8"], ["model.dtype", "float16"]),
    ("lora-scale", "", [], ["model.loras=[{path: a/b, scale: 5}]"],
     ["model.loras[0].scale", "5", "[-4, 4]"]),
    ("lora-path-missing", "", [], ["model.loras=[{scale: 1}]"],
     ["model.loras[0].path", "missing"]),
    ("lora-adapter-duplicate", "", [],
     ["model.loras=[{path: a, adapter_name: x}, {path: b, adapter_name: x}]"],
     ["model.loras[1].adapter_name", "already used"]),
    ("backend", "", [], ["acceleration.backend=cuda"],
     ["acceleration.backend", "torch | onnxruntime | tensorrt"]),
    ("fallback", "", [], ["acceleration.fallback=ignore"],
     ["acceleration.fallback", "error | torch"]),
    ("onnx-provider", "", [], ["acceleration.onnx_providers=[CUDA]"],
     ["acceleration.onnx_providers[0]", "ExecutionProvider"]),
    ("input-type", "input:\n  type: webcam\n", [], [],
     ["input.type", "'webcam'", "pattern | video | shm | ndi | spout | syphon"]),
    ("input-key-of-other-type", "input:\n  path: clip.mp4\n", [], [],
     ["input.path", "unknown key", "type"]),
    ("output-type-missing", "outputs:\n  - port: 8081\n", [], [],
     ["outputs[0].type", "missing", "preview | record"]),
    ("input-video-path-missing", "", [], ["input.type=video"], ["input.path", "missing"]),
    ("input-extra-key", "input:\n  type: video\n  path: a.mp4\n  fps: 30\n", [], [],
     ["input.fps", "unknown key", "path"]),
    ("input-on-loss", "", [], ["input.on_loss=freeze"],
     ["input.on_loss", "hold | black | passthrough"]),
    ("input-retry", "", [], ["input.retry_seconds=0"], ["input.retry_seconds", "(0, 60]"]),
    ("input-fps", "", [], ["input.fps=0"], ["input.fps", "(0, 240]"]),
    ("input-not-mapping", "input: pattern\n", [], [], ["input", "not a mapping", "type:"]),
    ("output-type", "outputs:\n  - type: hdmi\n", [], [],
     ["outputs[0].type", "'hdmi'", "preview | record | shm | ndi | spout | syphon"]),
    ("output-port", "outputs:\n  - type: preview\n  - type: preview\n    port: 70000\n", [], [],
     ["outputs[1].port", "70000", "[1, 65535]"]),
    ("queue-size-0", "", [], ["outputs=[{type: preview, queue_size: 0}]"],
     ["outputs[0].queue_size", "[1, 64]"]),
    ("outputs-not-list", "outputs:\n  type: preview\n", [], [], ["outputs", "not a list"]),
    ("record-path-twice", "", [], ["outputs=[{type: record}, {type: record}]"],
     ["outputs[1].path", "already used by outputs[0]"]),
    ("shm-name-loop", "", [], ["input={type: shm}", "outputs=[{type: shm, name: latentstage_in}]"],
     ["outputs[0].name", "already used by input.name"]),
    ("osc-host-without-allow", "", [], ["osc.host=0.0.0.0"], ["osc.allow", "'0.0.0.0'", "allow"]),
    ("osc-port", "", [], ["osc.port=0"], ["osc.port", "[1, 65535]"]),
    ("oscquery-port", "", [], ["osc.oscquery_port=70000"], ["osc.oscquery_port", "[1, 65535]"]),
    ("feedback-no-port", "", [], ["osc.feedback=[localhost]"],
     ["osc.feedback[0]", "'localhost'", "host:port"]),
    ("feedback-bad-port", "", [], ["osc.feedback=['127.0.0.1:70000']"],
     ["osc.feedback[0]", "host:port"]),
    ("allow-bad-cidr", "", [], ["osc.allow=[10.0.0.0/33]"],
     ["osc.allow[0]", "10.0.0.0/33", "CIDR"]),
    ("status-hz", "", [], ["osc.status_hz=0"], ["osc.status_hz", "(0, 60]"]),
    ("audio-file-and-device", "", [], ["audio.file=track.wav", "audio.device=2"],
     ["audio.device: '2' is given beside audio.file",
      "allowed: at most one of audio.file, audio.device and audio.ndi"]),
    ("audio-file-and-ndi", "", [], ["audio.file=track.wav", "audio.ndi=HOST (Ableton)"],
     ["audio.ndi: 'HOST (Ableton)' is given beside audio.file", "at most one of"]),
    ("audio-device-and-ndi", "", [], ["audio.device=2", "audio.ndi=Ableton"],
     ["audio.ndi: 'Ableton' is given beside audio.device", "at most one of"]),
    ("audio-ndi-empty", "", [], ["audio.ndi=' '"], ["audio.ndi", "non-empty text"]),
    ("log-level", "", [], ["logging.level=verbose"],
     ["logging.level", "DEBUG | INFO | WARNING | ERROR"]),
    ("unknown-preset", "", ["nosuch"], [], ["--preset", "'nosuch'", "available:", "demo"]),
    ("path-like-preset", "", ["../x"], [], ["--preset", "'../x'", "no paths"]),
    ("absolute-preset", "", ["/etc/passwd"], [], ["--preset", "no paths"]),
    ("set-without-equals", "", [], ["stream.width"], ["--set", "stream.width", "KEY=VALUE"]),
    ("set-empty-path", "", [], ["=3"], ["--set", "'=3'", "KEY=VALUE"]),
    ("set-empty-segment", "", [], ["stream..width=3"], ["--set", "stream..width"]),
    ("set-inside-list", "", [], ["outputs.port=8081"], ["outputs", "set the whole list"]),
    ("set-bad-yaml", "", [], ["stream.t_index_list=[1, 2"],
     ["stream.t_index_list", "invalid YAML"]),
    ("yaml-syntax", "stream:\n  width: [256\n  height: 256\n", [], [],
     ["config.yaml", "line 3", "invalid YAML"]),
    ("yaml-tab", "stream:\n\twidth: 256\n", [], [], ["config.yaml", "line 2", "invalid YAML"]),
    ("duplicate-key", "stream:\n  width: 256\n  width: 320\n", [], [],
     ["config.yaml", "line 3", "duplicate key 'width'"]),
    ("top-level-list", "- stream\n- model\n", [], [], ["config.yaml", "a list, not a mapping"]),
    ("top-level-text", "hello\n", [], [], ["config.yaml", "not a mapping"]),
]


@pytest.mark.parametrize(("text", "presets", "overrides", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_refused(tmp_path: Path, text: str, presets: list[str], overrides: list[str],
                 expected: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, presets=presets, overrides=overrides)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert info.value.errors and all(msg for _, msg in info.value.errors)


def test_audio_takes_one_input_of_file_device_or_ndi() -> None:
    from engine.runtime.music import MusicSettings

    config = load_config(overrides=["audio.ndi=STAGE-PC (Ableton Live)"])
    assert config.audio.ndi == "STAGE-PC (Ableton Live)"
    assert config.audio.file is None and config.audio.device is None
    assert MusicSettings.from_config(config).audio_ndi == "STAGE-PC (Ableton Live)"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["audio.file=a.wav", "audio.device=2", "audio.ndi=Ableton"])
    assert [key for key, _ in info.value.errors] == ["audio.ndi"]  # the last of them is named
    assert "beside audio.file" in str(info.value)


def test_bad_cases_are_many_and_distinct() -> None:
    assert len({case[0] for case in BAD}) == len(BAD) >= 25


def test_missing_explicit_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(missing)


def test_several_problems_give_one_line_each(tmp_path: Path) -> None:
    path = _write(tmp_path, "stream:\n  width: 500\n  cfg_type: bogus\nosc:\n  port: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert [key for key, _ in info.value.errors] == ["stream.width", "stream.cfg_type", "osc.port"]
    assert all(line.startswith(key + ": ") for line, (key, _) in zip(lines, info.value.errors))
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- the CLI


def test_cli_config_error_exits_2(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "stream.cfg_type=bogus"]) == 2
    captured = capsys.readouterr()
    assert "cfg_type" in captured.err
    assert "none | full | self | onetime" in captured.err
    assert captured.out == ""


def test_cli_config_prints_merged_yaml(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "demo"]) == 0
    out = capsys.readouterr().out
    assert "builtin:shapes" in out
    data = yaml.safe_load(out)
    assert data["model"]["id"] == "builtin:shapes"
    assert cfg_files.config_from_dict(data) == load_config(presets=["demo"])


def test_cli_config_with_file_and_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "stream:\n  width: 320\n")
    assert main(["config", "--config", str(path), "--set", "stream.height=192"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["stream"]["width"], data["stream"]["height"]) == (320, 192)


def test_cli_config_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(SECTIONS) <= set(schema["properties"])
