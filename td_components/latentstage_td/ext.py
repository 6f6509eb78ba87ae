"""StreamEngineExt: the extension of the ``latentstage`` Base COMP in TouchDesigner.

Standard library only (TouchDesigner's Python has no latentstage package), Python 3.9+.
Inside TouchDesigner this file is the Text DAT ``StreamEngineExt`` of the COMP, made by
``build_component.py``; tests import it as ``latentstage_td.ext`` with stand-ins for TD's
objects. What the COMP holds and who calls what:

    oscout   OSC Out DAT   -> the engine's OSC port (Oschost:Oscport); every send goes here
    oscin    OSC In DAT    <- the feedback port; oscin_callbacks calls OnReceiveOSC
    parexec  Parameter Execute DAT: onValueChange -> OnParValueChange, onPulse -> OnPulse
    execute  Execute DAT: onFrameStart -> Poll, onStart -> OnProjectStart, onExit -> OnProjectExit
    syphonspout_out / ndi_out   TD video -> engine input (named from Inputname)
    syphonspout_in  / ndi_in    engine output -> TD (named from Outputname / Ndisource)

Two-way control: the engine echoes every accepted change on the feedback port. An echo of
a value this component sent is ignored (so a fast fader never jumps back to a stale value);
any other echo sets the par, and the change callback that this set causes is not sent back.

``/status`` is answered to the sender's own address, which the OSC Out DAT does not read,
so the Status pulse asks over a small socket of this extension and ``Poll`` (every frame)
reads the replies. The engine process runs via ``subprocess.Popen`` with DEVNULL or a real
log file (never TD's file-like objects); the only thread waits for a stopping process and
never touches a TD object.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

OSC_OUT = "oscout"
OSC_IN = "oscin"
SPOUT_IN = "syphonspout_in"
SPOUT_OUT = "syphonspout_out"
NDI_IN = "ndi_in"
NDI_OUT = "ndi_out"
OUTPUT_SWITCH = "engine_out"
PARAMS_DAT = "params_json"
MAPPING_DAT = "mapping"

#: Feedback status addresses -> (status par, type).
STATUS_ADDRESSES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "/engine/state": ("State", str),
    "/engine/fps": ("Fps", float),
    "/engine/latency_ms": ("Latencyms", float),
    "/engine/skip_rate": ("Skiprate", float),
    "/engine/building": ("Building", str),
    "/engine/change_latency_ms": ("Changelatencyms", float),
    "/engine/bpm": ("Enginebpm", float),
    "/engine/sequence_step": ("Sequencestep", int),
    "/engine/restarts": ("Restarts", int),
    "/engine/replicas": ("Replicas", int),
}
#: Sent on each beat (not periodic): the beat in the bar.
BEAT_ADDRESS = "/engine/beat"
#: Sent when the MIDI controllers' state changes (connected, waiting, learning): not periodic.
MIDI_ADDRESS = "/engine/midi"
ERROR_ADDRESS = "/engine/error"
CONNECTED_STATES = ("running", "paused", "stalled", "lost")
STOP_TIMEOUT_S = 5.0
RESTART_DELAY_S = 2.0
STATUS_WINDOW_S = 2.0
ECHO_WINDOW_S = 2.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _load_mapping(owner: Any) -> Any:
    try:
        from latentstage_td import mapping  # tests, or td_components on TouchDesigner's Python path
    except ImportError:
        return owner.op(MAPPING_DAT).module  # inside TouchDesigner: the Text DAT 'mapping' beside us
    return mapping


# ----------------------------------------------------------------------------- OSC over a plain socket


def _osc_string(text: str) -> bytes:
    data = text.encode("utf-8") + b"\x00"
    return data + b"\x00" * (-len(data) % 4)


def encode_message(address: str, args: list[Any]) -> bytes:
    """One OSC message: ints as ``i``, floats as ``f``, anything else as ``s``."""
    tags, payload = ",", b""
    for arg in args:
        if isinstance(arg, int):
            tags, payload = tags + "i", payload + struct.pack(">i", int(arg))
        elif isinstance(arg, float):
            tags, payload = tags + "f", payload + struct.pack(">f", arg)
        else:
            tags, payload = tags + "s", payload + _osc_string(str(arg))
    return _osc_string(address) + _osc_string(tags) + payload


def _read_string(data: bytes, start: int) -> tuple[str, int]:
    end = data.index(b"\x00", start)
    return data[start:end].decode("utf-8"), (end + 4) & ~3


def decode_packet(data: bytes, depth: int = 0) -> list[tuple[str, list[Any]]]:
    """The messages of one OSC datagram (message or bundle); ``ValueError``/``struct.error`` if bad."""
    if depth > 8:
        raise ValueError("OSC bundle nested too deep")
    if data.startswith(b"#bundle\x00"):
        messages: list[tuple[str, list[Any]]] = []
        i = 16
        while i + 4 <= len(data):
            (size,) = struct.unpack_from(">i", data, i)
            i += 4
            if size < 0 or i + size > len(data):
                raise ValueError("truncated OSC bundle")
            messages += decode_packet(data[i : i + size], depth + 1)
            i += size
        return messages
    address, i = _read_string(data, 0)
    if not address.startswith("/"):
        raise ValueError("not an OSC message")
    if i >= len(data):
        return [(address, [])]
    tags, i = _read_string(data, i)
    if not tags.startswith(","):
        raise ValueError("OSC type tags missing")
    args: list[Any] = []
    for tag in tags[1:]:
        if tag in "if":
            args.append(struct.unpack_from(">i" if tag == "i" else ">f", data, i)[0])
            i += 4
        elif tag in "dh":
            args.append(struct.unpack_from(">d" if tag == "d" else ">q", data, i)[0])
            i += 8
        elif tag in "sS":
            text, i = _read_string(data, i)
            args.append(text)
        elif tag in "TFN":
            args.append({"T": True, "F": False, "N": None}[tag])
        elif tag == "b":
            (size,) = struct.unpack_from(">i", data, i)
            args.append(data[i + 4 : i + 4 + size])
            i += 4 + size + (-size % 4)
        else:
            raise ValueError(f"OSC type {tag!r} not understood")
    return [(address, args)]


# ----------------------------------------------------------------------------- helpers


class EchoGuard:
    """Keeps two-way control from looping or jittering (values compared as OSC arguments).

    ``sent``: a value went out. ``own_echo``: the feedback of a value we sent comes back; the
    par already holds it or a newer one, so it must not be set (a fader moved 1.1 -> 1.3
    would otherwise jump back to 1.1). ``engine_set`` / ``caused_by_engine``: a value set from
    the engine fires the par's change callback, which must not send it back.
    """

    def __init__(
        self,
        same: Callable[[list[Any], list[Any]], bool],
        clock: Callable[[], float],
        window: float = ECHO_WINDOW_S,
    ) -> None:
        self.same = same
        self.clock = clock
        self.window = window
        self._sent: dict[str, list[tuple[float, list[Any]]]] = {}
        self._set: dict[str, tuple[float, list[Any]]] = {}

    def _fresh(self, name: str) -> list[tuple[float, list[Any]]]:
        horizon = self.clock() - self.window
        items = [item for item in self._sent.get(name, []) if item[0] >= horizon][-32:]
        self._sent[name] = items
        return items

    def sent(self, name: str, args: list[Any]) -> None:
        self._fresh(name).append((self.clock(), args))

    def own_echo(self, name: str, args: list[Any]) -> bool:
        items = self._fresh(name)
        for index, (_, sent) in enumerate(items):
            if self.same(sent, args):
                del items[: index + 1]
                return True
        return False

    def engine_set(self, name: str, args: list[Any]) -> None:
        self._set[name] = (self.clock(), args)

    def caused_by_engine(self, name: str, args: list[Any]) -> bool:
        item = self._set.pop(name, None)
        return item is not None and self.clock() - item[0] <= self.window and self.same(item[1], args)


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate, then kill after ``timeout`` (runs in a thread: touches no TD object)."""
    try:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _spawn_options() -> dict[str, Any]:
    if os.name == "nt":  # no console window; the engine's output goes to DEVNULL or the log file
        return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}  # TD's own signals do not reach the engine


# ----------------------------------------------------------------------------- the extension


class StreamEngineExt:
    """Starts the latentstage engine and mirrors its live parameters as custom pars.

    Promoted members (capitalised) can be called on the COMP: ``op('latentstage').Start()``.
    """

    def __init__(self, ownerComp: Any) -> None:
        self.ownerComp = ownerComp
        self.mapping = _load_mapping(ownerComp)
        self.clock: Callable[[], float] = time.monotonic
        self.stop_timeout_s = STOP_TIMEOUT_S
        self.restart_delay_s = RESTART_DELAY_S
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.sent: deque[tuple[str, list[Any]]] = deque(maxlen=256)
        self.errors: deque[str] = deque(maxlen=64)
        self._guard = EchoGuard(self.mapping.same_args, lambda: self.clock())
        self._stopping: subprocess.Popen[bytes] | None = None
        self._user_stopped = True
        self._restart_requested = False
        self._restart_at: float | None = None
        self._connect_pending = False
        self._status_socket: socket.socket | None = None
        self._status_until = 0.0
        self.map = self.mapping.ParamMap(self._load_registry())
        self.WireBridges()

    # ------------------------------------------------------------------ pars and operators
    def _par(self, name: str) -> Any:
        return getattr(self.ownerComp.par, name, None)

    def _get(self, name: str, default: Any = None) -> Any:
        par = self._par(name)
        return default if par is None else par.eval()

    def _set(self, name: str, value: Any) -> None:
        par = self._par(name)
        if par is not None and par.eval() != value:
            par.val = value

    def _op(self, name: str) -> Any:
        return self.ownerComp.op(name)

    def _set_op_par(self, op_name: str, par_name: str, value: Any) -> None:
        target = self._op(op_name)
        if target is None or not hasattr(target.par, par_name):
            return
        par = getattr(target.par, par_name)
        if par.eval() != value:
            setattr(target.par, par_name, value)

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self._set("Lasterror", f"{time.strftime('%H:%M:%S')} {message}"[:1000])

    def _load_registry(self) -> list[dict[str, Any]]:
        """``Paramsjson`` (a file) when set, else the embedded Text DAT ``params_json``."""
        path = str(self._get("Paramsjson", "") or "").strip()
        try:
            if path:
                with open(path, encoding="utf-8") as handle:
                    return list(json.load(handle))
            dat = self._op(PARAMS_DAT)
            return list(json.loads(dat.text)) if dat is not None else []
        except (OSError, ValueError) as err:
            self._error(f"cannot read the parameter registry {path or PARAMS_DAT}: {err}")
            return []

    # ------------------------------------------------------------------ TD callbacks
    def OnParValueChange(self, par: Any) -> None:
        """Parameter Execute DAT ``onValueChange``: send the par's registry entry to the engine."""
        name = par.name
        if name in self.mapping.WIRING_PARS:
            self.WireBridges()
            return
        entry = self.map.entry_of_td.get(name)
        if entry is None or entry["type"] == "action":
            return
        value = par.eval()
        if self._guard.caused_by_engine(name, self.mapping.canonical(entry, value)):
            return
        self.SendParam(entry["name"], value)

    def OnPulse(self, par: Any) -> None:
        """Parameter Execute DAT ``onPulse``: Start/Stop/Restart/Send all, status and scenes."""
        own = {"Start": self.Start, "Stop": self.Stop, "Restart": self.Restart, "Pushall": self.PushAll}
        if par.name in own:
            own[par.name]()
            return
        entry = self.map.entry_of_td.get(par.name)
        if entry is None or entry["type"] != "action":
            return
        if entry["osc_address"] == "/status":
            self.RequestStatus()
        else:
            self.SendParam(entry["name"], self._get("Presetname", ""))

    def OnReceiveOSC(self, address: str, args: Any = ()) -> None:
        """OSC In DAT ``onReceiveOSC``: echoes update pars (never re-sent), status fills Status."""
        values = list(args or ())
        status = STATUS_ADDRESSES.get(address)
        if status is not None:
            self._status_message(status, values)
            return
        if address == ERROR_ADDRESS:
            self._error(str(values[0]) if values else "engine error")
            return
        if address == BEAT_ADDRESS:
            self._status_message(("Beat", int), values)
            return
        if address == MIDI_ADDRESS:
            self._status_message(("Midi", str), values)
            return
        entry = self.map.by_address.get(address)
        if entry is None:
            return
        if entry["type"] == "action":
            if values and isinstance(values[0], str):
                self._set("Presetname", values[0])
            return
        name = self.map.td_of[entry["name"]]
        par = self._par(name)
        if par is None:
            return
        try:
            value = self.mapping.td_value(entry, values)
        except (ValueError, TypeError):
            return
        incoming = self.mapping.canonical(entry, value)
        if self._guard.own_echo(name, incoming) or self.mapping.same_value(entry, par.eval(), value):
            return
        self._guard.engine_set(name, incoming)
        par.val = value

    def _status_message(self, status: tuple[str, Callable[[Any], Any]], values: list[Any]) -> None:
        name, cast = status
        if not values:
            return
        try:
            value = cast(values[0])
        except (TypeError, ValueError):
            return
        self._set(name, value)
        if name == "State" and value in CONNECTED_STATES and self._connect_pending:
            self._connect_pending = False
            action = self._get("Onconnect", "pull")
            if action == "pull":
                self.RequestStatus()
            elif action == "push":
                self.PushAll()

    def Poll(self) -> None:
        """Execute DAT ``onFrameStart``: watch the process, read ``/status`` replies."""
        self._check_process()
        if self._restart_at is not None and self.clock() >= self._restart_at:
            self._restart_at = None
            self.Start()
        if self._status_socket is not None and self.clock() <= self._status_until:
            self._drain_status(apply=True)

    def OnProjectStart(self) -> None:
        if self._get("Autostart", False):
            self.Start()

    def OnProjectExit(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _stop_process(process, min(self.stop_timeout_s, 3.0))

    # ------------------------------------------------------------------ sending
    def SendParam(self, name: str, value: Any) -> bool:
        """Validate ``value`` for registry entry ``name`` and send it; refusals go to Lasterror."""
        entry = self.map.by_name.get(name)
        if entry is None:
            self._error(f"{name}: not in this component's parameter registry")
            return False
        crossfade = self._get("Crossfade", 0.0) if "[f]" in (entry.get("osc_args") or "") else None
        try:
            args = self.mapping.osc_args(entry, value, crossfade)
        except (ValueError, TypeError) as err:
            self._error(str(err))
            return False
        if args is None:
            return False
        if entry["type"] == "action":
            return self._send(entry["osc_address"], args)
        canonical = self.mapping.canonical(entry, value)
        return self._send(entry["osc_address"], args, self.map.td_of[name], canonical)

    def _send(self, address: str, args: list[Any], par_name: str = "", canonical: Any = None) -> bool:
        dat = self._op(OSC_OUT)
        if dat is None:
            self._error(f"no OSC Out DAT '{OSC_OUT}' in the component: run the builder again")
            return False
        try:
            dat.sendOSC(address, args)
        except Exception as err:  # TD raises its own types; none may escape into a callback
            self._error(f"sending {address} failed: {err}")
            return False
        self.sent.append((address, list(args)))
        if par_name:
            self._guard.sent(par_name, canonical)
        return True

    def PushAll(self) -> int:
        """Send every scene value (prompt, guidance, seed, ...) from the pars to the engine."""
        count = 0
        for entry in self.map.entries:
            if entry["type"] == "action" or not entry.get("in_scene", True):
                continue
            par = self._par(self.map.td_of[entry["name"]])
            if par is not None and self.SendParam(entry["name"], par.eval()):
                count += 1
        return count

    def RequestStatus(self) -> bool:
        """Ask for every current value; ``Poll`` reads the replies for a couple of seconds."""
        host, port = self._osc_target()
        try:
            if self._status_socket is None:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                self._status_socket = sock
            self._drain_status(apply=False)
            self._status_socket.sendto(encode_message("/status", []), (host, port))
        except OSError as err:
            self._error(f"status request to {host}:{port} failed: {err}")
            return False
        self._status_until = self.clock() + STATUS_WINDOW_S
        return True

    def _drain_status(self, apply: bool) -> None:
        sock = self._status_socket
        if sock is None:
            return
        for _ in range(2000):
            try:
                data = sock.recvfrom(65535)[0]
            except ConnectionResetError:  # Windows: an earlier datagram found no listener
                continue
            except OSError:  # nothing waiting (BlockingIOError) or the socket is gone
                return
            if not apply:
                continue
            try:
                messages = decode_packet(data)
            except (ValueError, struct.error):
                continue
            for address, args in messages:
                self.OnReceiveOSC(address, args)

    def _osc_target(self) -> tuple[str, int]:
        host = str(self._get("Oschost", "127.0.0.1") or "127.0.0.1").strip()
        return ("127.0.0.1" if host == "localhost" else host), int(self._get("Oscport", 9000))

    # ------------------------------------------------------------------ bridges
    def WireBridges(self) -> None:
        """OSC DAT ports and the Syphon Spout / NDI TOP names from the COMP's pars."""
        host, port = self._osc_target()
        self._set_op_par(OSC_OUT, "address", host)
        self._set_op_par(OSC_OUT, "port", port)
        self._set_op_par(OSC_IN, "port", int(self._get("Feedbackport", 9001)))
        in_type = str(self._get("Inputtype", "config"))
        in_name = str(self._get("Inputname", "") or "")
        if in_type != "config":  # "config": the config file decides; leave the TOPs alone
            self._set_op_par(SPOUT_OUT, "active", in_type in ("spout", "syphon"))
            self._set_op_par(NDI_OUT, "active", in_type == "ndi")
            if in_type in ("spout", "syphon") and in_name:
                self._set_op_par(SPOUT_OUT, "sendername", in_name)
            if in_type == "ndi" and in_name:
                self._set_op_par(NDI_OUT, "name", self.mapping.ndi_stream_name(in_name))
        out_type = str(self._get("Outputtype", "config"))
        out_name = str(self._get("Outputname", "") or "")
        if out_type in ("spout", "syphon") and out_name:
            self._set_op_par(SPOUT_IN, "sendername", out_name)
        if out_type == "ndi":
            source = str(self._get("Ndisource", "") or "").strip()
            if not source and out_name:
                source = f"{socket.gethostname().split('.')[0].upper()} ({out_name})"
            if source:
                self._set_op_par(NDI_IN, "name", source)
        if out_type != "config":
            self._set_op_par(OUTPUT_SWITCH, "index", 1 if out_type == "ndi" else 0)

    # ------------------------------------------------------------------ the engine process
    def Running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def BuildCommand(self) -> list[str]:
        """``latentstage run ...`` from the Engine and Bridges pars (``ValueError`` if impossible)."""
        executable = str(self._get("Executable", "") or "").strip().strip('"')
        if not executable:
            executable = shutil.which("latentstage") or ""
        if not executable:
            raise ValueError(
                "latentstage not found: set 'latentstage executable' on the Engine page to the "
                "latentstage program of its environment (Windows: ...\\.venv\\Scripts\\latentstage.exe, "
                "macOS: .../.venv/bin/latentstage) or to that environment's python"
            )
        stem = os.path.splitext(os.path.basename(executable))[0].lower()
        command = [executable, "-m", "engine.cli"] if stem.startswith("python") else [executable]
        command += ["run", "--quiet"]
        config = str(self._get("Configfile", "") or "").strip()
        if config:
            command += ["--config", config]
        for preset in str(self._get("Preset", "") or "").replace(",", " ").split():
            command += ["--preset", preset]
        feedback = f"127.0.0.1:{int(self._get('Feedbackport', 9001))}"
        command += ["--set", f"osc.port={self._osc_target()[1]}"]
        command += ["--set", f"osc.feedback={json.dumps([feedback])}"]
        in_type = str(self._get("Inputtype", "config"))
        if in_type != "config":
            key = self.mapping.INPUT_NAME_KEY[in_type]
            source = {"type": in_type, key: str(self._get("Inputname", "") or "")}
            command += ["--set", f"input={json.dumps(source)}"]
        out_type = str(self._get("Outputtype", "config"))
        if out_type != "config":
            sink = {"type": out_type, "name": str(self._get("Outputname", "") or "latentstage")}
            command += ["--set", f"outputs={json.dumps([sink])}"]
        return command

    def _port_problem(self) -> str | None:
        host, port = self._osc_target()
        probe = socket.socket(socket.AF_INET6 if host == "::1" else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((host, port))
        except OSError as err:
            return (
                f"OSC port {port} is in use ({err.strerror}): is an engine already running? "
                "Stop it, or set another OSC port on the Engine page"
            )
        finally:
            probe.close()
        return None

    def _workdir(self) -> str | None:
        folder = str(self._get("Workdir", "") or "").strip()
        if folder and os.path.isdir(folder):
            return folder
        config = str(self._get("Configfile", "") or "").strip()
        return os.path.dirname(os.path.abspath(config)) if config else None

    def Start(self) -> bool:
        """Start the engine process (one per component)."""
        if self.Running():
            pid = self.process.pid if self.process is not None else "?"
            self._error(f"the engine is already running (pid {pid}); use Restart")
            return False
        host = self._osc_target()[0]
        if host not in LOCAL_HOSTS:
            self._error(
                f"the engine address is {host}: start the engine on that machine (Start runs it here)"
            )
            return False
        try:
            command = self.BuildCommand()
        except ValueError as err:
            self._error(str(err))
            return False
        problem = self._port_problem()
        if problem:
            self._error(problem)
            return False
        log_path = str(self._get("Logfile", "") or "").strip()
        try:
            # DEVNULL or a real file: TD's own streams are file-like objects without a fileno
            with open(log_path, "ab") if log_path else contextlib.nullcontext() as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log if log is not None else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    cwd=self._workdir(),
                    **_spawn_options(),
                )
        except OSError as err:
            self._error(f"cannot start {command[0]}: {err}")
            return False
        self.command = command
        self._user_stopped = False
        self._restart_at = None
        self._connect_pending = True
        self._set("State", "starting")
        self.WireBridges()
        return True

    def Stop(self) -> bool:
        """Terminate the engine; it is killed if still there after ``stop_timeout_s``."""
        self._restart_at = None
        process = self.process
        if process is None or process.poll() is not None:
            self._check_process()
            return False
        self._user_stopped = True
        if self._stopping is not process:
            self._stopping = process
            waiter = threading.Thread(
                target=_stop_process, args=(process, self.stop_timeout_s), name="latentstage-stop"
            )
            waiter.daemon = True
            waiter.start()
        self._set("State", "stopping")
        return True

    def Restart(self) -> None:
        """Stop, then start as soon as the old process is gone (it holds the OSC port)."""
        if self.Running():
            self._restart_requested = True
            self.Stop()
        else:
            self.Start()

    def _check_process(self) -> None:
        process = self.process
        if process is None:
            return
        code = process.poll()
        if code is None:
            return
        self.process = None
        self._stopping = None
        self._connect_pending = False
        for name in ("Fps", "Latencyms", "Skiprate"):
            self._set(name, 0.0)
        self._set("Building", "")
        if self._user_stopped:
            self._set("State", "stopped")
            if self._restart_requested:
                self._restart_requested = False
                self.Start()
            return
        self._set("State", f"exited ({code})")
        log_path = str(self._get("Logfile", "") or "").strip()
        hint = f"see {log_path}" if log_path else "set a Log file on the Engine page to see why"
        self._error(f"the engine exited with code {code}; {hint}")
        if self._get("Autorestart", False):
            self._restart_at = self.clock() + self.restart_delay_s
