"""Pushes over websockets: OSCQuery's LISTEN / IGNORE as binary OSC, the operator page's state; refusals."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from pythonosc.osc_message import OscMessage

from bridges.preview import PreviewSink
from bridges.webguard import parse_allow, refusal
from engine.control.operator import Operator
from engine.control.oscquery import OscQueryServer
from engine.control.service import ControlService, ControlSettings
from engine.control.transport import build_message
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine
from scripts.osc_peer import free_port
from tests.fakes import FakeSource, pipeline_settings, wait_until

TIMEOUT = 10.0


class Stage:
    """A running engine with its control service (OSC, OSCQuery) and a preview with the operator page."""

    def __init__(self, bundle: Any, tmp_path: Any) -> None:
        self.operator = Operator()
        self.preview = PreviewSink(port=0, operator=self.operator)
        self.pipeline = StreamPipeline(bundle, pipeline_settings(prompt="start", negative_prompt=""))
        self.engine = Engine(self.pipeline, lambda: FakeSource(fps=30), [("preview", lambda: self.preview)])
        settings = ControlSettings(
            port=0,
            feedback=[],
            status_hz=20,
            scenes_dir=str(tmp_path),
            oscquery_port=free_port(socket.SOCK_STREAM),
        )
        self.service = ControlService(
            settings, self.engine.control, self.engine.submit, self.engine.stats.snapshot, self.operator
        )
        assert self.service.oscquery is not None
        self.oscquery_port = self.service.oscquery.port
        self.engine.on_applied = self.service.echo
        self.thread = threading.Thread(target=self.engine.run, daemon=True)

    def __enter__(self) -> Stage:
        self.service.start()
        self.thread.start()
        assert wait_until(lambda: self.preview._frames_sent >= 2, 20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.stop()
        self.thread.join(10)
        self.engine.close()
        self.service.close()
        self.preview.close()

    def osc(self, address: str, args: list[Any]) -> None:
        """Send one OSC message over UDP to the control service, as a control surface does."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(build_message(address, args), ("127.0.0.1", self.service.port))

    def applied(self, name: str) -> Any:
        return self.engine.control.applied().get(name)


@pytest.fixture()
def stage(bundle: Any, tmp_path: Any) -> Iterator[Stage]:
    with Stage(bundle, tmp_path) as running:
        yield running


async def next_osc(ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT) -> OscMessage:
    message = await ws.receive(timeout)
    assert message.type is aiohttp.WSMsgType.BINARY, message
    return OscMessage(message.data)


async def listened(server: OscQueryServer | None, paths: set[str]) -> None:
    """Wait until the server has read the commands: its one websocket listens to exactly ``paths``."""
    assert server is not None

    def current() -> set[str]:
        return {path for listener in list(server._listeners.values()) for path in listener.paths}

    assert await asyncio.to_thread(wait_until, lambda: current() == paths, TIMEOUT), current()


def test_host_info_announces_listen(stage: Stage) -> None:
    async def main() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{stage.oscquery_port}/?HOST_INFO") as reply,
        ):
            assert reply.headers["Content-Type"] == "application/json"
            return dict(await reply.json())

    assert asyncio.run(main())["EXTENSIONS"]["LISTEN"] is True


def test_listen_sends_changes_made_over_osc_as_binary_osc_and_ignore_stops_them(stage: Stage) -> None:
    async def main() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{stage.oscquery_port}/") as ws,
        ):
            await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": "/guidance_scale"}))
            await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": "/seed"}))
            await listened(stage.service.oscquery, {"/guidance_scale", "/seed"})
            stage.osc("/guidance_scale", [1.7])
            message = await next_osc(ws)
            assert message.address == "/guidance_scale"
            assert message.params == [pytest.approx(1.7)]
            stage.osc("/seed", [77])
            message = await next_osc(ws)
            assert (message.address, message.params) == ("/seed", [77])

            await ws.send_str(json.dumps({"COMMAND": "IGNORE", "DATA": "/guidance_scale"}))
            await listened(stage.service.oscquery, {"/seed"})
            stage.osc("/guidance_scale", [2.5])
            assert await asyncio.to_thread(
                wait_until, lambda: stage.applied("guidance_scale") == pytest.approx(2.5), TIMEOUT
            )
            stage.osc("/seed", [78])  # still listened to: it arrives, and nothing came before it
            message = await next_osc(ws)
            assert (message.address, message.params) == ("/seed", [78])

    asyncio.run(main())


def test_a_bad_command_is_ignored_and_the_socket_keeps_working(stage: Stage) -> None:
    async def main() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{stage.oscquery_port}/") as ws,
        ):
            for bad in (
                "not json",
                '{"COMMAND": "SHOUT", "DATA": "/seed"}',
                '{"COMMAND": "LISTEN"}',
                '{"COMMAND": "LISTEN", "DATA": "/no/such/address"}',
                "[1, 2]",
                "[" * 4000,  # deeper than the JSON parser recurses
            ):
                await ws.send_str(bad)
            await ws.send_bytes(b"\x00\x01")
            await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": "/delta"}))
            await listened(stage.service.oscquery, {"/delta"})
            stage.osc("/delta", [0.25])
            message = await next_osc(ws)
            assert message.address == "/delta" and message.params == [pytest.approx(0.25)]

    asyncio.run(main())


def test_the_page_socket_sends_a_snapshot_then_pushes_changes(stage: Stage) -> None:
    async def main() -> None:
        url = f"http://127.0.0.1:{stage.preview.port}/api/ws"
        origin = {"Origin": f"http://127.0.0.1:{stage.preview.port}"}
        async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=origin) as ws:
            kinds: dict[str, dict[str, Any]] = {}
            while {"state", "history"} - set(kinds):
                body = json.loads((await ws.receive(TIMEOUT)).data)
                kinds.setdefault(body["type"], body)
            assert "guidance_scale" in kinds["state"]["values"] and "status" in kinds["state"]
            assert kinds["history"]["append"] is False and "seconds" in kinds["history"]
            stage.osc("/seed", [4242])
            deadline = time.monotonic() + TIMEOUT
            while True:
                body = json.loads((await ws.receive(max(0.1, deadline - time.monotonic()))).data)
                if body["type"] == "state" and body["values"]["seed"] == 4242:
                    break
                if body["type"] == "history":
                    assert body["append"] is True  # only the new samples
            assert time.monotonic() < deadline

    asyncio.run(main())


async def refused_status(url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with session.ws_connect(url, headers=headers):
                pass
        return refused.value.status


def test_upgrades_from_a_foreign_host_or_origin_are_refused(stage: Stage) -> None:
    page = f"http://127.0.0.1:{stage.preview.port}/api/ws"
    oscquery = f"http://127.0.0.1:{stage.oscquery_port}/"
    for url, port in ((page, stage.preview.port), (oscquery, stage.oscquery_port)):
        assert asyncio.run(refused_status(url, {"Host": f"evil.example:{port}"})) == 403
        assert asyncio.run(refused_status(url, {"Origin": "http://evil.example"})) == 403
        assert asyncio.run(refused_status(url, {"Origin": f"http://localhost:{port}"})) == 403


def test_the_allow_list_refuses_other_clients() -> None:
    allow = parse_allow(["192.168.1.0/24"], "osc")
    host = {"Host": "192.168.1.2:9002"}
    assert refusal(host, "192.168.1.44", allow) is None
    assert refusal(host, "127.0.0.1", allow) is None
    assert refusal(host, "10.0.0.5", allow) == ("client", "not in the allow-list")
    assert refusal({"Host": "evil.example"}, "127.0.0.1", allow)[0] == "host"  # type: ignore[index]


def web_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.endswith("-web") or "asyncio" in t.name}


def test_close_with_a_listener_connected_is_clean_twice_and_frees_the_port() -> None:
    before = web_threads()
    server = OscQueryServer(lambda: {"guidance_scale": 1.0}, lambda: {}, "127.0.0.1", 9000, port=0)
    server.start()
    port = server.port

    async def main() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/") as ws:
            await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": "/guidance_scale"}))
            await listened(server, {"/guidance_scale"})
            server.changed({"guidance_scale": 3.5})
            assert (await next_osc(ws)).params == [pytest.approx(3.5)]
            start = time.monotonic()
            await asyncio.to_thread(server.close)
            server.close()
            assert time.monotonic() - start < 3.0
            return await ws.receive(TIMEOUT)

    assert asyncio.run(main()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert wait_until(lambda: web_threads() <= before, 5), web_threads() - before
    again = OscQueryServer(lambda: {}, lambda: {}, "127.0.0.1", 9000, port=port)  # the port is free again
    again.close()


def test_the_page_socket_says_offline_before_the_service_and_closes_with_the_sink() -> None:
    before = web_threads()
    sink = PreviewSink(port=0, operator=Operator())

    async def main() -> aiohttp.WSMessage:
        url = f"http://127.0.0.1:{sink.port}/api/ws"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            body = json.loads((await ws.receive(TIMEOUT)).data)
            assert body == {"type": "offline", "error": "the control service is not running yet"}
            start = time.monotonic()
            await asyncio.to_thread(sink.close)
            assert time.monotonic() - start < 3.0
            message = await ws.receive(TIMEOUT)
            while message.type is aiohttp.WSMsgType.TEXT:  # what was pushed before the close
                message = await ws.receive(TIMEOUT)
            return message

    assert asyncio.run(main()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    sink.close()
    assert wait_until(lambda: web_threads() <= before, 5), web_threads() - before
