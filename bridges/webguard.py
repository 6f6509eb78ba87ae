"""Who may talk to the engine's web listeners: the Host check (DNS rebinding), Origin, the allow-list."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_loopback(address: str) -> bool:
    """Whether a bound IP address is reachable only from this machine."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def known_host(host: str) -> bool:
    """An IP literal, localhost or this machine's own name, plain, fully qualified or mDNS
    (``name.local``): what a browser on stage shows for us."""
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    if host in names or host.removesuffix(".local") in names:
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def parse_allow(entries: Sequence[str], what: str) -> list[Network]:
    """``osc.allow`` entries as networks; ``ValueError`` naming the bad entry and what is allowed."""
    try:
        return [ipaddress.ip_network(entry, strict=False) for entry in entries]
    except ValueError as err:
        raise ValueError(
            f"{what} allow: {err}; allowed: IP addresses or networks like 192.168.1.0/24"
        ) from err


def client_allowed(allow: Sequence[Network], client: str) -> bool:
    """Whether ``client`` (an IP address) may be served: loopback always, anyone when there is no
    allow-list (the listener is bound to this machine then), else the addresses in ``allow``."""
    if is_loopback(client) or not allow:
        return True
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


def refusal(headers: Mapping[str, str], client: str, allow: Sequence[Network]) -> tuple[str, str] | None:
    """``(kind, why)`` when a request must be refused with 403: a ``Host`` other than an address,
    localhost or this machine's name (a DNS rebinding page would otherwise be "same origin"), or
    a client outside the allow-list; ``None`` when it may be served."""
    host = urlsplit(f"//{headers.get('Host', '')}").hostname or ""
    if not known_host(host):
        return "host", f"Host {host[:100]!r} is not this machine's address or name"
    if not client_allowed(allow, client):
        return "client", "not in the allow-list"
    return None


def foreign_origin(headers: Mapping[str, str]) -> str | None:
    """The ``Origin`` of a request from another site's page (a browser sends it with every
    cross-site POST and every websocket), ``None`` when it is absent or this very host."""
    origin = headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != headers.get("Host", ""):
        return origin
    return None


def cross_site(headers: Mapping[str, str]) -> str | None:
    """Why a read that does work (opens a source) must be refused: a foreign ``Origin`` (a
    script's request from another site), or ``Sec-Fetch-Site`` saying another site (or another
    port of this one) asked, which a browser sends where it sends no ``Origin`` (an ``<img>``);
    ``None`` for the page itself or a request typed or sent by a program."""
    origin = foreign_origin(headers)
    if origin is not None:
        return f"cross-origin request from {origin[:100]!r} refused"
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"{site[:20]!r} request refused: only the operator page itself may ask"
    return None
