"""Prompt sequences: a list of prompts (or blends) that steps every N beats or bars, on the beat grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine import params
from engine.modulation.rate import Rate, RateUnit, parse_rate

MAX_STEPS = 64
MAX_CROSSFADE_BEATS = 64.0
EVERY_TEXT = "a number of beats or bars, e.g. '1bar', '4bars', '2beats', '1/2bar'"


class SequenceSpec(BaseModel):
    """A prompt sequence as configured in YAML or sent over OSC.

    Attributes:
        steps: each a prompt (text) or a blend (a list of ``[prompt, weight]`` pairs).
        every: how long each step plays, in beats or bars (steps change on multiples of it counted
            from beat 0, so a ``1bar`` sequence changes on the downbeats).
        crossfade: beats over which each new step fades in (0: a cut).
        loop: after the last step, the first again (else the last stays and the sequence stops).
        autostart: start as soon as the sequence is set (from the config, a scene, a restart).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: list[Any] = Field(min_length=1, max_length=MAX_STEPS)
    every: str = "1bar"
    crossfade: float = Field(default=0.0, ge=0.0, le=MAX_CROSSFADE_BEATS)
    loop: bool = True
    autostart: bool = False

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[Any]) -> list[Any]:
        checked: list[Any] = []
        for index, step in enumerate(steps):
            if not isinstance(step, (str, list, tuple)):
                raise ValueError(
                    f"step {index}: {step!r:.40} is neither a prompt nor a blend; allowed: text, or a "
                    "list of [prompt, weight] pairs"
                )
            name = "prompt" if isinstance(step, str) else "prompt_blend"
            try:
                value = params.REGISTRY[name].coerce(step)
            except params.ParamError as err:
                raise ValueError(f"step {index}: {err}") from None
            checked.append(value if isinstance(value, str) else [list(pair) for pair in value])
        return checked

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> str:
        rate = parse_rate(value)
        if rate.unit is RateUnit.SECONDS:
            raise ValueError(f"every {value!r} is in Hz; allowed: {EVERY_TEXT}")
        return str(rate)

    @property
    def every_rate(self) -> Rate:
        return parse_rate(self.every)

    def period_beats(self, beats_per_bar: int) -> float:
        """The length of one step in beats."""
        rate = self.every_rate
        return rate.period * (beats_per_bar if rate.unit is RateUnit.BARS else 1)

    def change(self, step: int) -> dict[str, Any]:
        """The live change that plays ``step``: ``prompt`` or ``prompt_blend``."""
        value = self.steps[step]
        if isinstance(value, str):
            return {"prompt": value}
        return {"prompt_blend": [tuple(pair) for pair in value]}


def check_sequence(value: Any) -> dict[str, Any] | None:
    """The registry's check of ``sequence``: a mapping (``None``: no sequence) in canonical plain
    form; a ValueError naming the field and what is allowed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"{value!r:.60} is not a mapping; allowed: {{steps: [...], every: 1bar, crossfade: 0}}"
        )
    try:
        spec = SequenceSpec.model_validate(value)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise
        first = errors()[0]
        where = ".".join(str(part) for part in first["loc"][:2])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}") from None
    return spec.model_dump(mode="json", exclude_defaults=True) | {"steps": list(spec.steps)}


@dataclass(frozen=True)
class Step:
    """Step ``index`` begins at beat ``beat`` (on the clock's beat line)."""

    index: int
    beat: float


class Sequencer:
    """Where a sequence is: the step playing and the next one with the beat it begins on.

    Pure bookkeeping on the beat line (no clock, no threads): the runtime asks ``upcoming`` for
    the next step, schedules its change to be seen at that beat, and calls ``reached`` once it
    has been committed. Steps begin on multiples of ``every`` counted from beat 0.
    """

    def __init__(self, spec: SequenceSpec, beats_per_bar: int) -> None:
        self.spec = spec
        self.period = spec.period_beats(beats_per_bar)
        self.playing = -1  # the step playing (-1: none yet)
        self._next: Step | None = None

    @property
    def running(self) -> bool:
        return self._next is not None

    def boundary_after(self, beat: float) -> float:
        """The first step boundary at or after ``beat``."""
        return math.ceil(beat / self.period - 1e-9) * self.period

    def start(self, step: int, beat: float) -> Step:
        """Play ``step`` from beat ``beat`` (the caller picks it: now, or the next quantum); it
        replaces whatever was to come next (a jump)."""
        self._next = Step(self._check(step), beat)
        return self._next

    def stop(self) -> None:
        self._next = None

    def upcoming(self) -> Step | None:
        """The next step to play and its beat (``None``: stopped)."""
        return self._next

    def reached(self) -> Step | None:
        """The upcoming step is now playing; the one after it is upcoming (``None``: the end of a
        sequence without ``loop``, which stops)."""
        assert self._next is not None, "reached() while stopped"
        current = self._next
        self.playing = current.index
        following = current.index + 1
        if following >= len(self.spec.steps):
            if not self.spec.loop:
                self._next = None
                return None
            following = 0
        self._next = Step(following, self.boundary_after(current.beat + self.period * 0.5))
        return self._next

    def _check(self, step: int) -> int:
        count = len(self.spec.steps)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < count:
            raise ValueError(f"step {step!r} is not in the sequence; allowed: 0..{count - 1}")
        return step
