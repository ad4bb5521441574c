"""Probe timing of the PathKeeper with a fake clock, on the two-node world of
test_wg_paths (A and B behind NATs, B's TURN allocation, a blockable direct path)."""

from __future__ import annotations

from itertools import pairwise

from overlay.traversal.path_keeper import PROBE_IDLE_MAX, PROBE_INTERVAL, PathKeeper
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


def probe_times(w: World, keeper: PathKeeper, start: float, end: float, traffic: bool) -> list[float]:
    times = []
    t = start
    while t < end:
        if traffic:
            w.ping_a_to_b(t)
        out, _ = keeper.tick(w.a, [w.b.public_key], t)
        if out:
            # Pings to the direct endpoints only (past 120 s a ping, like any packet
            # the initiator sends, also starts WireGuard's rekey: not counted here).
            assert {d for m, d in out if m[0] == 4} == {B_D}
            times.append(round(t, 1))
            w.send(w.a, out, t)
        t += 0.5
    return times


def test_relayed_peer_is_probed_every_second_while_traffic_flows():
    w = relayed_world()
    times = probe_times(w, PathKeeper(), 2.0, 8.0, traffic=True)
    gaps = {round(b - a, 1) for a, b in pairwise(times)}
    assert gaps == {PROBE_INTERVAL} and len(times) == 6


def test_idle_relayed_peer_backs_off_and_a_connect_event_resets():
    w = relayed_world()
    keeper = PathKeeper()
    times = probe_times(w, keeper, 2.0, 200.0, traffic=False)
    gaps = [round(b - a, 1) for a, b in pairwise(times)]
    assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and max(gaps) == PROBE_IDLE_MAX
    keeper.reset(w.b.public_key, 200.0)
    again = probe_times(w, keeper, 200.0, 204.0, traffic=False)
    assert again[0] == 201.0 and again[1] == 202.0


def test_probes_move_the_peer_to_direct_once_it_opens_and_report_the_change():
    w = relayed_world()
    keeper = PathKeeper()
    out, changes = keeper.tick(w.a, [w.b.public_key], 2.0)
    assert changes == [(w.b.public_key, "relay")]
    w.send(w.a, out, 2.0)
    w.direct_open = True
    out, _ = keeper.tick(w.a, [w.b.public_key], 3.0)
    w.send(w.a, out, 3.0)
    _, changes = keeper.tick(w.a, [w.b.public_key], 3.5)
    assert changes == [(w.b.public_key, "direct")]
    assert w.pa.active_endpoint == B_D


def test_dead_direct_path_probes_every_endpoint_and_fails_over():
    w = World()
    w.ping_a_to_b(1.0)
    w.ping_b_to_a(1.01)
    keeper = PathKeeper()
    w.direct_open = False
    for t in (2.0, 3.0, 4.0):
        w.ping_a_to_b(t)  # lost
        out, _ = keeper.tick(w.a, [w.b.public_key], t)
        assert out == []  # not dead yet: data went unanswered for less than 3 s
    t = 5.5
    out, _ = keeper.tick(w.a, [w.b.public_key], t)
    assert {d for _, d in out} == {B_D, R_B}
    w.send(w.a, out, t)
    assert w.pa.active_endpoint == R_B
