"""Path preference inside a session: in-session probes and endpoint states.

A probe is an ordinary encrypted transport message whose plaintext is not an IP
packet: its first byte has the high nibble 1 (IP packets have 4 or 6), so a stock
WireGuard peer decrypts it and drops it as a bad packet. Layout of the plaintext:

    byte 0     0x10 ping | 0x11 pong
    bytes 1-8  probe id (random; a pong echoes the ping's id)

The receiver answers a ping with a pong on the path the ping arrived by. A pong
that comes back from a direct endpoint proves the path works both ways; when the
peer is on a relay, that endpoint becomes active. The session (keys, counters)
never changes, so connections inside the tunnel just continue. Probes never make
the receiver roam: only data, keepalives and handshakes do.

Sans-I/O like the device: functions take the device, the peer and `now`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT
from .endpoints import Endpoint, RelayEndpoint

if TYPE_CHECKING:
    from .device import Datagrams, Device
    from .peer import Peer

PROBE_NIBBLE = 1
PING = 0x10
PONG = 0x11
PROBE_ID_LEN = 8
MAX_OUTSTANDING = 64  # probe ids remembered per peer (oldest dropped first)
PROBE_FAIL_AFTER = 3.0  # an endpoint unanswered this long shows as "failed"
HEARD_OK_WITHIN = 30.0  # an endpoint heard from this recently shows as "ok"
SEND_FAILED_WINDOW = 15.0

# The active endpoint counts as dead when nothing came from it for this long while
# we were sending data (the session then probes every endpoint, relays included).
SILENT_ACTIVE = 3.0

PATH_DIRECT = "direct"
PATH_RELAY = "relay"


def is_control(plain: bytes) -> bool:
    return len(plain) > PROBE_ID_LEN and plain[0] >> 4 == PROBE_NIBBLE


def _seal_control(device: Device, peer: Peer, endpoint: Endpoint, payload: bytes,
                  now: float) -> Datagrams:
    """Encrypt one control message without touching the data timers: a probe is
    neither data (it must not start a rekey when unanswered) nor a keepalive."""
    kp = device._usable_send_keypair(peer, now)
    if kp is None:
        return []
    saved = (peer.t_send_keepalive, peer.t_new_handshake, peer.t_persistent, peer.keepalive_needed)
    out = device._seal(peer, kp, endpoint, [payload], now)
    peer.probe_bytes += sum(len(d) for d, _ in out)
    peer.t_send_keepalive, peer.t_new_handshake, peer.t_persistent, peer.keepalive_needed = saved
    return out


def send_probes(device: Device, peer: Peer, endpoints: list[Endpoint], now: float) -> Datagrams:
    """A ping to each of `endpoints` (nothing without a usable session)."""
    if device._usable_send_keypair(peer, now) is None:
        return []
    out: Datagrams = []
    if len(peer.probe_unanswered_since) > MAX_OUTSTANDING:
        known = set(peer.endpoint_set.all())
        peer.probe_unanswered_since = {e: t for e, t in peer.probe_unanswered_since.items() if e in known}
        peer.probe_rtt = {e: t for e, t in peer.probe_rtt.items() if e in known}
    for ep in endpoints:
        probe_id = device._rng(PROBE_ID_LEN)
        peer.probes[probe_id] = (ep, now)
        while len(peer.probes) > MAX_OUTSTANDING:
            peer.probes.pop(next(iter(peer.probes)))
        peer.probe_unanswered_since.setdefault(ep, now)
        out.extend(_seal_control(device, peer, ep, bytes([PING]) + probe_id, now))
    return out


def handle_control(device: Device, peer: Peer, plain: bytes, src: Endpoint, now: float) -> Datagrams:
    """An authenticated control message from `src` (already replay-checked)."""
    kind = plain[0]
    probe_id = bytes(plain[1:1 + PROBE_ID_LEN])
    eset = peer.endpoint_set
    eset.heard[src] = now
    peer.probe_bytes += 32 + len(plain)  # header + tag around the padded plaintext
    if kind == PING:
        out = _seal_control(device, peer, src, bytes([PONG]) + probe_id, now)
        # The peer reached us directly while we still send through a relay: probe
        # back at once rather than at our next probe tick.
        if eset.is_relayed(eset.active) and not eset.is_relayed(src) and src not in peer.probe_unanswered_since:
            out.extend(send_probes(device, peer, [src], now))
        return out
    if kind == PONG:
        sent = peer.probes.pop(probe_id, None)
        if sent is None:
            return []
        peer.probe_unanswered_since.pop(sent[0], None)
        peer.probe_unanswered_since.pop(src, None)
        peer.probe_rtt[src] = now - sent[1]
        eset.failed_at.pop(src, None)
        active = eset.active
        if eset.is_relayed(active) and not eset.is_relayed(src):
            eset.confirm(src)  # relay -> direct, same session
        elif src != active and now - eset.heard.get(active, -1e18) >= SILENT_ACTIVE:
            eset.confirm(src)  # the active path went silent; this one answers
        return []
    return []


# How long after sending our own initiation a crossing initiation from the peer is
# ignored in favour of ours (only by the side with the larger public key).
CROSSING_WINDOW = 2.0


def keep_own_handshake(device: Device, peer: Peer, now: float) -> bool:
    """Whether to ignore the peer's initiation because ours is in flight.

    When both sides initiate at once (hole punching makes that the rule), each one
    consuming the other's initiation drops its own handshake, so both responses
    are then discarded and nothing works until the retransmission 5 s later. With
    an agent peer the tie is broken by key order: the larger key keeps its own
    handshake and ignores the peer's initiation; the smaller key answers. Limited
    to CROSSING_WINDOW after our initiation, so a one-way path cannot lock the
    peer out.
    """
    return (peer.crossing_tiebreak and peer.handshake is not None
            and peer.last_initiation_sent is not None
            and now - peer.last_initiation_sent < CROSSING_WINDOW
            and device.public_key > peer.public_key)


def path_of(peer: Peer) -> str | None:
    active = peer.active_endpoint
    if active is None:
        return None
    return PATH_RELAY if peer.endpoint_set.is_relayed(active) else PATH_DIRECT


def endpoint_state(peer: Peer, endpoint: Endpoint, now: float) -> str:
    """"active", "ok" (heard lately), "failed" (send error or unanswered probes) or "trying"."""
    eset = peer.endpoint_set
    if endpoint == peer.active_endpoint:
        return "active"
    heard = eset.heard.get(endpoint)
    failed = eset.failed_at.get(endpoint)
    if failed is not None and now - failed < SEND_FAILED_WINDOW and (heard is None or heard < failed):
        return "failed"
    since = peer.probe_unanswered_since.get(endpoint)
    if since is not None and now - since >= PROBE_FAIL_AFTER:
        return "failed"
    if heard is not None and now - heard < HEARD_OK_WITHIN:
        return "ok"
    return "trying"


def active_looks_dead(peer: Peer, now: float) -> bool:
    """Data went out at least SILENT_ACTIVE seconds ago and nothing at all came back since.

    The device arms `t_new_handshake` at the first data sent after the last packet
    received (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter ahead) and disarms it on any
    authenticated packet: so it tells when the unanswered sending began.
    """
    eset = peer.endpoint_set
    if peer.t_new_handshake is None or eset.active is None:
        return False
    first_unanswered = peer.t_new_handshake - (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
    return (now - first_unanswered >= SILENT_ACTIVE
            and now - max(eset.heard.values(), default=-1e18) >= SILENT_ACTIVE)


def direct_endpoints(peer: Peer) -> list[Endpoint]:
    """The peer's endpoints that do not go through any relay (probe targets)."""
    eset = peer.endpoint_set
    return [e for e in eset.all() if not eset.is_relayed(e) and not isinstance(e, RelayEndpoint)]


def punch(device: Device, peer: Peer, now: float) -> Datagrams:
    """Hole punching: reach every endpoint of `peer` at once.

    With a usable session: pings to all direct endpoints (the session stays). With
    a handshake in flight: the same initiation again to every endpoint (the
    responder answers identical copies identically). Otherwise a new handshake,
    sent to every endpoint without the happy-eyeballs stagger.
    """
    if device._usable_send_keypair(peer, now) is not None:
        return send_probes(device, peer, direct_endpoints(peer), now)
    targets = peer.endpoint_set.ordered_for_handshake()
    if (peer.initiation_bytes is not None and peer.last_initiation_sent is not None
            and peer.handshake is not None):
        msg = peer.initiation_bytes
        peer.eyeballs = None
        peer.tx_bytes += len(msg) * len(targets)
        return [(msg, e) for e in targets]
    out = device._initiate(peer, now, retry=False)
    if peer.eyeballs is not None:
        msg, rest, _ = peer.eyeballs
        peer.eyeballs = None
        out.extend((msg, e) for e in rest)
        peer.tx_bytes += len(msg) * len(rest)
    return out
