"""Start checks: what would fail after the first frame, found before the model loads."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PORT_SEARCH = 50
"""How far above a port in use the fix looks for a free one to suggest."""


@dataclass(frozen=True)
class StartProblem:
    """One thing that stops a show from starting: the config key, what is wrong, the fix."""

    key: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}; {self.fix}"


def check_start(
    config: Any,
    state_file: str | os.PathLike[str] | None = None,
    scenes_dir: Path | None = None,
    midi_dir: Path | None = None,
) -> list[StartProblem]:
    """Everything about ``config`` that can be checked before the first frame.

    Ports (OSC, OSCQuery, preview) must be free, the log file, recordings (a video container by
    their extension and an encoder PyAV can write into it) and the live-state
    file (``state_file``, when the engine autosaves) writable, their folders creatable, the
    engine cache writable for a backend that builds engines, and a video input readable.
    A scenes folder that cannot be written is only a warning: scenes still load.
    Folders that are missing are created (the sinks would create them anyway). MIDI mapping files
    (in ``midi_dir``, default ``presets/midi``) must load and the ``midi`` extra be installed; a
    controller that is not plugged in is not a problem (it is waited for).
    """
    problems: list[StartProblem] = []
    tcp_ports: dict[int, str] = {}
    taken = _configured_ports(config)

    def tcp(key: str, host: str, port: int) -> None:
        if port == 0:
            return
        if port in tcp_ports:
            problems.append(
                StartProblem(key, f"port {port} is also {tcp_ports[port]}", "give each server its own port")
            )
            return
        tcp_ports[port] = key
        problems.extend(_port_problem(key, host, port, socket.SOCK_STREAM, taken))

    if config.osc.enabled:
        problems.extend(_port_problem("osc.port", config.osc.host, config.osc.port, socket.SOCK_DGRAM, taken))
        if config.osc.oscquery_port is not None:
            tcp("osc.oscquery_port", config.osc.host, config.osc.oscquery_port)
    for index, output in enumerate(config.outputs):
        if output.type == "preview":
            tcp(f"outputs[{index}].port", output.host, output.port)
        elif output.type == "record":
            problems.extend(_recording_problem(f"outputs[{index}]", output.path, output.codec, output.fps)
                            or _file_problem(f"outputs[{index}].path", output.path))
    if config.logging.file:
        problems.extend(_file_problem("logging.file", config.logging.file))
    if state_file is not None:
        problems.extend(_file_problem("supervise.state_file", state_file))
    if config.acceleration.backend.value != "torch":
        problems.extend(_folder_problem("acceleration.engine_dir", config.acceleration.engine_dir))
    if config.input.type == "video":
        problems.extend(_video_problem("input.path", config.input.path))
    problems.extend(_music_problems(config))
    problems.extend(_replica_problems(config))
    problems.extend(_midi_problems(config, Path("presets/midi") if midi_dir is None else midi_dir))
    if scenes_dir is not None and config.osc.enabled and _folder_problem("scenes", scenes_dir):
        logger.warning(
            "the scenes folder %s is not writable: /preset/save will fail (loading works)", scenes_dir
        )
    return problems


# --------------------------------------------------------------------------- replicas


def _replica_problems(config: Any) -> list[StartProblem]:
    """``scale``: torch.distributed in this torch build, and every device of ``scale.devices`` here
    (a replica on a missing GPU would fail to load over and over while the show holds its frame)."""
    if config.scale.replicas < 2:
        return []
    import torch.distributed

    from engine.models.device import resolve_device
    from engine.models.errors import ModelLoadError

    if not torch.distributed.is_available():
        return [
            StartProblem(
                "scale.replicas",
                "this torch build has no torch.distributed",
                "install a torch build with it (the PyPI wheels have it), or set scale.replicas: 1",
            )
        ]
    problems = []
    for index, device in enumerate(config.scale.devices):
        try:
            resolve_device(device)
        except ModelLoadError as err:
            fix = "name the devices this machine has (latentstage doctor lists them), or cpu"
            problems.append(StartProblem(f"scale.devices[{index}]", str(err).split(";")[0], fix))
    return problems


# --------------------------------------------------------------------------- musical time


def _music_problems(config: Any) -> list[StartProblem]:
    """The tempo source's and the audio input's optional packages, and the audio file."""
    from engine.tempo.extras import TempoSourceUnavailable

    problems = []
    try:
        if config.tempo.source.value == "midi_clock":
            from engine.tempo.midi_port import import_mido

            import_mido()
        elif config.tempo.source.value == "link":
            from engine.tempo.link import import_link

            import_link()
    except TempoSourceUnavailable as err:
        fix = "or choose tempo.source internal | osc"
        problems.append(StartProblem("tempo.source", str(err).rstrip("."), fix))
    audio = config.audio
    if audio.file is not None:
        path = Path(audio.file)
        if not path.is_file():
            problems.append(StartProblem("audio.file", f"{audio.file!r} is not a file", "name a WAV file"))
        elif path.suffix.lower() != ".wav" and importlib.util.find_spec("soundfile") is None:
            fix = "pip install latentstage[audio], or use a WAV file"
            problems.append(StartProblem("audio.file", f"{path.name} needs soundfile", fix))
    if audio.device is not None and importlib.util.find_spec("sounddevice") is None:
        fix = "pip install latentstage[audio]"
        problems.append(StartProblem("audio.device", "sounddevice is not installed", fix))
    if audio.ndi is not None:
        from bridges.ndi import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            problems.append(StartProblem("audio.ndi", reason, "pip install latentstage[ndi]"))
    return problems


def _midi_problems(config: Any, folder: Path) -> list[StartProblem]:
    """MIDI: the extra (mido and its backend), OSC on (MIDI writes through it), every mapping file."""
    midi = getattr(config, "midi", None)
    if midi is None or not midi.mappings:
        return []
    from engine.midi.mapping import MappingError, load_mapping
    from engine.midi.profile import ProfileError, load_profile
    from engine.midi.service import check_colors, open_backend
    from engine.tempo.extras import TempoSourceUnavailable

    problems = []
    if not config.osc.enabled:
        fix = "set osc.enabled: true"
        problems.append(StartProblem("midi.mappings", "MIDI needs the control service", fix))
    try:
        open_backend(midi.backend)
    except TempoSourceUnavailable as err:
        problems.append(StartProblem("midi.backend", str(err).rstrip("."), "or set midi.mappings: []"))
    for name in midi.mappings:
        try:
            mapping = load_mapping(folder, name)
            if mapping.profile is not None:
                check_colors(mapping, load_profile(folder, mapping.profile), name)
        except (MappingError, ProfileError, ValueError) as err:
            problems.append(StartProblem("midi.mappings", str(err), f"fix {folder / (name + '.yaml')}"))
    return problems


# --------------------------------------------------------------------------- ports


def _configured_ports(config: Any) -> set[int]:
    """Every port the config names (a suggested port must not be the feedback port)."""
    ports = {config.osc.port, *(int(target.rpartition(":")[2]) for target in config.osc.feedback)}
    if config.osc.oscquery_port is not None:
        ports.add(config.osc.oscquery_port)
    ports.update(output.port for output in config.outputs if output.type == "preview")
    return ports


def _port_problem(
    key: str, host: str, port: int, kind: socket.SocketKind, taken: set[int]
) -> list[StartProblem]:
    """A problem when ``host:port`` cannot be bound the way the server binds it."""
    error = _bind_error(host, port, kind)
    if error is None:
        return []
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE or getattr(error, "winerror", None) == 10048:
        free = next_free_port(host, port, kind, taken)
        suggestion = "" if free is None else f", e.g. {_how_to_set(key, free)}"
        return [
            StartProblem(
                key,
                f"{where} is in use (another latentstage or another program)",
                f"stop that program or choose a free port{suggestion}",
            )
        ]
    if error.errno == errno.EADDRNOTAVAIL:
        return [
            StartProblem(
                key, f"{host!r} is not an address of this machine", "use 127.0.0.1, 0.0.0.0 or one of its own"
            )
        ]
    return [
        StartProblem(
            key,
            f"cannot listen on {where} ({error.strerror or error})",
            "choose another port (ports below 1024 need administrator rights)",
        )
    ]


def _bind_error(host: str, port: int, kind: socket.SocketKind) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM and sys.platform != "win32":
                # as the HTTP servers do: a port left in TIME_WAIT by the last run is free
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        return error
    return None


def next_free_port(
    host: str, port: int, kind: socket.SocketKind, taken: set[int] | frozenset[int] = frozenset()
) -> int | None:
    """The first port above ``port``, not in ``taken``, that ``host`` can bind (``None`` within 50)."""
    for candidate in range(port + 1, min(port + PORT_SEARCH, 65535) + 1):
        if candidate not in taken and _bind_error(host, candidate, kind) is None:
            return candidate
    return None


def _how_to_set(key: str, value: int) -> str:
    """``--set osc.port=9001``; an entry of ``outputs`` cannot be set alone, so say where."""
    if key.startswith("outputs["):
        entry, _, field = key.partition("].")
        return f"{field}: {value} in {entry}]"
    return f"--set {key}={value}"


# --------------------------------------------------------------------------- files and folders


def _file_problem(key: str, path: str | os.PathLike[str]) -> list[StartProblem]:
    """A problem when ``path`` cannot be written (its folder is created when missing)."""
    target = Path(path)
    if target.is_dir():
        return [StartProblem(key, f"{str(target)!r} is a folder", "give a file name inside it")]
    problem = _folder_problem(key, target.parent, for_file=target)
    if problem or not target.exists():
        return problem
    try:
        with open(target, "ab"):  # appending changes nothing
            pass
    except OSError as error:
        return [
            StartProblem(
                key,
                f"{str(target)!r} cannot be written ({_reason(error)})",
                "fix its permissions or choose another file",
            )
        ]
    return []


def _folder_problem(
    key: str, folder: str | os.PathLike[str], for_file: Path | None = None
) -> list[StartProblem]:
    """A problem when ``folder`` cannot be created or written (created when missing)."""
    folder = Path(folder)
    what = f" for {str(for_file)!r}" if for_file is not None else ""
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        return [
            StartProblem(
                key,
                f"cannot create the folder {str(folder)!r}{what}: {str(blocker)!r} is a file",
                "choose a path whose folders are folders",
            )
        ]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".latentstage-check-")
    except OSError as error:
        return [
            StartProblem(
                key,
                f"the folder {str(folder)!r}{what} is not writable ({_reason(error)})",
                "fix its permissions or choose a writable folder",
            )
        ]
    os.close(handle)
    os.unlink(probe)
    return []


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing part of ``folder`` when it is a file, not a folder."""
    for part in (folder, *folder.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def _video_problem(key: str, path: str) -> list[StartProblem]:
    target = Path(path)
    if not target.is_file():
        what = "is a folder" if target.is_dir() else "does not exist"
        return [
            StartProblem(
                key, f"{path!r} {what} (looked at {str(target.resolve())!r})", "give the path of a video file"
            )
        ]
    try:
        import av  # the [video] extra; its absence is reported as an unavailable bridge
    except ImportError:
        return []
    try:
        with av.open(str(target)) as container:
            if not container.streams.video:
                return [StartProblem(key, f"{path!r} has no video stream", "give a video file")]
    except (av.error.FFmpegError, OSError) as error:
        return [
            StartProblem(key, f"{path!r} cannot be read as video ({error})", "give a video file PyAV reads")
        ]
    return []


def _recording_problem(key: str, path: str, codec: str, fps: float) -> list[StartProblem]:
    """A recording's container (from the extension) and encoder, tried as the sink will run them."""
    from bridges.base import BridgeUnavailable
    from bridges.record import check_recording

    try:
        problem = check_recording(path, codec, fps)
    except BridgeUnavailable:  # no PyAV: reported as an unavailable bridge before this check
        return []
    if problem is None:
        return []
    return [StartProblem(f"{key}.{problem.option}", problem.problem, f"allowed: {problem.allowed}")]


def _reason(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return "read-only file system"
    return error.strerror or str(error)
