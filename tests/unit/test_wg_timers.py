"""WireGuard's timers, driven with a fake clock."""

from overlay.wireguard.constants import (
    MSG_INITIATION,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
)
from tests.unit.wg_helpers import A1, B1, handshake, ip4, pair

DATA_A = ip4("10.0.0.1", "10.0.0.2")
DATA_B = ip4("10.0.0.2", "10.0.0.1")


def kinds(out):
    return [(m[0], len(m) if m[0] == 4 else None) for m, _ in out]


def run_until(dev, until, start):
    """Fire the device's timers in order until `until`; returns [(time, datagrams)]."""
    fired = []
    t = start
    while True:
        d = dev.next_deadline()
        if d is None or d > until:
            return fired
        t = max(t, d)
        out = dev.handle_timers(t)
        if out:
            fired.append((t, out))


def test_retransmit_every_rekey_timeout_with_jitter_and_give_up_after_90s():
    a, b, n = pair()
    first = a.tun_packets([DATA_A], 0.0)
    assert kinds(first) == [(MSG_INITIATION, None)]
    fired = run_until(a, 300.0, 0.0)
    times = [t for t, out in fired if out[0][0][0] == MSG_INITIATION]
    assert len(times) == 18  # retries after the first, REKEY_ATTEMPT_TIME / REKEY_TIMEOUT
    gaps = [b_ - a_ for a_, b_ in zip([0.0] + times, times)]
    assert all(5.0 <= g < 5.0 + 0.334 for g in gaps), gaps
    assert len(set(round(g, 6) for g in gaps)) > 1  # jittered
    assert 90.0 <= times[-1] + 5.4 and times[-1] < 100.0
    pa = a.peers[b.public_key]
    assert pa.handshake is None and not pa.staged  # gave up, staged packets dropped
    # every retry is a fresh initiation (new ephemeral, new timestamp)
    msgs = [out[0][0] for _, out in fired]
    assert len(set(msgs)) == len(msgs)


def run_net(n, until, start, hosts):
    """Fire the timers of all devices in time order, delivering what they send."""
    fired = []
    t = start
    while True:
        due = [(d, dev, src) for dev, src in hosts if (d := dev.next_deadline()) is not None]
        if not due:
            return fired
        d, dev, src = min(due, key=lambda x: x[0])
        if d > until:
            return fired
        t = max(t, d)
        out = dev.handle_timers(t)
        if out:
            fired.append((t, dev, out))
            n.send(out, src, t)


def test_passive_keepalive_after_receiving_data_and_sending_nothing():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)  # b receives data at 1.0
    n.send(a.tun_packets([DATA_A], 2.0), A1, 2.0)  # and more while the timer is pending
    fired = run_until(b, 60.0, 1.0)
    keepalives = [t for t, o in fired if kinds(o) == [(MSG_TRANSPORT, 32)]]
    # 10 s after the first data; once more because data came in while it was pending
    assert keepalives == [11.0, 21.0]


def test_no_passive_keepalive_if_we_replied_with_data():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)
    n.send(a.tun_packets([DATA_A], 2.0), A1, 2.0)
    n.send(b.tun_packets([DATA_B], 3.0), B1, 3.0)
    assert all(kinds(o) != [(MSG_TRANSPORT, 32)] for _, o in run_until(b, 14.0, 3.0))


def test_new_handshake_when_data_sent_and_nothing_received_for_15s():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)
    n.send(b.tun_packets([DATA_B], 1.0), B1, 1.0)
    n.blocked.add(B1)
    a.tun_packets([DATA_A], 10.0)
    a.tun_packets([DATA_A], 20.0)  # does not push the deadline
    assert a.handle_timers(24.9) == []
    fired = run_until(a, 25.4, 10.0)
    assert fired and kinds(fired[0][1]) == [(MSG_INITIATION, None)]
    assert 25.0 <= fired[0][0] < 25.334


def test_no_new_handshake_when_answers_arrive():
    a, b, n = pair()
    handshake(a, b, n, now=1.0)
    n.send(a.tun_packets([DATA_A], 10.0), A1, 10.0)
    n.send(b.tun_packets([DATA_B], 11.0), B1, 11.0)
    fired = run_until(a, 40.0, 11.0)
    assert all(o[0][0][0] != MSG_INITIATION for _, o in fired)


def test_initiator_rekeys_after_rekey_after_time_responder_does_not():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    assert kinds(a.tun_packets([DATA_A], 119.0)) == [(MSG_TRANSPORT, 32 + 48)]
    out = a.tun_packets([DATA_A], 120.0)
    assert [m[0] for m, _ in out] == [MSG_TRANSPORT, MSG_INITIATION]
    out_b = b.tun_packets([DATA_B], 121.0)
    assert [m[0] for m, _ in out_b] == [MSG_TRANSPORT]


def test_initiator_rekeys_on_receive_at_reject_minus_keepalive_minus_rekey_timeout():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    _, out = a.datagrams([(m, B1) for m, _ in b.tun_packets([DATA_B], 164.0)], 164.0)
    assert out == []
    _, out = a.datagrams([(m, B1) for m, _ in b.tun_packets([DATA_B], 165.0)], 165.0)
    assert [m[0] for m, _ in out] == [MSG_INITIATION]


def test_reject_after_time_keys_unusable_both_ways():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    late = b.tun_packets([DATA_B], 179.0)
    pkts, _ = a.datagrams([(m, B1) for m, _ in late], 180.0)
    assert pkts == []  # received with keys too old
    out = a.tun_packets([DATA_A], 180.0)
    assert [m[0] for m, _ in out] == [MSG_INITIATION]  # staged, handshake instead
    assert a.peers[b.public_key].staged


def test_rekey_and_reject_after_messages():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    pa = a.peers[b.public_key]
    pa.current.send_counter = REKEY_AFTER_MESSAGES
    assert [m[0] for m, _ in a.tun_packets([DATA_A], 10.0)] == [MSG_TRANSPORT, MSG_INITIATION]
    pa.current.send_counter = REJECT_AFTER_MESSAGES
    n.blocked.add(B1)
    out = a.tun_packets([DATA_A], 30.0)
    assert [m[0] for m, _ in out] == [MSG_INITIATION]


def test_zero_key_material_after_three_times_reject_after_time():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    pa = a.peers[b.public_key]
    n.blocked.update({A1, B1})
    run_until(a, 539.0, 0.0)
    assert pa.current is not None
    run_until(a, 541.0, 539.0)
    assert pa.current is None and pa.previous is None and pa.next is None


def test_persistent_keepalive_interval_default_off():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    assert all(kinds(o) != [(MSG_TRANSPORT, 32)] or t < 11 for t, o in run_until(a, 100.0, 0.0))
    a2, b2, n2 = pair()
    b2.set_peer(a2.public_key, 0.0, endpoints=[A1])
    a2.set_peer(b2.public_key, 0.0, persistent_keepalive=25)
    handshake(a2, b2, n2, now=0.0)
    hosts = [(a2, A1), (b2, B1)]
    # As in WireGuard, any authenticated packet sent or received restarts the
    # interval: b's passive keepalive (10 s after a's data at 0) arrives at 10.
    fired = run_net(n2, 88.0, 0.0, hosts)
    keepalive_times = [t for t, d, o in fired if d is a2 and kinds(o) == [(MSG_TRANSPORT, 32)]]
    assert keepalive_times == [35.0, 60.0, 85.0]
    # data at 90 -> b's passive keepalive at 100 -> next persistent keepalive at 125
    n2.send(a2.tun_packets([DATA_A], 90.0), A1, 90.0)
    fired = run_net(n2, 140.0, 90.0, hosts)
    # (at 125 the session is also older than REKEY_AFTER_TIME, so a rekey rides along)
    assert [t for t, d, o in fired if d is a2 and (MSG_TRANSPORT, 32) in kinds(o)] == [125.0]
    a2.set_peer(b2.public_key, 140.0, persistent_keepalive=0)
    fired = run_net(n2, 300.0, 140.0, hosts)
    assert not [t for t, d, o in fired if d is a2 and kinds(o) == [(MSG_TRANSPORT, 32)]]


def test_turning_persistent_keepalive_on_sends_one_at_once():
    a, b, n = pair()
    handshake(a, b, n, now=0.0)
    a.set_peer(b.public_key, 5.0, persistent_keepalive=10)
    assert a.next_deadline() == 5.0
    assert kinds(a.handle_timers(5.0)) == [(MSG_TRANSPORT, 32)]
