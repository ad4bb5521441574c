"""NAT mapping lifetime measurement (RFC 5780 binding lifetime, parallel ladder), the
keepalive policy built on it, and the device's automatic keepalive. Fake clock, a
simulated NAT and STUN server; no sockets."""

from __future__ import annotations

import struct

import pytest

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.traversal import nat_lifetime as nl
from overlay.traversal.nat_lifetime import (
    FAILED,
    MEASURED,
    TESTER,
    UNSUPPORTED,
    KeepalivePolicy,
    LifetimeProbe,
    LifetimeResult,
    interval_for,
)
from tests.unit.wg_helpers import B1, handshake, ip4, pair

SERVER = ("203.0.113.10", 3478)
PUBLIC_IP = "198.51.100.7"


class FakeNatAndServer:
    """A NAT whose mappings die `timeout` s after their last packet (either way, as
    conntrack does), in front of a STUN server that may or may not honour RESPONSE-PORT.
    Delivery is instant; `lose` drops the next n test requests from the tester."""

    def __init__(self, timeout: float, *, response_port: str = "honour", answer: bool = True):
        self.timeout = timeout
        self.response_port = response_port  # "honour", "ignore", "refuse"
        self.answer = answer
        self.mappings: dict[object, tuple[int, float]] = {}  # socket -> (public port, last packet)
        self.next_port = 40000
        self.lose = 0
        self.requests = 0

    def _alive(self, sock, now):
        entry = self.mappings.get(sock)
        return entry is not None and now - entry[1] < self.timeout

    def _map(self, sock, now) -> int:
        if not self._alive(sock, now):
            self.next_port += 1
            self.mappings[sock] = (self.next_port, now)
        port = self.mappings[sock][0]
        self.mappings[sock] = (port, now)
        return port

    def carry(self, probe: LifetimeProbe, now: float) -> None:
        for sock, data, dest in probe.datagrams_to_send():
            assert dest == SERVER
            self.requests += 1
            if sock == TESTER and self.lose and m.parse(data).has(m.RESPONSE_PORT):
                self.lose -= 1
                continue
            port = self._map(sock, now)
            if not self.answer:
                continue
            req = m.parse(data)
            rp = req.get(m.RESPONSE_PORT)
            if rp is not None and self.response_port == "refuse":
                resp = m.Message(m.BINDING, m.ERROR, req.transaction_id).add_error(420, "Unknown Attribute")
                self._deliver(probe, sock, resp.encode(), now)
                continue
            resp = m.Message(m.BINDING, m.SUCCESS, req.transaction_id)
            resp.add_xor_address(m.XOR_MAPPED_ADDRESS, (PUBLIC_IP, port))
            target = sock
            if rp is not None and self.response_port == "honour":
                want = struct.unpack("!H", rp[:2])[0]
                target = next((s for s, (p, _) in self.mappings.items() if p == want), None)
                if target is None or not self._alive(target, now):
                    continue  # the NAT drops it: no live mapping at that port
                self.mappings[target] = (want, now)
            self._deliver(probe, target, resp.encode(), now)

    @staticmethod
    def _deliver(probe, sock, data, now):
        probe.receive(sock, data, SERVER, now)


def run(probe: LifetimeProbe, world: FakeNatAndServer, limit: float = 400.0) -> float:
    now = 100.0
    probe.start(now)
    world.carry(probe, now)
    while not probe.done:
        deadline = probe.next_deadline()
        assert deadline is not None, "stuck without a deadline"
        now = max(now, deadline)
        assert now < 100.0 + limit, "measurement never finished"
        probe.handle_timers(now)
        world.carry(probe, now)
    return now - 100.0


def test_ten_second_nat_measures_eight_and_finishes_soon():
    probe = LifetimeProbe(SERVER)
    took = run(probe, FakeNatAndServer(timeout=10))
    res = probe.result
    assert res.kind == MEASURED and res.lifetime == 8 and res.dead_at == 10, res
    # The first dead rung decides it: no need to wait for the 120 s rung.
    assert took < 10 + nl.ANSWER_WAIT + 0.5, took
    assert interval_for(res.lifetime) == pytest.approx(6.4)
    assert set(probe.finished_sockets()) == set(probe.sockets())


def test_long_lived_mapping_is_alive_at_every_rung_and_caps_the_interval():
    probe = LifetimeProbe(SERVER)
    took = run(probe, FakeNatAndServer(timeout=300))
    res = probe.result
    assert res.kind == MEASURED and res.lifetime == 120 and res.dead_at is None, res
    assert 120 <= took < 125
    assert interval_for(res.lifetime) == nl.MAX_INTERVAL


def test_mapping_shorter_than_the_first_rung_gives_the_floor():
    probe = LifetimeProbe(SERVER)
    run(probe, FakeNatAndServer(timeout=3))
    res = probe.result
    assert res.kind == MEASURED and res.lifetime is None and res.dead_at == 5, res
    assert interval_for(res.lifetime) == nl.MIN_INTERVAL


def test_a_lost_test_request_is_retransmitted_not_taken_for_a_dead_mapping():
    world = FakeNatAndServer(timeout=300)
    probe = LifetimeProbe(SERVER, ladder=(5.0,))
    probe.start(0.0)
    world.carry(probe, 0.0)
    # the control test goes out at once; let it through, then lose the 5 s rung's first try
    probe.handle_timers(0.0)
    world.carry(probe, 0.0)
    world.lose = 1
    probe.handle_timers(5.0)
    world.carry(probe, 5.0)
    assert not probe.done
    probe.handle_timers(5.0 + nl.TEST_RETRANSMIT[0])
    world.carry(probe, 5.0 + nl.TEST_RETRANSMIT[0])
    assert probe.done and probe.result.lifetime == 5.0, probe.result


def test_server_ignoring_response_port_is_reported_and_keeps_the_default():
    probe = LifetimeProbe(SERVER)
    took = run(probe, FakeNatAndServer(timeout=10, response_port="ignore"))
    assert probe.result.kind == UNSUPPORTED and "ignores RESPONSE-PORT" in probe.result.detail
    assert took < 1.0  # the control answer comes straight back to the tester
    policy = KeepalivePolicy()
    policy.set_network(True, SERVER)
    policy.started(0.0)
    policy.finished(probe.result, 1.0)
    interval, reason = policy.state()
    assert interval == 25.0 and "ignores RESPONSE-PORT" in reason


def test_server_refusing_response_port():
    probe = LifetimeProbe(SERVER)
    run(probe, FakeNatAndServer(timeout=10, response_port="refuse"))
    assert probe.result.kind == UNSUPPORTED and "420" in probe.result.detail


def test_silent_server_fails_after_the_mapping_timeout():
    probe = LifetimeProbe(SERVER)
    world = FakeNatAndServer(timeout=10, answer=False)
    took = run(probe, world)
    assert probe.result.kind == FAILED and took == pytest.approx(nl.MAP_GIVE_UP)
    assert world.requests > len(probe.sockets()) - 1  # retransmitted meanwhile


def test_answers_from_elsewhere_prove_nothing():
    probe = LifetimeProbe(SERVER, ladder=(5.0,))
    probe.start(0.0)
    (sock, data, _), *_ = probe.datagrams_to_send()
    req = m.parse(data)
    forged = m.Message(m.BINDING, m.SUCCESS, req.transaction_id)
    forged.add_xor_address(m.XOR_MAPPED_ADDRESS, (PUBLIC_IP, 1234))
    assert not probe.receive(sock, forged.encode(), ("192.0.2.66", 3478), 0.1)
    assert not probe.receive(sock, sc.binding_request().encode(), SERVER, 0.1)  # a request, not an answer
    assert not probe.receive(sock, b"\x00garbage", SERVER, 0.1)


# -- the policy --------------------------------------------------------------------------------

def test_policy_interval_while_measuring_follows_what_is_confirmed():
    p = KeepalivePolicy()
    assert p.state() == (25.0, "default: no STUN answer yet")
    p.set_network(True, SERVER)
    assert p.due(0.0)
    p.started(0.0)
    assert not p.due(1.0)
    # nothing confirmed yet: assume only the first rung (5 s)
    assert p.interval == pytest.approx(4.0)
    p.progress(20.0)
    assert p.interval == pytest.approx(16.0)
    p.finished(LifetimeResult(MEASURED, 8.0, 10.0, "alive after 8 s, dead after 10 s"), 12.0)
    interval, reason = p.state()
    assert interval == pytest.approx(6.4) and reason.startswith("measured")
    summary = p.summary()
    assert summary["lifetime"] == 8.0 and summary["interval"] == pytest.approx(6.4)
    # every 10 minutes again; the old value holds meanwhile
    assert not p.due(12.0 + nl.REMEASURE_EVERY - 1)
    assert p.due(12.0 + nl.REMEASURE_EVERY)
    p.started(700.0)
    assert p.interval == pytest.approx(6.4)
    # a failed re-measurement does not undo a good one
    p.finished(LifetimeResult(FAILED, None, None, "no answer from the STUN server"), 703.0)
    assert p.interval == pytest.approx(6.4)
    assert p.due(703.0 + nl.RETRY_FAILED_AFTER)


def test_policy_network_change_measures_again_at_once():
    p = KeepalivePolicy()
    p.set_network(True, SERVER)
    p.started(0.0)
    p.finished(LifetimeResult(MEASURED, 120.0, None, "alive after 120 s"), 122.0)
    assert p.interval == 25.0 and not p.due(200.0)
    p.network_changed(200.0)
    assert p.due(200.0)
    p.started(200.0)
    assert p.interval == pytest.approx(4.0)  # the new NAT may be much shorter-lived


def test_policy_without_nat_still_measures_for_a_stateful_firewall():
    p = KeepalivePolicy()
    assert not p.due(0.0)  # no STUN answer yet
    p.set_network(False, SERVER)
    assert p.due(0.0) and not p.forgets
    p.started(0.0)
    p.finished(LifetimeResult(MEASURED, 120.0, None, "alive after 120 s (longest tried)"), 122.0)
    assert not p.forgets and p.interval == 25.0  # nothing forgets: no keepalives needed for us
    p.network_changed(130.0)
    p.started(130.0)
    p.finished(LifetimeResult(MEASURED, 25.0, 30.0, "alive after 25 s, dead after 30 s"), 160.0)
    assert p.forgets and p.interval == pytest.approx(20.0)


# -- the device --------------------------------------------------------------------------------

def test_auto_keepalive_only_counts_what_we_send():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)
    peer = a.peers[b.public_key]
    a.set_auto_keepalive(peer, 6.4)
    assert a.next_deadline() is not None and a.next_deadline() <= 1.0 + 6.4

    def sent_by_a(now):
        out = a.handle_timers(now)
        n.send(out, ("192.0.2.1", 51820), now)
        return [d for d, dst in out if dst == B1]

    # b keeps sending to a (its data would not hold a's NAT mapping): a still keeps alive.
    for t in (3.0, 5.0, 7.0):
        n.send(b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], t), B1, t)
    assert sent_by_a(7.0) == []
    assert len(sent_by_a(1.0 + 6.4)) == 1
    # our own data restarts the interval
    n.send(a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 9.0), ("192.0.2.1", 51820), 9.0)
    assert sent_by_a(1.0 + 6.4 + 6.4) == []
    assert len(sent_by_a(9.0 + 6.4)) == 1
    # off: nothing more
    a.set_auto_keepalive(peer, 0)
    assert sent_by_a(9.0 + 6.4 + 6.4) == []


def test_auto_keepalive_is_not_restarted_by_probes_to_other_endpoints():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)
    peer = a.peers[b.public_key]
    a.set_auto_keepalive(peer, 5.0)
    last = peer.last_sent_active
    a.probe(peer, [("198.51.100.9", 9999)], 4.0)  # an alternative, not the active path
    assert peer.last_sent_active == last
    out = a.handle_timers(last + 5.0)
    assert [dst for _, dst in out] == [B1]
