"""The operator page's files (``static/``: HTML, a JavaScript module, a stylesheet) as served."""

from __future__ import annotations

from pathlib import Path

from bridges.webassets import StaticFiles

STATIC = Path(__file__).with_name("static")
#: URL path → file; ``/`` is the page, the others are what it links.
OPERATOR_FILES = {"/": "index.html", "/operator.js": "operator.js", "/operator.css": "operator.css"}


def operator_page() -> StaticFiles:
    """The operator page's files, read now (``OSError`` when the package lacks them)."""
    return StaticFiles(STATIC, OPERATOR_FILES)
