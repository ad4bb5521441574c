"""Peer endpoints: canonical direct endpoints and the bounded per-peer endpoint set.

A direct endpoint is the plain tuple `(ip_str, port)` with the canonical IP
string (IPv6 without brackets, IPv4-mapped IPv6 shown as IPv4). The core
treats endpoints as opaque hashable values; a relayed endpoint (through our
own TURN allocation) is a `RelayEndpoint`.

Besides configured and learned endpoints, a peer known from a rendezvous has
candidate endpoints (its host, server-reflexive and relayed addresses), each
with a kind, replaced as a group whenever the peer publishes new candidates.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

Endpoint = Hashable
DirectEndpoint = tuple[str, int]

MAX_LEARNED_ENDPOINTS = 8
MAX_CANDIDATE_ENDPOINTS = 24  # the rendezvous allows 32 candidates; a few relayed variants come on top

# Endpoint kinds as `overlay status` shows them.
KIND_CONFIGURED = "configured"
KIND_LEARNED = "learned"
KIND_HOST = "host"
KIND_SRFLX = "srflx"
KIND_RELAY = "relay"
KIND_PRFLX = "prflx"
# How long a direct active endpoint must have been silent before an authenticated
# packet from a relay-kind source may pull the peer back onto the relay.
RELAY_ROAM_HOLD = 5.0
# An endpoint left on a send or ICMP error is not roamed back onto for this long:
# packets the peer sent from it before the failure may still arrive after it.
FAILED_ROAM_HOLD = 1.0
MAX_HEARD = 64  # "last heard" times kept per peer before unknown sources are forgotten


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """Send through OUR TURN allocation on `server` to `peer` (both canonical (ip, port)).

    Packets that arrive through that allocation from `peer` carry this endpoint as
    their source, so answers go back the same way.
    """

    server: tuple[str, int]
    peer: tuple[str, int]

    def __str__(self) -> str:
        return f"{format_direct(self.peer)} via {format_direct(self.server)}"


def format_direct(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    """A peer's endpoints: configured ones and candidates (each replaced as a group)
    plus learned ones.

    Learned endpoints come from authenticated packets (roaming) and are bounded:
    the least recently confirmed is evicted first, which answers the "memory
    bounded list" question of the multi-endpoint RFC thread. Candidates are bounded
    by MAX_CANDIDATE_ENDPOINTS.
    """

    __slots__ = (
        "active",
        "candidates",
        "configured",
        "failed_at",
        "heard",
        "kinds",
        "learned",
        "left_by_choice",
        "max_learned",
    )

    def __init__(self, max_learned: int = MAX_LEARNED_ENDPOINTS):
        self.configured: list[Endpoint] = []
        self.candidates: list[Endpoint] = []
        self.learned: list[Endpoint] = []
        self.active: Endpoint | None = None
        self.max_learned = max_learned
        # endpoint -> core time of the last send error, to skip it when failing over
        self.failed_at: dict[Endpoint, float] = {}
        # candidate endpoint -> its kind (host / srflx / relay)
        self.kinds: dict[Endpoint, str] = {}
        # endpoint -> core time of the last authenticated packet from it
        self.heard: dict[Endpoint, float] = {}
        # endpoint -> until when the peer's packets from it do not pull us back onto
        # it: we left it for a better one (paths.reconsider), and the peer may not
        # have followed yet.
        self.left_by_choice: dict[Endpoint, float] = {}

    def all(self) -> list[Endpoint]:
        out = list(self.configured)
        seen = set(out)
        for e in self.candidates:
            if e not in seen:
                seen.add(e)
                out.append(e)
        return out + [e for e in self.learned if e not in seen]

    def set_configured(self, endpoints: Iterable[Endpoint]) -> None:
        new: list[Endpoint] = []
        for e in endpoints:
            e = normalize(e)
            if e not in new:
                new.append(e)
        self.configured = new
        # Configured addresses are no longer "learned" ones.
        self.learned = [e for e in self.learned if e not in new]
        self._prune()
        if new and self.active not in new:
            # As with `wg set ... endpoint`, setting endpoints makes one of them current.
            self.active = new[0]
        elif not new and self.active is not None and self.active not in self.learned \
                and self.active not in self.candidates:
            self.active = self.learned[-1] if self.learned else None

    def set_candidates(self, endpoints: Iterable[tuple[Endpoint, str]]) -> None:
        """Replace the candidate group with `(endpoint, kind)` pairs (bounded, first wins).

        The active endpoint is kept even when it is no longer a candidate: it works,
        and the path logic moves away from it when something better answers.
        """
        new: list[Endpoint] = []
        kinds: dict[Endpoint, str] = {}
        old_active_kind = self.kinds.get(self.active) if self.active is not None else None
        for e, kind in endpoints:
            e = normalize(e)
            if e in kinds:
                continue
            if len(new) >= MAX_CANDIDATE_ENDPOINTS:
                break
            new.append(e)
            kinds[e] = kind
        if old_active_kind is not None and self.active not in kinds:
            # The active endpoint stays (see above) and keeps its kind, so a path
            # through a relay is still shown, and handled, as one.
            kinds[self.active] = old_active_kind
        self.candidates = new
        self.kinds = kinds
        self.learned = [e for e in self.learned if e not in kinds]
        self._prune()
        if self.active is None and new:
            self.active = new[0]

    def _prune(self) -> None:
        keep = set(self.configured) | set(self.candidates) | set(self.learned)
        if self.active is not None:
            keep.add(self.active)
        self.failed_at = {e: t for e, t in self.failed_at.items() if e in keep}
        self.heard = {e: t for e, t in self.heard.items() if e in keep}
        self.left_by_choice = {e: t for e, t in self.left_by_choice.items() if e in keep}

    def kind_of(self, endpoint: Endpoint) -> str:
        if isinstance(endpoint, RelayEndpoint):
            return KIND_RELAY
        if endpoint in self.configured:
            return KIND_CONFIGURED
        kind = self.kinds.get(endpoint)
        if kind is not None:
            return kind
        # An address a rendezvous peer was heard from without announcing it is
        # peer-reflexive (e.g. a symmetric NAT's mapping towards us).
        return KIND_PRFLX if self.candidates else KIND_LEARNED

    def is_relayed(self, endpoint: Endpoint | None) -> bool:
        """Whether traffic to `endpoint` goes through a TURN relay (ours or the peer's)."""
        if endpoint is None:
            return False
        return isinstance(endpoint, RelayEndpoint) or self.kinds.get(endpoint) == KIND_RELAY

    def confirm(self, endpoint: Endpoint) -> None:
        """An authenticated packet came from `endpoint`: make it the active one (roaming)."""
        self.failed_at.pop(endpoint, None)
        if endpoint == self.active:
            return
        self.active = endpoint
        if endpoint in self.configured or endpoint in self.kinds:
            return
        if endpoint in self.learned:
            self.learned.remove(endpoint)
        self.learned.append(endpoint)
        while len(self.learned) > self.max_learned:
            evicted = self.learned.pop(0)
            self.failed_at.pop(evicted, None)
            self.heard.pop(evicted, None)

    def roam(self, endpoint: Endpoint, now: float, active_in_doubt: bool = False) -> bool:
        """A data packet (or keepalive) came from `endpoint`, not the active one: roam
        unless that would pull a working direct path back onto a relay. Returns
        whether the active endpoint is now `endpoint`.

        A peer may send single packets through the relay (its own happy eyeballs, a
        handshake answered on every path); only when the direct endpoint has been
        silent for RELAY_ROAM_HOLD seconds, or our own probes have put it in doubt
        (`active_in_doubt`), is the relay taken as the better path.
        """
        if len(self.heard) > MAX_HEARD:
            self._prune()
        active = self.active
        if now - self.failed_at.get(endpoint, -1e18) < FAILED_ROAM_HOLD or (
                not active_in_doubt and now < self.left_by_choice.get(endpoint, -1e18)):
            self.heard[endpoint] = now
            return False
        if (active is not None and not active_in_doubt and self.is_relayed(endpoint)
                and not self.is_relayed(active) and now - self.heard.get(active, -1e18) < RELAY_ROAM_HOLD):
            self.heard[endpoint] = now
            return False
        self.confirm(endpoint)
        self.heard[endpoint] = now
        return True

    def ordered_for_handshake(self) -> list[Endpoint]:
        """Active endpoint first (happy-eyeballs head start), then the others in order."""
        all_ = self.all()
        if self.active is not None and self.active in all_:
            all_.remove(self.active)
            return [self.active, *all_]
        if self.active is not None:
            return [self.active, *all_]
        return all_
