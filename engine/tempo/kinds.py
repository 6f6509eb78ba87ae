"""What the musical time shares with its readers: where the tempo comes from, and its status."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TempoSource(str, Enum):
    """Where the tempo comes from (``tempo.source``)."""

    INTERNAL = "internal"  # tempo.bpm; /tempo/bpm, taps and the page adjust it
    OSC = "osc"  # the same, and Resolume's tempo controller addresses are followed
    MIDI_CLOCK = "midi_clock"  # 24 pulses per beat on a MIDI input (extra: midi)
    LINK = "link"  # an Ableton Link session, read-only (extra: link)

    @property
    def external(self) -> bool:
        """The tempo belongs to another device: /tempo/bpm, taps and resync are refused."""
        return self in (TempoSource.MIDI_CLOCK, TempoSource.LINK)


@dataclass(frozen=True)
class MusicStatus:
    """The musical time as the latest frame saw it (swapped whole; read by any thread).

    ``beat`` is the position at ``time`` (``time.monotonic()``); ``modulated``: the values the
    modulators gave that frame, by parameter name.
    """

    bpm: float
    beat: float
    beats_per_bar: int
    time: float
    sequence_step: int = -1
    modulated: dict[str, Any] = field(default_factory=dict)

    def beat_at(self, t: float) -> float:
        """The beat position at ``t``, extrapolated at ``bpm``."""
        return self.beat + (t - self.time) * self.bpm / 60.0

    def next_beat(self, t: float) -> float:
        """The time of the first whole beat after ``t``."""
        position = self.beat_at(t)
        return t + (math.floor(position) + 1 - position) * 60.0 / self.bpm
