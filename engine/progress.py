"""Progress lines of long work (model load, export, engine build, bench): shown once."""

from __future__ import annotations

import logging
from collections.abc import Callable

Progress = Callable[[str], None]
"""Shows one progress line (the CLI prints it under the status line)."""


def report(log: logging.Logger, progress: Progress | None, text: str) -> None:
    """Hand ``text`` to ``progress``; without one, log it at INFO.

    With a callback the line is logged at DEBUG only, so a terminal never shows it twice.
    """
    if progress is None:
        log.info("%s", text)
    else:
        log.debug("%s", text)
        progress(text)
