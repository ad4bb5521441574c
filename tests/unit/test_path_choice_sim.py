"""Path choice end to end with a fake clock: two real Devices, each with its PathKeeper,
on a simulated network where the direct path and the relay path each have their own
delay, jitter and loss, and the direct path can be cut.

A sends a packet to B every 10 ms and B answers each one, like a TCP stream and its
acknowledgements; the figures a user notices (how long B receives nothing, which path
each side uses, how often it changes) are read off that traffic.
"""

from __future__ import annotations

import heapq
import random

import pytest

from overlay.traversal.path_keeper import TICK, PathKeeper
from overlay.wireguard import paths

from .test_wg_paths import A_D, B_D, R_B, VIA_RELAY_FROM_A, World
from .wg_helpers import ip4


class Link:
    def __init__(self, delay: float, jitter: float = 0.0, loss: float = 0.0):
        self.delay, self.jitter, self.loss, self.up = delay, jitter, loss, True


class Sim:
    def __init__(self, seed: int = 1, direct: Link | None = None, relay: Link | None = None):
        self.w = World()
        # B reaches A through its own allocation too (A's packets to R_B show up there).
        self.w.pb.endpoint_set.set_candidates([(A_D, "srflx"), (VIA_RELAY_FROM_A, "relay")])
        self.rng = random.Random(seed)
        self.direct = direct or Link(0.005)
        self.relay = relay or Link(0.030)
        self.queue: list[tuple[float, int, object, bytes, object]] = []
        self.seq = 0
        self.now = 0.0
        self.keepers = {self.w.a: PathKeeper(), self.w.b: PathKeeper()}
        self.peer_key = {self.w.a: self.w.b.public_key, self.w.b: self.w.a.public_key}
        self.received_at_b: list[float] = []
        self.changes: dict[str, list[tuple[float, str | None, str]]] = {"a": [], "b": []}
        self.next_tick = 0.0

    def _route(self, sender, dst):
        w = self.w
        if sender is w.a:
            if dst == B_D:
                return w.b, A_D, self.direct
            if dst == R_B:
                return w.b, VIA_RELAY_FROM_A, self.relay
        else:
            if dst == A_D:
                return w.a, B_D, self.direct
            if dst == VIA_RELAY_FROM_A:
                return w.a, R_B, self.relay
        return None, None, None

    def send(self, sender, out) -> None:
        for msg, dst in out:
            target, src, link = self._route(sender, dst)
            if target is None or not link.up or self.rng.random() < link.loss:
                continue
            at = self.now + link.delay + self.rng.uniform(0, link.jitter)
            self.seq += 1
            heapq.heappush(self.queue, (at, self.seq, target, bytes(msg), src))

    def run(self, until: float, traffic: bool = True, step: float = 0.01) -> None:
        w = self.w
        while self.now < until:
            self.now = round(self.now + step, 6)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, target, msg, src = heapq.heappop(self.queue)
                pkts, replies = target.datagrams([(msg, src)], self.now)
                if target is w.b:
                    self.received_at_b.extend(self.now for p in pkts if len(p) >= 20)
                    if traffic and pkts:
                        self.send(w.b, w.b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], self.now))
                self.send(target, replies)
            for dev in (w.a, w.b):
                self.send(dev, dev.handle_timers(self.now))
            if traffic:
                self.send(w.a, w.a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], self.now))
            if self.now >= self.next_tick:
                self.next_tick = self.now + TICK
                for dev, name in ((w.a, "a"), (w.b, "b")):
                    out, changes = self.keepers[dev].tick(dev, [self.peer_key[dev]], self.now)
                    self.send(dev, out)
                    self.changes[name].extend((self.now, c.path, c.reason) for c in changes)

    def longest_gap_at_b(self, start: float, end: float) -> float:
        times = [t for t in self.received_at_b if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=end - start)

    def connected_direct(self) -> None:
        self.run(3.0)
        assert paths.path_of(self.w.pa) == "direct" and paths.path_of(self.w.pb) == "direct"


def test_cut_direct_path_moves_both_sides_to_the_relay_within_a_second():
    sim = Sim()
    sim.connected_direct()
    sim.direct.up = False
    cut = sim.now
    sim.run(cut + 3.0)
    assert paths.path_of(sim.w.pa) == "relay" and paths.path_of(sim.w.pb) == "relay"
    gap = sim.longest_gap_at_b(cut - 0.5, sim.now)
    assert gap < 0.6, gap
    assert sim.w.pa.path_reason == paths.REASON_SILENT
    assert sim.changes["a"][-1][1:] == ("relay", paths.REASON_SILENT)


def test_restored_direct_path_is_taken_back_within_seconds():
    sim = Sim()
    sim.connected_direct()
    sim.direct.up = False
    sim.run(sim.now + 5.0)
    assert paths.path_of(sim.w.pa) == "relay"
    sim.direct.up = True
    restored = sim.now
    sim.run(restored + 5.0)
    assert paths.path_of(sim.w.pa) == "direct" and paths.path_of(sim.w.pb) == "direct"
    back = [t for t, path, _ in sim.changes["a"] if t > restored and path == "direct"]
    assert back and back[0] - restored < 2.5, sim.changes["a"]


def test_send_error_moves_at_once_and_the_first_answer_wins():
    sim = Sim()
    sim.connected_direct()
    sim.direct.up = False
    sim.send(sim.w.a, sim.w.a.send_failed(B_D, 113, sim.now))
    sim.run(sim.now + 0.2)
    assert paths.path_of(sim.w.pa) == "relay"
    assert sim.w.pa.path_reason in (paths.REASON_SEND_ERROR, paths.REASON_SILENT)


def test_idle_tunnel_probes_back_off():
    sim = Sim()
    sim.connected_direct()
    sim.run(sim.now + 300.0, traffic=False, step=0.05)
    before = sim.w.pa.probe_bytes
    sim.run(sim.now + 600.0, traffic=False, step=0.05)
    per_minute = (sim.w.pa.probe_bytes - before) / 10
    # Both sides' probes and answers as A sees them: the active endpoint every 30 s,
    # the relay every 120 s, 48-byte messages: about 540 bytes a minute.
    assert per_minute < 700, per_minute
    assert paths.path_of(sim.w.pa) == "direct"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_lossy_direct_path_loses_to_a_clean_relay(seed):
    sim = Sim(seed=seed)
    sim.connected_direct()
    sim.direct.loss = 0.20
    start = sim.now
    sim.run(start + 40.0)
    assert paths.path_of(sim.w.pa) == "relay" and paths.path_of(sim.w.pb) == "relay"
    # ... and they stay there.
    settled = sim.now
    sim.run(settled + 60.0)
    late = [c for c in sim.changes["a"] + sim.changes["b"] if c[0] > settled]
    assert not late, late


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_five_percent_loss_and_jitter_do_not_flap(seed):
    sim = Sim(seed=seed, direct=Link(0.005, jitter=0.050, loss=0.05))
    sim.run(3.0)
    start = sim.now
    sim.run(start + 120.0)
    for side in ("a", "b"):
        moves = [c for c in sim.changes[side] if c[0] > start]
        assert len(moves) <= 2, (side, moves)


def test_swinging_round_trips_are_damped():
    sim = Sim(seed=4)
    sim.connected_direct()
    start = sim.now
    t = start
    while t < start + 600:
        sim.direct.delay = sim.rng.uniform(0.010, 0.400)
        sim.relay.delay = sim.rng.uniform(0.010, 0.400)
        t += 4.0
        sim.run(t, step=0.02)
    moves = [c for c in sim.changes["a"] if c[0] > start and c[2] in (paths.REASON_COST, paths.REASON_LOSS)]
    assert len(moves) <= 12, moves


def test_an_unreachable_endpoint_is_not_lossy_and_does_not_hold_back_the_upgrade():
    from overlay.wireguard.pathstats import PathStats
    dead = PathStats()
    for _ in range(40):
        dead.lost()
    assert not dead.lossy and dead.loss == 1.0
    flaky = PathStats()
    for i in range(40):
        flaky.lost() if i % 3 == 0 else flaky.answered(0.01)
    assert flaky.lossy
