"""`latentstage midi ports` and `latentstage midi check`: what a VJ sees before the show."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.midi.mapping import MappingError, load_mapping, mapping_names
from engine.midi.profile import ProfileError, load_profile
from engine.midi.service import by_prefix, check_colors, open_backend, port_names
from engine.midi.surface import describe
from engine.tempo.extras import TempoSourceUnavailable


def no_ports_reason(platform: str = sys.platform, seq: Path = Path("/dev/snd/seq")) -> str:
    """Why a machine may list no MIDI ports, and what to do, for ``platform``."""
    if platform.startswith("linux"):
        if not seq.exists():
            return (
                f"{seq} does not exist: this machine has no ALSA sequencer (no sound devices, or the "
                "snd-seq module is not loaded: sudo modprobe snd-seq); a container needs --device /dev/snd"
            )
        return "no MIDI device is plugged in (a virtual one: sudo modprobe snd-virmidi)"
    if platform == "win32":
        return (
            "no MIDI device is plugged in; Windows has no virtual ports of its own: loopMIDI "
            "(Tobias Erichsen) makes one that other programs can send to"
        )
    if platform == "darwin":
        return (
            "no MIDI device is plugged in; for a virtual port, enable the IAC Driver in Audio MIDI "
            "Setup (Window > Show MIDI Studio > IAC Driver > Device is online)"
        )
    return "no MIDI device is plugged in"


def ports_report(backend_name: str | None, folder: Path) -> tuple[str, bool]:
    """The inputs and outputs, which mapping in ``folder`` would take each; whether any was found."""
    try:
        backend = open_backend(backend_name)
        inputs, outputs = port_names(backend)
    except TempoSourceUnavailable as err:
        return str(err), False
    except (OSError, RuntimeError) as err:
        return f"MIDI ports cannot be listed: {err}", False
    if not inputs and not outputs:
        return f"no MIDI ports: {no_ports_reason()}", False
    mappings = {}
    for name in mapping_names(folder):
        try:
            mappings[name] = load_mapping(folder, name)
        except MappingError:
            continue
    lines = [f"MIDI ports ({backend.name}):"]
    for kind, names, prefix_of in (("in ", inputs, "input"), ("out", outputs, "output")):
        for port in names:
            taken = [
                m for m, mapping in mappings.items() if by_prefix(getattr(mapping, prefix_of), [port]) == port
            ]
            used = f"   <- mapping {', '.join(taken)}" if taken else ""
            lines.append(f"  {kind}  {port}{used}")
    return "\n".join(lines), True


def check_report(folder: Path, name: str) -> tuple[str, bool]:
    """Mapping ``name`` checked with its profile: its bindings, or the error naming the key."""
    try:
        mapping = load_mapping(folder, name)
        profile = None if mapping.profile is None else load_profile(folder, mapping.profile)
        if profile is not None:
            check_colors(mapping, profile, name)
    except (MappingError, ProfileError, ValueError) as err:
        return str(err), False
    lines = [
        f"midi mapping {name!r}: input {mapping.input!r}, output {mapping.output!r}, "
        f"profile {profile.name if profile else 'none'}; {len(mapping.bindings)} bindings"
    ]
    for binding in mapping.bindings:
        argument = "" if binding.argument is None else f" {binding.argument}"
        lines.append(f"  {describe(binding):<24} -> {binding.target}{argument} ({binding.mode.value})")
    return "\n".join(lines), True
