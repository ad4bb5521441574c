"""When to probe which endpoints of the rendezvous peers (sans-I/O, fed `now`).

- A peer on a relay path: its direct endpoints are probed every PROBE_INTERVAL while
  traffic flows, backing off (doubling, up to PROBE_IDLE_MAX) while the tunnel is
  idle; a connect event (`reset`) brings the full rate back at once. The first pong
  from a direct endpoint moves the peer onto it (wireguard/paths.py).
- A peer on a direct path whose active endpoint went silent while we were sending
  data (`paths.active_looks_dead`): every endpoint is probed, relays included, each
  PROBE_INTERVAL, so the first that answers takes over well before WireGuard's own
  15 s handshake timeout.

Only rendezvous peers are given to the keeper: a stock WireGuard peer would drop
probes (they are not IP packets) but there is no point sending them.
"""

from __future__ import annotations

from collections.abc import Iterable

from overlay.wireguard import paths
from overlay.wireguard.device import Datagrams, Device

PROBE_INTERVAL = 1.0
PROBE_IDLE_MAX = 30.0


class _ProbeState:
    __slots__ = ("interval", "next_probe", "path", "traffic")

    def __init__(self) -> None:
        self.interval = PROBE_INTERVAL
        self.next_probe = 0.0
        self.traffic = -1  # user bytes (probes excluded) at the last tick
        self.path: str | None = None


class PathKeeper:
    def __init__(self) -> None:
        self._state: dict[bytes, _ProbeState] = {}

    def forget(self, key: bytes) -> None:
        self._state.pop(key, None)

    def reset(self, key: bytes, now: float) -> None:
        """A connect event: probe at the full rate again, starting one interval from now
        (the punch itself has just probed)."""
        st = self._state.setdefault(key, _ProbeState())
        st.interval = PROBE_INTERVAL
        st.next_probe = now + PROBE_INTERVAL

    def tick(self, device: Device, keys: Iterable[bytes], now: float
             ) -> tuple[Datagrams, list[tuple[bytes, str | None]]]:
        """Probes due now, and the peers whose path changed since the last tick."""
        out: Datagrams = []
        changes: list[tuple[bytes, str | None]] = []
        for key in keys:
            peer = device.peers.get(key)
            if peer is None:
                continue
            st = self._state.get(key)
            if st is None:
                st = self._state[key] = _ProbeState()
            path = paths.path_of(peer)
            if path != st.path and peer.current is not None:
                st.path = path
                changes.append((key, path))
            if path == paths.PATH_DIRECT:
                if paths.active_looks_dead(peer, now) and now >= st.next_probe:
                    out.extend(device.probe(peer, peer.endpoints, now))
                    st.next_probe = now + PROBE_INTERVAL
                continue
            if path != paths.PATH_RELAY:
                continue
            traffic = peer.rx_bytes + peer.tx_bytes - peer.probe_bytes
            if traffic != st.traffic:
                st.traffic = traffic
                st.interval = PROBE_INTERVAL  # traffic flows: probe at the full rate
            if now < st.next_probe:
                continue
            targets = paths.direct_endpoints(peer)
            if targets:
                out.extend(device.probe(peer, targets, now))
            st.next_probe = now + st.interval
            st.interval = min(PROBE_IDLE_MAX, st.interval * 2)
        return out, changes
