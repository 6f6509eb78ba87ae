"""OSC control: dispatcher fed with datagrams, scenes, OSCQuery, and the control state."""

from __future__ import annotations

import json
import math
import os
import struct
import time
import urllib.request

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from engine import params
from engine.control.dispatch import MAX_BUNDLE_DEPTH, OscDispatcher, osc_args
from engine.control.oscquery import OscQueryServer, build_namespace, find_node
from engine.control.scenes import SceneError, SceneStore, scene_params
from engine.control.service import ControlService, ControlSettings
from engine.control.state import ControlState
from engine.control.transport import build_message
from tests.fakes import record_durability

SENDER = ("127.0.0.1", 50000)
DEFAULTS = {
    name: spec.default for name, spec in params.REGISTRY.items() if spec.kind is not params.ParamKind.ACTION
}


def msg(address: str, *args, types: str | None = None) -> bytes:
    builder = OscMessageBuilder(address)
    for i, arg in enumerate(args):
        tag = types[i] if types else None
        builder.add_arg(arg, tag) if tag else builder.add_arg(arg)
    return bytes(builder.build().dgram)


@pytest.fixture
def state():
    return ControlState(applied=dict(DEFAULTS))


@pytest.fixture
def dispatcher(state):
    scenes: list[tuple[str, str]] = []

    def scene(action: str, name: str, due: float | None = None) -> str | None:
        scenes.append((action, name))
        return None if name != "missing" else "scene 'missing' does not exist"

    d = OscDispatcher(state, state.applied, scene)
    d.scenes = scenes  # type: ignore[attr-defined]
    return d


def pending(state: ControlState) -> dict:
    taken = state.take_for_encoding(0.0)
    if taken is not None:
        state.release_encoded(*taken)
    result = state.take_pending()
    return {} if result is None else result.changes


GOOD = [
    (msg("/prompt", "neon jellyfish"), {"prompt": "neon jellyfish"}),
    (msg("/negative_prompt", "blurry"), {"negative_prompt": "blurry"}),
    (msg("/prompt_blend", "a cat", 1.0, "a dog", 0.5), {"prompt_blend": [("a cat", 1.0), ("a dog", 0.5)]}),
    (msg("/prompt_blend_method", "linear"), {"prompt_blend_method": "linear"}),
    (msg("/guidance_scale", 1.7), {"guidance_scale": pytest.approx(1.7)}),
    (msg("/guidance", 2), {"guidance_scale": 2.0}),  # alias, int where a float is meant
    (msg("/delta", 0.5), {"delta": 0.5}),
    (msg("/cfg_type", "full"), {"cfg_type": "full"}),
    (msg("/seed", 42), {"seed": 42}),
    (msg("/seed_blend", 1, 0.5, 2, 0.5), {"seed_blend": [(1, 0.5), (2, 0.5)]}),
    (msg("/t_index_list", 0, 16, 32, 45), {"t_index_list": [0, 16, 32, 45]}),
    (msg("/lora_scales", 0.5, -1.0), {"lora_scales": [0.5, -1.0]}),
    (msg("/controlnet_scales", 0.3, 0.0), {"controlnet_scales": [pytest.approx(0.3), 0.0]}),
    (msg("/ip_adapter_scale", 0.5), {"ip_adapter_scale": 0.5}),
    (msg("/ip_adapter_image", "style-ref_2.png"), {"ip_adapter_image": "style-ref_2.png"}),
    (msg("/strength", 0.6), {"strength": pytest.approx(0.6)}),
    (msg("/resolution", 768, 512), {"resolution": [768, 512]}),
    (msg("/resolution", 512.0, 512.0), {"resolution": [512, 512]}),  # floats from a fader
    (msg("/resolution", "1280x720"), {"resolution": [1280, 720]}),
    (msg("/similarity_filter/enabled", True), {"similarity_filter_enabled": True}),
    (msg("/similarity_filter/enabled", 0), {"similarity_filter_enabled": False}),
    (msg("/similarity_filter/threshold", 0.95), {"similarity_filter_threshold": pytest.approx(0.95)}),
    (msg("/similarity_filter/max_skip_frames", 5), {"similarity_filter_max_skip_frames": 5}),
    (msg("/feedback/amount", 0.5), {"feedback_amount": 0.5}),
    (msg("/feedback/amount", 1), {"feedback_amount": 1.0}),  # an int where a float is meant
    (msg("/feedback/zoom", 1.02), {"feedback_zoom": pytest.approx(1.02)}),
    (msg("/feedback/rotate", -2.5), {"feedback_rotate": -2.5}),
    (msg("/feedback/translate", 0.01, -0.5), {"feedback_translate": [pytest.approx(0.01), -0.5]}),
    (msg("/feedback/hue", 120), {"feedback_hue": 120.0}),
    (msg("/feedback/decay", 0.25), {"feedback_decay": 0.25}),
    (msg("/bypass", 1), {"bypass": True}),
    (msg("/pause", 1.0), {"pause": True}),  # TouchOSC toggles send floats
    (msg("/input/select", "ndi:STAGE-PC (TouchDesigner)"), {"input_source": "ndi:STAGE-PC (TouchDesigner)"}),
    (msg("/input/crossfade", 12), {"input_crossfade": 12}),
    (msg("/controlnet/0/source", "shm:depth_cam"), {"controlnet_source_0": "shm:depth_cam"}),
    (msg("/controlnet/1/source", "pattern"), {"controlnet_source_1": "pattern"}),
    (msg("/controlnet/2/source", "file:walk.mp4"), {"controlnet_source_2": "file:walk.mp4"}),
    (msg("/controlnet/3/source", "spout:TD_Out"), {"controlnet_source_3": "spout:TD_Out"}),
    (msg("/ip_adapter/source", "syphon:Resolume - Main"), {"ip_adapter_source": "syphon:Resolume - Main"}),
    (msg("/feature_cache/enabled", True), {"feature_cache_enabled": True}),
    (msg("/feature_cache/frames", 3), {"feature_cache_frames": 3}),
    (msg("/feature_cache/interval", 2), {"feature_cache_interval": 2}),
    (msg("/feature_cache/strength", 0.5), {"feature_cache_strength": pytest.approx(0.5)}),
    (msg("/feature_cache/injection", 0.25), {"feature_cache_injection": pytest.approx(0.25)}),
    (msg("/feature_cache/threshold", 0.8), {"feature_cache_threshold": pytest.approx(0.8)}),
    (msg("/tempo/bpm", 128), {"bpm": 128.0}),
    (msg("/tempo/beats_per_bar", 3), {"beats_per_bar": 3}),
    (msg("/quantize", "2bars"), {"quantize": "2bars"}),
    (msg("/quantize/offset_ms", -20), {"quantize_offset_ms": -20.0}),
    (
        msg("/modulators", '[{"target": "delta", "shape": "saw", "depth": 0.2}]'),  # JSON is YAML too
        {"modulators": [{"target": "delta", "shape": "saw", "rate": "1bar", "depth": 0.2}]},
    ),
    (
        msg("/sequence", "{steps: [a cat, a dog], every: 2bars}"),
        {"sequence": {"steps": ["a cat", "a dog"], "every": "2bars"}},
    ),
    (msg("/sequence", ""), {"sequence": None}),
]

MUSIC_ACTIONS = {  # sent with a tempo clock: tests/test_music.py
    "/tempo/tap", "/tempo/resync", "/composition/tempocontroller/tempo",
    "/composition/tempocontroller/tempotap", "/composition/tempocontroller/resync", "/mod/depth",
    "/mod/rate", "/mod/enabled", "/mod/add", "/mod/remove", "/mod/trigger", "/mod/release",
    "/sequence/start", "/sequence/stop", "/sequence/jump",
}
# sent with a MIDI service: tests/test_midi_service.py
MIDI_ACTIONS = {"/midi/learn", "/midi/forget", "/midi/unbind", "/midi/cancel"}
INPUT_ACTIONS = {"/input/sources"}  # with a source catalogue: tests/test_discovery.py


@pytest.mark.parametrize(("datagram", "expected"), GOOD)
def test_every_address_writes_state(dispatcher, state, datagram, expected):
    replies = dispatcher.handle_datagram(datagram, SENDER)
    assert replies == []
    assert pending(state) == expected


def test_every_registry_address_is_covered_by_a_test():
    covered = {OscPacketAddress(d) for d, _ in GOOD} | {"/status", "/preset/load", "/preset/save"}
    covered |= MUSIC_ACTIONS | MIDI_ACTIONS | INPUT_ACTIONS
    assert {a for spec in params.REGISTRY.values() for a in spec.addresses} <= covered


def OscPacketAddress(datagram: bytes) -> str:
    return datagram.split(b"\x00", 1)[0].decode()


def test_prompt_with_crossfade_and_bundles(dispatcher, state):
    bundle = OscBundleBuilder(IMMEDIATELY)
    bundle.add_content(OscMessageBuilder("/prompt").build())  # no args: refused
    for address, value in (("/seed", 7), ("/delta", 0.25)):
        b = OscMessageBuilder(address)
        b.add_arg(value)
        bundle.add_content(b.build())
    replies = dispatcher.handle_datagram(bundle.build().dgram, SENDER)
    assert len(replies) == 1 and replies[0].address == "/engine/error"
    assert pending(state) == {"seed": 7, "delta": 0.25}
    dispatcher.handle_datagram(msg("/prompt", "forest", 2.5), SENDER)
    taken = state.take_for_encoding(0.0)
    assert taken == ({"prompt": "forest"}, 2.5)


BAD = [
    (msg("/feature_cache/frames", 5), "feature_cache_frames"),
    (msg("/feature_cache/strength", 2.0), "out of range"),
    (msg("/guidance_scale", "high"), "guidance_scale"),
    (msg("/guidance_scale", float("nan")), "not finite"),
    (msg("/guidance_scale", float("inf")), "not finite"),
    (msg("/guidance_scale", 99.0), "out of range"),
    (msg("/guidance_scale", 1.0, 2.0), "arguments"),
    (msg("/seed", -5), "seed"),
    (msg("/seed", 1.5), "whole number"),
    (msg("/cfg_type", "bogus"), "none | full | self | onetime"),
    (msg("/t_index_list", 45, 32), "strictly increasing"),
    (msg("/t_index_list", *range(0, 45, 5)), "items"),
    (msg("/prompt", "x" * 5000), "at most"),
    (msg("/prompt", 42), "not text"),
    (msg("/prompt", "ok", 500.0), "crossfade"),
    (msg("/prompt_blend", "a", 1.0, "b"), "pairs"),
    (msg("/prompt_blend", *(["p", 1.0] * 20)), "pairs"),
    (msg("/prompt_blend", "a", 0.0), "all 0"),
    (msg("/seed_blend", 1, -1.0), "weight"),
    (msg("/similarity_filter/threshold", 1.0), "out of range"),
    (msg("/resolution", 512), "1 numbers given; allowed: width and height"),
    (msg("/controlnet_scales", 2.5), "2.5 is out of range; allowed"),
    (msg("/ip_adapter_image", "../secret.png"), "never a path"),
    (msg("/ip_adapter_image", "/etc/passwd"), "never a path"),
    (msg("/ip_adapter_image", "notes.txt"), "never a path"),
    (msg("/ip_adapter_scale", 3.0), "out of range"),
    (msg("/controlnet_scales", -0.1), "out of range"),
    (msg("/controlnet_scales", 0.1, 0.2, 0.3, 0.4, 0.5), "5 items given"),
    (msg("/resolution", 512, 512, 512), "3 numbers given"),
    (msg("/resolution", 500, 512), "500 is not a multiple of 8"),
    (msg("/resolution", 4096, 512), "out of range; allowed: width and height (two integers or 'WxH'), each"),
    (msg("/resolution", "768 by 512"), "is not WIDTHxHEIGHT"),
    (msg("/resolution", 512.5, 512), "not an integer"),
    (msg("/feedback/amount", 1.5), "1.5 is out of range; allowed: a number in [0, 1]"),
    (msg("/feedback/translate", 0.1, 0.1, 0.1), "3 items given; allowed: exactly 2 numbers in [-0.5, 0.5]"),
    (msg("/feedback/translate", 0.1), "1 items given; allowed: exactly 2 numbers"),
    (msg("/feedback/zoom", 0.0), "out of range; allowed: a number in [0.5, 2]"),
    (msg("/bypass", "yes please"), "switch"),
    (msg("/no/such/address", 1), "unknown address"),
    (msg("/preset/load", "../../etc/passwd"), "not a scene name"),
    (msg("/preset/save", "C:\\scenes\\x"), "not a scene name"),
    (msg("/preset/load", "missing"), "does not exist"),
    (msg("/status", 1), "arguments"),
]


@pytest.mark.parametrize(("datagram", "needle"), BAD)
def test_bad_messages_change_nothing_and_answer_an_error(dispatcher, state, datagram, needle):
    replies = dispatcher.handle_datagram(datagram, SENDER)
    assert len(replies) == 1 and replies[0].address == "/engine/error"
    assert needle in replies[0].args[0]
    assert replies[0].to_sender and replies[0].to_feedback
    assert pending(state) == {}
    assert state.applied() == DEFAULTS
    assert dispatcher.counters.rejected == 1


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 3, b"garbage!", b"/prompt\x00,s\x00\x00\xff\xfe\x00\x00", b"#bundle\x00\x00\x00"],
)
def test_malformed_datagrams_are_refused(dispatcher, state, data):
    replies = dispatcher.handle_datagram(data, SENDER)
    assert all(r.address == "/engine/error" for r in replies)
    assert pending(state) == {}


def test_deep_bundles_are_refused_without_recursion(dispatcher, state):
    data = msg("/seed", 3)
    for _ in range(2000):
        data = b"#bundle\x00" + struct.pack(">Q", 1) + struct.pack(">i", len(data)) + data
    replies = dispatcher.handle_datagram(data, SENDER)
    assert "deeper" in replies[0].args[0] and pending(state) == {}
    shallow = msg("/seed", 3)
    for _ in range(MAX_BUNDLE_DEPTH - 1):
        shallow = b"#bundle\x00" + struct.pack(">Q", 1) + struct.pack(">i", len(shallow)) + shallow
    assert dispatcher.handle_datagram(shallow, SENDER) == [] and pending(state) == {"seed": 3}


def test_status_replies_every_value_to_the_sender(dispatcher, state):
    state.mark_applied({"prompt": "now", "t_index_list": [1, 2]})
    replies = dispatcher.handle_datagram(msg("/status"), SENDER)
    by_address = {r.address: r.args for r in replies}
    assert all(r.to_sender and not r.to_feedback for r in replies)
    assert by_address["/prompt"] == ["now"] and by_address["/t_index_list"] == [1, 2]
    expected = {spec.osc_address for name, spec in params.REGISTRY.items() if DEFAULTS.get(name) is not None}
    assert expected | {"/prompt", "/t_index_list"} <= set(by_address)


def test_scene_actions_reach_the_handler(dispatcher):
    assert dispatcher.handle_datagram(msg("/preset/save", "intro"), SENDER)[0].args == ["intro"]
    dispatcher.handle_datagram(msg("/preset/load", "intro"), SENDER)
    assert dispatcher.scenes == [("preset_save", "intro"), ("preset_load", "intro")]


def test_changes_coalesce_between_frames(state):
    for value in (1.1, 1.2, 1.3):
        state.write({"guidance_scale": value})
    assert state.take_pending().changes == {"guidance_scale": 1.3}
    assert state.take_pending() is None


def test_scene_round_trip_and_refusals(tmp_path):
    store = SceneStore(tmp_path / "scenes")
    values = dict(DEFAULTS, prompt="a forest", t_index_list=[10, 40], seed_blend=[(1, 0.5), (9, 0.5)])
    path = store.save("intro_1", values, crossfade_s=2.5)
    assert path == tmp_path / "scenes" / "intro_1.yaml"
    loaded, crossfade = store.load("intro_1")
    assert crossfade == 2.5
    assert loaded["prompt"] == "a forest" and loaded["t_index_list"] == [10, 40]
    assert loaded["seed_blend"] == [(1, 0.5), (9, 0.5)]
    assert set(loaded) <= set(scene_params()) and "pause" not in loaded
    for bad in ("../x", "a/b", "..", "", "x" * 65, "C:\\evil", ".hidden"):
        with pytest.raises(SceneError, match="not a scene name"):
            store.path(bad)
    with pytest.raises(SceneError, match="does not exist; available: intro_1"):
        store.load("nope")
    (tmp_path / "scenes" / "broken.yaml").write_text("values: {guidance_scale: 500}\n")
    with pytest.raises(SceneError, match="guidance_scale"):
        store.load("broken")
    (tmp_path / "scenes" / "odd.yaml").write_text("values: {rm_rf: 1}\n")
    with pytest.raises(SceneError, match="unknown parameters"):
        store.load("odd")


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot fsync a folder")
def test_a_scene_save_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power cut after /preset/save could leave an empty scene: its data were never fsynced."""
    calls = record_durability(monkeypatch)
    SceneStore(tmp_path / "scenes").save("intro", dict(DEFAULTS, prompt="a forest"))
    assert calls == [("fsync", "file"), ("replace", "intro.yaml"), ("fsync", "folder")]


def test_the_control_service_removes_what_killed_scene_saves_left(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    stale = [folder / ".intro.yaml.0123abcd.tmp", folder / ".intro.k2_x9qzw.tmp"]  # now, and mkstemp's
    fresh = folder / ".outro.yaml.89abcdef.tmp"  # another engine on this folder is saving it now
    kept = [folder / "intro.yaml", folder / "notes.txt", folder / ".nul.yaml.0123abcd.tmp", fresh]
    then = time.time() - 60
    for path in [*stale, *kept]:
        path.write_text("")
        if path != fresh:
            os.utime(path, (then, then))
    service = ControlService(
        ControlSettings(port=0, feedback=[], scenes_dir=str(folder)), ControlState(), lambda *a: None, dict
    )
    service.close()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in kept)


def test_oscquery_namespace_follows_the_proposal():
    values = dict(DEFAULTS, prompt="hello", t_index_list=[32, 45])
    root = build_namespace(values, {"state": "running", "fps": 12.5}, "127.0.0.1", 9000)
    assert root["FULL_PATH"] == "/" and "CONTENTS" in root
    for spec in params.REGISTRY.values():
        for address in spec.addresses:
            node = find_node(root, address)
            assert node is not None, address
            assert node["FULL_PATH"] == address
            assert isinstance(node["TYPE"], str) and node["ACCESS"] in (1, 2, 3)
            assert node["DESCRIPTION"]
            if spec.kind is not params.ParamKind.ACTION and values.get(spec.name) is not None:
                assert node["VALUE"] == osc_args(spec, values[spec.name])
                assert len(node["TYPE"]) == len(node["VALUE"])
            if "RANGE" in node:
                assert all(set(r) <= {"MIN", "MAX", "VALS"} for r in node["RANGE"])
    assert find_node(root, "/guidance_scale")["RANGE"] == [{"MIN": 0.0, "MAX": 20.0}]
    assert find_node(root, "/cfg_type")["RANGE"] == [{"VALS": ["none", "full", "self", "onetime"]}]
    assert find_node(root, "/resolution")["TYPE"] == "ii"
    assert find_node(root, "/resolution")["RANGE"] == [{"MIN": 64, "MAX": 2048}] * 2
    assert find_node(root, "/similarity_filter")["CONTENTS"]["threshold"]["TYPE"] == "f"
    assert find_node(root, "/engine/fps")["VALUE"] == [12.5] and find_node(root, "/engine/fps")["ACCESS"] == 1


def test_oscquery_http_endpoint():
    server = OscQueryServer(
        lambda: dict(DEFAULTS, prompt="hi"), lambda: {"state": "running"}, "127.0.0.1", 9000, port=0
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:

        def get(path: str):
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.headers["Content-Type"], response.read()

        status, ctype, body = get("/")
        assert status == 200 and ctype == "application/json"
        assert "prompt" in json.loads(body)["CONTENTS"]
        assert json.loads(get("/prompt?VALUE")[2]) == {"VALUE": ["hi"]}
        info = json.loads(get("/?HOST_INFO")[2])
        assert info["OSC_PORT"] == 9000 and info["OSC_TRANSPORT"] == "UDP" and info["EXTENSIONS"]["VALUE"]
        assert get("/status?VALUE")[0] == 204
        for path, code in (("/nope", 404), ("/prompt?BOGUS", 400)):
            with pytest.raises(urllib.error.HTTPError) as info_error:
                get(path)
            assert info_error.value.code == code
    finally:
        server.close()
        server.close()


def test_feedback_messages_encode_types():
    data = build_message("/x", [1, 2.5, "s", True])
    assert data.startswith(b"/x\x00\x00,ifsi")
    assert math.isclose(struct.unpack(">f", data[16:20])[0], 2.5)


def test_docs_osc_md_matches_the_registry():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "osc.md"
    assert path.read_text(encoding="utf-8") == params.as_markdown(), (
        "docs/osc.md drifted from engine/params.py: run `latentstage params --markdown > docs/osc.md`"
    )
    for spec in params.REGISTRY.values():
        assert f"`{spec.osc_address}`" in params.as_markdown()


def test_status_reaches_a_sender_that_is_also_a_feedback_target():
    """Regression: a controller sending from its own feedback address got no /status reply."""
    import socket as socketlib

    from engine.control.transport import FeedbackSender, OscUdpServer

    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(2.0)
        me = client.getsockname()
        state = ControlState(applied=dict(DEFAULTS, prompt="hello"))
        feedback = FeedbackSender([me])
        server = OscUdpServer(OscDispatcher(state, state.applied), feedback, port=0)
        server.start()
        try:
            client.sendto(build_message("/status", []), ("127.0.0.1", server.port))
            addresses = set()
            try:
                while True:
                    addresses.add(client.recvfrom(65536)[0].split(b"\x00", 1)[0])
            except TimeoutError:
                pass
            assert b"/prompt" in addresses and b"/seed" in addresses
            client.sendto(build_message("/seed", ["bad"]), ("127.0.0.1", server.port))
            errors = []
            try:
                while True:
                    errors.append(client.recvfrom(65536)[0])
            except TimeoutError:
                pass
            assert len(errors) == 1 and errors[0].startswith(b"/engine/error")  # once, not twice
        finally:
            server.close()
            feedback.close()


# --------------------------------------------------------------------------- truncated arguments

_FLOAT_TAGS = b"/guidance_scale\x00,f\x00\x00"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_FLOAT_TAGS, "argument 1 ('f') is cut short (4 bytes, 0 present)"),  # was 0.0
        (_FLOAT_TAGS + b"\x3f", "(4 bytes, 1 present)"),  # was 0.5
        (msg("/prompt", "a cat").replace(b",s\x00\x00", b",sf\x00"), "argument 2 ('f')"),  # crossfade
        (msg("/seed", 3)[:-2], "argument 1 ('i')"),
        (msg("/delta", 0.5, types="d")[:-1], "argument 1 ('d')"),
        (b"/prompt\x00,s\x00\x00a cat", "without its terminator"),
        (b"/prompt\x00,s\x00\x00dark\x00", "without its terminator or padding"),
        (b"/t_index_list\x00\x00\x00,ib\x00\x00\x00\x00\x14\x00\x00\x00\x10ab", "a blob of 16 bytes"),
    ],
)
def test_a_truncated_argument_is_refused_not_invented(dispatcher, state, data, needle):
    """python-osc pads a float cut short with zeros: `/guidance_scale ,f` with no data set 0.0."""
    replies = dispatcher.handle_datagram(data, SENDER)
    assert [r.address for r in replies] == ["/engine/error"]
    assert needle in replies[0].args[0], replies[0].args[0]
    assert pending(state) == {} and state.take_for_encoding(0.0) is None
    assert dispatcher.counters.malformed == 1 and dispatcher.counters.accepted == 0


def test_a_truncated_message_inside_a_bundle_refuses_the_bundle(dispatcher, state):
    good = msg("/seed", 7)
    short = _FLOAT_TAGS + b"\x3f\x00"
    data = b"#bundle\x00" + struct.pack(">Q", 1)
    for element in (good, short):
        data += struct.pack(">i", len(element)) + element
    replies = dispatcher.handle_datagram(data, SENDER)
    assert [r.address for r in replies] == ["/engine/error"] and "/guidance_scale" in replies[0].args[0]
    assert pending(state) == {}


def test_complete_messages_still_parse(dispatcher, state):
    """Every argument present: strings, blobs and T/F (no data) are walked, nothing refused."""
    assert dispatcher.handle_datagram(msg("/prompt", "a cat", 2.0), SENDER) == []
    assert dispatcher.handle_datagram(msg("/similarity_filter/enabled", True), SENDER) == []  # T: no data
    assert dispatcher.handle_datagram(msg("/resolution", 320, 192), SENDER) == []
    assert state.take_for_encoding(0.0) == ({"prompt": "a cat"}, 2.0)
    assert pending(state) == {"similarity_filter_enabled": True, "resolution": [320, 192]}


# --------------------------------------------------------------------------- timed bundles


def bundle_at(when: float, *messages: bytes) -> bytes:
    """A bundle stamped ``when`` (Unix seconds) holding ``messages``."""
    builder = OscBundleBuilder(when)
    for data in messages:
        builder.add_content(OscMessage(data))
    return bytes(builder.build().dgram)


def test_a_bundle_stamped_ahead_applies_at_its_time(dispatcher, state):
    """Timetags were ignored: a bundle stamped 30 s ahead applied at once."""

    sent = time.monotonic()
    assert dispatcher.handle_datagram(bundle_at(time.time() + 2.0, msg("/guidance_scale", 3.0)), SENDER) == []
    assert pending(state) == {} and dispatcher.counters.timed == 1
    wait = dispatcher.seconds_to_next_due()
    assert wait is not None and 1.5 < wait <= 2.0
    assert dispatcher.run_due(sent + 1.9) == [] and pending(state) == {}  # not early
    assert dispatcher.run_due(sent + 2.1) == []
    assert pending(state) == {"guidance_scale": pytest.approx(3.0)}
    assert dispatcher.seconds_to_next_due() is None and dispatcher.counters.accepted == 1


def test_timed_messages_apply_in_time_order_and_past_ones_at_once(dispatcher, state):

    now_wall, now = time.time(), time.monotonic()
    dispatcher.handle_datagram(bundle_at(now_wall + 3.0, msg("/seed", 3)), SENDER)
    dispatcher.handle_datagram(bundle_at(now_wall + 1.0, msg("/seed", 1), msg("/delta", 0.5)), SENDER)
    dispatcher.handle_datagram(bundle_at(now_wall - 5.0, msg("/guidance_scale", 2.0)), SENDER)  # past
    assert pending(state) == {"guidance_scale": pytest.approx(2.0)}
    dispatcher.run_due(now + 1.5)
    assert pending(state) == {"seed": 1, "delta": pytest.approx(0.5)}
    dispatcher.run_due(now + 3.5)
    assert pending(state) == {"seed": 3}


def test_timed_bundles_are_bounded(dispatcher, state):

    far = dispatcher.handle_datagram(bundle_at(time.time() + 75.0, msg("/seed", 9)), SENDER)
    assert [r.address for r in far] == ["/engine/error"]
    assert "ahead; allowed: at most 60 s ahead" in far[0].args[0]
    bad = dispatcher.handle_datagram(bundle_at(time.time() + 5.0, msg("/guidance_scale", 99.0)), SENDER)
    assert "out of range" in bad[0].args[0]  # validated on arrival, answered at once
    for seed in range(params.MAX_TIMED_WAITING):
        assert dispatcher.handle_datagram(bundle_at(time.time() + 30.0, msg("/seed", seed)), SENDER) == []
    full = dispatcher.handle_datagram(bundle_at(time.time() + 30.0, msg("/seed", 1)), SENDER)
    assert "already waiting; allowed: at most 256" in full[0].args[0]
    assert dispatcher.run_due(time.monotonic()) == [] and pending(state) == {}
    assert dispatcher.counters.timed == params.MAX_TIMED_WAITING


def test_a_timed_scene_load_runs_at_its_time_and_answers_then(dispatcher):

    now = time.monotonic()
    dispatcher.handle_datagram(bundle_at(time.time() + 1.0, msg("/preset/load", "missing")), SENDER)
    assert dispatcher.scenes == []
    answers = dispatcher.run_due(now + 2.0)
    assert dispatcher.scenes == [("preset_load", "missing")]
    assert [(reply.address, to) for reply, to in answers] == [("/engine/error", SENDER)]


def test_the_udp_server_applies_a_timed_bundle_not_before_its_time():
    """Over a real socket: held by the server thread, written into the state at its time."""
    import socket as socketlib

    from engine.control.transport import FeedbackSender, OscUdpServer

    state = ControlState(applied=dict(DEFAULTS))
    feedback = FeedbackSender([])
    server = OscUdpServer(OscDispatcher(state, state.applied), feedback, port=0)
    server.start()
    try:
        with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as client:
            stamped = time.time() + 0.5
            client.sendto(bundle_at(stamped, msg("/seed", 42)), ("127.0.0.1", server.port))
            deadline = time.monotonic() + 30
            while server.dispatcher.counters.timed == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert server.dispatcher.counters.timed == 1
            while state.version == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            applied_at = time.time()
        assert pending(state) == {"seed": 42}
        assert applied_at >= stamped - 0.01  # never early (late only by the machine's load)
    finally:
        server.close()
        feedback.close()
