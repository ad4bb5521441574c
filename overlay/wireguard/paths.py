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

from collections.abc import Callable

from .endpoints import Endpoint, RelayEndpoint
from .pathstats import LOSSY_OFF, OUTAGE_RUN, WINDOW, PathStats

if TYPE_CHECKING:
    from .device import Datagrams, Device
    from .peer import Peer

PROBE_NIBBLE = 1
PING = 0x10
PONG = 0x11
PROBE_ID_LEN = 8
MAX_OUTSTANDING = 256  # probe ids remembered per peer (oldest dropped first)
PROBE_FAIL_AFTER = 3.0  # an endpoint unanswered this long shows as "failed"
HEARD_OK_WITHIN = 30.0  # an endpoint heard from this recently shows as "ok"
SEND_FAILED_WINDOW = 15.0

# Silence on the active endpoint while we send, before it is in doubt: a couple of
# round trips, but not less than this. 0.25 s lets the switch land before TCP's
# second retransmission (RTO 0.2 s, then 0.4 s later), so a stream pauses < 1 s.
SILENCE_FLOOR = 0.25
ACTIVE_PROBE_INTERVAL = 0.25  # how often the active endpoint is probed while traffic flows
# A direct endpoint must answer this many probes in a row to take over from a relay.
UPGRADE_ANSWERS = 3
# Switching for cost: the alternative must be cheaper by max(COST_MARGIN_ABS,
# COST_MARGIN_REL * active cost) for COST_HOLD seconds, and at least
# MIN_BETWEEN_COST_SWITCHES after the last such change. Each change for cost within
# FLAP_WINDOW doubles that wait (damping), up to FLAP_HOLD_MAX.
COST_MARGIN_ABS = 0.010
COST_MARGIN_REL = 0.30
COST_HOLD = 4.0
MIN_BETWEEN_COST_SWITCHES = 10.0
FLAP_WINDOW = 300.0
FLAP_HOLD_MAX = 300.0
LOSSY_PENALTY = 1.0  # seconds added to a lossy endpoint's cost: any clean path wins
RELAY_PENALTY = 0.020  # a relay costs the server's resources: direct wins a near tie
STATS_FRESH = 10.0  # an endpoint's figures count for cost only if it answered this recently

PATH_DIRECT = "direct"
PATH_RELAY = "relay"

# Why the active endpoint changed (shown by `overlay status` and logged).
REASON_SILENT = "active path silent"
REASON_SEND_ERROR = "send error"
REASON_ICMP = "ICMP error"
REASON_DIRECT = "direct path answered"
REASON_COST = "lower cost"
REASON_LOSS = "loss on the active path"
REASON_ROAMED = "peer roamed"
REASON_ENDPOINTS = "endpoints changed"
REASON_FIRST = "session established"
REASON_HANDSHAKE = "handshake from the peer"


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


def stats_of(peer: Peer, endpoint: Endpoint) -> PathStats:
    st = peer.path_stats.get(endpoint)
    if st is None:
        st = peer.path_stats[endpoint] = PathStats()
    return st


def send_probes(device: Device, peer: Peer, endpoints: list[Endpoint], now: float) -> Datagrams:
    """A ping to each of `endpoints` (nothing without a usable session)."""
    if device._usable_send_keypair(peer, now) is None:
        return []
    out: Datagrams = []
    if len(peer.probe_unanswered_since) > MAX_OUTSTANDING or len(peer.path_stats) > MAX_OUTSTANDING:
        known = set(peer.endpoint_set.all())
        peer.probe_unanswered_since = {e: t for e, t in peer.probe_unanswered_since.items() if e in known}
        peer.path_stats = {e: st for e, st in peer.path_stats.items() if e in known}
    for ep in endpoints:
        probe_id = device._rng(PROBE_ID_LEN)
        peer.probes[probe_id] = (ep, now)
        while len(peer.probes) > MAX_OUTSTANDING:
            peer.probes.pop(next(iter(peer.probes)))
        peer.probe_unanswered_since.setdefault(ep, now)
        out.extend(_seal_control(device, peer, ep, bytes([PING]) + probe_id, now))
        if ep == peer.endpoint_set.active and peer.unanswered_since is None:
            peer.unanswered_since = now
    return out


def ping(device: Device, peer: Peer, now: float,
         on_pong: Callable[[Endpoint, float], None]) -> Datagrams:
    """One probe on the active endpoint for a user's `overlay ping`: `on_pong(source,
    round trip)` is called when its answer arrives (never if it does not)."""
    active = peer.endpoint_set.active
    if active is None:
        return []
    out = send_probes(device, peer, [active], now)
    if out:
        probe_id = next(reversed(peer.probes))
        peer.pong_hooks[probe_id] = on_pong
        while len(peer.pong_hooks) > MAX_OUTSTANDING:
            peer.pong_hooks.pop(next(iter(peer.pong_hooks)))
    return out


def expire_probes(peer: Peer, now: float) -> None:
    """Probes unanswered for longer than their endpoint allows count as lost."""
    if not peer.probes:
        return
    expired = []
    for probe_id, (ep, sent) in peer.probes.items():
        st = stats_of(peer, ep)
        if now - sent >= st.lost_after():
            expired.append(probe_id)
            if sent >= st.forgive_before:
                st.lost(sent)
    for probe_id in expired:
        del peer.probes[probe_id]
        peer.pong_hooks.pop(probe_id, None)


def handle_control(device: Device, peer: Peer, plain: bytes, src: Endpoint, now: float) -> Datagrams:
    """An authenticated control message from `src` (already replay-checked)."""
    kind = plain[0]
    probe_id = bytes(plain[1:1 + PROBE_ID_LEN])
    eset = peer.endpoint_set
    eset.heard[src] = now
    if src == eset.active:
        peer.unanswered_since = None
    peer.probe_bytes += 32 + len(plain)  # header + tag around the padded plaintext
    if kind == PING:
        out = _seal_control(device, peer, src, bytes([PONG]) + probe_id, now)
        # The peer reached us directly while we still send through a relay: probe
        # back at once rather than at our next probe tick.
        if eset.is_relayed(eset.active) and not eset.is_relayed(src) and src not in peer.probe_unanswered_since:
            out.extend(send_probes(device, peer, [src], now))
        return out
    if kind != PONG:
        return []
    sent = peer.probes.pop(probe_id, None)
    if sent is None:
        return []
    probed, sent_at = sent
    rtt = now - sent_at
    peer.probe_unanswered_since.pop(probed, None)
    peer.probe_unanswered_since.pop(src, None)
    probed_st = stats_of(peer, probed)
    out_before = sum(1 for ep, t in peer.probes.values()
                     if ep == probed and probed_st.answered_sent_at < t < sent_at)
    probed_st.answered(rtt, now, sent_at, out_before)
    if src != probed:
        stats_of(peer, src).answered(rtt, now, sent_at)
    eset.failed_at.pop(src, None)
    hook = peer.pong_hooks.pop(probe_id, None)
    if hook is not None:
        hook(src, rtt)
    active = eset.active
    if src == active:
        peer.suspect_since = None
    elif peer.suspect_since is not None:
        if active_failed(peer, now) and _may_take_over_from_doubt(peer, src):
            switch(peer, src, now, peer.path_reason_pending or REASON_SILENT)
    elif (eset.is_relayed(active) and not eset.is_relayed(src) and _may_upgrade(peer, src, active)
          and peer.path_reason not in (REASON_COST, REASON_LOSS)):
        # (A relay chosen for cost is left by the cost rule, with its damping.)
        switch(peer, src, now, REASON_DIRECT)
    return []


def _may_take_over_from_doubt(peer: Peer, src: Endpoint) -> bool:
    """While the active endpoint is in doubt the first to answer takes over, except
    that a lossy one needs a real outage of the active one (several probes in a row
    lost): a lossy direct path is closer than the relay and would win every race."""
    st = peer.path_stats.get(src)
    if st is None or not st.lossy:
        return True
    active_st = peer.path_stats.get(peer.endpoint_set.active)
    return active_st is not None and active_st.lost_in_a_row >= OUTAGE_RUN


def _may_upgrade(peer: Peer, direct: Endpoint, relay: Endpoint) -> bool:
    """A direct endpoint replaces the relay once it answered UPGRADE_ANSWERS probes in
    a row, is not lossy, and does not cost clearly more than the relay."""
    st = peer.path_stats.get(direct)
    if st is None or st.lossy or st.answers_in_a_row < UPGRADE_ANSWERS:
        return False
    eset = peer.endpoint_set
    for other, ost in peer.path_stats.items():
        # A sibling direct endpoint is lossy (e.g. IPv4 and IPv6 over the same bad
        # link): a few lucky answers are no proof; wait for a full clean window.
        if other != direct and ost.lossy and not eset.is_relayed(other) and other in eset.kinds:
            if st.samples < WINDOW or st.loss >= LOSSY_OFF:
                return False
    relay_cost = cost(peer, relay)
    direct_cost = cost(peer, direct)
    return relay_cost is None or direct_cost is None or direct_cost <= relay_cost + _margin(relay_cost)


def cost(peer: Peer, endpoint: Endpoint) -> float | None:
    """Median round trip, plus LOSSY_PENALTY if lossy and RELAY_PENALTY through a relay."""
    st = peer.path_stats.get(endpoint)
    if st is None or st.median_rtt is None:
        return None
    c = st.median_rtt
    if st.lossy:
        c += LOSSY_PENALTY
    if peer.endpoint_set.is_relayed(endpoint):
        c += RELAY_PENALTY
    return c


def _margin(active_cost: float) -> float:
    return max(COST_MARGIN_ABS, COST_MARGIN_REL * active_cost)


def _cost_hold(peer: Peer, now: float) -> float:
    """The wait after a change for cost: doubled by every other such change within
    FLAP_WINDOW (flap damping)."""
    recent = sum(1 for t in peer.cost_switches if now - t < FLAP_WINDOW)
    return min(FLAP_HOLD_MAX, MIN_BETWEEN_COST_SWITCHES * 2 ** max(0, recent - 1))


def _damped(peer: Peer, now: float) -> bool:
    """Whether the last change for cost is too recent for another one."""
    return bool(peer.cost_switches) and now - peer.cost_switches[-1] < _cost_hold(peer, now)


def reconsider(peer: Peer, now: float) -> None:
    """Switch to an alternative that has cost clearly less than the active endpoint
    for COST_HOLD seconds (not while the active one is in doubt: that is handled by
    the first answer)."""
    eset = peer.endpoint_set
    active = eset.active
    if active is None or peer.suspect_since is not None:
        peer.cheaper = None
        return
    active_cost = cost(peer, active)
    if active_cost is None:
        return
    best, best_cost = None, None
    for ep in eset.all():
        if ep == active:
            continue
        st = peer.path_stats.get(ep)
        c = cost(peer, ep)
        if c is None or st is None or st.lost_in_a_row or now - eset.heard.get(ep, -1e18) > STATS_FRESH:
            continue
        if not eset.is_relayed(ep) and eset.is_relayed(active) and not _may_upgrade(peer, ep, active):
            continue
        if best_cost is None or c < best_cost:
            best, best_cost = ep, c
    if best is None or best_cost is None or best_cost >= active_cost - _margin(active_cost):
        peer.cheaper = None
        return
    if peer.cheaper is None or peer.cheaper[0] != best:
        peer.cheaper = (best, now)
        return
    if now - peer.cheaper[1] < COST_HOLD or _damped(peer, now):
        return
    active_st = peer.path_stats.get(active)
    reason = REASON_LOSS if active_st is not None and active_st.lossy else REASON_COST
    peer.cost_switches.append(now)
    eset.left_by_choice[active] = now + _cost_hold(peer, now)
    switch(peer, best, now, reason)


def switch(peer: Peer, endpoint: Endpoint, now: float, reason: str) -> None:
    """Make `endpoint` the active one (the session stays) and record why."""
    peer.endpoint_set.confirm(endpoint)
    moved(peer, now, reason)


def moved(peer: Peer, now: float, reason: str) -> None:
    """The active endpoint has just changed (here, by roaming or by a handshake): the
    old one's doubt, silence and cheaper rival mean nothing for the new one."""
    peer.suspect_since = None
    peer.path_reason_pending = None
    peer.unanswered_since = None
    peer.cheaper = None
    note_switch(peer, now, reason)


def note_switch(peer: Peer, now: float, reason: str) -> None:
    peer.path_since = now
    peer.path_reason = reason
    peer.path_change_count += 1
    peer.path_events.append((now, peer.endpoint_set.active, reason))
    del peer.path_events[:-32]


def doubt_active(peer: Peer, now: float, reason: str) -> None:
    """The active endpoint may be dead: probe everything, first answer takes over."""
    if peer.suspect_since is None:
        peer.suspect_since = now
        peer.path_reason_pending = reason
        peer.doubt_limit = 0.0


def _own_silence_limit(peer: Peer, active: Endpoint) -> float:
    """Silence that puts `active` in doubt from its own round trips (1 s unmeasured)."""
    st = peer.path_stats.get(active)
    return st.silence_limit(SILENCE_FLOOR) if st is not None else 1.0


def _silence_limit(peer: Peer, active: Endpoint) -> float:
    limit = _own_silence_limit(peer, active)
    if peer.data_elsewhere_at > peer.endpoint_set.heard.get(active, -1e18):
        # The peer's packets come by another path (it has not followed us yet): only
        # the probes tell whether ours works, so allow for their spacing.
        limit += ACTIVE_PROBE_INTERVAL
    return limit


def check_silence(peer: Peer, now: float) -> bool:
    """Whether the active endpoint has now been silent too long while we sent to it
    (it is then put in doubt, and probing every endpoint begins)."""
    since = peer.unanswered_since
    active = peer.endpoint_set.active
    if since is None or active is None or peer.suspect_since is not None:
        return False
    if peer.endpoint_set.heard.get(active, -1e18) >= since:
        peer.unanswered_since = None
        return False
    limit = _silence_limit(peer, active)
    if now - since < limit:
        return False
    doubt_active(peer, now, REASON_SILENT)
    peer.doubt_limit = limit
    return True


def active_failed(peer: Peer, now: float) -> bool:
    """Whether the endpoint in doubt is taken for dead: at once after a send or ICMP
    error, otherwise once its silence has lasted twice the limit that raised the
    doubt. Until then an answer from elsewhere does not move us: on a jittery, lossy
    path a late answer or two is no outage, and the active path keeps its place."""
    if peer.suspect_since is None:
        return False
    if peer.path_reason_pending in (REASON_SEND_ERROR, REASON_ICMP):
        return True
    since = peer.unanswered_since
    active = peer.endpoint_set.active
    if since is None or active is None:
        return False
    return now - since >= 2 * peer.doubt_limit


def may_follow_peer(peer: Peer, now: float) -> bool:
    """Whether the peer's packets from another endpoint may pull us off ours when our
    own choice says stay (a relay source while we are direct, or an endpoint we left
    for a better one): ours has failed, or it left our last probes or data
    unanswered since we chose it, while the peer's packets come the other way (the
    peer has given up on it)."""
    if active_failed(peer, now):
        return True
    since = peer.unanswered_since
    active = peer.endpoint_set.active
    if since is None or active is None:
        return False
    limit = _own_silence_limit(peer, active)
    heard = max(peer.endpoint_set.heard.get(active, -1e18), peer.path_since or -1e18)
    return now - since >= limit and now - heard >= 2 * limit


def resolve_doubt(peer: Peer, now: float) -> None:
    """End a doubt: the active endpoint spoke again, or it has failed and the closest
    endpoint that answered since the doubt began takes over."""
    since = peer.suspect_since
    if since is None:
        return
    eset = peer.endpoint_set
    active = eset.active
    if active is None or eset.heard.get(active, -1e18) >= since:
        peer.suspect_since = None
        return
    if not active_failed(peer, now):
        return
    answered = [e for e, st in peer.path_stats.items()
                if e != active and st.answered_at >= since and _may_take_over_from_doubt(peer, e)]
    if answered:
        best = min(answered, key=lambda e: cost(peer, e) if cost(peer, e) is not None else 1e9)
        switch(peer, best, now, peer.path_reason_pending or REASON_SILENT)


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


def path_kind(peer: Peer, endpoint: Endpoint | None) -> str | None:
    """"relay" when traffic to `endpoint` goes through a TURN relay (ours or the
    peer's), "direct" otherwise; None for no endpoint."""
    if endpoint is None:
        return None
    return PATH_RELAY if peer.endpoint_set.is_relayed(endpoint) else PATH_DIRECT


def path_of(peer: Peer) -> str | None:
    return path_kind(peer, peer.active_endpoint)


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
