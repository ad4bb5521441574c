"""The agent's UDP shell on loopback: GSO batches out, GRO batches in, demux by first bytes."""

import errno
import socket
import time

from overlay.net.udp import UdpSockets, bind_pair


def _drain_all(udp, sock, want, timeout=2.0):
    wg, other = [], []
    deadline = time.monotonic() + timeout
    while len(wg) + len(other) < want and time.monotonic() < deadline:
        udp.drain(sock, 64, wg, other)
        time.sleep(0.01)
    return wg, other


def test_batches_round_trip_with_demux():
    s4, s6, port = bind_pair(None)
    rx = UdpSockets(s4, s6, port)
    t4, t6, tport = bind_pair(None)
    tx = UdpSockets(t4, t6, tport)
    try:
        dst4 = ("127.0.0.1", port)
        wg = [bytes([4, 0, 0, 0]) + bytes([i]) * 60 for i in range(20)]
        short = bytes([4, 0, 0, 0]) + b"s" * 10  # shorter last segment of the run
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
        chan = b"\x40\x01\x00\x04abcd"
        errors = []
        tx.send_batch([(m, dst4) for m in wg] + [(short, dst4), (stun, dst4), (chan, dst4)],
                      lambda ep, err: errors.append((ep, err)))
        assert errors == []
        got_wg, got_other = _drain_all(rx, rx.s4, 23)
        assert [bytes(d) for d, _ in got_wg] == wg + [short]
        assert [d for d, _ in got_other] == [stun, chan]
        assert all(addr == ("127.0.0.1", tport) for _, addr in got_wg + got_other)
        if rx.s6 is not None and tx.s6 is not None:
            tx.send_batch([(wg[0], ("::1", port))], lambda ep, err: errors.append(err))
            got6, _ = _drain_all(rx, rx.s6, 1)
            assert [bytes(d) for d, _ in got6] == [wg[0]] and got6[0][1] == ("::1", tport)
    finally:
        rx.close()
        tx.close()


def test_send_error_is_reported_per_endpoint():
    s4, s6, port = bind_pair(None)
    udp = UdpSockets(s4, None, port)
    try:
        errors = []
        # no IPv6 socket: reported as unsupported address family, not raised
        udp.send_batch([(b"\x01\x00\x00\x00", ("2001:db8::1", 9))], lambda ep, err: errors.append((ep, err)))
        assert errors == [(("2001:db8::1", 9), errno.EAFNOSUPPORT)]
    finally:
        udp.close()


def test_same_port_on_both_families():
    s4, s6, port = bind_pair(None)
    try:
        assert s4.getsockname()[1] == port
        if s6 is not None:
            assert s6.getsockname()[1] == port
            assert s6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        s4.close()
        if s6 is not None:
            s6.close()


def test_lone_datagrams_are_demuxed_and_empty_ones_dropped():
    # Datagrams sent one by one arrive without a GRO batch (the fast path of
    # drain); an empty datagram must not reach either handler.
    s4, s6, port = bind_pair(None)
    rx = UdpSockets(s4, s6, port)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wg = bytes([1, 0, 0, 0]) + b"w" * 144
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
        for m in (wg, b"", stun, b"\x04\x00"):
            tx.sendto(m, ("127.0.0.1", port))
        got_wg, got_other = _drain_all(rx, rx.s4, 3)
        assert [bytes(d) for d, _ in got_wg] == [wg]
        assert [bytes(d) for d, _ in got_other] == [stun, b"\x04\x00"]
        assert got_wg[0][1] == ("127.0.0.1", tx.getsockname()[1])
    finally:
        rx.close()
        tx.close()
