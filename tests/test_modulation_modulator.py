"""ModulatorSpec validation against the registry and Modulation: base + offsets, clamped, the
base never changed."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from engine.modulation.follower import Band
from engine.modulation.modulator import MAX_MODULATORS, Modulation, ModulatorKind, ModulatorSpec
from engine.modulation.shapes import Shape
from engine.modulation.targets import allowed_targets, parse_target
from engine.params import REGISTRY

BPM = 120.0


def at_beat(beat: float) -> tuple[float, float]:
    """(seconds, beats) at ``beat`` on a 120 BPM clock."""
    return beat * 60.0 / BPM, beat


def lfo(target: str, **fields) -> ModulatorSpec:
    return ModulatorSpec(target=target, **fields)


def test_spec_from_yaml_with_defaults():
    specs = yaml.safe_load(
        """
        - {target: guidance_scale, shape: sine, rate: 1bar, depth: 0.3}
        - {target: "controlnet_scales[0]", kind: envelope, rate: 1beat, hold: 0.25, time_unit: beats}
        - {target: delta, kind: audio, band: low, gain: 2, depth: 0.5}
        """
    )
    first, second, third = (ModulatorSpec.model_validate(s) for s in specs)
    assert (first.kind, first.shape, first.rate, first.depth, first.phase) == (
        ModulatorKind.LFO,
        Shape.SINE,
        "1bar",
        0.3,
        0.0,
    )
    assert (second.kind, second.rate, second.parsed_target.index) == (ModulatorKind.ENVELOPE, "1beat", 0)
    assert (third.band, third.gain, third.rate) == (Band.LOW, 2.0, None)
    assert lfo("delta").rate == "1bar"  # an LFO without a rate cycles once a bar
    for spec in (first, second, third):  # scenes store it as plain data and read it back
        assert ModulatorSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_rates_are_stored_in_canonical_form():
    assert lfo("delta", rate="1/4beat").rate == "0.25beats"
    assert lfo("delta", rate=2).rate == "2hz"
    assert lfo("delta", rate="0.5Hz").parsed_rate.period == 2.0


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"target": "seed"}, "target 'seed' is not a continuous parameter; allowed: guidance_scale, delta"),
        ({"target": "bpm"}, "target 'bpm' is not a continuous parameter"),  # the clock's, not a picture's
        ({"target": "cfg_type"}, "target 'cfg_type' is not a continuous parameter"),
        ({"target": "prompt"}, "target 'prompt' is not a continuous parameter"),
        ({"target": "guidance_scale[0]"}, "target 'guidance_scale[0]' is not a continuous parameter"),
        ({"target": "controlnet_scales"}, "target 'controlnet_scales' is not a continuous parameter"),
        ({"target": "controlnet_scales[4]"}, "has no item 4; allowed: "),
        ({"target": "brightness"}, "target 'brightness' is not a live parameter; allowed: "),
        ({"target": "delta", "rate": "fast"}, "rate 'fast' is not a rate; allowed: "),
        ({"target": "delta", "shape": "wobble"}, "'sine', 'triangle', 'saw', 'square', 'sample_hold'"),
        ({"target": "delta", "kind": "midi"}, "'lfo', 'envelope' or 'audio'"),
        ({"target": "delta", "depth": float("nan")}, "finite number"),
        ({"target": "delta", "phase": 1.0}, "less than 1"),
        ({"target": "delta", "sustain": 2}, "less than or equal to 1"),
        ({"target": "delta", "band": "sub"}, "'rms', 'low', 'mid' or 'high'"),
        ({"target": "delta", "speed": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_name_the_value_and_what_is_allowed(fields, says):
    with pytest.raises(ValidationError) as caught:
        ModulatorSpec(**fields)
    assert says in str(caught.value)


def test_allowed_targets_come_from_the_registry():
    text = allowed_targets()
    for name in ("guidance_scale", "delta", "strength", "ip_adapter_scale", "feature_cache_strength"):
        assert name in text
    assert "controlnet_scales[i] (i < 4)" in text and "lora_scales[i] (i < 16)" in text
    assert "prompt_blend[i]" in text and "seed_blend[i]" in text
    listed = text.split(", ")
    assert "strength" in listed  # keeps n: t_index_list moves, the UNet batch does not
    assert "seed" not in listed and "bpm" not in listed  # not continuous / not the pipeline's
    target = parse_target("lora_scales[3]")
    assert (target.minimum, target.maximum) == (
        REGISTRY["lora_scales"].minimum,
        REGISTRY["lora_scales"].maximum,
    )
    assert (parse_target("seed_blend[1]").minimum, parse_target("seed_blend[1]").maximum) == (0.0, None)


def test_a_one_bar_sine_on_guidance_at_120_bpm():
    modulation = Modulation([lfo("guidance_scale", shape="sine", rate="1bar", depth=0.3)])
    base = {"guidance_scale": 1.2, "delta": 1.0}
    got = [modulation.values(base, *at_beat(b))["guidance_scale"] for b in (0, 1, 2, 3, 4)]
    assert got == pytest.approx([1.2, 1.5, 1.2, 0.9, 1.2])
    assert modulation.targets == frozenset({"guidance_scale"})
    assert "delta" not in modulation.values(base, *at_beat(1))


def test_values_are_clamped_to_the_registry_range():
    modulation = Modulation([lfo("guidance_scale", shape="square", rate="1beat", depth=5.0)])
    assert modulation.values({"guidance_scale": 18.0}, *at_beat(0.1))["guidance_scale"] == 20.0
    assert modulation.values({"guidance_scale": 1.0}, *at_beat(0.6))["guidance_scale"] == 0.0
    threshold = Modulation([lfo("similarity_filter_threshold", shape="square", rate="1beat", depth=1.0)])
    assert threshold.values({"similarity_filter_threshold": 0.98}, *at_beat(0.1)) == {
        "similarity_filter_threshold": 0.9999
    }


def test_offsets_on_one_target_add_up_and_disabled_ones_add_nothing():
    modulation = Modulation(
        [
            lfo("delta", shape="square", rate="1beat", depth=0.5),
            lfo("delta", shape="saw", rate="1beat", depth=1.0),
            lfo("delta", shape="square", rate="1beat", depth=3.0, enabled=False),
        ]
    )
    # beat 0.25: square +0.5, saw -0.5
    assert modulation.values({"delta": 2.0}, *at_beat(0.25))["delta"] == pytest.approx(2.0)
    # beat 0.75: square -0.5, saw +0.5
    assert modulation.values({"delta": 2.0}, *at_beat(0.875))["delta"] == pytest.approx(2.25)


def test_list_items_are_modulated_in_a_copy():
    modulation = Modulation(
        [
            lfo("controlnet_scales[1]", shape="square", rate="1beat", depth=0.25),
            lfo("lora_scales[0]", shape="square", rate="1beat", depth=-10.0),
        ]
    )
    scales = [0.5, 1.0, 1.5]
    base = {"controlnet_scales": scales, "lora_scales": [0.8]}
    got = modulation.values(base, *at_beat(0.2))
    assert got == {"controlnet_scales": [0.5, 1.25, 1.5], "lora_scales": [-4.0]}
    assert got["controlnet_scales"] is not scales and scales == [0.5, 1.0, 1.5]
    clamped = modulation.values({"controlnet_scales": [0.0, 1.9]}, *at_beat(0.2))
    assert clamped["controlnet_scales"] == [0.0, 2.0]


def test_missing_bases_and_items_are_left_out():
    modulation = Modulation(
        [lfo("controlnet_scales[2]", depth=0.5), lfo("ip_adapter_scale", depth=0.5), lfo("delta", depth=0.5)]
    )
    base = {"controlnet_scales": [1.0, 1.0], "ip_adapter_scale": None}  # no item 2, no IP-Adapter, no delta
    assert modulation.values(base, *at_beat(1)) == {}


def test_blend_weights_move_and_stay_non_negative():
    modulation = Modulation(
        [
            lfo("prompt_blend[1]", shape="square", rate="1beat", depth=0.5),
            lfo("seed_blend[0]", shape="square", rate="1beat", depth=-2.0),
        ]
    )
    base = {"prompt_blend": [("jellyfish", 1.0), ("coral", 0.25)], "seed_blend": [(1, 0.5), (2, 0.5)]}
    got = modulation.values(base, *at_beat(0.1))
    assert got == {"prompt_blend": [("jellyfish", 1.0), ("coral", 0.75)], "seed_blend": [(1, 0.0), (2, 0.5)]}
    got = modulation.values(base, *at_beat(0.6))
    assert got["prompt_blend"] == [("jellyfish", 1.0), ("coral", 0.0)]
    assert got["seed_blend"] == [(1, 2.5), (2, 0.5)]


def test_a_blend_whose_weights_would_all_be_zero_keeps_its_base():
    modulation = Modulation([lfo("seed_blend[0]", shape="square", rate="1beat", depth=-2.0)])
    base = {"seed_blend": [(7, 0.5)]}
    assert modulation.values(base, *at_beat(0.1)) == {"seed_blend": [(7, 0.5)]}
    assert REGISTRY["seed_blend"].coerce(modulation.values(base, *at_beat(0.1))["seed_blend"])


def test_modulated_values_never_change_the_base():
    modulation = Modulation(
        [
            lfo("guidance_scale", depth=0.3),
            lfo("controlnet_scales[0]", shape="triangle", depth=0.3),
            lfo("prompt_blend[0]", shape="smooth_random", depth=0.3, seed=4),
            lfo("lora_scales[1]", shape="sample_hold", depth=0.3, seed=9),
        ]
    )
    base = {
        "guidance_scale": 1.2,
        "controlnet_scales": [1.0],
        "prompt_blend": [("a", 0.5), ("b", 0.5)],
        "lora_scales": [0.1, 0.2],
        "delta": 1.0,
    }
    before = copy.deepcopy(base)
    lists = {name: base[name] for name in ("controlnet_scales", "prompt_blend", "lora_scales")}
    for frame in range(200):
        got = modulation.values(base, *at_beat(frame / 30))
        for name, value in lists.items():
            assert got[name] is not value
    assert base == before
    assert all(base[name] is value for name, value in lists.items())


def test_every_modulated_value_passes_the_registry():
    modulation = Modulation(
        [
            lfo("guidance_scale", shape="square", depth=30.0),
            lfo("controlnet_scales[0]", shape="saw", depth=9.0),
            lfo("prompt_blend[0]", shape="sample_hold", depth=9.0),
            lfo("feature_cache_strength", shape="triangle", depth=9.0),
        ]
    )
    base = {
        "guidance_scale": 1.2,
        "controlnet_scales": [1.0],
        "prompt_blend": [("a", 0.5), ("b", 0.5)],
        "feature_cache_strength": 0.5,
    }
    for frame in range(300):
        for name, value in modulation.values(base, *at_beat(frame / 7)).items():
            assert REGISTRY[name].coerce(value) == value


def test_a_beat_fired_envelope_pumps_on_every_beat():
    spec = ModulatorSpec(
        target="delta",
        kind="envelope",
        rate="1beat",
        attack=0.0,
        decay=0.0,
        sustain=1.0,
        release=0.5,
        hold=0.25,
        time_unit="beats",
        depth=-1.0,
    )
    modulation = Modulation([spec])
    base = {"delta": 2.0}
    got = [modulation.values(base, *at_beat(b))["delta"] for b in (0.0, 0.1, 0.5, 0.75, 0.9, 1.0, 1.5)]
    assert got == pytest.approx([1.0, 1.0, 1.5, 2.0, 2.0, 1.0, 1.5])


def test_a_beat_fired_envelope_switched_on_mid_beat_waits_for_the_next_beat():
    spec = ModulatorSpec(
        target="delta",
        kind="envelope",
        rate="1beat",
        attack=0.0,
        decay=0.0,
        release=0.0,
        hold=0.5,
        time_unit="beats",
        depth=1.0,
    )
    modulation = Modulation([spec])
    got = [modulation.values({"delta": 0.0}, *at_beat(b))["delta"] for b in (2.3, 2.9, 3.0, 3.4, 3.6)]
    assert got == [0.0, 0.0, 1.0, 1.0, 0.0]


def test_names_are_unique():
    with pytest.raises(ValueError, match=r"modulator names \['hit'\] are used twice"):
        Modulation([lfo("delta", name="hit"), lfo("guidance_scale", name="hit")])


def test_envelopes_fired_by_name_or_index():
    modulation = Modulation(
        [
            lfo("guidance_scale"),
            ModulatorSpec(target="delta", kind="envelope", name="hit", attack=1.0, decay=0.0, release=1.0),
        ]
    )
    base = {"delta": 1.0, "guidance_scale": 1.0}
    assert modulation.values(base, 0.0, 0.0)["delta"] == 1.0
    modulation.trigger("hit", 10.0, 0.0)
    assert modulation.values(base, 10.5, 0.0)["delta"] == pytest.approx(1.05)
    modulation.release(1, 11.0, 0.0)
    assert modulation.values(base, 11.5, 0.0)["delta"] == pytest.approx(1.05)
    with pytest.raises(ValueError, match="modulator 0 is not an envelope; allowed: hit"):
        modulation.trigger(0, 0.0, 0.0)
    with pytest.raises(ValueError, match="modulator 'kick' is not an envelope; allowed: hit"):
        modulation.release("kick", 0.0, 0.0)


class FakeFollower:
    def __init__(self) -> None:
        self.levels = dict.fromkeys(Band, 0.0)

    def instant(self, band: Band) -> float:
        return self.levels[band]


def test_audio_modulators_read_the_follower_with_their_own_smoothing():
    follower = FakeFollower()
    modulation = Modulation(
        [
            ModulatorSpec(
                target="delta", kind="audio", band="low", gain=2.0, depth=1.0, attack=0.0, release=1.0
            ),
            ModulatorSpec(
                target="guidance_scale", kind="audio", band="high", depth=1.0, attack=0.0, release=0.0
            ),
        ],
        audio=follower,
    )
    base = {"delta": 0.0, "guidance_scale": 1.0}
    follower.levels[Band.LOW] = 0.3
    assert modulation.values(base, 0.0, 0.0) == pytest.approx({"delta": 0.6, "guidance_scale": 1.0})
    follower.levels[Band.LOW] = 0.9  # gain 2 → clipped to 1
    follower.levels[Band.HIGH] = 0.5
    assert modulation.values(base, 0.1, 0.0) == pytest.approx({"delta": 1.0, "guidance_scale": 1.5})
    follower.levels[Band.LOW] = 0.0
    follower.levels[Band.HIGH] = 0.0
    got = modulation.values(base, 1.1, 0.0)  # one release time later: 1/e of the way left
    assert got["delta"] == pytest.approx(0.36788, abs=1e-4)
    assert got["guidance_scale"] == 1.0
    assert Modulation([ModulatorSpec(target="delta", kind="audio")]).values(base, 0.0, 0.0) == {"delta": 0.0}


def test_too_many_modulators_are_refused():
    with pytest.raises(ValueError, match=f"{MAX_MODULATORS + 1} modulators given; allowed: at most"):
        Modulation([lfo("delta")] * (MAX_MODULATORS + 1))


def test_no_modulators_give_nothing():
    assert Modulation().values({"delta": 1.0}, 1.0, 2.0) == {}
