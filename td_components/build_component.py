"""Builds the ``latentstage`` Base COMP in TouchDesigner and saves it as ``latentstage.tox``.

Run it ONCE in TouchDesigner's textport (Dialogs > Textport and DATs), with your path:

    p = r'C:/path/latentstage/td_components/build_component.py'
    exec(open(p).read(), dict(globals(), __file__=p))

(code run by a bare ``exec(open(p).read())`` cannot know where it came from; set
``LATENTSTAGE_TD = r'C:/path/latentstage/td_components'`` first if you prefer that form).
The COMP lands in ``LATENTSTAGE_PARENT`` when that is set, else in ``/project1``, and is saved
as ``td_components/latentstage.tox``: drag that file into any project afterwards.

It embeds ``params.json`` (the engine's live-parameter registry), ``latentstage_td/mapping.py``
and ``latentstage_td/ext.py`` as Text DATs, so the .tox needs nothing from this folder; makes
one custom par per registry entry plus the component's own (process, bridges, status); and
creates the OSC Out/In DATs, the Parameter Execute and Execute DATs with their callbacks, and
Syphon Spout In/Out and NDI In/Out TOPs. Standard library only, Python 3.9+. Outside
TouchDesigner ``build(parent_comp, folder)`` can be driven with stand-ins (see the tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

COMP_NAME = "latentstage"
EXT_NAME = "StreamEngineExt"
#: The extension object: evaluated by TouchDesigner in the COMP (``me`` is the COMP).
EXT_EXPRESSION = "op('./StreamEngineExt').module.StreamEngineExt(me)"

_FIND_EXT = '''
def _engine():
    """The StreamEngineExt of this COMP (its promoted methods on the COMP as a fallback)."""
    comp = parent()
    return getattr(getattr(comp, 'ext', None), 'StreamEngineExt', None) or comp
'''

PAREXEC_CALLBACKS = (
    "# latentstage: Parameter Execute DAT callbacks (made by build_component.py)\n"
    + _FIND_EXT
    + """

def onValueChange(par, *args):
    # (par, val, prev) on older builds, (par, prev) on newer ones: read par.eval()
    _engine().OnParValueChange(par)


def onPulse(par):
    _engine().OnPulse(par)
"""
)

OSCIN_CALLBACKS = (
    "# latentstage: OSC In DAT callbacks (made by build_component.py)\n"
    + _FIND_EXT
    + """

def onReceiveOSC(dat, rowIndex, message, bytes, timeStamp, address, args, peer):
    _engine().OnReceiveOSC(address, args)
"""
)

EXECUTE_CALLBACKS = (
    "# latentstage: Execute DAT callbacks (made by build_component.py)\n"
    + _FIND_EXT
    + """

def onStart():
    _engine().OnProjectStart()


def onFrameStart(frame):
    _engine().Poll()


def onExit():
    _engine().OnProjectExit()
"""
)


def _load_mapping(folder: str) -> Any:
    path = os.path.join(folder, "latentstage_td", "mapping.py")
    spec = importlib.util.spec_from_file_location("latentstage_td_mapping_for_build", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _first(created: Any) -> Any:
    """``appendX`` returns a ParGroup on new builds and a list on old ones: the Par is ``[0]``."""
    return created[0]


def _set_pars(target: Any, notes: list[str], **values: Any) -> None:
    """Set built-in pars that this build has; note the ones it lacks instead of failing."""
    for name, value in values.items():
        if hasattr(target.par, name):
            setattr(target.par, name, value)
        else:
            notes.append(f"{target.name}: no parameter '{name}' in this build; check it by hand")


def _place(target: Any, x: int, y: int) -> None:
    if hasattr(target, "nodeX"):
        target.nodeX, target.nodeY = x, y


def _text_dat(comp: Any, name: str, text: str, x: int, y: int) -> Any:
    dat = comp.create("textDAT", name)
    dat.text = text
    _place(dat, x, y)
    return dat


def _custom_pars(comp: Any, param_map: Any) -> int:
    pages: dict[str, Any] = {}
    count = 0
    for spec in param_map.pars():
        if spec.page not in pages:
            pages[spec.page] = comp.appendCustomPage(spec.page)
        par = _first(getattr(pages[spec.page], "append" + spec.style)(spec.name, label=spec.label))
        if spec.style == "Menu":
            par.menuNames = list(spec.choices)
            par.menuLabels = list(spec.choices)
        if spec.style in ("Float", "Int"):
            if spec.minimum is not None:
                par.min = spec.minimum
                par.clampMin = True
            if spec.maximum is not None:
                par.max = spec.maximum
                par.clampMax = True
            norm = spec.norm_range()
            if norm is not None:
                par.normMin, par.normMax = norm
        if spec.default is not None and spec.style != "Pulse":
            par.default = spec.default
            par.val = spec.default
        if spec.read_only:
            par.readOnly = True
        count += 1
    return count


def _video_io(comp: Any, tops: dict[str, Any], notes: list[str]) -> None:
    """Best effort: COMP input -> both senders, both receivers -> switch -> COMP output."""
    try:
        video_in = comp.create("inTOP", "video_in")
        switch = comp.create("switchTOP", "engine_out")
        video_out = comp.create("outTOP", "video_out")
        video_in.outputConnectors[0].connect(tops["syphonspout_out"])
        video_in.outputConnectors[0].connect(tops["ndi_out"])
        tops["syphonspout_in"].outputConnectors[0].connect(switch)
        tops["ndi_in"].outputConnectors[0].connect(switch)
        switch.outputConnectors[0].connect(video_out)
        _place(video_in, -400, -400)
        _place(switch, 200, -400)
        _place(video_out, 400, -400)
    except Exception as err:  # an API this build lacks: the TOPs still work, wired by hand
        notes.append(f"video in/out not wired ({err}); connect the TOPs inside the COMP by hand")


def _set_extension(comp: Any, notes: list[str]) -> None:
    if hasattr(comp.par, "ext0object"):  # 2025 builds
        comp.par.ext0object = EXT_EXPRESSION
        comp.par.ext0name = EXT_NAME
        comp.par.ext0promote = True
    elif hasattr(comp.par, "extension1"):  # older builds
        comp.par.extension1 = EXT_EXPRESSION
        comp.par.extname1 = EXT_NAME
        comp.par.promoteextension1 = True
    else:
        notes.append(f"no extension parameters found: set Extension 1 to {EXT_EXPRESSION} by hand")
        return
    if hasattr(comp, "initializeExtensions"):
        comp.initializeExtensions()


def build(
    parent_comp: Any, folder: str, name: str = COMP_NAME, save: bool = True, platform: str | None = None
) -> Any:
    """Create the COMP in ``parent_comp`` from the files in ``folder`` (td_components) and save it."""
    folder = os.path.abspath(folder)
    mapping = _load_mapping(folder)
    params_text = _read(os.path.join(folder, "params.json"))
    param_map = mapping.ParamMap(json.loads(params_text), platform or sys.platform)
    if parent_comp.op(name) is not None:
        raise RuntimeError(f"{parent_comp.path}/{name} already exists: delete or rename it, then run again")
    notes: list[str] = []
    comp = parent_comp.create("baseCOMP", name)
    _text_dat(comp, "params_json", params_text, -400, 400)
    _text_dat(comp, "mapping", _read(os.path.join(folder, "latentstage_td", "mapping.py")), -200, 400)
    _text_dat(comp, EXT_NAME, _read(os.path.join(folder, "latentstage_td", "ext.py")), 0, 400)
    count = _custom_pars(comp, param_map)

    oscout = comp.create("oscoutDAT", "oscout")
    _set_pars(oscout, notes, address="127.0.0.1", port=int(comp.par.Oscport.eval()), active=True)
    _text_dat(comp, "oscin_callbacks", OSCIN_CALLBACKS, 200, 200)
    oscin = comp.create("oscinDAT", "oscin")
    _set_pars(oscin, notes, port=int(comp.par.Feedbackport.eval()), callbacks="oscin_callbacks", active=True)
    parexec = comp.create("parameterexecuteDAT", "parexec")
    parexec.text = PAREXEC_CALLBACKS
    _set_pars(
        parexec,
        notes,
        op="..",
        pars=" ".join(param_map.control_pars()),
        custom=True,
        builtin=False,
        valuechange=True,
        onpulse=True,
        active=True,
    )
    execute = comp.create("executeDAT", "execute")
    execute.text = EXECUTE_CALLBACKS
    _set_pars(execute, notes, start=True, framestart=True, exit=True, active=True)
    for target, x, y in ((oscout, -200, 200), (oscin, 0, 200), (parexec, -400, 0), (execute, -200, 0)):
        _place(target, x, y)

    tops = {
        "syphonspout_out": comp.create("syphonspoutoutTOP", "syphonspout_out"),
        "ndi_out": comp.create("ndioutTOP", "ndi_out"),
        "syphonspout_in": comp.create("syphonspoutinTOP", "syphonspout_in"),
        "ndi_in": comp.create("ndiinTOP", "ndi_in"),
    }
    _set_pars(tops["syphonspout_out"], notes, sendername=str(comp.par.Inputname.eval()))
    _set_pars(tops["syphonspout_in"], notes, sendername=str(comp.par.Outputname.eval()))
    for index, top in enumerate(tops.values()):
        _place(top, -200 + 200 * (index % 2), -200 - 200 * (index // 2))
    _video_io(comp, tops, notes)
    _set_extension(comp, notes)

    path = os.path.join(folder, f"{name}.tox")
    if save:
        comp.save(path)
    saved = f", saved {path}" if save else ""
    print(f"latentstage: built {comp.path} with {count} custom parameters{saved}")
    for note in notes:
        print(f"latentstage: note: {note}")
    return comp


def _builder_folder(namespace: dict[str, Any]) -> str:
    given = namespace.get("LATENTSTAGE_TD") or ""
    if given:
        return str(given)
    source = str(namespace.get("__file__") or "")
    if source.endswith("build_component.py"):
        return os.path.dirname(os.path.abspath(source))
    raise RuntimeError(
        "latentstage: cannot tell where td_components is; run "
        "exec(open(p).read(), dict(globals(), __file__=p)) with p the path of build_component.py"
    )


if "op" in globals():  # inside TouchDesigner's textport
    build(globals().get("LATENTSTAGE_PARENT") or globals()["op"]("/project1"), _builder_folder(globals()))
