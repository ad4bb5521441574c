"""Sans-I/O TURN client (RFC 8656): one allocation on one server, over a path the caller owns.

The agent's tunnel socket carries this client's messages next to WireGuard, so the
class never sends or sleeps. The caller:

    turn = TurnClient(("198.51.100.1", 3478), credentials)      # TurnCredentials (TURN REST)
    turn.start(now)
    for data in turn.datagrams_to_send(): sock.sendto(data, turn.server)
    turn.unwrap(data, now)   # anything from the server: (payload, peer) for peer data, else None
    turn.handle_timers(now); turn.next_deadline()
    frame = turn.wrap(payload, peer, now)   # then flush datagrams_to_send() BEFORE sending frame
    turn.state in ("idle", "allocating", "ready", "failed", "closed"); turn.failure

The first Allocate goes out unauthenticated; the server's 401 carries REALM and NONCE
and the request is repeated signed with the long-term key. 438 (stale nonce) repeats
it with the new nonce. The allocation is refreshed at 80 % of its lifetime;
permissions and channels are refreshed before they expire while traffic uses them
and left to expire once it stops, except those the caller pins with `permit(ip, now,
keep=True)`: a peer on a direct path still needs its permission on our allocation as
the standby path, or a later failover to the relay finds the server dropping its
packets. Over UDP, with `keepalive=KEEPALIVE_INTERVAL`, a Binding indication goes to the server
that often so the NAT in front of us keeps the mapping the server sends our relayed traffic
to, also while the allocation carries nothing. With `liveness=LIVENESS_INTERVAL` a Refresh goes
out that often: unlike the indication it is answered, so a relay that went away (no answer
within GIVE_UP_AFTER: "relay silent") or restarted and forgot us (437) is noticed within
one interval instead of at the next scheduled refresh minutes later. Error answers never raise: they move the client to
`failed` with a `TurnFailure` saying what happened and whether retrying can help;
when to retry is the caller's decision (`retry_delay`).

With `stream=True` (TCP/TLS to the relay) nothing is retransmitted (the transport is
reliable) and ChannelData is padded to 4 bytes; use `stream.StreamFramer` to cut the
byte stream into frames for `unwrap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.credentials import TurnCredentials
from overlay.stun.message import Address, Message, StunError

from .stun_probe import family_of, normalize

# Requests over UDP: 250 ms first RTO, doubling; given up after 5 s (sends at 0, 0.25,
# 0.75, 1.75, 3.75 s). Tighter than RFC 8489's 39.5 s because the agent falls back to
# TCP/TLS or another relay when UDP gets no answer, and a user is waiting.
INITIAL_RTO = 0.25
GIVE_UP_AFTER = 5.0
DEFAULT_LIFETIME = 600  # what we ask for; the server's answer wins
REFRESH_FRACTION = 0.8  # refresh the allocation at 80 % of its lifetime
PERMISSION_LIFETIME = 300.0  # fixed by RFC 8656 section 9
PERMISSION_REFRESH = 240.0  # 80 % of it: one lost refresh can still be retried in time
CHANNEL_LIFETIME = 600.0  # fixed by RFC 8656 section 12
CHANNEL_REFRESH = 480.0  # 80 % of it
PERMISSION_RETRY = 5.0
BIND_RETRY = 1.0  # a ChannelBind that got no answer is sent again after this  # a pinned permission whose refresh got no answer is tried again after this
# NATs drop idle UDP mappings after as little as 30 s (the lab's NATs do); without one,
# everything the server relays to us is filtered out. A 20-byte indication keeps it.
KEEPALIVE_INTERVAL = 15.0
# How often a Refresh checks that the server still holds the allocation (RelayPath's choice;
# a restarted relay answers 437, a dead one nothing). The rendezvous reconnecting after a
# relay restart triggers a check at once (`refresh`), so this only bounds the silent cases.
LIVENESS_INTERVAL = 30.0
MAX_NONCE_RETRIES = 3  # 438 answers in a row before the server is considered broken
# After a channel binding lapses its number may not be reused for another peer for
# 5 minutes (RFC 8656 12); numbers are handed out round-robin so that never happens
# in practice (4096 numbers).

# Backoff the caller may use between allocation attempts after a retryable failure.
RETRY_BASE = 1.0
RETRY_MAX = 60.0

IDLE, ALLOCATING, READY, FAILED, CLOSED = "idle", "allocating", "ready", "failed", "closed"

# Codes where the same request later (or elsewhere) can succeed; the others need a
# configuration or credential change first.
_RETRYABLE = {0, 300, 437, 486, 500, 508}


@dataclass(frozen=True)
class TurnFailure:
    code: int  # STUN error code; 0 for "no answer" / local problems
    reason: str
    retryable: bool

    def __str__(self) -> str:
        return f"{self.code} {self.reason}" if self.code else self.reason


def retry_delay(attempt: int) -> float:
    """Seconds to wait before allocation attempt number `attempt` (0-based) after a failure."""
    return min(RETRY_MAX, RETRY_BASE * (2 ** max(0, attempt)))


class _Tx:
    __slots__ = ("kind", "build", "arg", "tid", "data", "first_sent", "next_send", "rto", "nonce_retries",
                 "signed")

    def __init__(self, kind: str, build: Callable[[], Message], arg: object) -> None:
        self.kind, self.build, self.arg = kind, build, arg
        self.tid = b""
        self.data = b""
        self.first_sent = self.next_send = self.rto = 0.0
        self.nonce_retries = 0
        self.signed = False


class _Permission:
    __slots__ = ("installed", "keep", "pending", "refresh_at", "used")

    def __init__(self) -> None:
        self.installed = False
        self.keep = False  # refreshed while the caller wants it, used or not
        self.refresh_at = float("inf")  # set when the server confirms
        self.used = False  # traffic to/from this IP since the last (re)install was sent
        self.pending = False


class _Channel:
    __slots__ = ("bound", "keep", "number", "peer", "pending", "refresh_at", "used")

    def __init__(self, number: int, peer: Address) -> None:
        self.number, self.peer = number, peer
        self.bound = False
        # Refreshed while the caller wants it, used or not: a lapsed binding the server
        # still holds would deliver ChannelData with a number we no longer know.
        self.keep = False
        self.refresh_at = float("inf")
        self.used = False  # traffic on this channel since the last ChannelBind was sent
        self.pending = False


class TurnClient:
    def __init__(self, server: tuple, credentials: TurnCredentials, *, family: int = 4, stream: bool = False,
                 lifetime: int = DEFAULT_LIFETIME, software: str | None = None,
                 keepalive: float | None = None, liveness: float | None = None) -> None:
        if family not in (4, 6):
            raise ValueError(f"relayed address family must be 4 or 6, not {family!r}")
        self.server: Address = normalize(server)
        self.family = family
        self.stream = stream
        self.requested_lifetime = lifetime
        self.software = software
        # Seconds between Binding indications over UDP (None: none; see KEEPALIVE_INTERVAL).
        self.keepalive = keepalive if not stream else None
        # Seconds between Refreshes that prove the server still holds the allocation (None:
        # only the one at REFRESH_FRACTION of the lifetime). Over streams too: a relay host
        # that vanished without closing the connection is otherwise noticed minutes later.
        self.liveness = liveness
        self._creds = credentials
        self.realm = ""
        self._nonce = b""
        self._key: bytes | None = None
        self.state = IDLE
        self.failure: TurnFailure | None = None
        self.relayed_address: Address | None = None
        self.mapped_address: Address | None = None  # our server-reflexive address as the server sees it
        self.lifetime = 0
        self.expires_at = 0.0
        self._refresh_at = float("inf")
        self._keepalive_at = float("inf")
        self._liveness_at = float("inf")
        self._txs: dict[bytes, _Tx] = {}
        self._out: list[bytes] = []
        self._perms: dict[str, _Permission] = {}
        self._channels: dict[Address, _Channel] = {}
        self._by_number: dict[int, _Channel] = {}
        self._next_number = m.CHANNEL_MIN
        # The number each peer was last bound to: a rebind reuses it, because the server
        # keeps a binding (and refuses another number for the peer) for minutes after we
        # stopped using it or after its answer was lost.
        self._last_number: dict[Address, int] = {}

    def __repr__(self) -> str:  # never the password or key
        return (f"TurnClient(server={self.server!r}, user={self._creds.username!r}, state={self.state!r}, "
                f"relayed={self.relayed_address!r})")

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def reason(self) -> str | None:
        return str(self.failure) if self.failure else None

    def start(self, now: float) -> None:
        """Begin (or, after `failed`/`closed`, begin again) an allocation."""
        self._reset()
        self.state = ALLOCATING
        family = m.FAMILY_IPV6 if self.family == 6 else m.FAMILY_IPV4
        lifetime = self.requested_lifetime

        def build() -> Message:
            msg = sc.allocate_request(family).add_u32(m.LIFETIME, lifetime)
            if self.software:
                msg.add(m.SOFTWARE, self.software.encode())
            return msg

        self._request("allocate", build, None, now)

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with LIFETIME 0). Safe in any state."""
        if self.state == READY:
            self._txs.clear()
            self._request("close", lambda: sc.refresh_request(0), None, now)
        else:
            self._txs.clear()
        self.state = CLOSED
        self._perms.clear()
        self._channels.clear()
        self._by_number.clear()

    def refresh(self, now: float) -> None:
        """Refresh the allocation now instead of at 80 % of its lifetime (e.g. after a network change)."""
        if self.state == READY and not any(tx.kind == "refresh" for tx in self._txs.values()):
            self._refresh_at = now

    def datagrams_to_send(self) -> list[bytes]:
        """Everything queued for the server, in order (all go to `self.server`)."""
        out, self._out = self._out, []
        return out

    # -- timers ------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [tx.next_send for tx in self._txs.values()]
        if self.state == READY:
            times.append(min(self._refresh_at, self.expires_at, self._keepalive_at, self._liveness_at))
            times += [p.refresh_at for p in self._perms.values() if not p.pending]
            times += [c.refresh_at for c in self._channels.values() if not c.pending]
        due = [t for t in times if t != float("inf")]
        return min(due) if due else None

    def handle_timers(self, now: float) -> None:
        for tid, tx in list(self._txs.items()):
            if now < tx.next_send or tid not in self._txs:  # a failure may have cleared the table
                continue
            if self.stream or now >= tx.first_sent + GIVE_UP_AFTER:
                del self._txs[tid]
                self._on_timeout(tx, now)
            else:
                tx.rto *= 2
                tx.next_send = min(now + tx.rto, tx.first_sent + GIVE_UP_AFTER)
                self._out.append(tx.data)
        if self.state != READY:
            return
        if now >= self.expires_at:
            self._fail(0, "allocation expired: no Refresh succeeded in time", True)
            return
        if now >= self._liveness_at:
            self._liveness_at = float("inf")  # re-armed by the answer
            if not any(tx.kind == "refresh" for tx in self._txs.values()):
                self._refresh_at = min(self._refresh_at, now)
        if now >= self._refresh_at:
            self._refresh_at = float("inf")  # re-armed by the answer (or the timeout)
            lifetime = self.requested_lifetime
            self._request("refresh", lambda: sc.refresh_request(lifetime), None, now)
        for ip, perm in list(self._perms.items()):
            if perm.pending or now < perm.refresh_at:
                continue
            if not perm.used and not perm.keep:
                # Nothing went to or came from this IP since the permission was last
                # installed: let it expire on the server instead of keeping it open.
                del self._perms[ip]
                continue
            self._send_permission(ip, now)
        for peer, chan in list(self._channels.items()):
            if chan.pending or now < chan.refresh_at:
                continue
            if not chan.used and not chan.keep:
                self._drop_channel(chan)
                continue
            self._send_bind(chan, now)
        if now >= self._keepalive_at:
            # Any request queued above refreshes the mapping just as well.
            if not self._out:
                self._out.append(m.Message(m.BINDING, m.INDICATION).encode(fingerprint=True))
            self._keepalive_at = now + self.keepalive  # type: ignore[operator]

    # -- peers -------------------------------------------------------------------------------------
    def permit(self, peer_ip: str, now: float, *, keep: bool = False) -> None:
        """Install a permission for `peer_ip`. Call it early. It is kept while traffic
        uses it; with `keep` also while idle, until `release(peer_ip)`."""
        ip = normalize((peer_ip, 0))[0]
        if self.state != READY or family_of(ip) != self._relayed_family():
            return
        perm = self._perms.get(ip)
        if perm is None:
            perm = self._perms[ip] = _Permission()
            self._send_permission(ip, now)
        if keep:
            perm.keep = True

    def release(self, peer_ip: str) -> None:
        """Stop pinning `peer_ip`'s permission and channels: they now lapse once traffic stops."""
        ip = normalize((peer_ip, 0))[0]
        perm = self._perms.get(ip)
        if perm is not None:
            perm.keep = False
        for chan in self._channels.values():
            if chan.peer[0] == ip:
                chan.keep = False

    def kept_permissions(self) -> list[str]:
        """The peer IPs pinned with `permit(..., keep=True)`."""
        return [ip for ip, perm in self._perms.items() if perm.keep]

    def release_channel(self, peer: tuple) -> None:
        """Stop pinning the channel to `peer` (its permission stays as it is)."""
        chan = self._channels.get(normalize(peer))
        if chan is not None:
            chan.keep = False

    def kept_channels(self) -> list[Address]:
        """The peer addresses whose channels are pinned with `bind(..., keep=True)`."""
        return [peer for peer, chan in self._channels.items() if chan.keep]

    def bind(self, peer: tuple, now: float, *, keep: bool = False) -> int | None:
        """Bind a channel to `peer` (idempotent). Returns its number, None when not possible.
        With `keep` the binding is refreshed while idle too, until `release`."""
        peer = normalize(peer)
        if self.state != READY or family_of(peer[0]) != self._relayed_family():
            return None
        chan = self._channels.get(peer)
        if chan is None:
            number = self._last_number.get(peer)
            if number is None or number in self._by_number:
                number = self._free_number()
            if number is None:
                return None
            self._last_number[peer] = number
            chan = _Channel(number, peer)
            self._channels[peer] = chan
            self._by_number[number] = chan
            self._send_bind(chan, now)
        if keep:
            chan.keep = True
        return chan.number

    def channel_of(self, peer: tuple) -> int | None:
        """The confirmed channel number for `peer`, if any."""
        chan = self._channels.get(normalize(peer))
        return chan.number if chan and chan.bound else None

    def has_permission(self, peer_ip: str) -> bool:
        perm = self._perms.get(peer_ip)
        return bool(perm and perm.installed)

    # -- data ---------------------------------------------------------------------------------------
    def wrap(self, payload: bytes, peer: tuple, now: float, *, channel: bool = True) -> bytes | None:
        """Bytes to send to the server so `payload` reaches `peer` from the relayed address.

        ChannelData (4 bytes of overhead) once a channel is bound, else a Send indication;
        with `channel` the first call starts binding one. Requests this queues must be
        sent before the returned frame (flush `datagrams_to_send()` first), so the server
        has the permission when the data arrives. None when not ready or family differs.
        """
        chan = self._channels.get(peer)  # type: ignore[arg-type]
        if chan is not None and chan.bound and self.state == READY:
            # Hot path (every tunnel packet through the relay): no address parsing.
            chan.used = True
            perm = self._perms.get(chan.peer[0])
            if perm is not None:
                perm.used = True
            return m.encode_channel_data(chan.number, payload, pad=self.stream)
        peer = normalize(peer)
        if self.state != READY or family_of(peer[0]) != self._relayed_family():
            return None
        chan = self._channels.get(peer)
        if chan is None and channel:
            self.bind(peer, now)
            chan = self._channels.get(peer)
        self._mark_used(peer[0], chan)
        if chan is not None:
            if chan.bound:
                return m.encode_channel_data(chan.number, payload, pad=self.stream)
        else:
            self.permit(peer[0], now)
            self._mark_used(peer[0], None)
        return sc.send_indication(peer, payload).encode(fingerprint=False)

    def unwrap(self, data: bytes, now: float) -> tuple[bytes, Address] | None:
        """Handle anything that came from the server.

        Returns (payload, peer) for ChannelData and Data indications, None for answers it
        consumed and for anything malformed or unknown (which changes nothing).
        """
        if len(data) < 4:
            return None
        first = data[0]
        try:
            if 0x40 <= first <= 0x4F:
                number, payload = m.decode_channel_data(data)
                chan = self._by_number.get(number)
                if chan is None:
                    return None
                self._mark_used(chan.peer[0], chan)
                return payload, chan.peer
            if first >= 0x40 or len(data) < m.HEADER_LEN or data[4:8] != m.MAGIC_COOKIE_BYTES:
                return None
            msg = m.parse(data)
            if msg.cls == m.INDICATION:
                return self._on_indication(msg, now)
            if msg.cls in (m.SUCCESS, m.ERROR):
                tx = self._txs.get(msg.transaction_id)
                if tx is not None:
                    self._on_response(tx, msg, now)
        except (StunError, ValueError):
            pass  # malformed: dropped, state untouched
        return None

    # -- responses ------------------------------------------------------------------------------------
    def _on_indication(self, msg: Message, now: float) -> tuple[bytes, Address] | None:
        if msg.method != m.DATA or self.state != READY:
            return None
        peer = msg.xor_address(m.XOR_PEER_ADDRESS)
        payload = msg.get(m.DATA_ATTR)
        if peer is None or payload is None:
            return None
        # Delivered whether or not a channel exists: a peer may answer before our bind lands.
        self._mark_used(peer[0], self._channels.get(peer))
        return payload, peer

    def _on_response(self, tx: _Tx, msg: Message, now: float) -> None:
        if msg.cls == m.SUCCESS:
            # Once we sign, a success must be signed back with our key: a forged or
            # replayed answer from elsewhere must not change the allocation.
            if tx.signed and not (self._key and msg.check_integrity(self._key)):
                return
            try:  # read every field first: a defective answer must not consume the transaction
                relayed = msg.xor_address(m.XOR_RELAYED_ADDRESS)
                mapped = msg.xor_address(m.XOR_MAPPED_ADDRESS)
                lifetime = msg.u32(m.LIFETIME)
            except StunError:
                return
            del self._txs[tx.tid]
            self._on_success(tx, relayed, mapped, lifetime, now)
            return
        code, reason = msg.error_code() or (0, "error response without ERROR-CODE")
        if code in (401, 438):
            realm_raw = msg.get(m.REALM)
            nonce = msg.get(m.NONCE)
            if nonce is not None and (code == 438 or not tx.signed) and tx.nonce_retries < MAX_NONCE_RETRIES:
                del self._txs[tx.tid]
                if realm_raw is not None:
                    self.realm = realm_raw.decode("utf-8", "replace")
                self._nonce = nonce
                self._key = m.long_term_key(self._creds.username, self.realm, self._creds.password)
                self._request(tx.kind, tx.build, tx.arg, now, nonce_retries=tx.nonce_retries + 1)
                return
            if code == 401:
                reason = f"{reason} (server rejected the credentials of user {self._creds.username!r})"
        del self._txs[tx.tid]
        try:
            alternate = msg.address(m.ALTERNATE_SERVER) if code == 300 else None
        except StunError:
            alternate = None
        self._on_error(tx, code, reason, now, alternate)

    def _on_success(self, tx: _Tx, relayed: Address | None, mapped: Address | None, lifetime: int | None,
                    now: float) -> None:
        if tx.kind == "allocate" and self.state == ALLOCATING:
            if relayed is None:
                self._fail(0, "Allocate success without XOR-RELAYED-ADDRESS", False)
                return
            self.relayed_address = relayed
            self.mapped_address = mapped
            self._set_lifetime(lifetime, now)
            self.state = READY
        elif tx.kind == "refresh" and self.state == READY:
            self._set_lifetime(lifetime, now)
        elif tx.kind == "permission":
            perm = self._perms.get(str(tx.arg))
            if perm is not None:
                perm.pending, perm.installed = False, True
                perm.refresh_at = now + PERMISSION_REFRESH
        elif tx.kind == "bind":
            chan = tx.arg
            if isinstance(chan, _Channel) and self._channels.get(chan.peer) is chan:
                chan.pending, chan.bound = False, True
                chan.refresh_at = now + CHANNEL_REFRESH
                # A ChannelBind installs or refreshes the peer's permission too.
                perm = self._perms.get(chan.peer[0])
                if perm is None:
                    perm = self._perms[chan.peer[0]] = _Permission()
                    perm.used = chan.used
                if not perm.pending:
                    perm.installed = True
                    perm.refresh_at = now + PERMISSION_REFRESH

    def _on_error(self, tx: _Tx, code: int, reason: str, now: float,
                  msg_alternate: Address | None = None) -> None:
        if tx.kind == "allocate" and self.state == ALLOCATING:
            if code == 300:
                # Following ALTERNATE-SERVER is the caller's choice; name it in the reason.
                alt = msg_alternate
                reason = f"{reason} (alternate server {alt[0]}:{alt[1]})" if alt else reason
            self._fail(code, f"Allocate failed: {reason}", code in _RETRYABLE)
        elif tx.kind == "refresh" and self.state == READY:
            if code == 437:
                self._fail(code, f"allocation lost on the server: {reason}", True)
            elif code in (401, 441):
                # TURN REST usernames carry their expiry and an allocation keeps its username,
                # so expired credentials end the allocation: the caller allocates anew with fresh ones.
                self._fail(code, f"Refresh refused: {reason}; credentials valid until {self._creds.expires}", True)
            else:
                # Transient: try again shortly; the allocation is still valid until it expires.
                self._refresh_at = now + 1.0
        elif tx.kind == "permission":
            self._permission_failed(str(tx.arg), now, retry=code in _RETRYABLE)
        elif tx.kind == "bind" and isinstance(tx.arg, _Channel):
            self._drop_channel(tx.arg)

    def _on_timeout(self, tx: _Tx, now: float) -> None:
        if tx.kind == "allocate" and self.state == ALLOCATING:
            transport = "stream" if self.stream else "UDP"
            self._fail(0, f"no answer from TURN server {self.server[0]}:{self.server[1]} over {transport} "
                          f"within {GIVE_UP_AFTER:g} s", True)
        elif tx.kind == "refresh" and self.state == READY:
            # Every retransmission over GIVE_UP_AFTER went unanswered (or, over a stream,
            # the one request): the server is gone or unreachable. Waiting for the
            # allocation to expire would keep publishing a dead relayed address for
            # minutes; the caller allocates again, here or on another relay.
            transport = "stream" if self.stream else "UDP"
            self._fail(0, f"relay silent: no answer to Refresh from {self.server[0]}:{self.server[1]} "
                          f"over {transport} within {GIVE_UP_AFTER:g} s", True)
        elif tx.kind == "permission":
            self._permission_failed(str(tx.arg), now)
        elif tx.kind == "bind" and isinstance(tx.arg, _Channel):
            chan = tx.arg
            if self._channels.get(chan.peer) is chan:
                # No answer (lost under load?): the server may hold the binding and relay
                # on this number, so keep it known and bind again shortly (kept while used).
                chan.pending = False
                chan.refresh_at = now + BIND_RETRY

    # -- internals -------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._txs.clear()
        self._last_number.clear()
        self._out.clear()
        self._perms.clear()
        self._channels.clear()
        self._by_number.clear()
        self.failure = None
        self.relayed_address = self.mapped_address = None
        self.lifetime = 0
        self.expires_at = 0.0
        self._refresh_at = float("inf")
        self._keepalive_at = float("inf")
        self._liveness_at = float("inf")

    def _fail(self, code: int, reason: str, retryable: bool) -> None:
        self.state = FAILED
        self.failure = TurnFailure(code, reason, retryable)
        self._txs.clear()
        self._perms.clear()
        self._channels.clear()
        self._by_number.clear()

    def _permission_failed(self, ip: str, now: float, retry: bool = True) -> None:
        perm = self._perms.get(ip)
        if perm is None:
            return
        if perm.keep and retry:
            # Pinned: the standby path must not vanish over one lost exchange; the server
            # may well still hold the permission, so `installed` stays as it was.
            perm.pending = False
            perm.refresh_at = now + PERMISSION_RETRY
        else:
            del self._perms[ip]

    def _set_lifetime(self, lifetime: int | None, now: float) -> None:
        self.lifetime = lifetime if lifetime else self.requested_lifetime
        self.expires_at = now + self.lifetime
        self._refresh_at = now + REFRESH_FRACTION * self.lifetime
        if self.liveness:
            self._liveness_at = now + self.liveness
        if self.keepalive and self._keepalive_at == float("inf"):
            self._keepalive_at = now + self.keepalive

    def _relayed_family(self) -> int:
        return family_of(self.relayed_address[0]) if self.relayed_address else self.family

    def _mark_used(self, ip: str, chan: _Channel | None) -> None:
        perm = self._perms.get(ip)
        if perm is not None:
            perm.used = True
        if chan is not None:
            chan.used = True

    def _send_permission(self, ip: str, now: float) -> None:
        perm = self._perms[ip]
        perm.pending, perm.used = True, False
        self._request("permission", lambda: sc.create_permission_request([(ip, 0)]), ip, now)

    def _send_bind(self, chan: _Channel, now: float) -> None:
        chan.pending, chan.used = True, False
        self._request("bind", lambda: sc.channel_bind_request(chan.number, chan.peer), chan, now)

    def _drop_channel(self, chan: _Channel) -> None:
        if self._channels.get(chan.peer) is chan:
            del self._channels[chan.peer]
        if self._by_number.get(chan.number) is chan:
            del self._by_number[chan.number]

    def _free_number(self) -> int | None:
        span = m.CHANNEL_MAX - m.CHANNEL_MIN + 1
        for _ in range(span):
            number = self._next_number
            self._next_number = m.CHANNEL_MIN + (number - m.CHANNEL_MIN + 1) % span
            if number not in self._by_number:
                return number
        return None

    def _request(self, kind: str, build: Callable[[], Message], arg: object, now: float,
                 nonce_retries: int = 0) -> None:
        msg = build()  # fresh transaction id each time (IPv6 XOR addresses depend on it)
        tx = _Tx(kind, build, arg)
        tx.nonce_retries = nonce_retries
        if self._key is not None:
            sc.add_auth(msg, self._creds.username, self.realm, self._nonce)
            tx.signed = True
        tx.tid = msg.transaction_id
        tx.data = msg.encode(key=self._key)
        tx.first_sent = now
        tx.rto = INITIAL_RTO
        tx.next_send = now + (GIVE_UP_AFTER if self.stream else INITIAL_RTO)
        self._txs[tx.tid] = tx
        self._out.append(tx.data)

