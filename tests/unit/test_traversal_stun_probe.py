"""StunProber (sans-I/O STUN gathering) with a fake clock and server answers built with the codec."""

from __future__ import annotations

import random

import pytest

from overlay.stun import message as m
from overlay.stun.message import Message
from overlay.traversal.stun_probe import GIVE_UP_AFTER, INITIAL_RTO, StunProber

S4 = ("198.51.100.1", 3478)
S4_OTHER = ("198.51.100.2", 3479)
S6 = ("2001:db8::1", 3478)
ME4 = ("203.0.113.7", 40000)


def answer(request: bytes, mapped: tuple, *, other: tuple | None = None, error: int | None = None) -> bytes:
    req = m.parse(request)
    if error:
        return Message(m.BINDING, m.ERROR, req.transaction_id).add_error(error).encode()
    resp = Message(m.BINDING, m.SUCCESS, req.transaction_id).add_xor_address(m.XOR_MAPPED_ADDRESS, mapped)
    if other:
        resp.add_address(m.OTHER_ADDRESS, other)
    return resp.encode()


def test_retransmits_on_schedule_then_gives_up():
    p = StunProber([S4, S6])
    p.start(0.0)
    first = p.datagrams_to_send()
    assert sorted(a for _, a in first) == sorted([S4, S6])
    sends = {S4: [0.0], S6: [0.0]}
    t = 0.0
    while not p.done:
        t = p.next_deadline()
        assert t is not None
        p.handle_timers(t)
        for data, addr in p.datagrams_to_send():
            # A retransmission is the same request (same transaction id), not a new one.
            assert data == dict((a, d) for d, a in first)[addr]
            sends[addr].append(t)
    assert sends[S4] == pytest.approx([0.0, INITIAL_RTO, 3 * INITIAL_RTO, 7 * INITIAL_RTO])
    assert t == pytest.approx(GIVE_UP_AFTER)
    assert p.results[S4].error == "timeout" and p.results[S6].error == "timeout"
    assert p.results[S4].mapped is None and p.next_deadline() is None


def test_answer_gives_mapping_and_rtt():
    p = StunProber([S4, S6])
    p.start(10.0)
    out = dict((a, d) for d, a in p.datagrams_to_send())
    p.handle_timers(10.2)
    p.datagrams_to_send()  # one retransmission happened; the RTT still counts from the first send
    assert p.receive(answer(out[S4], ME4), S4, 10.25) is True
    r = p.results[S4]
    assert r.mapped == ME4 and r.rtt == pytest.approx(0.25) and r.error is None
    assert p.results[S6].pending and not p.done
    # The same answer again (a duplicate) is no longer ours.
    assert p.receive(answer(out[S4], ME4), S4, 10.3) is False
    mapped6 = ("2001:db8:99::7", 40000)
    assert p.receive(answer(out[S6], mapped6), (S6[0], S6[1], 0, 0), 10.3) is True  # IPv6 sockaddr
    assert p.done and p.mapped_addresses(4) == [ME4] and p.mapped_addresses(6) == [mapped6]


def test_answer_from_another_source_is_not_taken():
    p = StunProber([S4])
    p.start(0.0)
    (data, _), = p.datagrams_to_send()
    assert p.receive(answer(data, ("192.0.2.66", 1)), ("192.0.2.66", 3478), 0.1) is False
    assert p.results[S4].pending


def test_other_address_is_probed_and_mapping_variation_reported():
    p = StunProber([S4])
    p.start(0.0)
    (data, _), = p.datagrams_to_send()
    assert p.receive(answer(data, ME4, other=S4_OTHER), S4, 0.05)
    (data2, dest2), = p.datagrams_to_send()
    assert dest2 == S4_OTHER and not p.done
    assert p.mapping_varies_by_destination(4) is None  # one observation so far
    # A destination-dependent NAT gives the second destination another port.
    assert p.receive(answer(data2, (ME4[0], 40001)), S4_OTHER, 0.1)
    assert p.done and p.mapping_varies_by_destination(4) is True
    assert [(o.server, o.mapped, o.primary) for o in p.observations] == [
        (S4, ME4, S4), (S4_OTHER, (ME4[0], 40001), S4)]


def test_unanswered_other_address_is_recorded_without_failing_the_server():
    p = StunProber([S4])
    p.start(0.0)
    (data, _), = p.datagrams_to_send()
    p.receive(answer(data, ME4, other=S4_OTHER), S4, 0.05)
    p.handle_timers(0.05 + GIVE_UP_AFTER)
    assert p.done and p.unanswered == [S4_OTHER]
    assert p.results[S4].mapped == ME4 and p.results[S4].error is None


def test_error_answer_is_a_failure_with_its_code():
    p = StunProber([S4])
    p.start(0.0)
    (data, _), = p.datagrams_to_send()
    assert p.receive(answer(data, ME4, error=400), S4, 0.1)
    assert p.results[S4].error == "400 Bad Request" and p.done


def test_restart_forgets_old_transactions():
    p = StunProber([S4])
    p.start(0.0)
    (old, _), = p.datagrams_to_send()
    p.start(5.0)
    (new, _), = p.datagrams_to_send()
    assert p.receive(answer(old, ME4), S4, 5.1) is False
    assert p.receive(answer(new, ME4), S4, 5.1) is True


def test_malformed_and_random_input_is_ignored():
    p = StunProber([S4])
    p.start(0.0)
    (data, _), = p.datagrams_to_send()
    good = answer(data, ME4)
    rng = random.Random(7)
    junk = [b"", b"\x00", good[:19], good[:-1], good[:-4], good + b"\0\0\0\0", bytes([1, 0, 0, 0]) + good[4:]]
    junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(60))) for _ in range(2000)]
    # Right header and transaction id but a damaged body or checksum: FINGERPRINT catches it.
    # (Damaging FINGERPRINT's own type would just make it an ignorable unknown attribute.)
    for i in [*range(20, len(good) - 8), *range(len(good) - 4, len(good))]:
        b = bytearray(good)
        b[i] ^= 0xFF
        junk.append(bytes(b))
    for j in junk:
        assert p.receive(j, S4, 0.1) is False
    assert p.results[S4].pending
    assert p.receive(good, S4, 0.2) is True and p.results[S4].mapped == ME4
