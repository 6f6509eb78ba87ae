"""OSC over UDP: the receiving socket thread with its allow-list, and the feedback sender."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder

from bridges.ratelimit import RateLimitedLog
from engine.control.dispatch import OscDispatcher, Reply

logger = logging.getLogger(__name__)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
POLL_S = 0.2
"""The receiving thread looks at its stop flag at least this often."""
MIN_WAIT_S = 0.0005
"""The shortest socket wait before a timed message is due (a zero timeout would not block)."""


def parse_allow(entries: Sequence[str]) -> tuple[IpNetwork, ...]:
    """Addresses or CIDR networks → networks; an empty list means loopback only."""
    if not entries:
        return LOOPBACK
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def parse_target(text: str) -> tuple[str, int]:
    """``host:port`` → ``(host, port)`` (the config validated the form)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def build_message(address: str, args: Sequence[Any]) -> bytes:
    """One OSC message; ints as ``i``, floats as ``f``, text as ``s``."""
    builder = OscMessageBuilder(address)
    for arg in args:
        if isinstance(arg, bool):
            builder.add_arg(int(arg), OscMessageBuilder.ARG_TYPE_INT)
        elif isinstance(arg, int):
            builder.add_arg(arg, OscMessageBuilder.ARG_TYPE_INT)
        elif isinstance(arg, float):
            builder.add_arg(arg, OscMessageBuilder.ARG_TYPE_FLOAT)
        else:
            builder.add_arg(str(arg), OscMessageBuilder.ARG_TYPE_STRING)
    return bytes(builder.build().dgram)


class FeedbackSender:
    """Sends OSC messages to the feedback targets (and replies to a sender)."""

    def __init__(self, targets: Sequence[tuple[str, int]]) -> None:
        self.targets = list(targets)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger, 5.0)
        self.sent = 0
        self._closed = False

    def send(self, address: str, args: Sequence[Any], to: Sequence[tuple[str, int]] | None = None) -> None:
        """Send one message to ``to`` (default: every feedback target); never raises."""
        data = build_message(address, args)
        with self._lock:
            if self._closed:
                return
            for target in self.targets if to is None else to:
                try:
                    self._socket.sendto(data, target)
                    self.sent += 1
                except OSError as err:
                    self._log(logging.WARNING, f"{target}", "feedback to %s:%s failed: %s", *target, err)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._socket.close()


class OscUdpServer:
    """Receives OSC datagrams on ``host:port`` in its own thread.

    Only senders inside ``allow`` are obeyed (loopback only when the list is empty); the
    rest are dropped and counted. Replies from the dispatcher go to the sender and/or the
    feedback targets.
    """

    def __init__(
        self,
        dispatcher: OscDispatcher,
        feedback: FeedbackSender,
        host: str = "127.0.0.1",
        port: int = 9000,
        allow: Sequence[str] = (),
        max_datagram: int = 65507,
    ) -> None:
        self.dispatcher = dispatcher
        self.feedback = feedback
        self.allow = parse_allow(allow)
        self.max_datagram = max_datagram
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            raise OSError(
                f"OSC cannot listen on {host}:{port} ({err.strerror}); is another engine running? "
                "Pick another port with --set osc.port=9010"
            ) from err
        # room for bursts (a fader flood, a bundle storm) while the engine holds the GIL
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._socket.settimeout(POLL_S)
        self.host, self.port = self._socket.getsockname()[:2]
        self.disallowed = 0
        self._log = RateLimitedLog(logger, 5.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="latentstage-osc", daemon=True)
        self.on_datagram: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread.start()
        logger.info("OSC listening on %s:%s", self.host, self.port)

    def close(self) -> None:
        """Stop receiving; safe twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        self._socket.close()

    def allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        address = mapped or address
        return any(address in network for network in self.allow)

    def _serve(self) -> None:
        while not self._stop.is_set():
            # wake for the next message of a timed bundle, or now and then to see the stop flag
            due = self.dispatcher.seconds_to_next_due()
            self._socket.settimeout(POLL_S if due is None else min(POLL_S, max(MIN_WAIT_S, due)))
            try:
                data, sender = self._socket.recvfrom(self.max_datagram)
            except TimeoutError:
                self.run_due()
                continue
            except OSError as err:
                if self._stop.is_set():
                    return
                self._log(logging.WARNING, "recv", "OSC receive failed: %s", err)
                continue
            self.handle(data, (sender[0], sender[1]))
            self.run_due()

    def run_due(self) -> None:
        """Apply the messages of timed bundles whose time has come; answer their senders."""
        for reply, sender in self.dispatcher.run_due():
            self._send_reply(reply, sender)

    def handle(self, data: bytes, sender: tuple[str, int]) -> None:
        """One datagram: allow-list, dispatch, replies."""
        if not self.allowed(sender[0]):
            self.disallowed += 1
            self.dispatcher.counters.disallowed += 1
            self._log(
                logging.WARNING, f"deny {sender[0]}", "OSC from %s dropped: not in osc.allow", sender[0]
            )
            return
        for reply in self.dispatcher.handle_datagram(data, sender):
            self._send_reply(reply, sender)
        if self.on_datagram is not None:
            self.on_datagram()

    def _send_reply(self, reply: Reply, sender: tuple[str, int]) -> None:
        if reply.to_feedback:
            self.feedback.send(reply.address, reply.args)
        # to the sender too, unless the feedback just went there already
        if reply.to_sender and not (reply.to_feedback and sender in self.feedback.targets):
            self.feedback.send(reply.address, reply.args, to=[sender])
