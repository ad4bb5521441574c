"""When to probe which endpoints of the rendezvous peers (sans-I/O, fed `now`).

While traffic flows (an IP packet went either way within TRAFFIC_RECENT):
- the active endpoint is probed every ACTIVE_INTERVAL, so its round trip is known and
  a dead path shows within a fraction of a second even on a one-way stream;
- direct alternatives every DIRECT_WHILE_RELAYED while the peer is on a relay (the
  way back to direct must be found within seconds of it opening);
- other alternatives every ALTERNATIVE_INTERVAL.
While idle, every interval backs off, doubling up to IDLE_MAX for the active endpoint
(and the direct ones while relayed) and IDLE_ALTERNATIVES_MAX for the rest: probes are
the tunnel's only idle cost besides keepalives. Retrying direct endpoints never stops.

While the active endpoint is in doubt (paths.check_silence: silent while we send, or
a send error) every endpoint is probed each DOUBT_INTERVAL and the first to answer
takes over (paths.handle_control). A network change (`network_changed`) or a connect
event (`reset`) probes everything at once and restores the full rate.

Each tick also counts unanswered probes as lost, lets the cost rule run
(paths.reconsider) and reports every change of the active endpoint with its reason.

Only rendezvous peers are given to the keeper: a stock WireGuard peer would drop
probes (they are not IP packets), so there is no point sending them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from overlay.wireguard import paths
from overlay.wireguard.device import Datagrams, Device
from overlay.wireguard.endpoints import Endpoint
from overlay.wireguard.peer import Peer

ACTIVE_INTERVAL = paths.ACTIVE_PROBE_INTERVAL
DIRECT_WHILE_RELAYED = 0.5
ALTERNATIVE_INTERVAL = 2.0
DOUBT_INTERVAL = 0.2
DOUBT_FAST_FOR = 10.0  # after this long in doubt with no answer, probe once a second
IDLE_FIRST = 1.0
IDLE_MAX = 30.0  # for the active endpoint, and direct ones while relayed
IDLE_ALTERNATIVES_MAX = 120.0  # the rest: only needed once the active one fails
TRAFFIC_RECENT = 2.0
TICK = 0.05  # how often the shell should call tick()


class PathChange(NamedTuple):
    key: bytes
    path: str | None
    endpoint: Endpoint | None
    reason: str


class _ProbeState:
    __slots__ = ("active", "idle_interval", "next_active", "next_alternatives", "next_direct", "next_doubt")

    def __init__(self) -> None:
        self.next_active = 0.0
        self.next_alternatives = 0.0
        self.next_direct = 0.0
        self.next_doubt = 0.0
        self.idle_interval = IDLE_FIRST
        self.active: Endpoint | None = None  # the active endpoint last reported

    def probe_everything_now(self, now: float) -> None:
        self.next_active = self.next_alternatives = self.next_direct = now
        self.idle_interval = IDLE_FIRST


class PathKeeper:
    def __init__(self) -> None:
        self._state: dict[bytes, _ProbeState] = {}

    def forget(self, key: bytes) -> None:
        self._state.pop(key, None)

    def reset(self, key: bytes, now: float) -> None:
        """A connect event: full rate again, starting one interval from now (the punch
        itself has just probed)."""
        st = self._state.setdefault(key, _ProbeState())
        st.idle_interval = IDLE_FIRST
        st.next_direct = st.next_alternatives = now + DIRECT_WHILE_RELAYED

    def network_changed(self, now: float) -> None:
        """Our addresses or routes changed: every path may be different now."""
        for st in self._state.values():
            st.probe_everything_now(now)

    def tick(self, device: Device, keys: Iterable[bytes], now: float
             ) -> tuple[Datagrams, list[PathChange]]:
        """Probes due now, and the changes of active endpoint since the last tick."""
        out: Datagrams = []
        changes: list[PathChange] = []
        for key in keys:
            peer = device.peers.get(key)
            if peer is None:
                continue
            st = self._state.get(key)
            if st is None:
                st = self._state[key] = _ProbeState()
            paths.expire_probes(peer, now)
            paths.check_silence(peer, now)
            paths.resolve_doubt(peer, now)
            out.extend(self._probes_due(device, peer, st, now))
            paths.reconsider(peer, now)
            changes.extend(self._changes(key, peer, st, now))
        return out, changes

    def _probes_due(self, device: Device, peer: Peer, st: _ProbeState, now: float) -> Datagrams:
        active = peer.active_endpoint
        if active is None or peer.current is None:
            return []
        if peer.suspect_since is not None:
            if now < st.next_doubt:
                return []
            fast = now - peer.suspect_since < DOUBT_FAST_FOR
            st.next_doubt = now + (DOUBT_INTERVAL if fast else 1.0)
            return device.probe(peer, peer.endpoints, now)
        busy = now - peer.last_user_data < TRAFFIC_RECENT
        if busy:
            st.idle_interval = IDLE_FIRST
        eset = peer.endpoint_set
        relayed = eset.is_relayed(active)
        targets: list[Endpoint] = []
        idle = min(IDLE_MAX, st.idle_interval)
        if now >= st.next_active:
            targets.append(active)
            st.next_active = now + (ACTIVE_INTERVAL if busy else idle)
        if relayed and now >= st.next_direct:
            targets.extend(e for e in paths.direct_endpoints(peer) if e != active)
            st.next_direct = now + (DIRECT_WHILE_RELAYED if busy else idle)
        if now >= st.next_alternatives:
            targets.extend(e for e in peer.endpoints
                           if e != active and e not in targets and not (relayed and not eset.is_relayed(e)))
            st.next_alternatives = now + (ALTERNATIVE_INTERVAL if busy else st.idle_interval)
            if not busy:
                st.idle_interval = min(IDLE_ALTERNATIVES_MAX, st.idle_interval * 2)
        return device.probe(peer, targets, now) if targets else []

    @staticmethod
    def _changes(key: bytes, peer: Peer, st: _ProbeState, now: float) -> list[PathChange]:
        active = peer.active_endpoint
        if peer.current is None:
            return []
        if active != st.active and (not peer.path_events or peer.path_events[-1][1] != active):
            # Changed by something that records no reason: the first session, new candidates.
            paths.note_switch(peer, now, paths.REASON_FIRST if st.active is None else paths.REASON_ENDPOINTS)
        st.active = active
        out = [PathChange(key, paths.path_kind(peer, ep), ep, reason) for _, ep, reason in peer.path_events]
        peer.path_events.clear()
        return out
