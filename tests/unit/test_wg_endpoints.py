"""Multi-endpoint peers: happy eyeballs, arrival-path answers, roaming, failover."""

import errno

from overlay.wireguard.constants import MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT
from overlay.wireguard.endpoints import EndpointSet, direct_endpoint, from_sockaddr
from tests.unit.wg_helpers import A1, B1, B2, B3, handshake, ip4, make_device, pair

DATA_A = ip4("10.0.0.1", "10.0.0.2")
DATA_B = ip4("10.0.0.2", "10.0.0.1")


def multi():
    a, b, n = pair()
    a.set_peer(b.public_key, 0.0, endpoints=[B1, B2, B3])
    n.add(b, B2, B3)
    return a, b, n


def test_endpoint_canonical_form():
    assert direct_endpoint("[2001:DB8::0001]", 5) == ("2001:db8::1", 5)
    assert direct_endpoint("::ffff:192.0.2.9", 7) == ("192.0.2.9", 7)
    assert from_sockaddr(("::ffff:192.0.2.9", 7, 0, 0)) == ("192.0.2.9", 7)
    assert from_sockaddr(("192.0.2.9", 7)) == ("192.0.2.9", 7)
    d = make_device(5)
    p = d.set_peer(b"\x05" * 32, 0, endpoints=[("::FFFF:198.51.100.1", 9), ("2001:0db8::1", 9)])
    assert p.configured_endpoints == [("198.51.100.1", 9), ("2001:db8::1", 9)]
    assert hash(p.configured_endpoints[0]) is not None


def test_happy_eyeballs_current_first_others_after_delay_same_bytes():
    a, b, n = multi()
    out = a.tun_packets([DATA_A], 1.0)
    assert [(m[0], e) for m, e in out] == [(MSG_INITIATION, B1)]
    assert a.next_deadline() == 1.0 + 0.010
    assert a.handle_timers(1.009) == []
    later = a.handle_timers(1.010)
    assert [e for _, e in later] == [B2, B3]
    assert all(m == out[0][0] for m, _ in later)  # one handshake state, identical bytes


def test_happy_eyeballs_delay_configurable():
    a, b, n = pair(happy_eyeballs_delay=0.05)
    a.set_peer(b.public_key, 0.0, endpoints=[B1, B2])
    a.tun_packets([DATA_A], 1.0)
    assert a.next_deadline() == 1.05


def test_first_response_selects_endpoint_and_session_works():
    a, b, n = multi()
    first = a.tun_packets([DATA_A], 1.0)
    n.blocked.add(B1)  # the current endpoint is dead
    n.send(first, A1, 1.0)
    later = a.handle_timers(1.010)
    # the copy to B3 arrives first
    n.send([x for x in later if x[1] == B3], A1, 1.011)
    n.send([x for x in later if x[1] == B2], A1, 1.012)
    pa = a.peers[b.public_key]
    assert pa.active_endpoint == B3
    assert n.tun[b] == [DATA_A]
    # b answered both copies, on their own paths
    responses = [(m, s, d) for m, s, d in n.delivered if m[0] == MSG_RESPONSE]
    assert {s for _, s, _ in responses} == {B3, B2}
    assert len({m for m, _, _ in responses}) == 1
    n.send(b.tun_packets([DATA_B], 1.1), B3, 1.1)
    assert n.tun[a] == [DATA_B]


def test_response_before_delay_cancels_other_copies():
    a, b, n = multi()
    n.send(a.tun_packets([DATA_A], 1.0), A1, 1.0)
    assert a.peers[b.public_key].active_endpoint == B1
    assert a.handle_timers(1.010) == []
    assert not [d for _, _, d in n.delivered if d in (B2, B3)]


def test_responder_answers_on_arrival_path_and_roams_to_it():
    a, b, n = pair()
    init = a.tun_packets([DATA_A], 1.0)[0][0]
    src = ("203.0.113.50", 40000)
    _, out = b.datagrams([(init, src)], 1.0)
    assert out[0][1] == src
    assert b.peers[a.public_key].active_endpoint == src


def test_roaming_on_authenticated_data_keeps_session():
    a, b, n = pair()
    handshake(a, b, n)
    pb = b.peers[a.public_key]
    kp = pb.current
    new_src = ("198.51.100.77", 1234)
    n.add(a, new_src)
    n.send(a.tun_packets([DATA_A], 2.0), new_src, 2.0)
    assert pb.active_endpoint == new_src and pb.current is kp
    out = b.tun_packets([DATA_B], 2.1)
    assert [(m[0], e) for m, e in out] == [(MSG_TRANSPORT, new_src)]
    # an unauthenticated packet from elsewhere does not move it
    forged = bytes([4, 0, 0, 0]) + kp.local_index.to_bytes(4, "little") + bytes(40)
    b.datagrams([(forged, ("192.0.2.200", 1))], 2.2)
    assert pb.active_endpoint == new_src


def test_learned_endpoints_bounded_oldest_evicted():
    a, b, n = pair()
    handshake(a, b, n)
    pb = b.peers[a.public_key]
    sources = [("198.51.100.%d" % i, 1000 + i) for i in range(12)]
    for i, src in enumerate(sources):
        b.datagrams([(m, src) for m, _ in a.tun_packets([DATA_A], 2.0 + i)], 2.0 + i)
    assert pb.learned_endpoints == sources[-8:]
    assert pb.active_endpoint == sources[-1]
    # configured endpoints are kept apart and listed first
    b.set_peer(a.public_key, 20.0, endpoints=[A1])
    assert pb.endpoints[0] == A1 and pb.configured_endpoints == [A1]


def test_configured_endpoints_replaced_as_group():
    s = EndpointSet()
    s.set_configured([B1, B2])
    s.confirm(("203.0.113.9", 9))
    s.set_configured([B3])
    assert s.configured == [B3] and s.learned == [("203.0.113.9", 9)]
    assert s.active == B3


def test_send_failed_switches_at_once_and_rehandshakes_remaining():
    a, b, n = multi()
    handshake(a, b, n)
    pa = a.peers[b.public_key]
    kp = pa.current
    counter = kp.send_counter
    assert pa.active_endpoint == B1
    out = a.send_failed(B1, errno.ENETUNREACH, 30.0)
    assert pa.active_endpoint == B2
    assert [(m[0], e) for m, e in out] == [(MSG_INITIATION, B2), (MSG_INITIATION, B3)]
    assert out[0][0] == out[1][0]
    # the session is kept: data goes on the new path with the same keys, counter continues
    data = a.tun_packets([DATA_A], 30.0)
    assert [(m[0], e) for m, e in data] == [(MSG_TRANSPORT, B2)]
    assert pa.current is kp and kp.send_counter == counter + 1
    n.send(data, A1, 30.0)
    assert n.tun[b][-1] == DATA_A


def test_send_failed_on_non_active_only_marks():
    a, b, n = multi()
    handshake(a, b, n)
    pa = a.peers[b.public_key]
    assert a.send_failed(B3, errno.EHOSTUNREACH, 30.0) == []
    assert pa.active_endpoint == B1
    assert a.send_failed(("192.0.2.250", 1), errno.EHOSTUNREACH, 30.0) == []


def test_send_failed_during_eyeballs_sends_held_copies_now():
    a, b, n = multi()
    a.tun_packets([DATA_A], 1.0)
    out = a.send_failed(B1, errno.ENETUNREACH, 1.001)
    assert [e for _, e in out] == [B2, B3]
    assert a.handle_timers(1.010) == []


def test_send_failed_all_endpoints_stops():
    a, b, n = multi()
    handshake(a, b, n)
    out1 = a.send_failed(B1, errno.ENETUNREACH, 30.0)
    out2 = a.send_failed(B2, errno.ENETUNREACH, 30.0)
    out3 = a.send_failed(B3, errno.ENETUNREACH, 30.0)
    assert out1 and out2 and out3 == []
    assert a.peers[b.public_key].active_endpoint == B3


def test_switching_endpoint_by_roaming_needs_no_handshake():
    a, b, n = multi()
    handshake(a, b, n)
    pa = a.peers[b.public_key]
    before = len([1 for m, _, _ in n.delivered if m[0] == MSG_INITIATION])
    # b now reaches a from B2 (e.g. b's route changed); a follows without a handshake
    n.send(b.tun_packets([DATA_B], 5.0), B2, 5.0)
    assert pa.active_endpoint == B2
    n.send(a.tun_packets([DATA_A], 5.1), A1, 5.1)
    after = len([1 for m, _, _ in n.delivered if m[0] == MSG_INITIATION])
    assert after == before and n.tun[b][-1] == DATA_A
    assert [d for m, _, d in n.delivered][-1] == B2
