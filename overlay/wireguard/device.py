"""The sans-I/O WireGuard device: peers, handshakes, transport, timers.

Driven by a monotonic `now` (float seconds) passed into every call; returns
the datagrams to send as `(payload, endpoint)` pairs. The data path takes and
returns batches so the shell can move packets in bursts (GSO/GRO).

Nothing here raises on bad input from the network: junk is dropped and counted.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag

from . import crypto, noise, paths
from .allowedips import AllowedIPs, IPNetwork
from .constants import (
    INITIATION_SIZE,
    INITIATIONS_MIN_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    RESPONSE_SIZE,
    COOKIE_REPLY_SIZE,
    TRANSPORT_MIN_SIZE,
    ZERO_KEYS_AFTER,
)
from .cookie import CookieChecker
from .crypto import HandshakeCryptoError
from .endpoints import Endpoint, normalize
from .keypair import Keypair
from .messages import INITIATION_MAC1_OFFSET, RESPONSE_MAC1_OFFSET
from .peer import Peer
from .ratelimit import SourceRateLimiter

Datagrams = list[tuple[bytes, Endpoint]]


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()

_U32 = struct.Struct("<I")
_NONCE = struct.Struct("<4xQ")
_TRANSPORT_HEADER = struct.Struct("<IIQ")

# How long a byte-identical copy of an initiation we already answered is
# answered again with the same response, and how many times at most.
DUPLICATE_ANSWER_WINDOW = REKEY_TIMEOUT
DUPLICATE_ANSWER_LIMIT = 16


class Device:
    def __init__(
        self,
        private_key: bytes,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        happy_eyeballs_delay: float = 0.010,
        mtu: int = 1420,
        under_load_threshold: int = 64,
        under_load_window: float = 1.0,
        wall_clock: Callable[[float], float] | None = None,
        now: float = 0.0,
    ):
        """`wall_clock(now)` maps core time to Unix time for TAI64N timestamps;
        by default the offset between time.time() and time.monotonic() at start.
        Under load = more than `under_load_threshold` handshake messages received
        within `under_load_window` seconds; then initiations need a cookie (MAC2)."""
        if len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        self._rng = rng
        self.happy_eyeballs_delay = happy_eyeballs_delay
        self.mtu = mtu
        self.under_load_threshold = under_load_threshold
        self.under_load_window = under_load_window
        if wall_clock is None:
            offset = time.time() - time.monotonic()
            wall_clock = lambda t: t + offset  # noqa: E731
        self._wall_clock = wall_clock
        self._private_key, self._public_key = self._derive_keys(private_key)
        self.peers: dict[bytes, Peer] = {}
        self._indices: dict[int, object] = {}  # local index -> Keypair or Peer (pending handshake)
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._cookies = CookieChecker(self._public_key, rng, now)
        self._handshake_times: deque[float] = deque()
        # Under load, handshake messages are also limited per source address.
        self.source_limiter = SourceRateLimiter()
        self.dropped = 0  # datagrams/packets dropped as invalid, for diagnostics
        # Called with the peer whenever a new handshake (not a retry) is about to
        # start: the rendezvous session asks for hole punching then.
        self.on_new_handshake: Callable[[Peer], None] | None = None

    def __repr__(self) -> str:
        return f"Device(peers={len(self.peers)})"

    # ------------------------------------------------------------------ config
    @property
    def private_key(self) -> bytes:
        return self._private_key

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @staticmethod
    def _derive_keys(key: bytes) -> tuple[bytes, bytes]:
        # All zeros means "no private key" (as in wg): no handshakes at all.
        if not any(key):
            return bytes(32), bytes(32)
        private = crypto.clamp_private_key(key)
        return private, crypto.public_key(private)

    @property
    def has_private_key(self) -> bool:
        return any(self._private_key)

    def set_private_key(self, key: bytes, now: float) -> None:
        if len(key) != 32:
            raise ValueError("private key must be 32 bytes")
        private, public = self._derive_keys(key)
        if private == self._private_key:
            return
        self._private_key, self._public_key = private, public
        self._cookies.set_public_key(self._public_key)
        # A peer with our own public key makes no sense; WireGuard removes it.
        for pk in [pk for pk in self.peers if pk == self._public_key and self.has_private_key]:
            self.remove_peer(pk, now)
        for peer in self.peers.values():
            peer.static_static = self._static_static(peer.public_key)
            self._drop_sessions(peer)

    def _static_static(self, remote: bytes) -> bytes | None:
        if not self.has_private_key:
            return None
        try:
            return crypto.dh(self._private_key, remote)
        except HandshakeCryptoError:
            return None

    def set_peer(
        self,
        public_key: bytes,
        now: float,
        *,
        preshared_key: bytes | None | _Unchanged = UNCHANGED,
        endpoints: list[Endpoint] | None = None,
        allowed_ips: list[IPNetwork] | None = None,
        replace_allowed_ips: bool = False,
        persistent_keepalive: int | None = None,
    ) -> Peer:
        """Create or update a peer. Validates everything before changing anything."""
        if len(public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if not isinstance(preshared_key, _Unchanged) and preshared_key is not None \
                and len(preshared_key) != 32:
            raise ValueError("preshared key must be 32 bytes")
        if persistent_keepalive is not None and not 0 <= persistent_keepalive <= 65535:
            raise ValueError(f"persistent keepalive {persistent_keepalive} out of range 0..65535")
        norm_endpoints = [normalize(e) for e in endpoints] if endpoints is not None else None
        nets: list[IPNetwork] | None = None
        if allowed_ips is not None:
            try:
                nets = [ipaddress.ip_network(n, strict=False) for n in allowed_ips]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"bad allowed IP: {exc}") from None

        peer = self.peers.get(public_key)
        if peer is None:
            if public_key == self._public_key and self.has_private_key:
                raise ValueError("peer public key equals the interface's own public key")
            peer = Peer(public_key, self._static_static(public_key))
            self.peers[public_key] = peer
        if not isinstance(preshared_key, _Unchanged):
            peer.preshared_key = preshared_key if preshared_key and any(preshared_key) else None
        if norm_endpoints is not None:
            peer.endpoint_set.set_configured(norm_endpoints)
        if nets is not None:
            if replace_allowed_ips:
                for net in peer.allowed_ips:
                    self.allowed_ips.remove(net)
                peer.allowed_ips = []
            for net in nets:
                old = self.allowed_ips.insert(net, peer)
                if old is not None and old is not peer:
                    old.allowed_ips = [n for n in old.allowed_ips if n != net]
                if net not in peer.allowed_ips:
                    peer.allowed_ips.append(net)
        if persistent_keepalive is not None:
            was = peer.persistent_keepalive
            peer.persistent_keepalive = persistent_keepalive
            if persistent_keepalive == 0:
                peer.t_persistent = None
            elif was == 0:
                # As WireGuard does when the option is turned on: a keepalive right away.
                peer.t_persistent = now
        return peer

    def remove_peer(self, public_key: bytes, now: float) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        for net in peer.allowed_ips:
            self.allowed_ips.remove(net)
        self._drop_sessions(peer)

    def remove_all_peers(self, now: float) -> None:
        for pk in list(self.peers):
            self.remove_peer(pk, now)

    def _drop_sessions(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._indices.pop(kp.local_index, None)
        peer.current = peer.previous = peer.next = None
        self._clear_handshake(peer)
        peer.staged.clear()
        peer.t_retransmit = peer.t_send_keepalive = peer.t_new_handshake = None
        peer.t_zero_keys = None
        peer.eyeballs = None
        peer.handshake_attempts = 0
        peer.last_initiation_sent = None

    def _clear_handshake(self, peer: Peer) -> None:
        if peer.handshake is not None:
            if self._indices.get(peer.handshake.local_index) is peer:
                del self._indices[peer.handshake.local_index]
            peer.handshake = None
        peer.initiation_bytes = None

    def _new_index(self, owner: object) -> int:
        while True:
            idx = _U32.unpack(self._rng(4))[0]
            if idx not in self._indices:
                self._indices[idx] = owner
                return idx

    def _jitter(self) -> float:
        if self._rng is os.urandom:
            # Timer jitter needs no secrecy, and it is drawn for nearly every lone
            # packet sent (a ping): random() spares the getrandom syscall. An
            # injected rng (tests) is still used, so runs stay reproducible.
            return random.random() * REKEY_TIMEOUT_JITTER_MAX
        return _U32.unpack(self._rng(4))[0] / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    # ------------------------------------------------------------- handshakes
    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> Datagrams:
        if not retry:
            if (peer.last_initiation_sent is not None
                    and now - peer.last_initiation_sent < REKEY_TIMEOUT):
                return []
            peer.handshake_attempts = 0
            if self.on_new_handshake is not None:
                self.on_new_handshake(peer)
        targets = peer.endpoint_set.ordered_for_handshake()
        if not targets or peer.static_static is None:
            return []
        self._clear_handshake(peer)
        idx = self._new_index(peer)
        msg, state = noise.create_initiation(
            local_static_public=self._public_key, remote_static=peer.public_key,
            static_static=peer.static_static, local_index=idx,
            timestamp=crypto.tai64n(self._wall_clock(now)), rng=self._rng)
        peer.handshake = state
        msg = peer.cookies.add_macs(msg, now)
        peer.initiation_bytes = msg
        peer.last_initiation_sent = now
        self._any_authenticated_sent(peer, now)
        peer.t_retransmit = now + REKEY_TIMEOUT + self._jitter()
        first, others = targets[0], targets[1:]
        if peer.crossing_tiebreak and now - peer.endpoint_set.heard.get(first, -1e18) < REKEY_TIMEOUT:
            # A rekey of an agent peer on a path that works: the probes choose paths,
            # so the handshake stays on this one (a copy answered first through the
            # relay would otherwise move the session there).
            others = []
        out: Datagrams = [(msg, first)]
        if others:
            if self.happy_eyeballs_delay <= 0:
                out.extend((msg, e) for e in others)
            else:
                peer.eyeballs = (msg, others, now + self.happy_eyeballs_delay)
        else:
            peer.eyeballs = None
        peer.tx_bytes += len(msg) * len(out)
        return out

    def _is_under_load(self, now: float) -> bool:
        times = self._handshake_times
        times.append(now)
        horizon = now - self.under_load_window
        while times and times[0] < horizon:
            times.popleft()
        return len(times) > self.under_load_threshold

    def _admit_handshake(self, data: bytes, mac1_offset: int, src: Endpoint,
                         now: float) -> tuple[bytes, bool] | None:
        """MAC1, then under load the per-source limit: (message bytes, under load) or None (dropped).

        Both checks are cheap and come before any DH, so a flood of forged or
        unwanted handshakes costs a hash each, not a scalar multiplication.
        """
        if not self._cookies.check_mac1(data, mac1_offset):
            self.dropped += 1
            return None
        under_load = self._is_under_load(now)
        if under_load and not self.source_limiter.allow(src, now):
            self.dropped += 1
            return None
        return bytes(data), under_load

    def _handle_initiation(self, data: bytes, src: Endpoint, now: float, out: Datagrams) -> None:
        if not self.has_private_key:
            self.dropped += 1
            return
        admitted = self._admit_handshake(data, INITIATION_MAC1_OFFSET, src, now)
        if admitted is None:
            return
        data, under_load = admitted
        # A byte-identical copy of the initiation we answered last: with happy
        # eyeballs the initiator sends one initiation to several of our
        # addresses. Each copy is answered on its own path, with the SAME
        # response bytes: a fresh response would create a second keypair and
        # the initiator, keeping whichever response arrived first, could end up
        # on keys we already replaced. Re-sending creates no state, costs no DH
        # and is smaller than the initiation (no amplification), so it is safe
        # without a cookie; it is bounded in time and count, and it does not
        # roam (anyone can replay the bytes).
        for peer in self.peers.values():
            if peer.answered_initiation == data:
                if (now - peer.answered_at < DUPLICATE_ANSWER_WINDOW
                        and peer.answered_duplicates < DUPLICATE_ANSWER_LIMIT
                        and peer.answered_response is not None):
                    peer.answered_duplicates += 1
                    peer.rx_bytes += len(data)
                    peer.tx_bytes += len(peer.answered_response)
                    out.append((peer.answered_response, src))
                else:
                    self.dropped += 1
                return
        if under_load and not self._cookies.check_mac2(data, INITIATION_MAC1_OFFSET, src, now):
            out.append((self._cookies.make_reply(data, INITIATION_MAC1_OFFSET, src, now), src))
            return
        try:
            init = noise.consume_initiation(
                data, local_static_private=self._private_key,
                local_static_public=self._public_key,
                static_static_for=self._static_static_for)
        except HandshakeCryptoError:
            self.dropped += 1
            return
        peer = self.peers[init.remote_static]
        # TAI64N replay protection and WireGuard's flood guard.
        if init.timestamp <= peer.latest_timestamp:
            self.dropped += 1
            return
        if (peer.last_initiation_consumed is not None
                and now - peer.last_initiation_consumed < INITIATIONS_MIN_INTERVAL):
            self.dropped += 1
            return
        if paths.keep_own_handshake(self, peer, now):
            return  # crossing initiations with an agent peer: ours wins (see paths.py)
        peer.latest_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        # One handshake per peer: the peer's initiation supersedes ours.
        self._clear_handshake(peer)
        peer.eyeballs = None
        peer.rx_bytes += len(data)
        self._confirm_by_handshake(peer, src, now)
        self._any_authenticated_received(peer, now)

        # Reserve our index first (it goes into the response); the keypair that
        # will own it only exists once the response is built.
        idx = self._new_index(object())
        msg, keys = noise.create_response(init, local_index=idx,
                                          preshared_key=peer.preshared_key, rng=self._rng)
        msg = peer.cookies.add_macs(msg, now)
        kp = Keypair(peer, keys.send_key, keys.recv_key, initiator=False, local_index=idx,
                     remote_index=keys.remote_index, created=now)
        self._indices[idx] = kp
        self._install_keypair(peer, kp, now)
        peer.answered_initiation = data
        peer.answered_response = msg
        peer.answered_at = now
        peer.answered_duplicates = 0
        self._any_authenticated_sent(peer, now)
        peer.tx_bytes += len(msg)
        out.append((msg, src))

    def _static_static_for(self, remote_static: bytes) -> bytes | None:
        peer = self.peers.get(remote_static)
        return peer.static_static if peer is not None else None

    def _handle_response(self, data: bytes, src: Endpoint, now: float, out: Datagrams) -> None:
        admitted = self._admit_handshake(data, RESPONSE_MAC1_OFFSET, src, now)
        if admitted is None:
            return
        data, under_load = admitted
        receiver = _U32.unpack_from(data, 8)[0]
        peer = self._indices.get(receiver)
        if not isinstance(peer, Peer) or peer.handshake is None \
                or peer.handshake.local_index != receiver:
            self.dropped += 1
            return
        if under_load and not self._cookies.check_mac2(data, RESPONSE_MAC1_OFFSET, src, now):
            out.append((self._cookies.make_reply(data, RESPONSE_MAC1_OFFSET, src, now), src))
            return
        try:
            keys = noise.consume_response(data, peer.handshake,
                                          local_static_private=self._private_key,
                                          preshared_key=peer.preshared_key)
        except HandshakeCryptoError:
            self.dropped += 1
            return
        idx = peer.handshake.local_index
        peer.handshake = None
        peer.initiation_bytes = None
        kp = Keypair(peer, keys.send_key, keys.recv_key, initiator=True, local_index=idx,
                     remote_index=keys.remote_index, created=now)
        self._indices[idx] = kp
        peer.rx_bytes += len(data)
        # First valid response wins: its source becomes the active endpoint and
        # the copies not yet sent to the other endpoints are no longer needed.
        peer.eyeballs = None
        self._confirm_by_handshake(peer, src, now)
        self._any_authenticated_received(peer, now)
        self._install_keypair(peer, kp, now)
        self._handshake_complete(peer, now)
        # Confirm the new session at once: staged packets, or a keepalive.
        if not peer.staged:
            peer.staged.append(b"")
        out.extend(self._send_staged(peer, now))

    @staticmethod
    def _confirm_by_handshake(peer: Peer, src: Endpoint, now: float) -> None:
        eset = peer.endpoint_set
        if src == eset.active:
            return
        if peer.crossing_tiebreak:
            # An agent peer: a handshake moves the path only as far as its data would
            # (not a working direct path onto a relay, not back to a path we left).
            if not eset.roam(src, now, paths.may_follow_peer(peer, now)):
                return
        else:
            eset.confirm(src)
        paths.moved(peer, now, paths.REASON_HANDSHAKE)

    def _handle_cookie_reply(self, data: bytes, now: float) -> None:
        receiver = _U32.unpack_from(data, 4)[0]
        owner = self._indices.get(receiver)
        peer = owner if isinstance(owner, Peer) else getattr(owner, "peer", None)
        if peer is None:
            self.dropped += 1
            return
        try:
            peer.cookies.consume_reply(bytes(data), now)
        except HandshakeCryptoError:
            self.dropped += 1

    def _install_keypair(self, peer: Peer, kp: Keypair, now: float) -> None:
        """Place a fresh keypair following WireGuard's current/previous/next rules."""
        drop: list[Keypair | None] = []
        if kp.initiator:
            if peer.next is not None:
                drop += [peer.previous, peer.current]
                peer.previous, peer.next = peer.next, None
            else:
                drop.append(peer.previous)
                peer.previous = peer.current
            peer.current = kp
        else:
            # A responder may not send with new keys before the initiator used
            # them once: they wait as "next" until the first data arrives.
            drop += [peer.next, peer.previous]
            peer.next = kp
            peer.previous = None
        for old in drop:
            if old is not None:
                self._indices.pop(old.local_index, None)
        peer.sent_lastminute_handshake = False
        peer.t_zero_keys = now + ZERO_KEYS_AFTER

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.t_retransmit = None
        peer.handshake_attempts = 0
        peer.last_handshake = now

    # ----------------------------------------------------------- timer rules
    def _any_authenticated_sent(self, peer: Peer, now: float) -> None:
        peer.t_send_keepalive = None
        if peer.persistent_keepalive:
            peer.t_persistent = now + peer.persistent_keepalive

    def _any_authenticated_received(self, peer: Peer, now: float) -> None:
        peer.t_new_handshake = None
        if peer.persistent_keepalive:
            peer.t_persistent = now + peer.persistent_keepalive

    def _data_sent(self, peer: Peer, now: float) -> None:
        if peer.t_new_handshake is None:
            peer.t_new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def _data_received(self, peer: Peer, now: float) -> None:
        if peer.t_send_keepalive is None:
            peer.t_send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            peer.keepalive_needed = True

    # -------------------------------------------------------------- transport
    def _usable_send_keypair(self, peer: Peer, now: float) -> Keypair | None:
        kp = peer.current
        if kp is None or now - kp.created >= REJECT_AFTER_TIME \
                or kp.send_counter >= REJECT_AFTER_MESSAGES:
            return None
        return kp

    def _send_staged(self, peer: Peer, now: float) -> Datagrams:
        """Encrypt the peer's staged packets (b"" = keepalive), or start a handshake."""
        kp = self._usable_send_keypair(peer, now)
        endpoint = peer.endpoint_set.active
        if kp is None or endpoint is None:
            return self._initiate(peer, now, retry=False)
        packets = list(peer.staged)
        peer.staged.clear()
        return self._seal(peer, kp, endpoint, packets, now)

    def _seal(self, peer: Peer, kp: Keypair, endpoint: Endpoint, packets: list[bytes],
              now: float) -> Datagrams:
        """Encrypt a burst for one peer (the per-packet loop is kept flat on purpose)."""
        out: Datagrams = []
        append = out.append
        data_sent = False
        mtu = self.mtu
        tx = 0
        counter = kp.send_counter
        encrypt = kp.send_cipher.encrypt
        header_pack = _TRANSPORT_HEADER.pack
        nonce_pack = _NONCE.pack
        remote = kp.remote_index
        for pkt in packets:
            n = len(pkt)
            if n:
                data_sent = True
                if n & 15 and n < mtu:
                    # Pad to a multiple of 16 (hides exact lengths), never beyond the MTU.
                    padded = (n + 15) & ~15
                    if padded > mtu:
                        padded = mtu
                    pkt = bytes(pkt) + bytes(padded - n)
            msg = header_pack(4, remote, counter) + encrypt(nonce_pack(counter), pkt, None)
            counter += 1
            tx += len(msg)
            append((msg, endpoint))
        kp.send_counter = counter
        peer.tx_bytes += tx
        self._any_authenticated_sent(peer, now)
        if endpoint == peer.endpoint_set.active:
            peer.last_sent_active = now  # (auto keepalive: the NAT mapping was just used)
            if data_sent and peer.unanswered_since is None:
                peer.unanswered_since = now  # (paths.check_silence: is it still answering?)
        if data_sent:
            self._data_sent(peer, now)
        # Keep the key fresh: the initiator rekeys after REKEY_AFTER_TIME, anyone after too many messages.
        if counter >= REKEY_AFTER_MESSAGES or (
                kp.initiator and now - kp.created >= REKEY_AFTER_TIME):
            out.extend(self._initiate(peer, now, retry=False))
        return out

    def tun_packets(self, packets: Iterable[bytes], now: float) -> Datagrams:
        """Plaintext IP packets read from the TUN -> datagrams to send."""
        lookup = self.allowed_ips.lookup_packet_destination
        by_peer: dict[Peer, list[bytes]] = {}
        # Bursts are mostly for one destination: remember the last lookup.
        last_dst = None
        last_list: list[bytes] | None = None
        for pkt in packets:
            v = pkt[0] >> 4 if pkt else 0
            dst = pkt[16:20] if v == 4 else pkt[24:40]
            if dst == last_dst and last_list is not None:
                last_list.append(pkt)
                continue
            peer = lookup(pkt)
            if peer is None:
                self.dropped += 1
                last_dst = last_list = None
                continue
            lst = by_peer.get(peer)
            if lst is None:
                lst = by_peer[peer] = []
            lst.append(pkt)
            last_dst, last_list = dst, lst
        out: Datagrams = []
        for peer, pkts in by_peer.items():
            peer.last_user_data = now
            kp = self._usable_send_keypair(peer, now)
            endpoint = peer.endpoint_set.active
            if kp is not None and endpoint is not None and not peer.staged:
                out.extend(self._seal(peer, kp, endpoint, pkts, now))
            else:
                # No session yet (or packets already waiting): keep the newest
                # ones and make sure a handshake is under way.
                peer.staged.extend(pkts)
                out.extend(self._send_staged(peer, now))
        return out

    def datagrams(self, items: Iterable[tuple[bytes, Endpoint]],
                  now: float) -> tuple[list[bytes], Datagrams]:
        """Received datagrams -> (IP packets for the TUN, datagrams to send).

        The transport branch is the hot path and is written flat: consecutive
        datagrams of one session (the usual GRO burst) reuse the keypair, the
        endpoint check and the AllowedIPs answer of the previous one.
        """
        packets: list[bytes] = []
        append_packet = packets.append
        out: Datagrams = []
        received: dict[Peer, Keypair] = {}
        got_data: set[Peer] = set()
        indices = self._indices
        header_unpack = _TRANSPORT_HEADER.unpack_from
        nonce_pack = _NONCE.pack
        min_size = TRANSPORT_MIN_SIZE
        reject_after = REJECT_AFTER_MESSAGES
        keypair_type = Keypair
        last_receiver = kp = replay = ring = decrypt = peer = None
        authenticated_kp = None  # the keypair of the current run once a packet passed
        last_src_ep = None
        last_src = last_src_peer = last_data_peer = None
        rx = 0
        for data, src in items:
            n = len(data)
            if n < 16:
                self.dropped += 1
                continue
            try:
                head, receiver, counter = header_unpack(data, 0)
                if head == 4 and n >= min_size:
                    if receiver != last_receiver:
                        if peer is not None:
                            peer.rx_bytes += rx
                            rx = 0
                        cand = indices.get(receiver)
                        if type(cand) is not keypair_type or now - cand.created >= REJECT_AFTER_TIME:
                            self.dropped += 1
                            last_receiver = peer = None
                            continue
                        kp = cand
                        peer = kp.peer
                        replay = kp.replay
                        ring = replay._ring
                        decrypt = kp.recv_cipher.decrypt
                        last_receiver = receiver
                        last_src_ep = authenticated_kp = None
                    highest = replay._highest
                    if counter <= highest and not replay.check(counter):
                        self.dropped += 1
                        continue
                    try:
                        plain = decrypt(nonce_pack(counter), data[16:], None)
                    except InvalidTag:
                        self.dropped += 1
                        continue
                    if counter > highest and (counter >> 6) == (highest >> 6) \
                            and counter < reject_after:
                        # In order, same 64-bit block: the common case, inline.
                        ring[(counter >> 6) & replay._mask] |= 1 << (counter & 63)
                        replay._highest = counter
                    elif not replay.accept(counter):
                        self.dropped += 1
                        continue
                    rx += n
                    if kp is not authenticated_kp:
                        # First authenticated packet of this run of the session.
                        authenticated_kp = kp
                        received[peer] = kp
                        if kp is peer.next:
                            self._confirm_next(peer, now)
                            if peer.staged:  # packets that waited for a session
                                out.extend(self._send_staged(peer, now))
                    if src is not last_src_ep:
                        eset = peer.endpoint_set
                        if src == eset.active:
                            eset.heard[src] = now
                            peer.unanswered_since = None
                            last_src_ep = src
                        elif not plain or plain[0] >> 4 != paths.PROBE_NIBBLE:
                            peer.data_elsewhere_at = now
                            if eset.roam(src, now, paths.may_follow_peer(peer, now)):
                                last_src_ep = src  # roamed (probes never roam)
                                paths.moved(peer, now, paths.REASON_ROAMED)
                        else:
                            eset.heard[src] = now
                    if not plain:
                        continue  # keepalive
                    # Inner packet: strip padding, check the source against the
                    # peer's AllowedIPs (cached for runs from the same source).
                    pn = len(plain)
                    version = plain[0] >> 4
                    if version == 4 and pn >= 20:
                        if not (peer is last_src_peer and plain.startswith(last_src, 12)):
                            isrc = plain[12:16]
                            if self.allowed_ips.lookup_v4(isrc) is not peer:
                                self.dropped += 1
                                continue
                            last_src, last_src_peer = isrc, peer
                        total = (plain[2] << 8) | plain[3]
                        if total < 20 or total > pn:
                            self.dropped += 1
                            continue
                    elif version == 6 and pn >= 40:
                        if not (peer is last_src_peer and plain.startswith(last_src, 8)):
                            isrc = plain[8:24]
                            if self.allowed_ips.lookup_v6(isrc) is not peer:
                                self.dropped += 1
                                continue
                            last_src, last_src_peer = isrc, peer
                        total = 40 + ((plain[4] << 8) | plain[5])
                        if total > pn:
                            self.dropped += 1
                            continue
                    elif paths.is_control(plain):
                        out.extend(paths.handle_control(self, peer, plain, src, now))
                        continue
                    else:
                        self.dropped += 1
                        continue
                    append_packet(plain if total == pn else plain[:total])
                    if peer is not last_data_peer:
                        got_data.add(peer)
                        last_data_peer = peer
                    continue
                # Handshake messages may retire keypairs: forget the cached one.
                if peer is not None:
                    peer.rx_bytes += rx
                    rx = 0
                last_receiver = peer = authenticated_kp = None
                last_src_peer = None
                if head == 1 and n == INITIATION_SIZE:
                    self._handle_initiation(data, src, now, out)
                elif head == 2 and n == RESPONSE_SIZE:
                    self._handle_response(data, src, now, out)
                elif head == 3 and n == COOKIE_REPLY_SIZE:
                    self._handle_cookie_reply(data, now)
                else:
                    self.dropped += 1
            except (ValueError, struct.error, HandshakeCryptoError):
                self.dropped += 1
        if peer is not None:
            peer.rx_bytes += rx
        # Timer updates once per peer per batch instead of once per packet.
        for peer, kp in received.items():
            self._any_authenticated_received(peer, now)
            if peer in got_data:
                self._data_received(peer, now)
                peer.last_user_data = now
            if (kp is peer.current and kp.initiator and not peer.sent_lastminute_handshake
                    and now - kp.created >= REKEY_ON_RECEIVE_AGE):
                peer.sent_lastminute_handshake = True
                out.extend(self._initiate(peer, now, retry=False))
        return packets, out

    def _confirm_next(self, peer: Peer, now: float) -> None:
        """The initiator used the keys we responded with: promote them to current."""
        if peer.previous is not None:
            self._indices.pop(peer.previous.local_index, None)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now)

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        best: float | None = None
        for peer in self.peers.values():
            for t in peer.deadlines():
                if best is None or t < best:
                    best = t
            if peer.auto_keepalive and peer.last_sent_active is not None:
                t = peer.last_sent_active + peer.auto_keepalive
                if best is None or t < best:
                    best = t
        return best

    def handle_timers(self, now: float) -> Datagrams:
        out: Datagrams = []
        for peer in list(self.peers.values()):
            if peer.eyeballs is not None and now >= peer.eyeballs[2]:
                msg, targets, _ = peer.eyeballs
                peer.eyeballs = None
                failed = peer.endpoint_set.failed_at
                for e in targets:
                    if now - failed.get(e, -1e18) >= REKEY_TIMEOUT:
                        out.append((msg, e))
                        peer.tx_bytes += len(msg)
            if peer.t_retransmit is not None and now >= peer.t_retransmit:
                peer.t_retransmit = None
                if peer.handshake_attempts >= MAX_TIMER_HANDSHAKES:
                    # Give up after REKEY_ATTEMPT_TIME; the keys go after a while.
                    peer.staged.clear()
                    self._clear_handshake(peer)
                    peer.eyeballs = None
                    if peer.t_zero_keys is None:
                        peer.t_zero_keys = now + ZERO_KEYS_AFTER
                else:
                    peer.handshake_attempts += 1
                    out.extend(self._initiate(peer, now, retry=True))
            if peer.t_send_keepalive is not None and now >= peer.t_send_keepalive:
                peer.t_send_keepalive = None
                out.extend(self._keepalive(peer, now))
                if peer.keepalive_needed:
                    peer.keepalive_needed = False
                    peer.t_send_keepalive = now + KEEPALIVE_TIMEOUT
            if peer.t_new_handshake is not None and now >= peer.t_new_handshake:
                # We sent data and heard nothing for KEEPALIVE + REKEY_TIMEOUT.
                peer.t_new_handshake = None
                out.extend(self._initiate(peer, now, retry=False))
            if peer.t_zero_keys is not None and now >= peer.t_zero_keys:
                peer.t_zero_keys = None
                self._drop_sessions(peer)
            if peer.t_persistent is not None and now >= peer.t_persistent:
                peer.t_persistent = None
                if peer.persistent_keepalive:
                    out.extend(self._keepalive(peer, now))
                    if peer.t_persistent is None:  # nothing could be sent: try again later
                        peer.t_persistent = now + peer.persistent_keepalive
            if peer.auto_keepalive and peer.last_sent_active is not None \
                    and now >= peer.last_sent_active + peer.auto_keepalive:
                # Nothing went out to the active endpoint for a whole interval: the
                # NAT mapping would lapse. (Without a session this starts a handshake,
                # which goes out on the same path and holds the mapping too.)
                out.extend(self._keepalive(peer, now))
                peer.last_sent_active = now
        return out

    def set_auto_keepalive(self, peer: Peer, seconds: float) -> None:
        """Keep the peer's active path warm: a keepalive whenever nothing was sent to
        it for `seconds` (0 = off). The shell re-arms its timer afterwards."""
        peer.auto_keepalive = max(0.0, float(seconds))

    def probe(self, peer: Peer, endpoints: list[Endpoint], now: float) -> Datagrams:
        """In-session pings to `endpoints` (see paths.py); nothing without a session."""
        return paths.send_probes(self, peer, endpoints, now)

    def _keepalive(self, peer: Peer, now: float) -> Datagrams:
        if not peer.staged:
            peer.staged.append(b"")
        return self._send_staged(peer, now)

    # ---------------------------------------------------------------- endpoints
    def send_failed(self, endpoint: Endpoint, err: int, now: float,
                    reason: str = paths.REASON_SEND_ERROR) -> Datagrams:
        """The shell could not send to `endpoint` (ENETUNREACH, EHOSTUNREACH, ...).

        If it was a peer's active endpoint, switch to another endpoint at once
        and offer the handshake on the remaining ones; the session is kept.
        """
        out: Datagrams = []
        for peer in self.peers.values():
            eset = peer.endpoint_set
            if endpoint not in eset.all() and endpoint != eset.active:
                continue
            eset.failed_at[endpoint] = now
            if endpoint != eset.active:
                continue
            fresh = [e for e in eset.ordered_for_handshake()
                     if e != endpoint and now - eset.failed_at.get(e, -1e18) >= REKEY_TIMEOUT]
            if not fresh:
                continue
            # The one heard from most recently first: it is the likeliest to work. The
            # others are probed at once (paths.doubt_active) and the first to answer wins.
            fresh.sort(key=lambda e: -eset.heard.get(e, -1e18))
            eset.active = fresh[0]
            peer.unanswered_since = None
            paths.note_switch(peer, now, reason)
            paths.doubt_active(peer, now, reason)
            if peer.crossing_tiebreak and self._usable_send_keypair(peer, now) is not None:
                continue  # an agent peer answers probes: they find the working path
            if peer.eyeballs is not None:
                # Happy eyeballs were still holding copies back: send them now.
                msg, _, _ = peer.eyeballs
                peer.eyeballs = None
                out.extend((msg, e) for e in fresh)
                peer.tx_bytes += len(msg) * len(fresh)
            elif (peer.initiation_bytes is not None and peer.last_initiation_sent is not None
                  and now - peer.last_initiation_sent < REKEY_TIMEOUT):
                # A handshake is in flight: offer the same initiation on the
                # other paths (the responder answers identical copies).
                out.extend((peer.initiation_bytes, e) for e in fresh)
                peer.tx_bytes += len(peer.initiation_bytes) * len(fresh)
            else:
                sent = self._initiate(peer, now, retry=True)
                out.extend(sent)
                if peer.eyeballs is not None:
                    msg, targets, _ = peer.eyeballs
                    peer.eyeballs = None
                    out.extend((msg, e) for e in targets if e in fresh)
        return out
