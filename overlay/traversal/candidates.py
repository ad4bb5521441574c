"""Candidates: the addresses a peer may reach this agent's tunnel socket at.

The rendezvous carries them as dicts `{"type": "host"|"srflx"|"relay"|"prflx", "ip": IP,
"port": 1-65535}` (`relay_server/rendezvous.py` validates exactly that; extra scalar
fields are allowed but unused here). Host candidates come from the interface
addresses, read with `pyroute2.AsyncIPRoute`; an rtnetlink subscription tells the
agent when to gather again (address or route changes: roaming, a new Wi-Fi).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

KINDS = ("host", "srflx", "relay", "prflx")


class CandidateError(ValueError):
    """A candidate dict that is not well formed (the text says which field)."""


@dataclass(frozen=True)
class Candidate:
    kind: str
    ip: str
    port: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CandidateError(f"candidate type must be one of {', '.join(KINDS)}, not {self.kind!r}")
        try:
            ip = ipaddress.ip_address(self.ip)
        except ValueError:
            raise CandidateError(f"candidate ip {self.ip!r} is not an IP address") from None
        object.__setattr__(self, "ip", str(ip))  # canonical form, so equal addresses compare equal
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise CandidateError(f"candidate port must be 1-65535, not {self.port!r}")

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    @property
    def address(self) -> tuple[str, int]:
        return self.ip, self.port

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "ip": self.ip, "port": self.port}

    @classmethod
    def from_dict(cls, obj: Any) -> "Candidate":
        if not isinstance(obj, dict):
            raise CandidateError(f"candidate must be an object, not {type(obj).__name__}")
        missing = [k for k in ("type", "ip", "port") if k not in obj]
        if missing:
            raise CandidateError(f"candidate lacks {', '.join(missing)}")
        return cls(obj["type"], obj["ip"], obj["port"])


def parse_candidates(objs: Any) -> list[Candidate]:
    """Valid candidates from a rendezvous list, skipping malformed entries (a peer's bug is not ours)."""
    out: list[Candidate] = []
    for obj in objs if isinstance(objs, list) else []:
        try:
            cand = Candidate.from_dict(obj)
        except CandidateError:
            continue
        if cand not in out:
            out.append(cand)
    return out


def usable_host_address(ip: str, exclude: Iterable[str] = ()) -> bool:
    """Whether a peer could plausibly reach us at `ip` (not loopback, link-local, multicast, ours)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return False
    for item in exclude:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        if addr.version == net.version and addr in net:
            return False
    return True


def host_candidates(addresses: Iterable[str], port: int, exclude: Iterable[str] = ()) -> list[Candidate]:
    """Host candidates for the tunnel socket's `port` on every usable interface address.

    `exclude` holds the overlay's own addresses or prefixes (e.g. "100.64.0.1" or
    "fd7a::/64"): advertising them would make a peer try to reach us through the tunnel.
    """
    exclude = list(exclude)
    out: list[Candidate] = []
    for ip in addresses:
        if usable_host_address(ip, exclude):
            cand = Candidate("host", ip.split("%", 1)[0], port)
            if cand not in out:
                out.append(cand)
    return out


async def interface_addresses(ipr: Any = None) -> list[str]:
    """Every address on every interface (IPv4 and IPv6), read over rtnetlink.

    `ipr` may be an open `AsyncIPRoute` (e.g. one for another namespace); else one is
    opened and closed here.
    """
    from pyroute2 import AsyncIPRoute

    own = ipr is None
    if own:
        ipr = AsyncIPRoute()
    try:
        out: list[str] = []
        async for msg in await ipr.addr("dump"):
            if msg.get("family") not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if ip and ip not in out:
                out.append(ip)
        return out
    finally:
        if own:
            ipr.close()


# Address and route changes both matter: a new default route can change which source
# address (and NAT) the tunnel's traffic uses without any address changing.
_CHANGE_EVENTS = {"RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWROUTE", "RTM_DELROUTE"}


async def network_changes(netns: str | None = None) -> AsyncIterator[str]:
    """Yield the rtnetlink event name for every address or route change, until cancelled.

    The agent re-gathers candidates (and re-runs STUN) after one; it should debounce,
    since one change often arrives as a burst of events.
    """
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.rtnl import (
        RTMGRP_IPV4_IFADDR,
        RTMGRP_IPV4_ROUTE,
        RTMGRP_IPV6_IFADDR,
        RTMGRP_IPV6_ROUTE,
    )

    ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()
    try:
        await ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        while True:
            async for msg in ipr.get():
                event = msg.get("event")
                if event in _CHANGE_EVENTS:
                    yield event
            await asyncio.sleep(0)  # get() ends after a batch; keep listening
    finally:
        ipr.close()
