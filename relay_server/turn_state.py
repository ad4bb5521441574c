"""What the TURN core keeps and is configured with: allocations, channels, client
transports, settings, counters, and the RelayPorts interface the shell implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from overlay.stun import message as m
from overlay.stun.message import Address, Message

Out = tuple[object, bytes, Address]


class RelayPorts(Protocol):
    """Opens and closes relayed transport addresses (real UDP sockets in the shell)."""

    def open(self, family: int, alloc: "Allocation", even: bool = False,
             reserve: bool = False) -> tuple[object, Address, object | None] | None:
        """Open a relayed address for `alloc` (an even port when `even`; with `reserve`, also
        hold the next port and return its handle third). None when no port is available."""
        ...

    def adopt(self, reserved: object, alloc: "Allocation") -> Address:
        """Hand a previously reserved port to `alloc`; returns its address."""
        ...

    def close(self, handle: object) -> None: ...


class ClientTransport:
    """One way clients reach the server: a UDP listener or one TCP/TLS connection.

    `allocs` maps a client address to its allocation, so the per-packet lookup is
    one dict access on the transport the datagram came in on.
    """

    __slots__ = ("local", "stream", "allocs", "name")

    def __init__(self, local: Address, stream: bool, name: str = "udp") -> None:
        self.local = local
        self.stream = stream
        self.allocs: dict[Address, Allocation] = {}
        self.name = name


class Channel:
    __slots__ = ("number", "peer", "expires", "until", "header")

    def __init__(self, number: int, peer: Address, expires: float) -> None:
        self.number = number
        self.peer = peer
        self.expires = expires
        # min(channel expiry, permission expiry for the peer's IP): the one number the
        # per-packet path compares against `now`.
        self.until = 0.0
        self.header = number << 16  # ChannelData header without the length


class Allocation:
    __slots__ = (
        "transport", "client", "username", "key", "relay", "relayed", "family", "expires",
        "perms", "channels", "peer_channels", "last_txid", "last_response", "tokens", "tb_time",
    )

    def __init__(self, transport: ClientTransport, client: Address, username: str, key: bytes, family: int) -> None:
        self.transport = transport
        self.client = client
        self.username = username
        self.key = key
        self.family = family
        self.relay: object = None
        self.relayed: Address = ("", 0)
        self.expires = 0.0
        self.perms: dict[str, float] = {}
        self.channels: dict[int, Channel] = {}
        self.peer_channels: dict[Address, Channel] = {}
        self.last_txid = b""
        self.last_response = b""
        self.tokens = 0.0
        self.tb_time = 0.0

    def update_routes(self, ip: str) -> None:
        perm = self.perms.get(ip, 0.0)
        for ch in self.channels.values():
            if ch.peer[0] == ip:
                ch.until = min(ch.expires, perm)


@dataclass
class TurnSettings:
    realm: str = "overlay"
    software: str | None = "overlay-relay"
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    nonce_lifetime: int = 600
    max_allocations_per_user: int = 100
    max_allocations: int = 100_000
    bandwidth: int = 0  # bytes/s per allocation, both directions; 0 = unlimited
    allow_loopback_peers: bool = False
    # TURN REST shared secret and/or static long-term users.
    shared_secret: str | None = field(default=None, repr=False)
    users: dict[str, str] = field(default_factory=dict, repr=False)
    # IPs this server answers on: relaying to them is refused unless allow_loopback_peers.
    own_ips: set[str] = field(default_factory=set)
    # Exact listener addresses: never a permitted peer (would loop back into the server).
    own_endpoints: set[Address] = field(default_factory=set)
    # RFC 5780: each listener IP's alternate IP, each listener port's alternate port.
    alternate_ip: dict[str, str] = field(default_factory=dict)
    alternate_port: dict[int, int] = field(default_factory=dict)
    # Address to advertise for a local IP (server behind a 1:1 NAT).
    advertise: dict[str, str] = field(default_factory=dict)


@dataclass
class TurnStats:
    allocations_total: int = 0
    auth_failures: int = 0
    bad_requests: int = 0
    pkts_in: int = 0
    pkts_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def family_of(ip: str) -> int:
    return m.FAMILY_IPV6 if ":" in ip else m.FAMILY_IPV4




def error_response(msg: Message, code: int, software: str | None, reason: str | None = None,
                   unknown: list[int] | None = None, key: bytes | None = None) -> bytes:
    """An error response to `msg` (signed with `key` when the request was authenticated)."""
    resp = Message(msg.method, m.ERROR, msg.transaction_id, classic=msg.classic)
    resp.add_error(code, reason)
    if unknown:
        resp.add_unknown_attributes(unknown)
    if software and not msg.classic:
        resp.add(m.SOFTWARE, software.encode())
    return resp.encode(key=key, fingerprint=not msg.classic)
