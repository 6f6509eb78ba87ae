"""The TouchDesigner component: builder, TD-name mapping and the extension against a live engine.

Nobody here can run TouchDesigner, so its objects are stand-ins: a COMP with ``.par`` (pars
with ``.name``, ``.eval()``, settable ``.val``), ``create``/``appendCustomPage``/``appendX``
recorders, and an OSC Out DAT whose ``sendOSC`` really sends UDP to the engine's
ControlService. The builder makes the COMP; its callback DATs' text runs as TD would run it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pythonosc import osc_packet
from pythonosc.osc_message_builder import OscMessageBuilder

from engine import params
from engine.control.service import ControlService, ControlSettings
from engine.control.transport import build_message
from engine.models.loader import ModelRequest, load_models
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine
from scripts.osc_peer import free_port
from tests.fakes import FakeSource, RecordingSink, pipeline_settings

ROOT = Path(__file__).resolve().parents[1]
TD = ROOT / "td_components"
sys.path.insert(0, str(TD))

from latentstage_td import ext as td_ext  # noqa: E402
from latentstage_td import mapping  # noqa: E402


def _load_builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_component", TD / "build_component.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


# ----------------------------------------------------------------------------- TouchDesigner stand-ins

BUILTIN_PARS = {
    "baseCOMP": ("ext0object", "ext0name", "ext0promote"),
    "baseCOMP-old": ("extension1", "extname1", "promoteextension1"),
    "oscoutDAT": ("active", "protocol", "address", "port", "localaddress"),
    "oscinDAT": ("active", "protocol", "port", "callbacks"),
    "parameterexecuteDAT": ("active", "op", "pars", "custom", "builtin", "valuechange", "onpulse"),
    "executeDAT": ("active", "start", "framestart", "frameend", "exit"),
    "syphonspoutinTOP": ("sendername",),
    "syphonspoutoutTOP": ("sendername", "active"),
    "ndiinTOP": ("name", "extraips", "bandwidth"),
    "ndioutTOP": ("name", "fps", "active"),
    "switchTOP": ("index",),
}


class FakePar:
    """A TD Par: ``.name``, ``.eval()``, settable ``.val``; attributes like min/max are free."""

    def __init__(self, owner: FakeOP, name: str, style: str = "builtin", value: Any = None):
        self.owner, self.name, self.style = owner, name, style
        self._value = value
        self.label: str | None = None
        self.sets = 0

    def eval(self) -> Any:
        return self._value

    @property
    def val(self) -> Any:
        return self._value

    @val.setter
    def val(self, value: Any) -> None:
        self.sets += 1
        if value != self._value:
            self._value = value
            if self.style != "builtin":
                self.owner.changed.append(self)  # TD fires the Parameter Execute DAT


class FakeParCollection:
    """``op.par``: attribute access to existing pars only (like TD's ParCollection)."""

    def __init__(self, owner: FakeOP, builtin: tuple[str, ...]):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_pars", {name: FakePar(owner, name) for name in builtin})

    def __getattr__(self, name: str) -> FakePar:
        try:
            return self._pars[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._pars:
            raise AttributeError(f"no parameter {name!r}")
        self._pars[name].val = value


class FakeParGroup(tuple):
    """What appendX returns on new builds (indexable; the Par is [0])."""


class FakePage:
    def __init__(self, comp: FakeOP, name: str):
        self.comp, self.name = comp, name
        self.appended: list[tuple[str, str]] = []

    def __getattr__(self, method: str) -> Any:
        if not method.startswith("append"):
            raise AttributeError(method)
        style = method[len("append") :]

        def append(
            name: str, label: str | None = None, order: Any = None, replace: bool = True, size: int = 1
        ):
            assert mapping.TD_NAME.match(name), name
            assert name not in self.comp.par._pars, f"{name} appended twice"
            par = FakePar(self.comp, name, style, "" if style in ("Str", "File", "Folder", "Menu") else 0)
            par.label = label
            par.page = self.name  # type: ignore[attr-defined]
            self.comp.par._pars[name] = par
            self.appended.append((style, name))
            return FakeParGroup([par]) if self.comp.new_build else [par]

        return append


class FakeConnector:
    def __init__(self, op: FakeOP):
        self.op = op

    def connect(self, target: FakeOP) -> None:
        self.op.connected_to.append(target)


class FakeOP:
    def __init__(self, op_type: str, name: str, parent: FakeOP | None = None, new_build: bool = True):
        self.OPType, self.name, self.parent_op, self.new_build = op_type, name, parent, new_build
        self.path = f"{parent.path}/{name}" if parent is not None else f"/{name}"
        builtin = BUILTIN_PARS.get("baseCOMP-old" if op_type == "baseCOMP" and not new_build else op_type, ())
        self.par = FakeParCollection(self, builtin)
        self.children: dict[str, FakeOP] = {}
        self.created: list[tuple[str, str]] = []
        self.pages: list[FakePage] = []
        self.changed: list[FakePar] = []
        self.connected_to: list[FakeOP] = []
        self.outputConnectors = [FakeConnector(self)]
        self.text = ""
        self.saved: list[str] = []
        self.initialized = 0

    def create(self, op_type: str, name: str) -> FakeOP:
        assert name not in self.children, name
        cls = FakeOscOut if op_type == "oscoutDAT" else FakeOP
        child = cls(op_type, name, self, self.new_build)
        self.children[name] = child
        self.created.append((op_type, name))
        return child

    def op(self, name: str) -> FakeOP | None:
        return self.children.get(name.removeprefix("./"))

    def appendCustomPage(self, name: str) -> FakePage:
        page = FakePage(self, name)
        self.pages.append(page)
        return page

    def save(self, path: str) -> None:
        self.saved.append(path)

    def initializeExtensions(self) -> None:
        self.initialized += 1


class FakeOscOut(FakeOP):
    """The OSC Out DAT: ``sendOSC`` sends real UDP to its address:port."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.messages: list[tuple[str, list[Any]]] = []
        self.datagrams: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def sendOSC(self, address: str, values: list[Any], asBundle: bool = False, **_: Any) -> None:
        data = build_message(address, values)
        self.sock.sendto(data, (self.par.address.eval(), int(self.par.port.eval())))
        self.messages.append((address, list(values)))
        self.datagrams.append(data)


def _callbacks(comp: FakeOP, dat: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"parent": lambda: comp}
    exec(compile(comp.op(dat).text, dat, "exec"), namespace)
    return namespace


class Harness:
    """The built COMP with its extension; the callback DATs' text runs as TouchDesigner runs it."""

    def __init__(self, new_build: bool = True, platform: str = "win32"):
        self.root = FakeOP("baseCOMP", "project1", new_build=new_build)
        self.comp = builder.build(self.root, str(TD), save=False, platform=platform)
        self.comp.changed.clear()
        self.ext = td_ext.StreamEngineExt(self.comp)
        self.comp.ext = SimpleNamespace(StreamEngineExt=self.ext)
        self.parexec = _callbacks(self.comp, "parexec")
        self.oscin = _callbacks(self.comp, "oscin_callbacks")
        self.execute = _callbacks(self.comp, "execute")
        self.value_changes = 0
        self.fire()

    @property
    def oscout(self) -> FakeOscOut:
        return self.comp.op("oscout")  # type: ignore[return-value]

    def par(self, name: str) -> FakePar:
        return getattr(self.comp.par, name)

    def fire(self) -> None:
        """What TD does after pars changed: the Parameter Execute DAT's onValueChange."""
        while self.comp.changed:
            par = self.comp.changed.pop(0)
            self.value_changes += 1
            self.parexec["onValueChange"](par, None)

    def set(self, name: str, value: Any) -> None:
        """A user edit."""
        self.par(name).val = value
        self.fire()

    def pulse(self, name: str) -> None:
        self.parexec["onPulse"](self.par(name))

    def receive(self, address: str, args: list[Any]) -> None:
        oscin = self.comp.op("oscin")
        self.oscin["onReceiveOSC"](oscin, 0, "", b"", 0.0, address, args, None)
        self.fire()

    def frame(self) -> None:
        self.execute["onFrameStart"](0)
        self.fire()


# ----------------------------------------------------------------------------- mapping, registry, builder


def test_every_registry_entry_has_a_unique_valid_td_name():
    entries = [e for e in params.as_json() if mapping.pulsed(e)]
    left_out = {e["osc_address"] for e in params.as_json() if not mapping.pulsed(e)}
    assert left_out == {  # actions with values a Pulse cannot give: for scripts and controllers
        "/composition/tempocontroller/tempo", "/mod/depth", "/mod/rate", "/mod/enabled", "/mod/add",
        "/mod/remove", "/mod/trigger", "/mod/release", "/sequence/jump", "/midi/learn", "/midi/forget",
        "/midi/unbind",
    }
    param_map = mapping.ParamMap(entries)
    names = [param_map.td_of[e["name"]] for e in entries]
    assert all(mapping.TD_NAME.match(n) for n in names)
    own = [p.name for p in param_map.component]
    assert len(set(names + own)) == len(names) + len(own)
    assert param_map.td_of["guidance_scale"] == "Guidancescale"
    assert param_map.td_of["similarity_filter_max_skip_frames"] == "Similarityfiltermaxskipframes"
    assert param_map.td_of["t_index_list"] == "Tindexlist"
    assert param_map.by_address["/guidance"]["name"] == "guidance_scale"  # aliases too
    assert mapping.td_name("3d_depth") == "P3ddepth"
    with pytest.raises(ValueError, match="collides"):
        mapping.ParamMap([{**entries[0], "name": "guid_ance"}, {**entries[0], "name": "guidance"}])
    with pytest.raises(ValueError, match="collides"):
        mapping.ParamMap([{**entries[0], "name": "state"}])  # the Status page's own par


def test_the_component_follows_every_status_address_the_engine_sends():
    periodic = {spec.address for spec in params.STATUS if spec.periodic}
    assert set(td_ext.STATUS_ADDRESSES) == periodic
    events = {spec.address for spec in params.STATUS if not spec.periodic}
    assert {td_ext.ERROR_ADDRESS, td_ext.BEAT_ADDRESS, td_ext.MIDI_ADDRESS} == events


def test_params_json_is_the_registry():
    on_disk = json.loads((TD / "params.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(params.as_json())), (
        "td_components/params.json drifted: run latentstage params --output td_components/params.json"
    )


def test_builder_compiles():
    path = TD / "build_component.py"
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


@pytest.mark.parametrize("new_build", [True, False], ids=["2025-build", "older-build"])
def test_builder_makes_one_par_per_entry_and_the_operators(new_build):
    root = FakeOP("baseCOMP", "project1", new_build=new_build)
    comp = builder.build(root, str(TD), save=True, platform="darwin")
    assert root.created == [("baseCOMP", "latentstage")]
    param_map = mapping.ParamMap(params.as_json())
    appended = {name: style for page in comp.pages for style, name in page.appended}
    entries = [entry for entry in params.as_json() if mapping.pulsed(entry)]
    for entry in entries:
        td = param_map.td_of[entry["name"]]
        assert appended[td] == mapping.STYLE_BY_TYPE.get(entry["type"], "Str"), entry["name"]
    assert len(appended) == len(entries) + len(param_map.component)
    assert [p.name for p in comp.pages] == list(mapping.PAGES)
    types = [t for t, _ in comp.created]
    for op_type in (
        "oscoutDAT",
        "oscinDAT",
        "parameterexecuteDAT",
        "syphonspoutinTOP",
        "syphonspoutoutTOP",
        "ndiinTOP",
        "ndioutTOP",
        "executeDAT",
    ):
        assert types.count(op_type) == 1, op_type
    assert json.loads(comp.op("params_json").text) == json.loads(json.dumps(params.as_json()))
    assert comp.op("mapping").text == (TD / "latentstage_td" / "mapping.py").read_text(encoding="utf-8")
    assert comp.op("StreamEngineExt").text == (TD / "latentstage_td" / "ext.py").read_text(encoding="utf-8")
    guidance = comp.par.Guidancescale
    assert (guidance.min, guidance.max, guidance.clampMin, guidance.clampMax) == (0.0, 20.0, True, True)
    assert guidance.eval() == 1.2 and guidance.default == 1.2
    assert comp.par.Cfgtype.menuNames == ["none", "full", "self", "onetime"]
    assert comp.par.Cfgtype.eval() == "self"
    assert comp.par.Tindexlist.eval() == "32 45"
    assert (comp.par.Seed.normMin, comp.par.Seed.normMax) == (0, 1000)
    assert comp.par.Fps.readOnly and comp.par.Lasterror.readOnly
    assert comp.par.Inputtype.eval() == "syphon"  # macOS default
    assert comp.op("oscout").par.port.eval() == 9000
    assert comp.op("oscin").par.port.eval() == 9001
    assert comp.op("oscin").par.callbacks.eval() == "oscin_callbacks"
    watched = comp.op("parexec").par.pars.eval().split()
    assert "Guidancescale" in watched and "Start" in watched and "Fps" not in watched
    assert comp.op("syphonspout_out").par.sendername.eval() == "TDSyphonSpoutOut"
    assert comp.op("syphonspout_in").par.sendername.eval() == "latentstage"
    if new_build:
        assert comp.par.ext0object.eval() == builder.EXT_EXPRESSION
        assert comp.par.ext0name.eval() == "StreamEngineExt" and comp.par.ext0promote.eval() is True
    else:
        assert comp.par.extension1.eval() == builder.EXT_EXPRESSION
        assert comp.par.extname1.eval() == "StreamEngineExt" and comp.par.promoteextension1.eval() is True
    assert comp.initialized == 1
    assert comp.saved == [str(TD / "latentstage.tox")]
    assert comp.op("video_in").connected_to == [comp.op("syphonspout_out"), comp.op("ndi_out")]
    with pytest.raises(RuntimeError, match="already exists"):
        builder.build(root, str(TD), save=False)


def test_builder_entry_point_builds_into_project1():
    project = FakeOP("baseCOMP", "project1")
    ops = {"/project1": project}
    path = str(TD / "build_component.py")
    exec(compile(Path(path).read_text(encoding="utf-8"), path, "exec"), {"op": ops.get, "__file__": path})
    assert project.op("latentstage") is not None
    assert project.op("latentstage").saved == [str(TD / "latentstage.tox")]


def test_values_are_validated_and_converted_like_the_engine_does():
    param_map = mapping.ParamMap(params.as_json())
    entry = param_map.by_name
    assert mapping.osc_args(entry["t_index_list"], "20 40") == [20, 40]
    assert mapping.osc_args(entry["t_index_list"], "[20, 40]") == [20, 40]
    for bad in ("40 20", "20 x", "", "1000", "1 2 3 4 5 6 7 8 9"):
        with pytest.raises(ValueError, match="t_index_list"):
            mapping.osc_args(entry["t_index_list"], bad)
    assert mapping.osc_args(entry["guidance_scale"], 2) == [2.0]
    with pytest.raises(ValueError, match=r"out of range; allowed: a number in \[0, 20\]"):
        mapping.osc_args(entry["guidance_scale"], 25.0)
    assert mapping.osc_args(entry["seed"], 7.0) == [7]
    with pytest.raises(ValueError, match="whole"):
        mapping.osc_args(entry["seed"], 7.5)
    assert mapping.osc_args(entry["bypass"], True) == [1] and mapping.osc_args(entry["bypass"], 0) == [0]
    assert mapping.osc_args(entry["feedback_translate"], "0.01 -0.2") == [0.01, -0.2]
    for bad in ("0.1", "0.1 0.1 0.1", "0.1 0.9"):  # exactly two numbers, each in [-0.5, 0.5]
        with pytest.raises(ValueError, match=r"feedback_translate.*allowed: exactly 2 numbers"):
            mapping.osc_args(entry["feedback_translate"], bad)
    assert mapping.osc_args(entry["cfg_type"], "full") == ["full"]
    with pytest.raises(ValueError, match="cfg_type"):
        mapping.osc_args(entry["cfg_type"], "loud")
    assert mapping.osc_args(entry["prompt"], "neon", 0.0) == ["neon"]
    assert mapping.osc_args(entry["prompt"], "neon", 2) == ["neon", 2.0]
    with pytest.raises(ValueError, match="crossfade"):
        mapping.osc_args(entry["prompt"], "neon", 61)
    assert mapping.osc_args(entry["prompt_blend"], "a cat:1 | style: neon | a dog:0.5") == [
        "a cat",
        1.0,
        "style: neon",
        1.0,
        "a dog",
        0.5,
    ]
    assert mapping.osc_args(entry["prompt_blend"], "  ") is None
    assert mapping.osc_args(entry["seed_blend"], "1:0.5, 2") == [1, 0.5, 2, 1.0]
    with pytest.raises(ValueError, match="weights are all 0"):
        mapping.osc_args(entry["seed_blend"], "1:0 2:0")
    assert mapping.osc_args(entry["status"], None) == []
    assert mapping.osc_args(entry["preset_save"], "one") == ["one"]
    with pytest.raises(ValueError, match="no name"):
        mapping.osc_args(entry["preset_save"], "")
    for text in ("768x512", "768 512", "768, 512", [768, 512]):
        assert mapping.osc_args(entry["resolution"], text) == [768, 512]
    refused = (("770x512", "770 is not a multiple of 8"), ("512", "1 numbers"), ("8x8", "8 is out of range"))
    for bad, needle in refused:
        with pytest.raises(ValueError, match=f"resolution: {needle}"):
            mapping.osc_args(entry["resolution"], bad)
    assert mapping.default_value(entry["resolution"]) == "512x512"
    assert mapping.td_value(entry["resolution"], [768, 512]) == "768x512"
    # echoes back into par values, and float32 echoes equal what was sent
    assert mapping.td_value(entry["t_index_list"], [20, 40]) == "20 40"
    assert mapping.td_value(entry["seed_blend"], [1, 0.5, 2, 0.5]) == "1:0.5, 2:0.5"
    assert mapping.same_value(entry["guidance_scale"], 1.6, 1.600000023841858)
    assert mapping.same_value(entry["t_index_list"], "20,40", "20 40")
    assert not mapping.same_value(entry["guidance_scale"], 1.6, 1.7)
    assert mapping.ndi_stream_name("STAGE-PC (TouchDesigner)") == "TouchDesigner"


def test_osc_codec_round_trips_with_python_osc():
    data = td_ext.encode_message("/t_index_list", [20, 40, 0.5, "x"])
    message = osc_packet.OscPacket(data).messages[0].message
    assert (message.address, list(message.params)) == ("/t_index_list", [20, 40, 0.5, "x"])
    builder_msg = OscMessageBuilder("/similarity_filter/enabled")
    for value, kind in ((True, "T"), (3.25, "d"), ("ok", "s"), (2**40, "h")):
        builder_msg.add_arg(value, kind)
    assert td_ext.decode_packet(bytes(builder_msg.build().dgram)) == [
        ("/similarity_filter/enabled", [True, 3.25, "ok", 2**40])
    ]
    one, two = build_message("/seed", [1]), build_message("/delta", [0.5])
    bundle = b"#bundle\x00" + bytes(8)
    for part in (one, two):
        bundle += len(part).to_bytes(4, "big") + part
    assert td_ext.decode_packet(bundle) == [("/seed", [1]), ("/delta", [0.5])]


def test_wiring_names_the_bridge_tops():
    td = Harness(platform="win32")
    assert td.comp.op("syphonspout_out").par.active.eval() is True
    assert td.comp.op("ndi_out").par.active.eval() is False
    td.set("Inputtype", "ndi")
    td.set("Inputname", "STAGE-PC (TD feed)")
    assert td.comp.op("ndi_out").par.name.eval() == "TD feed"
    assert td.comp.op("ndi_out").par.active.eval() is True
    assert td.comp.op("syphonspout_out").par.active.eval() is False
    td.set("Outputtype", "ndi")
    td.set("Ndisource", "GPU-BOX (latentstage)")
    assert td.comp.op("ndi_in").par.name.eval() == "GPU-BOX (latentstage)"
    assert td.comp.op("engine_out").par.index.eval() == 1
    td.set("Outputtype", "spout")
    td.set("Outputname", "ai out")
    assert td.comp.op("syphonspout_in").par.sendername.eval() == "ai out"
    assert td.comp.op("engine_out").par.index.eval() == 0
    td.set("Oscport", 9100)
    td.set("Feedbackport", 9101)
    assert td.oscout.par.port.eval() == 9100 and td.comp.op("oscin").par.port.eval() == 9101
    assert td.oscout.messages == []


def test_stale_echoes_of_our_own_sends_never_move_the_par():
    td = Harness()
    td.set("Oscport", free_port())  # nobody listens: the echoes below are played by hand
    for value in (0.5, 0.6, 0.7):
        td.set("Delta", value)
    sent, changes = len(td.oscout.messages), td.value_changes
    for echo in (0.5, 0.6000000238418579, 0.7):  # float32, as OSC brings them back
        td.receive("/delta", [echo])
    assert td.par("Delta").eval() == 0.7 and td.value_changes == changes
    td.receive("/delta", [0.9])  # another controller: the par follows, nothing goes back
    assert td.par("Delta").eval() == 0.9 and td.value_changes == changes + 1
    assert len(td.oscout.messages) == sent
    td.set("Delta", 0.9)  # unchanged value: TD fires nothing, nothing is sent
    td.set("Delta", 1.0)
    assert td.oscout.messages[-1] == ("/delta", [1.0])


# ----------------------------------------------------------------------------- against a live engine


class LiveEngine:
    """An engine thread (tiny model, 64x64 fake source) with its ControlService; feedback to a socket."""

    def __init__(self, bundle: Any, scenes: Path):
        self.pipeline = StreamPipeline(bundle, pipeline_settings(prompt="start", negative_prompt=""))
        self.sink = RecordingSink()
        self.engine = Engine(self.pipeline, lambda: FakeSource(fps=30), [("rec", lambda: self.sink)])
        self.feedback = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.feedback.bind(("127.0.0.1", 0))
        self.feedback.settimeout(0.02)
        self.feedback_port = self.feedback.getsockname()[1]
        control = ControlSettings(
            port=0, feedback=[f"127.0.0.1:{self.feedback_port}"], status_hz=10, scenes_dir=str(scenes)
        )
        self.service = ControlService(
            control, self.engine.control, self.engine.submit, self.engine.stats.snapshot
        )
        self.engine.on_applied = self.service.echo
        self.engine.on_error = self.service.error
        self.thread = threading.Thread(target=self.engine.run, daemon=True)

    def start(self) -> None:
        self.service.start()
        self.thread.start()
        deadline = time.monotonic() + 20
        while len(self.sink.frames) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.engine.stop()
        self.thread.join(10)
        self.engine.close()
        self.service.close()
        self.feedback.close()

    def feedback_messages(self) -> list[tuple[str, list[Any]]]:
        messages = []
        while True:
            try:
                data = self.feedback.recv(65536)
            except (TimeoutError, BlockingIOError):
                return messages
            for timed in osc_packet.OscPacket(data).messages:
                messages.append((timed.message.address, list(timed.message.params)))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    bundle = load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))
    run = LiveEngine(bundle, tmp_path_factory.mktemp("scenes"))
    run.start()
    td = Harness()
    td.set("Oscport", run.service.port)
    td.set("Feedbackport", run.feedback_port)
    yield run, td
    run.close()


def pump(run: LiveEngine, td: Harness, until: Any = None, timeout: float = 5.0, feed: bool = True) -> bool:
    """Feed the engine's feedback into the OSC In DAT callback (TD's frame loop, in short)."""
    deadline = time.monotonic() + timeout
    while True:
        for address, args in run.feedback_messages():
            if feed:
                td.receive(address, args)
        td.frame()
        if until is not None and until():
            return True
        if time.monotonic() > deadline:
            return until is None


def test_guidance_par_change_reaches_the_engine(live):
    run, td = live
    td.set("Guidancescale", 1.7)
    assert td.oscout.messages[-1] == ("/guidance_scale", [1.7])
    assert b",f\x00" in td.oscout.datagrams[-1]
    assert pump(run, td, lambda: run.pipeline.state["guidance_scale"] == pytest.approx(1.7))
    sent = len(td.oscout.messages)
    pump(run, td, timeout=0.3)  # the float32 echo 1.70000005 comes back: no jump, no re-send
    assert td.par("Guidancescale").eval() == 1.7
    assert len(td.oscout.messages) == sent


def test_prompt_reaches_the_engine_with_crossfade(live):
    run, td = live
    td.set("Prompt", "neon jellyfish")
    assert td.oscout.messages[-1] == ("/prompt", ["neon jellyfish"])
    assert pump(run, td, lambda: run.pipeline.state["prompt"] == "neon jellyfish")
    td.set("Crossfade", 0.25)
    td.set("Prompt", "a glowing forest")
    assert td.oscout.messages[-1] == ("/prompt", ["a glowing forest", 0.25])
    assert pump(run, td, lambda: run.pipeline.state["prompt"] == "a glowing forest")
    td.set("Crossfade", 0.0)


def test_t_index_list_string_is_sent_as_ints(live):
    run, td = live
    td.set("Tindexlist", "20 40")
    assert td.oscout.messages[-1] == ("/t_index_list", [20, 40])
    assert b",ii\x00" in td.oscout.datagrams[-1]
    assert pump(run, td, lambda: run.pipeline.state["t_index_list"] == [20, 40])
    td.set("Tindexlist", "20,40")  # the same list written differently
    assert td.oscout.messages[-1] == ("/t_index_list", [20, 40])


def test_out_of_range_is_not_sent_and_lasterror_explains(live):
    run, td = live
    sent = len(td.oscout.messages)
    before = run.pipeline.state["guidance_scale"]
    td.set("Guidancescale", 25.0)
    td.set("Tindexlist", "40 20")
    assert len(td.oscout.messages) == sent
    error = td.par("Lasterror").eval()
    assert "t_index_list" in error and "strictly increasing" in error
    assert "guidance_scale: 25.0 is out of range; allowed: a number in [0, 20]" in td.ext.errors[-2]
    pump(run, td, timeout=0.2)
    assert run.pipeline.state["guidance_scale"] == before


def test_echoes_from_another_controller_update_pars_without_resending(live):
    run, td = live
    sent = len(td.oscout.messages)
    changes = td.value_changes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        for address, args in (
            ("/seed", [77]),
            ("/delta", [0.4]),
            ("/prompt_blend_method", ["linear"]),
            ("/similarity_filter/enabled", [1]),
            ("/t_index_list", [10, 30]),
        ):
            other.sendto(build_message(address, args), ("127.0.0.1", run.service.port))
    assert pump(
        run,
        td,
        lambda: (
            td.par("Seed").eval() == 77
            and td.par("Delta").eval() == pytest.approx(0.4)
            and td.par("Promptblendmethod").eval() == "linear"
            and td.par("Similarityfilterenabled").eval() is True
            and td.par("Tindexlist").eval() == "10 30"
        ),
    )
    assert td.value_changes >= changes + 5  # onValueChange fired for each par the echoes set
    assert len(td.oscout.messages) == sent  # ...and none of them went back to the engine


def test_a_fast_fader_does_not_jump_back_to_its_own_echoes(live):
    run, td = live
    sent = len(td.oscout.messages)
    for value in (0.5, 0.6, 0.7, 0.8):
        td.set("Delta", value)
    assert pump(run, td, lambda: run.pipeline.state["delta"] == pytest.approx(0.8))
    pump(run, td, timeout=0.3)
    assert td.par("Delta").eval() == 0.8
    assert len(td.oscout.messages) == sent + 4


def test_status_messages_fill_the_status_pars(live):
    run, td = live
    assert pump(
        run,
        td,
        lambda: (
            td.par("State").eval() == "running"
            and td.par("Fps").eval() > 0
            and td.par("Latencyms").eval() > 0
        ),
    )
    assert td.par("Skiprate").sets > 0 and 0.0 <= td.par("Skiprate").eval() <= 1.0
    assert td.par("Building").sets > 0 and td.par("Building").eval() == ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.sendto(build_message("/seed", ["many"]), ("127.0.0.1", run.service.port))
    assert pump(
        run, td, lambda: "seed" in td.par("Lasterror").eval() and "not a number" in td.par("Lasterror").eval()
    )


def test_status_pulse_refreshes_the_pars(live):
    run, td = live
    run.engine.submit({"seed": 4242, "negative_prompt": "blurry"})
    assert pump(run, td, lambda: run.pipeline.state["seed"] == 4242, feed=False)  # the echo is lost
    pump(run, td, timeout=0.2, feed=False)
    assert td.par("Seed").eval() != 4242
    sent = len(td.oscout.messages)
    td.pulse("Status")
    assert pump(
        run, td, lambda: td.par("Seed").eval() == 4242 and td.par("Negativeprompt").eval() == "blurry"
    )
    assert len(td.oscout.messages) == sent  # asked over the extension's own socket, nothing re-sent


def test_toggles_menus_and_scene_pulses(live, tmp_path):
    run, td = live
    td.set("Bypass", True)
    assert td.oscout.messages[-1] == ("/bypass", [1])
    assert pump(run, td, lambda: run.engine.runtime_state["bypass"] is True)
    td.set("Bypass", False)
    assert pump(run, td, lambda: run.engine.runtime_state["bypass"] is False)
    td.set("Cfgtype", "full")
    assert pump(run, td, lambda: run.pipeline.state["cfg_type"] == "full")
    td.set("Presetname", "td_scene")
    td.pulse("Presetsave")
    assert td.oscout.messages[-1] == ("/preset/save", ["td_scene"])
    scenes = Path(run.service.settings.scenes_dir)
    assert pump(run, td, lambda: (scenes / "td_scene.yaml").exists())
    td.set("Seed", 5)
    assert pump(run, td, lambda: run.pipeline.state["seed"] == 5)
    td.pulse("Presetload")
    assert pump(run, td, lambda: run.pipeline.state["seed"] != 5 and td.par("Seed").eval() != 5)
    assert td.par("Seed").eval() == run.pipeline.state["seed"]
    td.set("Presetname", "")
    sent = len(td.oscout.messages)
    td.pulse("Presetload")
    assert len(td.oscout.messages) == sent and "no name" in td.par("Lasterror").eval()
    assert td.ext.PushAll() >= 10
    assert pump(run, td, lambda: run.pipeline.state["cfg_type"] == "full")


# ----------------------------------------------------------------------------- the engine process


def _fake_engine(folder: Path, behaviour: str) -> Path:
    """A stand-in ``latentstage`` program: records its argv, then sleeps, ignores TERM or exits."""
    script = folder / "latentstage"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, signal, sys, time\n"
        f"with open({str(folder / 'argv.jsonl')!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if behaviour == "stubborn" else "")
        + ("sys.exit(3)\n" if behaviour == "crash" else "time.sleep(60)\n"),
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _poll_until(td: Harness, predicate: Any, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        td.frame()
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.skipif(os.name == "nt", reason="the stand-in engine is a POSIX script")
def test_start_builds_a_command_the_cli_accepts_and_stop_terminates(tmp_path):
    td = Harness(platform="win32")
    td.set("Executable", str(_fake_engine(tmp_path, "sleep")))
    td.set("Configfile", str(ROOT / "config.yaml"))
    td.set("Preset", "demo")
    port = free_port()
    td.set("Oscport", port)
    td.set("Feedbackport", port + 1)
    td.set("Logfile", str(tmp_path / "engine.log"))
    td.pulse("Start")
    assert td.par("State").eval() == "starting" and td.ext.Running()
    assert _poll_until(td, lambda: (tmp_path / "argv.jsonl").exists())
    argv = json.loads((tmp_path / "argv.jsonl").read_text().splitlines()[0])
    assert argv[:2] == ["run", "--quiet"]
    assert f"osc.port={port}" in argv and f'osc.feedback=["127.0.0.1:{port + 1}"]' in argv
    assert 'input={"type": "spout", "sender": "TDSyphonSpoutOut"}' in argv
    assert 'outputs=[{"type": "spout", "name": "latentstage"}]' in argv
    # the real CLI takes the same arguments (config instead of run: no model load)
    checked = subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", *argv[2:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert "sender: TDSyphonSpoutOut" in checked.stdout and f"port: {port}" in checked.stdout
    td.pulse("Start")
    assert "already running" in td.par("Lasterror").eval()
    td.pulse("Stop")
    assert _poll_until(td, lambda: td.par("State").eval() == "stopped")
    assert not td.ext.Running()


@pytest.mark.skipif(os.name == "nt", reason="the stand-in engine is a POSIX script")
def test_stop_kills_a_stubborn_engine_and_a_crash_is_reported_and_restarted(tmp_path):
    td = Harness(platform="win32")
    td.set("Oscport", free_port())
    td.set("Executable", str(_fake_engine(tmp_path, "stubborn")))
    td.ext.stop_timeout_s = 0.5
    assert td.ext.Start()
    assert _poll_until(td, lambda: (tmp_path / "argv.jsonl").exists())
    time.sleep(0.2)  # let it install its SIGTERM handler
    td.pulse("Stop")
    assert td.par("State").eval() == "stopping"
    assert _poll_until(td, lambda: td.par("State").eval() == "stopped")
    td.set("Executable", str(_fake_engine(tmp_path, "crash")))
    td.set("Autorestart", True)
    td.ext.restart_delay_s = 0.1
    assert td.ext.Start()
    assert _poll_until(td, lambda: td.par("State").eval() == "exited (3)")
    assert "exited with code 3" in td.par("Lasterror").eval()
    starts = len((tmp_path / "argv.jsonl").read_text().splitlines())
    assert _poll_until(td, lambda: len((tmp_path / "argv.jsonl").read_text().splitlines()) > starts)
    td.set("Autorestart", False)
    assert _poll_until(td, lambda: not td.ext.Running())


def test_start_refuses_a_port_in_use_and_a_missing_executable(tmp_path):
    td = Harness(platform="win32")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        td.set("Oscport", taken.getsockname()[1])
        td.set("Executable", sys.executable)
        assert not td.ext.Start()
        assert "is in use" in td.par("Lasterror").eval()
    assert td.ext.BuildCommand()[:4] == [sys.executable, "-m", "engine.cli", "run"]
    td.set("Executable", str(tmp_path / "nothing-here"))
    td.set("Oscport", free_port())
    assert not td.ext.Start()
    assert "cannot start" in td.par("Lasterror").eval()
    assert td.par("State").eval() == "stopped"
    td.set("Oschost", "192.168.1.50")  # an engine on another machine is started there, not here
    assert not td.ext.Start()
    assert "start the engine on that machine" in td.par("Lasterror").eval()
