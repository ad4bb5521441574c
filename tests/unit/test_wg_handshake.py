"""Handshake, sessions, cookies and junk handling between two Device instances."""

import base64

from overlay.wireguard.constants import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, REKEY_TIMEOUT
from tests.unit.wg_helpers import A1, B1, handshake, ip4, ip6, make_device, net, pair


def test_handshake_initiated_by_a_then_data_both_ways():
    a, b, n = pair()
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)
    assert [(len(m), m[0], e) for m, e in out] == [(148, MSG_INITIATION, B1)]
    n.send(out, A1, 1.0)
    pa, pb = a.peers[b.public_key], b.peers[a.public_key]
    # The staged packet went out right after the response and arrived.
    assert n.tun[b] == [ip4("10.0.0.1", "10.0.0.2")]
    assert pa.current is not None and pa.current.initiator
    assert pb.current is not None and pb.next is None  # confirmed by the data
    assert pa.last_handshake == 1.0 and pb.last_handshake == 1.0
    assert pb.active_endpoint == A1
    n.send(b.tun_packets([ip6("fd00::2", "fd00::1")], 1.5), B1, 1.5)
    assert n.tun[a] == [ip6("fd00::2", "fd00::1")]
    assert pa.rx_bytes > 0 and pa.tx_bytes > 0 and pb.rx_bytes == pa.tx_bytes


def test_handshake_initiated_by_b_other_direction():
    a, b, n = pair()
    b.set_peer(a.public_key, 0.0, endpoints=[A1])
    n.send(b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], 1.0), B1, 1.0)
    assert n.tun[a] == [ip4("10.0.0.2", "10.0.0.1")]
    assert a.peers[b.public_key].current is not None
    assert not a.peers[b.public_key].current.initiator


def test_responder_keeps_new_keys_as_next_until_first_data():
    a, b, n = pair()
    out = a.tun_packets([], 1.0) + a.handle_timers(1.0)
    init = a._initiate(a.peers[b.public_key], 1.0, retry=False)
    _, resp = b.datagrams([(init[0][0], A1)], 1.0)
    pb = b.peers[a.public_key]
    assert pb.next is not None and pb.current is None
    # b cannot send with unconfirmed keys: its packet waits, nothing encrypted goes out
    assert all(m[0] != 4 for m, _ in b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], 1.0))
    pkts, out = a.datagrams([(resp[0][0], B1)], 1.0)
    assert [m[0] for m, _ in out] == [4]  # the keepalive that confirms
    b.datagrams([(out[0][0], A1)], 1.0)
    assert pb.current is not None and pb.next is None


def test_preshared_key_match_and_mismatch():
    a, b, n = pair()
    psk = bytes(range(32))
    a.set_peer(b.public_key, 0, preshared_key=psk)
    b.set_peer(a.public_key, 0, preshared_key=psk)
    handshake(a, b, n)
    assert len(n.tun[b]) == 1

    a, b, n = pair()
    a.set_peer(b.public_key, 0, preshared_key=psk)
    b.set_peer(a.public_key, 0, preshared_key=bytes(32 * [7]))
    handshake(a, b, n)
    assert n.tun[b] == [] and a.peers[b.public_key].current is None


def test_initiation_from_unknown_peer_is_dropped():
    a, b, n = pair()
    b.remove_peer(a.public_key, 0)
    handshake(a, b, n)
    assert len(n.delivered) == 1 and b.dropped == 1


def test_bad_mac1_dropped_without_state_change():
    a, b, n = pair()
    init = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)[0][0]
    bad = bytearray(init)
    bad[120] ^= 1
    pkts, out = b.datagrams([(bytes(bad), A1)], 1.0)
    assert (pkts, out) == ([], [])
    pb = b.peers[a.public_key]
    assert pb.next is None and pb.latest_timestamp == b"" and pb.active_endpoint is None
    # the genuine message still works afterwards
    _, out = b.datagrams([(init, A1)], 1.0)
    assert out and out[0][0][0] == MSG_RESPONSE


def test_replayed_initiation_rejected_by_timestamp():
    a, b, n = pair()
    init = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)[0][0]
    _, out1 = b.datagrams([(init, A1)], 1.0)
    assert len(out1) == 1
    # long after the duplicate window, the same bytes are a replay: ignored
    _, out2 = b.datagrams([(init, A1)], 1.0 + REKEY_TIMEOUT + 1)
    assert out2 == []
    # an older initiation (earlier timestamp) is rejected too
    old = a._initiate(a.peers[b.public_key], 0.5, retry=True)[0][0]
    newer = a._initiate(a.peers[b.public_key], 3.0, retry=True)[0][0]
    _, out3 = b.datagrams([(newer, A1)], 10.0)
    _, out4 = b.datagrams([(old, A1)], 10.1)
    assert len(out3) == 1 and out4 == []


def test_duplicate_initiation_over_other_path_gets_identical_response():
    a, b, n = pair()
    init = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)[0][0]
    _, out1 = b.datagrams([(init, A1)], 1.0)
    other = ("198.51.100.7", 999)
    _, out2 = b.datagrams([(init, other)], 1.01)
    assert out1[0][1] == A1 and out2[0][1] == other
    assert out1[0][0] == out2[0][0]
    # a duplicate does not roam the responder (anyone can replay it)
    assert b.peers[a.public_key].active_endpoint == A1
    # the initiator can use either copy: same keys
    pkts, out = a.datagrams([(out2[0][0], B1)], 1.02)
    pkts2, _ = b.datagrams([(m, A1) for m, _ in out], 1.02)
    assert pkts2 == [ip4("10.0.0.1", "10.0.0.2")]


def test_cookie_reply_under_load_and_mac2_honoured():
    a, b, n = pair()
    b.under_load_threshold = 0
    pa = a.peers[b.public_key]
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)
    assert out[0][0][132:148] == bytes(16)  # no cookie yet: zero MAC2
    _, replies = b.datagrams([(out[0][0], A1)], 1.0)
    assert [(len(m), m[0]) for m, _ in replies] == [(64, MSG_COOKIE_REPLY)]
    assert b.peers[a.public_key].next is None  # no handshake work done
    a.datagrams([(replies[0][0], B1)], 1.0)
    assert pa.cookies.has_cookie
    # the retransmission carries MAC2 and is accepted although b is still under load
    t = a.next_deadline()
    retry = a.handle_timers(t)
    assert retry[0][0][132:148] != bytes(16)
    n.send(retry, A1, t)
    assert pa.current is not None and n.tun[b] == [ip4("10.0.0.1", "10.0.0.2")]


def test_cookie_mac2_bound_to_source_address():
    a, b, n = pair(under_load_threshold=0)
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)
    _, replies = b.datagrams([(out[0][0], A1)], 1.0)
    a.datagrams([(replies[0][0], B1)], 1.0)
    retry = a.handle_timers(a.next_deadline())
    # the same MAC2 from another address does not pass: another cookie reply
    _, again = b.datagrams([(retry[0][0], ("192.0.2.99", 1))], 7.0)
    assert [m[0] for m, _ in again] == [MSG_COOKIE_REPLY]


def test_forged_cookie_reply_ignored():
    a, b, n = pair()
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)
    idx = out[0][0][4:8]
    forged = bytes([3, 0, 0, 0]) + idx + bytes(56)
    a.datagrams([(forged, B1)], 1.0)
    assert not a.peers[b.public_key].cookies.has_cookie


def test_not_under_load_below_threshold():
    a, b, n = pair(under_load_threshold=5, under_load_window=1.0)
    handshake(a, b, n)
    assert len(n.tun[b]) == 1


def test_garbage_datagrams_dropped_without_disturbing_session():
    a, b, n = pair()
    handshake(a, b, n)
    pb = b.peers[a.public_key]
    state = (pb.current, pb.previous, pb.next, pb.active_endpoint, pb.current.replay._highest)
    junk = [b"", b"\x01", b"\x01\x00\x00\x00", b"\x04\x00\x00\x00" + bytes(28),
            b"\x04\x00\x00\x00" + bytes(100), b"\x01\x00\x00\x00" + bytes(144),
            b"\x02\x00\x00\x00" + bytes(88), b"\x03\x00\x00\x00" + bytes(60),
            b"\x05\x00\x00\x00" + bytes(40), bytes(range(256)) * 3,
            b"\x01\x00\x00\x00" + bytes(200), b"\x04\x01\x00\x00" + bytes(60)]
    # also a real transport header with a corrupt tag, from a foreign address
    good = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 2.0)[0][0]
    corrupt = good[:-1] + bytes([good[-1] ^ 1])
    pkts, out = b.datagrams([(j, ("203.0.113.66", 1)) for j in junk + [corrupt]], 2.0)
    assert (pkts, out) == ([], [])
    assert (pb.current, pb.previous, pb.next, pb.active_endpoint,
            pb.current.replay._highest) == state
    pkts, _ = b.datagrams([(good, A1)], 2.0)
    assert pkts == [ip4("10.0.0.1", "10.0.0.2")]
    # a replayed transport packet is dropped
    pkts, _ = b.datagrams([(good, A1)], 2.0)
    assert pkts == []


def test_inner_packet_padding_stripped_and_junk_inner_dropped():
    a, b, n = pair()
    handshake(a, b, n)
    n.tun[b].clear()
    odd = ip4("10.0.0.1", "10.0.0.2", b"x" * 3)
    out = a.tun_packets([odd], 2.0)
    assert (len(out[0][0]) - 32) % 16 == 0
    n.send(out, A1, 2.0)
    assert n.tun[b] == [odd]


def test_key_material_absent_from_reprs():
    a, b, n = pair()
    psk = bytes(range(100, 132))
    a.set_peer(b.public_key, 0, preshared_key=psk)
    b.set_peer(a.public_key, 0, preshared_key=psk)
    handshake(a, b, n)
    pa = a.peers[b.public_key]
    text = " ".join(repr(x) for x in (a, pa, pa.current, pa.cookies, a._cookies, pa.handshake))
    for secret in (a.private_key, psk):
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]):
            assert form not in text


def test_set_private_key_drops_sessions():
    a, b, n = pair()
    handshake(a, b, n)
    a.set_private_key(bytes(range(32)), 5.0)
    pa = a.peers[b.public_key]
    assert pa.current is None and pa.next is None
    assert a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 5.0)[0][0][0] == MSG_INITIATION


def test_set_peer_validation_is_all_or_nothing():
    import pytest
    a, b, n = pair()
    pa = a.peers[b.public_key]
    with pytest.raises(ValueError):
        a.set_peer(b.public_key, 0, endpoints=[("198.51.100.1", 1)], preshared_key=b"short")
    with pytest.raises(ValueError):
        a.set_peer(b.public_key, 0, endpoints=[("not-an-ip", 1)], allowed_ips=[net("10.7.0.0/16")])
    assert pa.configured_endpoints == [B1] and net("10.7.0.0/16") not in pa.allowed_ips
    with pytest.raises(ValueError):
        a.set_peer(a.public_key, 0)


def test_flood_from_one_source_is_rate_limited_under_load():
    a, b, n = pair()
    b.under_load_threshold = 0
    init = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)[0][0]
    flooder = ("198.51.100.66", 5555)
    replies = [b.datagrams([(init, flooder)], 1.0 + i * 0.001)[1] for i in range(50)]
    answered = sum(1 for r in replies if r)
    assert answered == 5  # the burst, then nothing within the same 50 ms
    # another source is not affected
    _, r = b.datagrams([(init, A1)], 1.06)
    assert [m[0] for m, _ in r] == [MSG_COOKIE_REPLY]
    # and the flooder gets tokens back over time
    _, r = b.datagrams([(init, flooder)], 2.0)
    assert r


def test_responder_flushes_waiting_packets_once_session_confirmed():
    a, b, n = pair()
    # b has a packet for a but no endpoint: it waits
    assert b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], 0.5) == []
    handshake(a, b, n, now=1.0)  # a initiates; its first data confirms b's keys
    assert n.tun[a] == [ip4("10.0.0.2", "10.0.0.1")]


def test_zero_private_key_means_no_key_and_no_handshakes():
    from overlay.wireguard.device import Device
    d = Device(bytes(32))
    assert not d.has_private_key and d.public_key == bytes(32)
    b = make_device(2)
    d.set_peer(b.public_key, 0, endpoints=[B1], allowed_ips=[net("10.0.0.2/32")])
    assert d.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0) == []
    d.set_private_key(bytes(range(32)), 2.0)
    assert d.has_private_key
    assert d.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 2.0)[0][0][0] == MSG_INITIATION
