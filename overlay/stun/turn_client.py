"""Sans-I/O TURN client: one allocation on one server, for a socket the caller owns.

The agent multiplexes WireGuard, STUN and TURN on one UDP socket, so this class
never sends anything itself. It is fed what arrived from the TURN server
(`receive(data, now)`) and asked what to send (`datagrams_to_send()`), when to
wake up (`next_deadline()`, `handle_timer(now)`), and for the wire form of a
payload to a peer (`wrap(peer, payload, now)`). It handles the 401/438
authentication dance, retransmissions, allocation refresh, permission refresh
(every 4 of the 5 minutes) and channel binding (refreshed every 9 of the 10
minutes), IPv4 or IPv6 relayed addresses, and unwraps ChannelData and Data
indications back into (peer, payload).

    turn = TurnAllocation(username, password, family=m.FAMILY_IPV4)
    turn.start(now); sock.sendto(*each of turn.datagrams_to_send()) ...
    for event in turn.receive(data, now): ...   # Allocated / AllocationFailed / PeerData
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import client as sc
from . import message as m
from .message import Address, Message, StunError

RTO = 0.5
MAX_TRIES = 6
PERMISSION_REFRESH = 240.0
CHANNEL_REFRESH = 540.0
REFRESH_MARGIN = 60.0


@dataclass(frozen=True)
class Allocated:
    relayed: Address
    mapped: Address | None
    lifetime: int


@dataclass(frozen=True)
class AllocationFailed:
    code: int
    reason: str


@dataclass(frozen=True)
class PeerData:
    peer: Address
    data: bytes


class _Tx:
    __slots__ = ("msg", "kind", "arg", "sent_at", "tries", "data")

    def __init__(self, msg: Message, kind: str, arg: object = None) -> None:
        self.msg, self.kind, self.arg = msg, kind, arg
        self.sent_at = 0.0
        self.tries = 0
        self.data = b""


def _family_of(ip: str) -> int:
    return m.FAMILY_IPV6 if ":" in ip else m.FAMILY_IPV4


class TurnAllocation:
    def __init__(self, username: str, password: str, family: int = m.FAMILY_IPV4, lifetime: int = 600,
                 channel_base: int = m.CHANNEL_MIN) -> None:
        self.username, self._password = username, password
        self.family = family
        self.lifetime = lifetime
        self.realm = ""
        self.nonce = b""
        self._key = b""
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.state = "new"  # new -> allocating -> allocated -> closed / failed
        self.expires = 0.0
        self._refresh_at = 0.0
        self._txs: dict[bytes, _Tx] = {}
        self._out: list[bytes] = []
        self.permissions: dict[str, float] = {}  # peer IP -> when to refresh
        self.channels: dict[Address, int] = {}  # peer -> channel (bound or being bound)
        self._channel_ok: dict[int, float] = {}  # channel -> when to refresh (present once bound)
        self._by_channel: dict[int, Address] = {}
        self._next_channel = channel_base

    def __repr__(self) -> str:  # the password stays out of logs
        return f"TurnAllocation(username={self.username!r}, state={self.state!r}, relayed={self.relayed!r})"

    # -- driving -----------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        self.state = "allocating"
        self._request(sc.allocate_request(self.family).add_u32(m.LIFETIME, self.lifetime), "allocate", now)

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with lifetime 0); nothing is retransmitted after."""
        if self.state == "allocated":
            self._request(sc.refresh_request(0), "close", now)
        self.state = "closed"

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        times = [tx.sent_at + RTO * (2 ** (tx.tries - 1)) for tx in self._txs.values()]
        if self.state == "allocated":
            times.append(self._refresh_at)
            times += list(self.permissions.values()) + list(self._channel_ok.values())
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[AllocationFailed]:
        events: list[AllocationFailed] = []
        for txid, tx in list(self._txs.items()):
            if now >= tx.sent_at + RTO * (2 ** (tx.tries - 1)):
                if tx.tries >= MAX_TRIES:
                    del self._txs[txid]
                    if tx.kind in ("allocate", "refresh") and self.state != "closed":
                        self.state = "failed"
                        events.append(AllocationFailed(408, "TURN server did not answer"))
                    continue
                tx.tries += 1
                tx.sent_at = now
                self._out.append(tx.data)
        if self.state == "allocated":
            if now >= self._refresh_at:
                self._refresh_at = now + 3600  # rescheduled when the answer arrives
                self._request(sc.refresh_request(self.lifetime), "refresh", now)
            for ip, due in list(self.permissions.items()):
                if now >= due:
                    self.permissions[ip] = now + 3600
                    self._request(sc.create_permission_request([(ip, 0)]), "permission", now, ip)
            for number, due in list(self._channel_ok.items()):
                if now >= due:
                    self._channel_ok[number] = now + 3600
                    peer = self._by_channel[number]
                    self._request(sc.channel_bind_request(number, peer), "channel", now, peer)
        return events

    # -- data ------------------------------------------------------------------------------------
    def wrap(self, peer: Address, payload: bytes, now: float) -> bytes | None:
        """Wire form of `payload` for `peer` through the relay (None until allocated).

        Binds a channel on first use (a Send indication carries the data meanwhile), so a
        steady flow ends up with 4 bytes of overhead per packet.
        """
        if self.state != "allocated" or _family_of(peer[0]) != self.relayed_family:
            return None
        peer = (peer[0], peer[1])
        number = self.channels.get(peer)
        if number is None:
            self.bind_channel(peer, now)
            number = self.channels.get(peer)
        if number is not None and number in self._channel_ok:
            return m.encode_channel_data(number, payload)
        return sc.send_indication(peer, payload).encode(fingerprint=False)

    def channel_bound(self, peer: Address) -> bool:
        """True once the server confirmed a channel to `peer` (data then costs 4 bytes)."""
        number = self.channels.get((peer[0], peer[1]))
        return number is not None and number in self._channel_ok

    @property
    def relayed_family(self) -> int:
        return _family_of(self.relayed[0]) if self.relayed else self.family

    def permit(self, peer_ip: str, now: float) -> None:
        """Install (and keep refreshing) a permission for `peer_ip`."""
        if self.state == "allocated" and peer_ip not in self.permissions:
            self.permissions[peer_ip] = now + 3600
            self._request(sc.create_permission_request([(peer_ip, 0)]), "permission", now, peer_ip)

    def bind_channel(self, peer: Address, now: float) -> None:
        if self.state != "allocated" or peer in self.channels or self._next_channel > m.CHANNEL_MAX:
            return
        number = self._next_channel
        self._next_channel += 1
        self.channels[peer] = number
        self._by_channel[number] = peer
        self.permissions.setdefault(peer[0], now + PERMISSION_REFRESH)  # ChannelBind installs it
        self._request(sc.channel_bind_request(number, peer), "channel", now, peer)

    # -- input -------------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[Allocated | AllocationFailed | PeerData]:
        """Anything the TURN server sent. Returns what happened."""
        if m.is_channel_data(data):
            try:
                number, payload = m.decode_channel_data(data)
            except StunError:
                return []
            peer = self._by_channel.get(number)
            return [PeerData(peer, payload)] if peer else []
        try:
            msg = m.parse(data)
        except StunError:
            return []
        if msg.cls == m.INDICATION and msg.method == m.DATA:
            try:
                peer, payload = msg.xor_address(m.XOR_PEER_ADDRESS), msg.get(m.DATA_ATTR)
            except StunError:
                return []
            return [PeerData(peer, payload)] if peer and payload is not None else []
        tx = self._txs.get(msg.transaction_id)
        if tx is None or msg.cls not in (m.SUCCESS, m.ERROR):
            return []
        if self._key and not msg.check_integrity(self._key) and msg.cls == m.SUCCESS:
            return []  # a success must be signed with our key once we have one
        del self._txs[msg.transaction_id]
        if msg.cls == m.ERROR:
            return self._on_error(tx, msg, now)
        return self._on_success(tx, msg, now)

    def _on_error(self, tx: _Tx, msg: Message, now: float) -> list[AllocationFailed]:
        code, reason = msg.error_code() or (0, "")
        if code in (401, 438) and msg.get(m.NONCE):
            # First 401: learn realm and nonce and sign from now on. 438: new nonce, same key.
            # A 401 on a signed request means wrong credentials: no retry loop.
            signed_before = bool(self._key)
            self.realm = (msg.get(m.REALM) or self.realm.encode()).decode("utf-8", "replace")
            self.nonce = msg.get(m.NONCE) or b""
            self._key = m.long_term_key(self.username, self.realm, self._password)
            if code == 438 or not signed_before:
                retry = Message(tx.msg.method, m.REQUEST)
                retry.attributes = [(t, v) for t, v in tx.msg.attributes
                                    if t not in (m.USERNAME, m.REALM, m.NONCE, m.MESSAGE_INTEGRITY, m.FINGERPRINT)]
                self._request(retry, tx.kind, now, tx.arg)
                return []
        if tx.kind == "allocate":
            self.state = "failed"
            return [AllocationFailed(code, reason)]
        if tx.kind == "refresh" and code == 437:
            self.state = "failed"
            return [AllocationFailed(code, reason)]
        if tx.kind == "channel" and isinstance(tx.arg, tuple):
            number = self.channels.pop(tx.arg, None)
            if number is not None:
                self._by_channel.pop(number, None)
                self._channel_ok.pop(number, None)
        return []

    def _on_success(self, tx: _Tx, msg: Message, now: float) -> list[Allocated]:
        if tx.kind == "allocate":
            self.relayed = msg.xor_address(m.XOR_RELAYED_ADDRESS)
            self.mapped = msg.xor_address(m.XOR_MAPPED_ADDRESS)
            lifetime = msg.u32(m.LIFETIME) or self.lifetime
            self.state = "allocated"
            self.expires = now + lifetime
            self._refresh_at = now + max(lifetime - REFRESH_MARGIN, lifetime / 2)
            return [Allocated(self.relayed, self.mapped, lifetime)]  # type: ignore[arg-type]
        if tx.kind == "refresh":
            lifetime = msg.u32(m.LIFETIME) or self.lifetime
            self.expires = now + lifetime
            self._refresh_at = now + max(lifetime - REFRESH_MARGIN, lifetime / 2)
        elif tx.kind == "permission" and isinstance(tx.arg, str) and tx.arg in self.permissions:
            self.permissions[tx.arg] = now + PERMISSION_REFRESH
        elif tx.kind == "channel" and isinstance(tx.arg, tuple):
            number = self.channels.get(tx.arg)
            if number is not None:
                self._channel_ok[number] = now + CHANNEL_REFRESH
                self.permissions[tx.arg[0]] = now + PERMISSION_REFRESH
        return []

    # -- internals ---------------------------------------------------------------------------------
    def _request(self, msg: Message, kind: str, now: float, arg: object = None) -> None:
        _new_transaction_id(msg)
        if self._key:
            sc.add_auth(msg, self.username, self.realm, self.nonce)
        tx = _Tx(msg, kind, arg)
        tx.data = msg.encode(key=self._key or None)
        tx.sent_at = now
        tx.tries = 1
        if kind != "close":
            self._txs[msg.transaction_id] = tx
        self._out.append(tx.data)


_XOR_ATTRIBUTES = (m.XOR_PEER_ADDRESS, m.XOR_RELAYED_ADDRESS, m.XOR_MAPPED_ADDRESS)


def _new_transaction_id(msg: Message) -> None:
    """Give `msg` a fresh transaction id; IPv6 XOR addresses are masked with it, so re-mask them."""
    old, new = msg.transaction_id, os.urandom(12)
    msg.attributes = [
        (t, m.encode_xor_address(m.decode_xor_address(v, old), new) if t in _XOR_ATTRIBUTES else v)
        for t, v in msg.attributes
    ]
    msg.transaction_id = new


def binding_request_bytes() -> tuple[bytes, bytes]:
    """(transaction id, datagram) for a STUN Binding request."""
    msg = sc.binding_request()
    return msg.transaction_id, msg.encode()


def parse_binding_response(data: bytes, transaction_id: bytes) -> Address | None:
    """The mapped address from a Binding success answering `transaction_id`, else None."""
    try:
        msg = m.parse(data)
    except StunError:
        return None
    if msg.transaction_id != transaction_id or msg.method != m.BINDING or msg.cls != m.SUCCESS:
        return None
    try:
        return sc.mapped_address(msg)
    except StunError:
        return None

