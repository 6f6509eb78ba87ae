"""The web pages as files: no inline code, served with content types, CSP and ETags, linted by ESLint."""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bridges.preview import PreviewSink
from bridges.webassets import CONTENT_SECURITY_POLICY
from engine.control.operator import Operator

REPO = Path(__file__).resolve().parents[1]
OPERATOR_STATIC = REPO / "engine" / "control" / "web" / "static"
PREVIEW_STATIC = REPO / "bridges" / "static"
PAGES = [OPERATOR_STATIC / "index.html", PREVIEW_STATIC / "preview.html"]
SCRIPTS = sorted([*OPERATOR_STATIC.glob("*.js"), *PREVIEW_STATIC.glob("*.js")])
ESLINT = REPO / ".tools" / "node_modules" / ".bin" / "eslint"


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_have_no_inline_script_style_or_handler(page: Path):
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", html, re.IGNORECASE), "an inline style attribute"
    assert "<style" not in html, "an inline stylesheet"
    for script in re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.DOTALL):
        assert not script.strip(), "an inline script"
    assert re.search(r'<script type="module" src="/[a-z]+\.js"></script>', html), "the page's module"
    assert re.search(r'<link rel="stylesheet" href="/[a-z]+\.css">', html), "the page's stylesheet"


def test_the_static_files_are_package_data():
    project = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    package_data = project.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"control/web/static/*"' in package_data and 'bridges = ["static/*"]' in package_data
    dependencies = project.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert '"aiohttp>=' in dependencies  # the preview is part of the default run


@pytest.mark.parametrize(
    ("operated", "path", "content_type"),
    [
        (True, "/", "text/html; charset=utf-8"),
        (True, "/operator.js", "text/javascript"),
        (True, "/operator.css", "text/css"),
        (False, "/", "text/html; charset=utf-8"),
        (False, "/preview.js", "text/javascript"),
        (False, "/preview.css", "text/css"),
    ],
)
def test_files_are_served_with_type_csp_and_revalidation(operated: bool, path: str, content_type: str):
    with PreviewSink(port=0, operator=Operator() if operated else None) as sink:
        status, headers, body = fetch(sink.port, path)
        assert status == 200 and body
        assert headers["content-type"].startswith(content_type)
        assert headers["cache-control"] == "no-cache" and headers["etag"].startswith('"')
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "default-src 'self'" in CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
        again = fetch(sink.port, path, {"If-None-Match": headers["etag"]})
        assert again[0] == 304 and again[2] == b""
        assert fetch(sink.port, path, {"If-None-Match": '"stale"'})[0] == 200


def test_the_operator_page_links_its_module_and_the_plain_page_stays_at_preview():
    with PreviewSink(port=0, operator=Operator()) as sink:
        page = fetch(sink.port, "/")[2].decode()
        assert '<script type="module" src="/operator.js"></script>' in page
        assert "<title>latentstage preview</title>" in fetch(sink.port, "/preview")[2].decode()


@pytest.mark.skipif(
    not ESLINT.exists() or shutil.which("node") is None,
    reason="ESLint is not installed in .tools/node_modules (bash scripts/install-test-tools.sh installs "
    "it where npm exists)",
)
def test_eslint_passes_on_the_pages_javascript():
    assert SCRIPTS, "no JavaScript found"
    done = subprocess.run(
        [str(ESLINT), "--max-warnings", "0", *map(str, SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
]


def test_malformed_requests_get_400_and_no_traceback_in_the_log(caplog: pytest.LogCaptureFixture):
    """aiohttp's own server log says ERROR with a traceback for each; ours keeps it to DEBUG."""
    caplog.set_level(logging.DEBUG)
    with PreviewSink(port=0) as sink:
        caplog.clear()  # "preview at ..."
        for payload in MALFORMED * 10:
            with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as client:
                client.sendall(payload)
                assert client.recv(12) == b"HTTP/1.0 400"
        assert fetch(sink.port, "/")[0] == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
