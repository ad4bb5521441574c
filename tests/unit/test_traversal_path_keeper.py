"""Probe timing of the PathKeeper with a fake clock, on the two-node world of
test_wg_paths (A and B behind NATs, B's TURN allocation, a blockable direct path)."""

from __future__ import annotations

from itertools import pairwise

from overlay.traversal.path_keeper import (
    ACTIVE_INTERVAL,
    DIRECT_WHILE_RELAYED,
    DOUBT_INTERVAL,
    IDLE_MAX,
    PathKeeper,
)
from overlay.wireguard import paths

from .test_wg_paths import B_D, R_B, World


def relayed_world() -> World:
    w = World()
    w.direct_open = False
    w.ping_a_to_b(1.0)
    w.timers(1.011)
    w.ping_b_to_a(1.02)
    assert paths.path_of(w.pa) == "relay"
    return w


def probes_by_target(w: World, keeper: PathKeeper, start: float, end: float, traffic: bool,
                     step: float = 0.05) -> dict[object, list[float]]:
    """Tick the keeper from `start` to `end`; the times each endpoint was probed."""
    seen: dict[object, list[float]] = {}
    t = start
    while t < end:
        if traffic:
            w.ping_a_to_b(t)
        out, _ = keeper.tick(w.a, [w.b.public_key], t)
        for msg, dst in out:
            if msg[0] == 4 and len(msg) == 48:  # a probe (handshakes and data differ)
                seen.setdefault(dst, []).append(round(t, 2))
        w.send(w.a, out, t)
        t = round(t + step, 4)
    return seen


def gaps(times: list[float]) -> set[float]:
    return {round(b - a, 2) for a, b in pairwise(times)}


def test_relayed_peer_with_traffic_probes_its_direct_endpoints_twice_a_second():
    w = relayed_world()
    seen = probes_by_target(w, PathKeeper(), 2.0, 8.0, traffic=True)
    assert gaps(seen[B_D]) == {DIRECT_WHILE_RELAYED}
    assert gaps(seen[R_B]) == {ACTIVE_INTERVAL}


def test_idle_peer_backs_off_and_a_connect_event_resets():
    w = relayed_world()
    keeper = PathKeeper()
    seen = probes_by_target(w, keeper, 4.0, 300.0, traffic=False, step=0.25)
    spacing = [round(b - a) for a, b in pairwise(seen[B_D])]
    assert spacing[:4] == [1, 2, 4, 8] and max(spacing) == IDLE_MAX
    keeper.reset(w.b.public_key, 300.0)
    again = probes_by_target(w, keeper, 300.0, 302.0, traffic=False)
    assert again[B_D][0] == 300.5


def test_network_change_probes_everything_at_once():
    w = relayed_world()
    keeper = PathKeeper()
    probes_by_target(w, keeper, 4.0, 200.0, traffic=False, step=0.5)  # backed off
    keeper.network_changed(200.0)
    seen = probes_by_target(w, keeper, 200.0, 200.1, traffic=False)
    assert seen[B_D] == [200.0] and seen[R_B] == [200.0]


def test_probes_move_the_peer_to_direct_once_it_opens_and_report_the_change():
    w = relayed_world()
    keeper = PathKeeper()
    _, changes = keeper.tick(w.a, [w.b.public_key], 2.0)
    assert [(c.path, c.reason) for c in changes] == [("relay", paths.REASON_HANDSHAKE)]
    w.direct_open = True
    probes_by_target(w, keeper, 2.0, 4.0, traffic=True)
    assert w.pa.active_endpoint == B_D
    assert w.pa.path_reason == paths.REASON_DIRECT and w.pa.path_change_count == 2
    _, changes = keeper.tick(w.a, [w.b.public_key], 4.0)
    assert changes == []  # each change is reported once


def test_dead_direct_path_probes_every_endpoint_and_fails_over():
    w = World()
    w.ping_a_to_b(1.0)
    w.ping_b_to_a(1.01)
    keeper = PathKeeper()
    probes_by_target(w, keeper, 1.0, 3.0, traffic=True)  # round trips measured
    w.direct_open = False
    cut = 3.0
    seen = probes_by_target(w, keeper, cut, cut + 0.7, traffic=True)
    # In doubt after SILENCE_FLOOR: every endpoint is probed and the relay answers; the
    # direct path is left once its silence has lasted twice that.
    assert seen[R_B][0] <= cut + paths.SILENCE_FLOOR + DOUBT_INTERVAL
    assert w.pa.active_endpoint == R_B and w.pa.path_reason == paths.REASON_SILENT
