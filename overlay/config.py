"""Agent configuration: the wg-quick file format plus multi-endpoint peers.

The types below are what the rest of the agent consumes; the parser that fills
them from a file lives further down.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class EndpointSpec:
    """One `host:port` item of an `Endpoint =` line, before name resolution.

    `host` is an IP literal or a hostname; a hostname stands for all of its A
    and AAAA records and is re-resolved while the agent runs.
    """

    host: str
    port: int


@dataclass
class PeerConfig:
    public_key: bytes  # 32 raw bytes
    preshared_key: bytes | None = None  # 32 raw bytes
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoints: list[EndpointSpec] = field(default_factory=list)
    persistent_keepalive: int = 0  # seconds, 0 = off


@dataclass
class InterfaceConfig:
    private_key: bytes  # 32 raw bytes
    listen_port: int | None = None  # None = pick a free port
    addresses: list[IPInterface] = field(default_factory=list)
    mtu: int | None = None  # None = default (1420)
    peers: list[PeerConfig] = field(default_factory=list)
    source: str = "<memory>"  # file path, for messages
