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

import heapq
import ipaddress
import itertools
import os
import struct
from typing import Callable

from overlay.stun import message as m
from overlay.stun.message import Address, Message, StunError

from .stun_binding import answer_binding
from .turn_auth import Authenticator
from .turn_state import (  # noqa: F401  (re-exported: the core's public vocabulary)
    Allocation, Channel, ClientTransport, Out, RelayPorts, TurnSettings, TurnStats, error_response, family_of,
)

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


class TurnCore:
    def __init__(self, settings: TurnSettings, ports: RelayPorts, nonce_key: bytes | None = None) -> None:
        self.s = settings
        self.ports = ports
        self.auth = Authenticator(settings, nonce_key)
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
        if rate and not self.take_tokens(alloc, length, now, rate):
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
        if rate and not self.take_tokens(alloc, length, now, rate):
            return None
        self.stats.pkts_in += 1
        self.stats.bytes_in += length
        ch = alloc.peer_channels.get(peer)
        if ch is not None and ch.until >= now:
            return ch.header
        return -1

    @staticmethod
    def take_tokens(alloc: Allocation, n: int, now: float, rate: int) -> bool:
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
            return answer_binding(msg, transport, client, self.s)
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

    def _error(self, msg: Message, code: int, reason: str | None = None, unknown: list[int] | None = None,
               key: bytes | None = None) -> bytes:
        return error_response(msg, code, self.s.software, reason, unknown, key)

    def make_nonce(self, now: float) -> bytes:
        return self.auth.make_nonce(now)

    def password_for(self, username: str, now: float) -> str | None:
        return self.auth.password_for(username, now)

    def _finish(self, resp: Message, key: bytes) -> bytes:
        if self.s.software:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return resp.encode(key=key)

    # -- TURN requests -------------------------------------------------------------------
    def _turn_request(self, msg: Message, transport: ClientTransport, client: Address, now: float) -> list[Out]:
        auth = self.auth.authenticate(msg, now, self.stats)
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
        resp.add_xor_address(m.XOR_RELAYED_ADDRESS, (self.s.advertise.get(alloc.relayed[0], alloc.relayed[0]), alloc.relayed[1]))
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
        if any(family_of(p[0]) != alloc.family for p in peers):
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
        if peer is None or data is None or family_of(peer[0]) != alloc.family:
            return
        if alloc.perms.get(peer[0], 0.0) < now or self.peer_forbidden(peer):
            return
        rate = self.s.bandwidth
        if rate and not self.take_tokens(alloc, len(data), now, rate):
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
