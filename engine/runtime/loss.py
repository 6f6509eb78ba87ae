"""What the outputs show while the input source is gone (torch-free, so the config can use it)."""

from __future__ import annotations

from enum import Enum


class OnLossMode(str, Enum):
    """What the outputs show while the source is gone."""

    HOLD = "hold"  # the last output frame
    BLACK = "black"  # black frames
    PASSTHROUGH = "passthrough"  # the last input frame, unprocessed
