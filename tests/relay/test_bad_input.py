"""Truncated, oversized and random STUN/TURN input over real UDP and TCP: errors or silence,
never a crash, and other clients keep being served."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from overlay.stun import client as sc
from overlay.stun import message as m

pytestmark = pytest.mark.timeout(60)


def _binding_works(port: int, family=socket.AF_INET, host="127.0.0.1") -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        req = sc.binding_request()
        s.sendto(req.encode(), (host, port))
        reply = m.parse(s.recv(2048))
        return reply.transaction_id == req.transaction_id and sc.mapped_address(reply)[1] == s.getsockname()[1]


def _request_with_bad_length(method: int) -> bytes:
    data = sc.allocate_request().encode()
    return data[:2] + struct.pack("!H", len(data) - 20 + 40) + data[4:]


def test_udp_garbage_gets_400_or_nothing_and_server_keeps_serving(relay):
    rnd = random.Random(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        # A request whose header is readable but whose length lies: 400 with its transaction id.
        bad = _request_with_bad_length(m.ALLOCATE)
        s.sendto(bad, ("127.0.0.1", relay.port))
        reply = m.parse(s.recv(2048))
        assert reply.cls == m.ERROR and reply.error_code()[0] == 400 and reply.transaction_id == bad[8:20]
        # Unknown comprehension-required attribute on a Binding: 420 listing it.
        req = sc.binding_request().add(0x0777, b"zz")
        s.sendto(req.encode(), ("127.0.0.1", relay.port))
        reply = m.parse(s.recv(2048))
        assert reply.error_code()[0] == 420 and reply.get(m.UNKNOWN_ATTRIBUTES) == b"\x07\x77"
        # Thousands of random datagrams, some oversized, some ChannelData-looking.
        for i in range(3000):
            n = rnd.choice([0, 1, 3, 4, 19, 20, 21, 100, 1500, 9000, 65000])
            blob = bytearray(rnd.getrandbits(8) for _ in range(min(n, 64))) + bytes(max(0, n - 64))
            if i % 3 == 0 and n >= 8:
                blob[4:8] = m.MAGIC_COOKIE_BYTES
                blob[0] &= 0x3F
            s.sendto(bytes(blob), ("127.0.0.1", relay.port))
        # Whatever came back are STUN errors, never relayed data.
        try:
            while True:
                data = s.recv(70000)
                assert m.parse(data).cls == m.ERROR
        except socket.timeout:
            pass
    assert _binding_works(relay.port)
    assert _binding_works(relay.port, socket.AF_INET6, "::1")
    assert relay.alive()


def test_tcp_garbage_closes_only_that_connection(relay):
    victim = socket.create_connection(("127.0.0.1", relay.port), timeout=3)
    bystander = socket.create_connection(("127.0.0.1", relay.port), timeout=3)
    try:
        victim.sendall(b"\xff" * 64)  # neither STUN nor ChannelData
        assert victim.recv(100) == b""  # server hung up on it
        # A truncated message followed by silence: nothing happens, then a valid one on another socket.
        half = sc.binding_request().encode()[:12]
        bystander.sendall(half)
        req = sc.binding_request()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=3) as fresh:
            fresh.sendall(req.encode())
            data = fresh.recv(2048)
            assert m.parse(data).transaction_id == req.transaction_id
    finally:
        victim.close()
        bystander.close()
    assert _binding_works(relay.port)


def test_tcp_stream_split_and_coalesced_frames_are_reassembled(relay):
    reqs = [sc.binding_request() for _ in range(3)]
    blob = b"".join(r.encode() for r in reqs)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=3) as s:
        for i in range(0, len(blob), 7):  # dribble 7 bytes at a time
            s.sendall(blob[i : i + 7])
        got = b""
        while len(got) < 3 * 20 or len(_split(got)) < 3:
            got += s.recv(4096)
        assert [m.parse(f).transaction_id for f in _split(got)] == [r.transaction_id for r in reqs]


def _split(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 4 <= len(stream):
        size = m.stream_frame_length(stream[pos : pos + 4])
        if pos + size > len(stream):
            break
        out.append(stream[pos : pos + size])
        pos += size
    return out


def test_tcp_random_streams_never_take_the_server_down(relay):
    rnd = random.Random(3)
    for i in range(30):
        with socket.socket(socket.AF_INET6 if i % 2 else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(("::1" if i % 2 else "127.0.0.1", relay.port))
            blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 3000)))
            if i % 3 == 0:
                blob = b"\x00\x03\xff\xfc" + m.MAGIC_COOKIE_BYTES + blob  # Allocate claiming 65532 bytes
            try:
                s.sendall(blob)
            except OSError:
                pass  # the server may already have hung up on garbage
    with socket.create_connection(("::1", relay.port), timeout=3) as s:
        req = sc.binding_request()
        s.sendall(req.encode())
        reply = m.parse(s.recv(2048))
        assert reply.transaction_id == req.transaction_id and sc.mapped_address(reply)[0] == "::1"
    assert _binding_works(relay.port)


def test_no_internal_errors_were_logged(relay):
    """Runs last in this module: garbage must be handled, not end in an exception the loop logs."""
    errors = [line for line in relay.log_path.read_text().splitlines() if '"level": "error"' in line]
    assert not errors, errors[:3]
