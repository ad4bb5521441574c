"""Sans-I/O STUN server and TURN allocation table (RFC 8489, RFC 8656, RFC 5780).

`TurnCore` is fed what arrives — `handle_client(data, transport, client_addr, now)`
for anything a client sends to a listener, `handle_peer(alloc, data, peer, now)`
for what a peer sends to a relayed address — and returns the datagrams to send
as `(via, bytes, destination)` tuples. `via` is the client transport handle, a
relay handle, or a `(local_ip, local_port)` tuple when an RFC 5780 CHANGE-REQUEST
asks for the answer to leave from another listener. Time is the `now` argument
(unix seconds as a float); expiry is driven by `handle_timer(now)` and
`next_deadline()`.

Relayed sockets are opened through the injected `RelayPorts` object so the core
never touches a socket itself; the asyncio shell passes real sockets, unit tests
a fake. The per-packet relay path is split into `channel_target` and
`peer_target`, which only check and look up, so the shell can move bytes
between preallocated buffers without building messages.
"""

from __future__ import annotations

import hashlib
import hmac
import heapq
import ipaddress
import itertools
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from overlay.stun import message as m
from overlay.stun.credentials import rest_expiry, rest_password
from overlay.stun.message import Address, Message, StunError

# Attributes this server understands; any other comprehension-required one gets 420.
KNOWN_ATTRIBUTES = frozenset(
    {
        m.MAPPED_ADDRESS, m.RESPONSE_ADDRESS, m.CHANGE_REQUEST, m.SOURCE_ADDRESS, m.CHANGED_ADDRESS,
        m.USERNAME, m.MESSAGE_INTEGRITY, m.ERROR_CODE, m.UNKNOWN_ATTRIBUTES, m.CHANNEL_NUMBER,
        m.LIFETIME, m.XOR_PEER_ADDRESS, m.DATA_ATTR, m.REALM, m.NONCE, m.XOR_RELAYED_ADDRESS,
        m.REQUESTED_ADDRESS_FAMILY, m.EVEN_PORT, m.REQUESTED_TRANSPORT, m.DONT_FRAGMENT,
        m.XOR_MAPPED_ADDRESS, m.RESERVATION_TOKEN, m.PRIORITY, m.USE_CANDIDATE, m.PADDING, m.RESPONSE_PORT,
    }
)

SWEEP_INTERVAL = 30.0
RESERVATION_LIFETIME = 30.0
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
    shared_secret: str | None = None
    users: dict[str, str] = field(default_factory=dict)
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


def _family_of(ip: str) -> int:
    return m.FAMILY_IPV6 if ":" in ip else m.FAMILY_IPV4


class TurnCore:
    def __init__(self, settings: TurnSettings, ports: RelayPorts, nonce_key: bytes | None = None) -> None:
        self.s = settings
        self.ports = ports
        self._nonce_key = nonce_key or os.urandom(32)
        self.allocations: set[Allocation] = set()
        self.per_user: dict[str, int] = {}
        self._heap: list[tuple[float, int, Allocation]] = []
        self._seq = itertools.count()
        self._next_sweep = 0.0
        self.stats = TurnStats()
        self.on_log: Callable[..., None] = lambda event, **kw: None
        self._pending: list[Out] = []
        # RESERVATION-TOKEN -> (relay handle, family, expiry) for EVEN-PORT R=1 (RFC 8656 7.2).
        self.reservations: dict[bytes, tuple[object, int, float]] = {}

    # ------------------------------------------------------------------ entry points
    def handle_client(self, data: bytes, transport: ClientTransport, client: Address, now: float) -> list[Out]:
        """Anything a client sent to a listener: STUN/TURN message or ChannelData."""
        if m.is_channel_data(data):
            self._client_channel_data(data, transport, client, now)
            return self._outbox()
        try:
            msg = m.parse(data)
        except StunError as exc:
            return self._reply_to_garbage(data, transport, client, str(exc))
        if msg.cls == m.REQUEST:
            return self._handle_request(msg, transport, client, now)
        if msg.cls == m.INDICATION and msg.method == m.SEND and not msg.classic:
            self._send_indication(msg, transport, client, now)
            return self._outbox()
        return []  # stray responses and unknown indications are dropped

    def handle_peer(self, alloc: Allocation, data: bytes, peer: Address, now: float) -> list[Out]:
        """A datagram from `peer` arrived at `alloc`'s relayed address."""
        target = self.peer_target(alloc, peer, len(data), now)
        if target is None:
            return []
        if target >= 0:
            frame = struct.pack("!I", target | len(data)) + data
            if alloc.transport.stream:
                frame += b"\0" * (-len(data) % 4)
            return [(alloc.transport, frame, alloc.client)]
        ind = Message(m.DATA, m.INDICATION)
        ind.add_xor_address(m.XOR_PEER_ADDRESS, peer).add(m.DATA_ATTR, data)
        return [(alloc.transport, ind.encode(fingerprint=False), alloc.client)]

    def transport_closed(self, transport: ClientTransport) -> None:
        """A TCP/TLS connection ended: its allocations go with it (RFC 8656 3.1)."""
        for alloc in list(transport.allocs.values()):
            self._delete(alloc)

    def next_deadline(self) -> float | None:
        candidates = [self._heap[0][0]] if self._heap else []
        if self.allocations and self._next_sweep:
            candidates.append(self._next_sweep)
        candidates += [exp for _, _, exp in self.reservations.values()]
        return min(candidates) if candidates else None

    def handle_timer(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires, _, alloc = heapq.heappop(heap)
            if alloc in self.allocations and alloc.expires <= now:
                self.on_log("allocation_expired", relayed=alloc.relayed, user=alloc.username)
                self._delete(alloc)
        for token, (handle, _, expires) in list(self.reservations.items()):
            if expires <= now:
                del self.reservations[token]
                self.ports.close(handle)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            for alloc in self.allocations:
                self._sweep(alloc, now)

    # ------------------------------------------------------------------ hot path helpers
    def channel_target(self, alloc: Allocation, number: int, length: int, now: float) -> Address | None:
        """Peer to send a client's ChannelData payload to, or None to drop it."""
        ch = alloc.channels.get(number)
        if ch is None or ch.until < now:
            return None
        rate = self.s.bandwidth
        if rate and not self._take_tokens(alloc, length, now, rate):
            return None
        self.stats.pkts_out += 1
        self.stats.bytes_out += length
        return ch.peer

    def peer_target(self, alloc: Allocation, peer: Address, length: int, now: float) -> int | None:
        """For data from `peer`: the ChannelData header word (channel << 16) to prepend,
        -1 to wrap it in a Data indication, or None to drop it (no permission / over quota)."""
        if alloc.perms.get(peer[0], 0.0) < now:
            return None
        rate = self.s.bandwidth
        if rate and not self._take_tokens(alloc, length, now, rate):
            return None
        self.stats.pkts_in += 1
        self.stats.bytes_in += length
        ch = alloc.peer_channels.get(peer)
        if ch is not None and ch.until >= now:
            return ch.header
        return -1

    @staticmethod
    def _take_tokens(alloc: Allocation, n: int, now: float, rate: int) -> bool:
        tokens = alloc.tokens + (now - alloc.tb_time) * rate
        if tokens > rate:
            tokens = rate  # burst of one second
        alloc.tb_time = now
        if tokens < n:
            alloc.tokens = tokens
            return False
        alloc.tokens = tokens - n
        return True

    # ------------------------------------------------------------------ internals
    def _outbox(self) -> list[Out]:
        out, self._pending = self._pending, []
        return out

    def _emit(self, via: object, data: bytes, dest: Address) -> None:
        self._pending.append((via, data, dest))

    def _client_channel_data(self, data: bytes, transport: ClientTransport, client: Address, now: float) -> None:
        alloc = transport.allocs.get(client)
        if alloc is None:
            return
        number, length = struct.unpack_from("!HH", data, 0)
        if 4 + length > len(data):
            return
        peer = self.channel_target(alloc, number, length, now)
        if peer is not None:
            self._emit(alloc.relay, data[4 : 4 + length], peer)

    def _reply_to_garbage(self, data: bytes, transport: ClientTransport, client: Address, why: str) -> list[Out]:
        """A malformed request still gets a 400 when its header is readable; anything else is dropped."""
        self.stats.bad_requests += 1
        if len(data) < m.HEADER_LEN or data[0] >= 0x40:
            return []
        msg_type = struct.unpack_from("!H", data, 0)[0]
        if m.class_of(msg_type) != m.REQUEST or data[4:8] != m.MAGIC_COOKIE_BYTES:
            return []
        resp = Message(m.method_of(msg_type), m.ERROR, bytes(data[8:20]))
        resp.add_error(400, f"Bad Request: {why}"[:120])
        return [(transport, resp.encode(), client)]

    def _handle_request(self, msg: Message, transport: ClientTransport, client: Address, now: float) -> list[Out]:
        unknown = [t for t, _ in msg.attributes if t < 0x8000 and t not in KNOWN_ATTRIBUTES]
        if unknown:
            return [(transport, self._error(msg, 420, unknown=unknown), client)]
        if msg.method == m.BINDING:
            return self._binding(msg, transport, client)
        if msg.classic:
            return []
        if msg.method not in (m.ALLOCATE, m.REFRESH, m.CREATE_PERMISSION, m.CHANNEL_BIND):
            self.stats.bad_requests += 1
            return [(transport, self._error(msg, 400, "Unknown method"), client)]
        try:
            return self._turn_request(msg, transport, client, now)
        except StunError as exc:
            self.stats.bad_requests += 1
            alloc = transport.allocs.get(client)
            key = alloc.key if alloc else None
            return [(transport, self._error(msg, 400, f"Bad Request: {exc}"[:120], key=key), client)]

    # -- STUN Binding (RFC 8489, RFC 5780) -------------------------------------------
    def _binding(self, msg: Message, transport: ClientTransport, client: Address) -> list[Out]:
        local = transport.local
        source: object = transport
        resp = Message(m.BINDING, m.SUCCESS, msg.transaction_id, classic=msg.classic)
        alt_ip = self.s.alternate_ip.get(local[0])
        alt_port = self.s.alternate_port.get(local[1])
        change = msg.get(m.CHANGE_REQUEST)
        if change is not None and not transport.stream:
            if len(change) != 4:
                return [(transport, self._error(msg, 400, "CHANGE-REQUEST must be 4 bytes"), client)]
            flags = change[3]
            want_ip, want_port = bool(flags & 0x04), bool(flags & 0x02)
            if (want_ip and not alt_ip) or (want_port and not alt_port):
                return [(transport, self._error(msg, 420, unknown=[m.CHANGE_REQUEST]), client)]
            if want_ip or want_port:
                source = (alt_ip if want_ip else local[0], alt_port if want_port else local[1])
        origin = source if isinstance(source, tuple) else local
        dest = client
        response_port = msg.get(m.RESPONSE_PORT)
        if response_port is not None and not transport.stream:
            # RFC 5780 7.5: answer to the client's IP at the port it names (filtering tests).
            if len(response_port) != 4 or response_port[:2] == b"\0\0":
                return [(transport, self._error(msg, 400, "bad RESPONSE-PORT"), client)]
            dest = (client[0], struct.unpack("!H", response_port[:2])[0])
        if msg.classic:
            resp.add_address(m.MAPPED_ADDRESS, client)
            resp.add_address(m.SOURCE_ADDRESS, self._advertised(origin))
            if alt_ip and alt_port:
                resp.add_address(m.CHANGED_ADDRESS, self._advertised((alt_ip, alt_port)))
            return [(source, resp.encode(fingerprint=False), dest)]
        resp.add_xor_address(m.XOR_MAPPED_ADDRESS, client)
        resp.add_address(m.MAPPED_ADDRESS, client)
        if alt_ip and alt_port:
            resp.add_address(m.RESPONSE_ORIGIN, self._advertised(origin))
            resp.add_address(m.OTHER_ADDRESS, self._advertised((alt_ip, alt_port)))
        if self.s.software:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return [(source, resp.encode(), dest)]

    def _advertised(self, addr: Address) -> Address:
        return self.s.advertise.get(addr[0], addr[0]), addr[1]

    # -- authentication ----------------------------------------------------------------
    def make_nonce(self, now: float) -> bytes:
        expiry = f"{int(now) + self.s.nonce_lifetime:x}"
        mac = hmac.new(self._nonce_key, expiry.encode(), hashlib.sha256).hexdigest()[:16]
        return f"{expiry}-{mac}".encode()

    def _nonce_valid(self, nonce: bytes, now: float) -> bool:
        try:
            expiry, mac = nonce.decode("ascii").split("-", 1)
            good = hmac.new(self._nonce_key, expiry.encode(), hashlib.sha256).hexdigest()[:16]
            return hmac.compare_digest(mac, good) and int(expiry, 16) >= now
        except (ValueError, UnicodeDecodeError):
            return False

    def password_for(self, username: str, now: float) -> str | None:
        static = self.s.users.get(username)
        if static is not None:
            return static
        if self.s.shared_secret:
            expiry = rest_expiry(username)
            if expiry is not None and expiry >= now:
                return rest_password(self.s.shared_secret, username)
        return None

    def _challenge(self, msg: Message, code: int, now: float, reason: str | None = None) -> bytes:
        resp = Message(msg.method, m.ERROR, msg.transaction_id)
        resp.add_error(code, reason)
        resp.add(m.REALM, self.s.realm.encode()).add(m.NONCE, self.make_nonce(now))
        if self.s.software:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return resp.encode()

    def _authenticate(self, msg: Message, now: float) -> tuple[str, bytes] | bytes:
        """(username, key) for a correctly signed request, else the error response to send."""
        if msg.integrity_offset < 0:
            return self._challenge(msg, 401, now)
        username, realm, nonce = msg.get(m.USERNAME), msg.get(m.REALM), msg.get(m.NONCE)
        if username is None or realm is None or nonce is None:
            self.stats.bad_requests += 1
            return self._error(msg, 400, "USERNAME, REALM and NONCE are required with MESSAGE-INTEGRITY")
        if not self._nonce_valid(nonce, now):
            return self._challenge(msg, 438, now)
        try:
            user = username.decode("utf-8")
            realm_s = realm.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.auth_failures += 1
            return self._challenge(msg, 401, now)
        password = self.password_for(user, now)
        if password is None or realm_s != self.s.realm:
            self.stats.auth_failures += 1
            return self._challenge(msg, 401, now)
        key = m.long_term_key(user, realm_s, password)
        if not msg.check_integrity(key):
            self.stats.auth_failures += 1
            return self._challenge(msg, 401, now)
        return user, key

    def _error(self, msg: Message, code: int, reason: str | None = None, unknown: list[int] | None = None,
               key: bytes | None = None) -> bytes:
        resp = Message(msg.method, m.ERROR, msg.transaction_id, classic=msg.classic)
        resp.add_error(code, reason)
        if unknown:
            resp.add_unknown_attributes(unknown)
        if self.s.software and not msg.classic:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return resp.encode(key=key, fingerprint=not msg.classic)

    def _finish(self, resp: Message, key: bytes) -> bytes:
        if self.s.software:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return resp.encode(key=key)

    # -- TURN requests -------------------------------------------------------------------
    def _turn_request(self, msg: Message, transport: ClientTransport, client: Address, now: float) -> list[Out]:
        auth = self._authenticate(msg, now)
        if isinstance(auth, bytes):
            return [(transport, auth, client)]
        user, key = auth
        alloc = transport.allocs.get(client)
        if msg.method == m.ALLOCATE:
            if alloc is not None:
                if alloc.last_txid == msg.transaction_id:
                    return [(transport, alloc.last_response, client)]  # retransmission
                return [(transport, self._error(msg, 437, key=key), client)]
            return [(transport, self._allocate(msg, transport, client, user, key, now), client)]
        if alloc is None:
            return [(transport, self._error(msg, 437, key=key), client)]
        if alloc.username != user:
            return [(transport, self._error(msg, 441, key=key), client)]
        if msg.method == m.REFRESH:
            return [(transport, self._refresh(msg, alloc, key, now), client)]
        if msg.method == m.CREATE_PERMISSION:
            return [(transport, self._create_permission(msg, alloc, key, now), client)]
        return [(transport, self._channel_bind(msg, alloc, key, now), client)]

    def _lifetime(self, msg: Message) -> int:
        requested = msg.u32(m.LIFETIME)
        if requested is None:
            return self.s.default_lifetime
        return max(self.s.default_lifetime, min(requested, self.s.max_lifetime)) if requested else 0

    def _allocate(self, msg: Message, transport: ClientTransport, client: Address, user: str, key: bytes,
                  now: float) -> bytes:
        rt = msg.get(m.REQUESTED_TRANSPORT)
        if rt is None or len(rt) != 4:
            return self._error(msg, 400, "REQUESTED-TRANSPORT missing or malformed", key=key)
        if rt[0] != m.TRANSPORT_UDP:
            return self._error(msg, 442, key=key)
        if msg.has(m.EVEN_PORT) and msg.has(m.RESERVATION_TOKEN):
            return self._error(msg, 400, "EVEN-PORT and RESERVATION-TOKEN together", key=key)
        token = msg.get(m.RESERVATION_TOKEN)
        even = msg.get(m.EVEN_PORT)
        if token is not None and (len(token) != 8 or msg.has(m.REQUESTED_ADDRESS_FAMILY)):
            return self._error(msg, 400, "bad RESERVATION-TOKEN", key=key)
        if even is not None and len(even) != 1:
            return self._error(msg, 400, "EVEN-PORT must be 1 byte", key=key)
        family = m.FAMILY_IPV4
        raf = msg.get(m.REQUESTED_ADDRESS_FAMILY)
        aaf = msg.get(m.ADDITIONAL_ADDRESS_FAMILY)
        if raf is not None and aaf is not None:
            return self._error(msg, 400, "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together", key=key)
        if raf is not None:
            if len(raf) != 4 or raf[0] not in (m.FAMILY_IPV4, m.FAMILY_IPV6):
                return self._error(msg, 440, key=key)
            family = raf[0]
        if aaf is not None and (len(aaf) != 4 or aaf[0] != m.FAMILY_IPV6):
            return self._error(msg, 400, "ADDITIONAL-ADDRESS-FAMILY must ask for IPv6", key=key)
        lifetime = self._lifetime(msg) or self.s.default_lifetime
        if self.per_user.get(user, 0) >= self.s.max_allocations_per_user or len(self.allocations) >= self.s.max_allocations:
            return self._error(msg, 486, key=key)
        alloc = Allocation(transport, client, user, key, family)
        new_token = None
        if token is not None:
            reserved = self.reservations.pop(token, None)
            if reserved is None or reserved[2] <= now:
                return self._error(msg, 508, "Unknown or expired reservation", key=key)
            alloc.family = reserved[1]
            alloc.relay, alloc.relayed = reserved[0], self.ports.adopt(reserved[0], alloc)
        else:
            opened = self.ports.open(family, alloc, even=even is not None, reserve=bool(even and even[0] & 0x80))
            if opened is None:
                return self._error(msg, 440 if raf is not None else 508, key=key)
            alloc.relay, alloc.relayed, spare = opened
            if spare is not None:
                new_token = os.urandom(8)
                self.reservations[new_token] = (spare, family, now + RESERVATION_LIFETIME)
        alloc.expires = now + lifetime
        alloc.tokens = float(self.s.bandwidth)
        alloc.tb_time = now
        self.allocations.add(alloc)
        transport.allocs[client] = alloc
        self.per_user[user] = self.per_user.get(user, 0) + 1
        self.stats.allocations_total += 1
        heapq.heappush(self._heap, (alloc.expires, next(self._seq), alloc))
        if self._next_sweep == 0.0:
            self._next_sweep = now + SWEEP_INTERVAL
        resp = Message(m.ALLOCATE, m.SUCCESS, msg.transaction_id)
        resp.add_xor_address(m.XOR_RELAYED_ADDRESS, self._advertised(alloc.relayed))
        if aaf is not None:
            # Dual allocations are not offered: say so for the extra family, keep the IPv4 one.
            resp.add(m.ADDRESS_ERROR_CODE, struct.pack("!BBBB", m.FAMILY_IPV6, 0, 4, 40) + b"Address Family not Supported")
        resp.add_u32(m.LIFETIME, lifetime)
        if new_token is not None:
            resp.add(m.RESERVATION_TOKEN, new_token)
        resp.add_xor_address(m.XOR_MAPPED_ADDRESS, client)
        data = self._finish(resp, key)
        alloc.last_txid, alloc.last_response = msg.transaction_id, data
        self.on_log("allocation_created", relayed=alloc.relayed, user=user, client=client, transport=transport.name)
        return data

    def _refresh(self, msg: Message, alloc: Allocation, key: bytes, now: float) -> bytes:
        raf = msg.get(m.REQUESTED_ADDRESS_FAMILY)
        if raf is not None and (len(raf) != 4 or raf[0] != alloc.family):
            return self._error(msg, 443, key=key)
        lifetime = self._lifetime(msg)
        if lifetime == 0:
            self._delete(alloc)
        else:
            alloc.expires = now + lifetime
            heapq.heappush(self._heap, (alloc.expires, next(self._seq), alloc))
        resp = Message(m.REFRESH, m.SUCCESS, msg.transaction_id).add_u32(m.LIFETIME, lifetime)
        return self._finish(resp, key)

    def peer_forbidden(self, peer: Address, with_port: bool = True) -> bool:
        """Refused peers (403). `with_port=False` for CreatePermission, where only the IP counts."""
        if with_port and (peer in self.s.own_endpoints or peer[1] == 0):
            return True
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return True
        if ip.is_unspecified or ip.is_multicast:
            return True
        if self.s.allow_loopback_peers:
            return False
        return ip.is_loopback or peer[0] in self.s.own_ips

    def _peers(self, msg: Message, alloc: Allocation, key: bytes, with_port: bool = True) -> list[Address] | bytes:
        try:
            peers = msg.xor_addresses(m.XOR_PEER_ADDRESS)
        except StunError as exc:
            return self._error(msg, 400, f"Bad XOR-PEER-ADDRESS: {exc}"[:120], key=key)
        if not peers:
            return self._error(msg, 400, "XOR-PEER-ADDRESS missing", key=key)
        if any(_family_of(p[0]) != alloc.family for p in peers):
            return self._error(msg, 443, key=key)
        if any(self.peer_forbidden(p, with_port) for p in peers):
            return self._error(msg, 403, key=key)
        return peers

    def _create_permission(self, msg: Message, alloc: Allocation, key: bytes, now: float) -> bytes:
        peers = self._peers(msg, alloc, key, with_port=False)
        if isinstance(peers, bytes):
            return peers
        for peer in peers:
            alloc.perms[peer[0]] = now + self.s.permission_lifetime
            alloc.update_routes(peer[0])
        return self._finish(Message(m.CREATE_PERMISSION, m.SUCCESS, msg.transaction_id), key)

    def _channel_bind(self, msg: Message, alloc: Allocation, key: bytes, now: float) -> bytes:
        raw = msg.get(m.CHANNEL_NUMBER)
        if raw is None or len(raw) != 4:
            return self._error(msg, 400, "CHANNEL-NUMBER missing or malformed", key=key)
        number = struct.unpack("!H", raw[:2])[0]
        if not m.CHANNEL_MIN <= number <= m.CHANNEL_MAX_ACCEPTED:
            return self._error(msg, 400, "Channel number outside 0x4000-0x7FFF", key=key)
        peers = self._peers(msg, alloc, key)
        if isinstance(peers, bytes):
            return peers
        if len(peers) != 1:
            return self._error(msg, 400, "exactly one XOR-PEER-ADDRESS expected", key=key)
        peer = peers[0]
        ch = alloc.channels.get(number)
        if ch is not None and ch.peer != peer:
            return self._error(msg, 400, "Channel already bound to another peer", key=key)
        other = alloc.peer_channels.get(peer)
        if other is not None and other.number != number:
            return self._error(msg, 400, "Peer already bound to another channel", key=key)
        if ch is None:
            ch = Channel(number, peer, 0.0)
            alloc.channels[number] = ch
            alloc.peer_channels[peer] = ch
        ch.expires = now + self.s.channel_lifetime
        alloc.perms[peer[0]] = now + self.s.permission_lifetime
        alloc.update_routes(peer[0])
        return self._finish(Message(m.CHANNEL_BIND, m.SUCCESS, msg.transaction_id), key)

    def _send_indication(self, msg: Message, transport: ClientTransport, client: Address, now: float) -> None:
        alloc = transport.allocs.get(client)
        if alloc is None:
            return
        try:
            peer = msg.xor_address(m.XOR_PEER_ADDRESS)
        except StunError:
            return
        data = msg.get(m.DATA_ATTR)
        if peer is None or data is None or _family_of(peer[0]) != alloc.family:
            return
        if alloc.perms.get(peer[0], 0.0) < now or self.peer_forbidden(peer):
            return
        rate = self.s.bandwidth
        if rate and not self._take_tokens(alloc, len(data), now, rate):
            return
        self.stats.pkts_out += 1
        self.stats.bytes_out += len(data)
        self._emit(alloc.relay, data, peer)

    # -- bookkeeping ----------------------------------------------------------------------
    def _sweep(self, alloc: Allocation, now: float) -> None:
        # Channels stay reserved for 5 minutes after expiry (RFC 8656 12); keep the
        # entry that long so the number cannot be rebound to another peer early.
        for number, ch in list(alloc.channels.items()):
            if ch.expires + 300 < now:
                del alloc.channels[number]
                alloc.peer_channels.pop(ch.peer, None)
        for ip, exp in list(alloc.perms.items()):
            if exp < now:
                del alloc.perms[ip]

    def _delete(self, alloc: Allocation) -> None:
        if alloc not in self.allocations:
            return
        self.allocations.discard(alloc)
        if alloc.transport.allocs.get(alloc.client) is alloc:
            del alloc.transport.allocs[alloc.client]
        left = self.per_user.get(alloc.username, 1) - 1
        if left:
            self.per_user[alloc.username] = left
        else:
            self.per_user.pop(alloc.username, None)
        self.ports.close(alloc.relay)
        self.on_log("allocation_deleted", relayed=alloc.relayed, user=alloc.username)

    def totals(self) -> TurnStats:
        """Counters for metrics (the shell's fast path adds its batches to `stats` directly)."""
        return self.stats
