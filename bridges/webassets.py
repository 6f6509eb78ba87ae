"""Web page files from a folder, served with their content type, an ETag and revalidation."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
#: Everything from this origin only: no inline script or style, no other site's code; the MJPEG
#: images and the websocket are the same origin (``'self'`` covers ``ws:`` to it).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class StaticFiles:
    """The files ``names`` of ``folder`` (read once), each answered with its content type,
    ``Cache-Control: no-cache`` and an ``ETag``: a browser revalidates and gets 304 while the
    file is unchanged. ``ValueError`` for a name with an extension that has no content type."""

    def __init__(self, folder: Path, names: Mapping[str, str]) -> None:
        """``names``: URL path → file name in ``folder`` (e.g. ``{"/": "index.html"}``)."""
        self.folder = folder
        self._files: dict[str, tuple[bytes, str, str]] = {}
        for path, name in names.items():
            suffix = Path(name).suffix
            if suffix not in CONTENT_TYPES:
                raise ValueError(
                    f"{name}: no content type for {suffix!r}; allowed: {', '.join(CONTENT_TYPES)}"
                )
            body = (folder / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self._files[path] = (body, CONTENT_TYPES[suffix], etag)

    def __contains__(self, path: str) -> bool:
        return path in self._files

    def body(self, path: str) -> bytes:
        return self._files[path][0]

    def response(self, path: str, if_none_match: str | None) -> web.Response:
        """The file at URL ``path`` (``KeyError`` when there is none), or 304 when the browser's
        copy (``If-None-Match``) is current."""
        body, content_type, etag = self._files[path]
        headers = {"Cache-Control": "no-cache", "ETag": etag, **SECURITY_HEADERS}
        if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(",")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={"Content-Type": content_type, **headers})
