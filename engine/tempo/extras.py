"""The one error a tempo source raises when its optional package is missing."""

from __future__ import annotations


class TempoSourceUnavailable(RuntimeError):
    """A tempo source cannot run here: its optional package is missing.

    The message is one line that names the extra to install, e.g. ``pip install latentstage[midi]``.
    """


def missing_extra(extra: str, what: str, reason: str) -> TempoSourceUnavailable:
    """``<what> is not available here: <reason>. Install it with `pip install latentstage[<extra>]`.``"""
    return TempoSourceUnavailable(
        f"{what} is not available here: {reason}. Install it with `pip install latentstage[{extra}]`."
    )
