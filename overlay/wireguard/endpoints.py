"""Peer endpoints: canonical direct endpoints and the bounded per-peer endpoint set.

A direct endpoint is the plain tuple `(ip_str, port)` with the canonical IP
string (IPv6 without brackets, IPv4-mapped IPv6 shown as IPv4). The core
treats endpoints as opaque hashable values; later, relayed endpoints (through
a TURN allocation) will be another hashable type.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Hashable, Iterable

Endpoint = Hashable
DirectEndpoint = tuple[str, int]

MAX_LEARNED_ENDPOINTS = 8


def direct_endpoint(host: str, port: int) -> DirectEndpoint:
    """Canonical `(ip_str, port)`; raises ValueError naming the bad part."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"endpoint address {host!r} is not an IP address") from None
    if not 0 < int(port) < 65536:
        raise ValueError(f"endpoint port {port!r} out of range")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(port))


def from_sockaddr(addr: tuple) -> DirectEndpoint:
    """Endpoint for an address returned by recvfrom/recvmsg (either family)."""
    host = addr[0]
    if ":" in host and (host.startswith("::ffff:") or "%" in host):
        return direct_endpoint(host.split("%", 1)[0], addr[1])
    return (host, addr[1])


def to_sockaddr(endpoint: DirectEndpoint) -> tuple[int, tuple]:
    """(address family, sockaddr) to send to a direct endpoint."""
    host, port = endpoint
    if ":" in host:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """Stable bytes naming an endpoint, for cookies (which bind to the source address)."""
    if isinstance(endpoint, tuple) and len(endpoint) == 2 and isinstance(endpoint[0], str):
        try:
            return ipaddress.ip_address(endpoint[0]).packed + int(endpoint[1]).to_bytes(2, "big")
        except ValueError:
            pass
    return repr(endpoint).encode()


def normalize(endpoint: Endpoint) -> Endpoint:
    """Canonicalise direct endpoints given as tuples; leave other kinds untouched."""
    if isinstance(endpoint, tuple) and len(endpoint) in (2, 4) and isinstance(endpoint[0], str):
        return direct_endpoint(endpoint[0], endpoint[1])
    return endpoint


class EndpointSet:
    """A peer's endpoints: configured ones (replaced as a group) plus learned ones.

    Learned endpoints come from authenticated packets (roaming) and are bounded:
    the least recently confirmed is evicted first, which answers the "memory
    bounded list" question of the multi-endpoint RFC thread.
    """

    __slots__ = ("configured", "learned", "active", "max_learned", "failed_at")

    def __init__(self, max_learned: int = MAX_LEARNED_ENDPOINTS):
        self.configured: list[Endpoint] = []
        self.learned: list[Endpoint] = []
        self.active: Endpoint | None = None
        self.max_learned = max_learned
        # endpoint -> core time of the last send error, to skip it when failing over
        self.failed_at: dict[Endpoint, float] = {}

    def all(self) -> list[Endpoint]:
        seen = set(self.configured)
        return self.configured + [e for e in self.learned if e not in seen]

    def set_configured(self, endpoints: Iterable[Endpoint]) -> None:
        new: list[Endpoint] = []
        for e in endpoints:
            e = normalize(e)
            if e not in new:
                new.append(e)
        self.configured = new
        # Configured addresses are no longer "learned" ones.
        self.learned = [e for e in self.learned if e not in new]
        self.failed_at = {e: t for e, t in self.failed_at.items() if e in new or e in self.learned}
        if new and self.active not in new:
            # As with `wg set ... endpoint`, setting endpoints makes one of them current.
            self.active = new[0]
        elif not new and self.active is not None and self.active not in self.learned:
            self.active = self.learned[-1] if self.learned else None

    def confirm(self, endpoint: Endpoint) -> None:
        """An authenticated packet came from `endpoint`: make it the active one (roaming)."""
        self.failed_at.pop(endpoint, None)
        if endpoint == self.active:
            return
        self.active = endpoint
        if endpoint in self.configured:
            return
        if endpoint in self.learned:
            self.learned.remove(endpoint)
        self.learned.append(endpoint)
        while len(self.learned) > self.max_learned:
            evicted = self.learned.pop(0)
            self.failed_at.pop(evicted, None)

    def ordered_for_handshake(self) -> list[Endpoint]:
        """Active endpoint first (happy-eyeballs head start), then the others in order."""
        all_ = self.all()
        if self.active is not None and self.active in all_:
            all_.remove(self.active)
            return [self.active, *all_]
        if self.active is not None:
            return [self.active, *all_]
        return all_
