"""TurnClient (sans-I/O TURN allocation) with a fake clock; the server side is answered with the codec."""

from __future__ import annotations

import random
import struct

import pytest

from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials, rest_password
from overlay.stun.message import Message
from overlay.traversal import turn_client as tcm
from overlay.traversal.turn_client import (ALLOCATING, CLOSED, FAILED, READY, TurnClient, retry_delay)

SERVER = ("192.0.2.1", 3478)
SECRET = "s3cret"
REALM = "example.org"
RELAYED = ("192.0.2.1", 50000)
MAPPED = ("203.0.113.7", 41000)
PEER = ("198.51.100.20", 51820)
PEER2 = ("198.51.100.21", 51820)
CREDS = make_rest_credentials(SECRET, "node1", ttl=86400, now=0)
KEY = m.long_term_key(CREDS.username, REALM, rest_password(SECRET, CREDS.username))


def reply(request: bytes, cls: int, *, attrs=(), xor=(), key: bytes | None = KEY, error: int | None = None) -> bytes:
    req = m.parse(request)
    resp = Message(req.method, cls, req.transaction_id)
    if error is not None:
        resp.add_error(error)
    for t, v in attrs:
        resp.add(t, v)
    for t, addr in xor:
        resp.add_xor_address(t, addr)
    return resp.encode(key=key)


def one(turn: TurnClient) -> bytes:
    out = turn.datagrams_to_send()
    assert len(out) == 1, out
    return out[0]


def challenge(turn: TurnClient, request: bytes, now: float, nonce: bytes = b"nonce-1") -> bytes:
    assert turn.unwrap(reply(request, m.ERROR, error=401, key=None,
                             attrs=[(m.REALM, REALM.encode()), (m.NONCE, nonce)]), now) is None
    return one(turn)


def ready(now: float = 100.0, **kw) -> TurnClient:
    turn = TurnClient(SERVER, CREDS, **kw)
    turn.start(now)
    signed = challenge(turn, one(turn), now)
    turn.unwrap(reply(signed, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))],
                      xor=[(m.XOR_RELAYED_ADDRESS, RELAYED), (m.XOR_MAPPED_ADDRESS, MAPPED)]), now)
    assert turn.state == READY
    return turn


def bound(turn: TurnClient, peer=PEER, now: float = 100.0) -> int:
    turn.wrap(b"x", peer, now)
    req = one(turn)
    assert m.parse(req).method == m.CHANNEL_BIND
    turn.unwrap(reply(req, m.SUCCESS), now)
    number = turn.channel_of(peer)
    assert number is not None
    return number


# -- allocation and authentication -------------------------------------------------------------------

def test_401_then_signed_allocate_then_ready():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    assert turn.state == ALLOCATING
    first = m.parse(one(turn))
    assert first.method == m.ALLOCATE and not first.has(m.USERNAME) and not first.has(m.MESSAGE_INTEGRITY)
    assert not first.has(m.REQUESTED_ADDRESS_FAMILY)
    signed_raw = challenge(turn, first.raw, 0.1)
    signed = m.parse(signed_raw)
    assert signed.transaction_id != first.transaction_id
    assert signed.text(m.USERNAME) == CREDS.username and signed.text(m.REALM) == REALM
    assert signed.get(m.NONCE) == b"nonce-1"
    assert signed.check_integrity(KEY)  # key = MD5(user:realm:base64 HMAC-SHA1 password)
    assert signed.get(m.REQUESTED_TRANSPORT)[0] == 17
    turn.unwrap(reply(signed_raw, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 300))],
                      xor=[(m.XOR_RELAYED_ADDRESS, RELAYED), (m.XOR_MAPPED_ADDRESS, MAPPED)]), 0.2)
    assert turn.state == READY and turn.failure is None
    assert turn.relayed_address == RELAYED and turn.mapped_address == MAPPED
    assert turn.lifetime == 300 and turn.expires_at == pytest.approx(300.2)


def test_ipv6_relay_is_requested_with_requested_address_family():
    turn = TurnClient(SERVER, CREDS, family=6)
    turn.start(0.0)
    msg = m.parse(one(turn))
    assert msg.get(m.REQUESTED_ADDRESS_FAMILY) == bytes([m.FAMILY_IPV6, 0, 0, 0])


def test_unsigned_or_badly_signed_success_is_ignored_after_auth():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    xor = [(m.XOR_RELAYED_ADDRESS, ("6.6.6.6", 6))]
    turn.unwrap(reply(signed, m.SUCCESS, xor=xor, key=None), 0.1)
    turn.unwrap(reply(signed, m.SUCCESS, xor=xor, key=b"wrong key"), 0.1)
    assert turn.state == ALLOCATING and turn.relayed_address is None


def test_stale_nonce_438_retries_with_the_new_nonce():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    turn.unwrap(reply(signed, m.ERROR, error=438, key=None, attrs=[(m.REALM, REALM.encode()),
                                                                   (m.NONCE, b"nonce-2")]), 0.1)
    again = m.parse(one(turn))
    assert again.get(m.NONCE) == b"nonce-2" and again.check_integrity(KEY)
    assert turn.state == ALLOCATING
    turn.unwrap(reply(again.raw, m.SUCCESS, xor=[(m.XOR_RELAYED_ADDRESS, RELAYED)]), 0.2)
    assert turn.state == READY


def test_endless_438_gives_up():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    req = challenge(turn, one(turn), 0.0)
    for i in range(tcm.MAX_NONCE_RETRIES + 1):
        turn.unwrap(reply(req, m.ERROR, error=438, key=None, attrs=[(m.NONCE, b"n%d" % i)]), 0.1)
        out = turn.datagrams_to_send()
        if not out:
            break
        req = out[0]
    assert turn.state == FAILED and turn.failure.code == 438


def test_401_on_a_signed_request_means_wrong_credentials():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    turn.unwrap(reply(signed, m.ERROR, error=401, key=None, attrs=[(m.REALM, REALM.encode()),
                                                                   (m.NONCE, b"nonce-1")]), 0.1)
    assert turn.state == FAILED and turn.datagrams_to_send() == []
    assert turn.failure.code == 401 and not turn.failure.retryable
    assert CREDS.username in turn.reason and CREDS.password not in turn.reason and CREDS.password not in repr(turn)


@pytest.mark.parametrize("code,retryable", [(486, True), (441, False), (508, True), (437, True), (440, False)])
def test_error_answer_fails_the_allocation_with_a_reason(code, retryable):
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    turn.unwrap(reply(signed, m.ERROR, error=code, key=None), 0.1)  # no exception
    assert turn.state == FAILED
    assert turn.failure.code == code and turn.failure.retryable is retryable
    assert str(code) in turn.reason and m.REASONS[code] in turn.reason
    assert turn.next_deadline() is None and turn.wrap(b"x", PEER, 0.2) is None
    # The caller may try again (after `retry_delay`): a fresh allocation starts.
    turn.start(5.0)
    assert turn.state == ALLOCATING and turn.failure is None and m.parse(one(turn)).method == m.ALLOCATE


def test_retry_delay_backs_off_and_caps():
    assert [retry_delay(i) for i in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(30) == tcm.RETRY_MAX


def test_allocate_retransmits_then_fails_after_give_up():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    first = one(turn)
    times = []
    while turn.state == ALLOCATING:
        t = turn.next_deadline()
        turn.handle_timers(t)
        for data in turn.datagrams_to_send():
            assert data == first
            times.append(t)
    assert times == pytest.approx([0.25, 0.75, 1.75, 3.75])
    assert t == pytest.approx(tcm.GIVE_UP_AFTER)
    assert turn.failure.code == 0 and "no answer" in turn.reason and turn.failure.retryable


def test_stream_transport_does_not_retransmit():
    turn = TurnClient(SERVER, CREDS, stream=True)
    turn.start(0.0)
    one(turn)
    assert turn.next_deadline() == pytest.approx(tcm.GIVE_UP_AFTER)
    turn.handle_timers(4.9)
    assert turn.datagrams_to_send() == [] and turn.state == ALLOCATING
    turn.handle_timers(5.0)
    assert turn.state == FAILED and "stream" in turn.reason


# -- refresh -----------------------------------------------------------------------------------------

def test_refresh_at_80_percent_of_lifetime_and_on_answer_extends():
    turn = ready(now=100.0)
    assert turn.next_deadline() == pytest.approx(100.0 + 480.0)
    turn.handle_timers(579.9)
    assert turn.datagrams_to_send() == []
    turn.handle_timers(580.0)
    req = m.parse(one(turn))
    assert req.method == m.REFRESH and req.u32(m.LIFETIME) == 600 and req.check_integrity(KEY)
    turn.unwrap(reply(req.raw, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))]), 580.1)
    assert turn.expires_at == pytest.approx(1180.1) and turn.state == READY
    assert turn.next_deadline() == pytest.approx(580.1 + 480.0)


def test_refresh_without_answers_means_the_relay_is_silent():
    """A Refresh nobody answers (all retransmissions over 5 s): the relay is gone. The
    client says so at once instead of publishing a dead relayed address until expiry."""
    turn = ready(now=0.0)
    t = 0.0
    sent = []
    while turn.state == READY and t < 2000:
        t = turn.next_deadline()
        turn.handle_timers(t)
        sent += [(t, m.parse(d).method) for d in turn.datagrams_to_send()]
    assert turn.state == FAILED and "relay silent" in turn.reason and turn.failure.retryable
    assert turn.failure.code == 0
    assert sent[0] == (pytest.approx(480.0), m.REFRESH) and len(sent) >= 4  # retransmitted
    assert t == pytest.approx(485.0)  # well before the allocation would expire at 600 s


def test_allocation_expires_when_refreshes_keep_failing_transiently():
    turn = ready(now=0.0)
    t = 0.0
    while turn.state == READY and t < 2000:
        t = turn.next_deadline()
        turn.handle_timers(t)
        for req in turn.datagrams_to_send():  # 500: try again shortly, until expiry
            turn.unwrap(reply(req, m.ERROR, error=500), t)
    assert turn.state == FAILED and "expired" in turn.reason
    assert t == pytest.approx(600.0)


def test_server_lifetime_is_honoured():
    """The server may grant less than we asked: the refresh follows its figure."""
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    turn.unwrap(reply(signed, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 60))],
                      xor=[(m.XOR_RELAYED_ADDRESS, RELAYED)]), 0.0)
    assert turn.lifetime == 60 and turn.expires_at == 60.0
    assert turn.next_deadline() == pytest.approx(48.0)
    turn.handle_timers(48.0)
    req = one(turn)
    turn.unwrap(reply(req, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 30))]), 48.0)
    assert turn.expires_at == pytest.approx(78.0) and turn.next_deadline() == pytest.approx(72.0)


def test_liveness_refresh_notices_a_restarted_relay_within_one_interval():
    """A relay restarted on the same address has no allocation for us: the periodic
    liveness Refresh gets 437 and the client reports the allocation lost (the caller
    allocates again)."""
    turn = ready(now=0.0, liveness=tcm.LIVENESS_INTERVAL)
    assert turn.next_deadline() == pytest.approx(tcm.LIVENESS_INTERVAL)
    turn.handle_timers(tcm.LIVENESS_INTERVAL - 0.1)
    assert turn.datagrams_to_send() == []
    turn.handle_timers(tcm.LIVENESS_INTERVAL)
    req = m.parse(one(turn))
    assert req.method == m.REFRESH and req.check_integrity(KEY)
    # Answered: checked again one interval later, and the lifetime restarts.
    turn.unwrap(reply(req.raw, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))]), 30.0)
    assert turn.next_deadline() == pytest.approx(60.0) and turn.expires_at == pytest.approx(630.0)
    turn.handle_timers(60.0)
    req = one(turn)
    turn.unwrap(reply(req, m.ERROR, error=437), 60.05)
    assert turn.state == FAILED and turn.failure.code == 437 and turn.failure.retryable


def test_liveness_refresh_unanswered_over_a_stream_fails_after_give_up():
    turn = ready(now=0.0, liveness=10.0, stream=True)
    turn.handle_timers(10.0)
    assert m.parse(one(turn)).method == m.REFRESH
    assert turn.next_deadline() == pytest.approx(10.0 + tcm.GIVE_UP_AFTER)
    turn.handle_timers(10.0 + tcm.GIVE_UP_AFTER)
    assert turn.datagrams_to_send() == []  # a stream does not retransmit
    assert turn.state == FAILED and "relay silent" in turn.reason


def test_refresh_now_checks_at_once_and_only_once():
    turn = ready(now=0.0, liveness=30.0)
    turn.refresh(5.0)
    turn.refresh(5.0)
    turn.handle_timers(5.0)
    assert [m.parse(d).method for d in turn.datagrams_to_send()] == [m.REFRESH]


def test_refresh_stale_nonce_is_retried_and_437_fails():
    turn = ready(now=0.0)
    turn.handle_timers(480.0)
    req = one(turn)
    turn.unwrap(reply(req, m.ERROR, error=438, key=None, attrs=[(m.NONCE, b"fresh")]), 480.1)
    req2 = m.parse(one(turn))
    assert req2.method == m.REFRESH and req2.get(m.NONCE) == b"fresh"
    turn.unwrap(reply(req2.raw, m.ERROR, error=437, key=None), 480.2)
    assert turn.state == FAILED and turn.failure.code == 437 and "lost" in turn.reason


def test_close_sends_refresh_lifetime_zero():
    turn = ready()
    turn.close(200.0)
    req = m.parse(one(turn))
    assert req.method == m.REFRESH and req.u32(m.LIFETIME) == 0 and req.check_integrity(KEY)
    assert turn.state == CLOSED and turn.wrap(b"x", PEER, 200.0) is None


# -- permissions and channels ------------------------------------------------------------------------------

def test_permission_refreshed_while_used_and_dropped_when_unused():
    turn = ready(now=0.0)
    turn.permit(PEER[0], 10.0)
    req = m.parse(one(turn))
    assert req.method == m.CREATE_PERMISSION and req.xor_address(m.XOR_PEER_ADDRESS)[0] == PEER[0]
    turn.unwrap(reply(req.raw, m.SUCCESS), 10.1)
    assert turn.has_permission(PEER[0])
    # Traffic to the peer (a Send indication, no channel) keeps it alive ...
    frame = turn.wrap(b"data", PEER, 100.0, channel=False)
    ind = m.parse(frame)
    assert ind.method == m.SEND and ind.cls == m.INDICATION and ind.get(m.DATA_ATTR) == b"data"
    assert turn.datagrams_to_send() == []
    turn.handle_timers(250.0)
    assert turn.datagrams_to_send() == []
    turn.handle_timers(250.1)  # 240 s after the confirmation: before the 300 s expiry
    req2 = m.parse(one(turn))
    assert req2.method == m.CREATE_PERMISSION
    turn.unwrap(reply(req2.raw, m.SUCCESS), 250.2)
    # ... and with no traffic for the next period it is left to expire, not refreshed.
    turn.handle_timers(490.2)
    sent = [m.parse(r).method for r in turn.datagrams_to_send()]
    assert m.CREATE_PERMISSION not in sent and not turn.has_permission(PEER[0])


def test_first_wrap_binds_channel_then_channeldata():
    turn = ready()
    frame = turn.wrap(b"hello", PEER, 100.0)
    bind = m.parse(one(turn))  # the bind goes out (first) next to the Send indication
    assert bind.method == m.CHANNEL_BIND and bind.xor_address(m.XOR_PEER_ADDRESS) == PEER
    number = struct.unpack("!H", bind.get(m.CHANNEL_NUMBER)[:2])[0]
    assert m.CHANNEL_MIN <= number <= m.CHANNEL_MAX
    assert m.parse(frame).method == m.SEND
    # Until the server confirms, still Send indications and no second bind.
    assert m.parse(turn.wrap(b"again", PEER, 100.01)).method == m.SEND
    assert turn.datagrams_to_send() == []
    turn.unwrap(reply(bind.raw, m.SUCCESS), 100.05)
    frame = turn.wrap(b"hello", PEER, 100.1)
    assert frame == struct.pack("!HH", number, 5) + b"hello"
    assert turn.has_permission(PEER[0])  # ChannelBind installed the permission too
    # Over a stream the same frame is padded to 4 bytes.
    s = ready(stream=True)
    n2 = bound(s)
    assert s.wrap(b"hello", PEER, 100.2) == struct.pack("!HH", n2, 5) + b"hello" + b"\0\0\0"


def test_channel_rebound_before_expiry_while_used_dropped_when_idle():
    turn = ready(now=0.0)
    number = bound(turn, now=0.0)
    for t in range(10, 480, 10):  # steady traffic
        turn.wrap(b"p", PEER, float(t))
        turn.handle_timers(float(t))
        for req in turn.datagrams_to_send():
            msg = m.parse(req)
            assert msg.method in (m.CREATE_PERMISSION, m.REFRESH)
            turn.unwrap(reply(req, m.SUCCESS), float(t))
    turn.handle_timers(480.0)
    kinds = {m.parse(r).method: r for r in turn.datagrams_to_send()}
    assert m.CHANNEL_BIND in kinds  # 480 s: re-bound well before the 600 s expiry
    rebind = m.parse(kinds[m.CHANNEL_BIND])
    assert struct.unpack("!H", rebind.get(m.CHANNEL_NUMBER)[:2])[0] == number
    for r in kinds.values():
        turn.unwrap(reply(r, m.SUCCESS), 480.0)
    # Idle from now: at the next rebind time the channel is dropped, not renewed.
    turn.handle_timers(960.0)
    assert all(m.parse(r).method != m.CHANNEL_BIND for r in turn.datagrams_to_send())
    assert turn.channel_of(PEER) is None
    assert m.parse(turn.wrap(b"later", PEER, 961.0)).method == m.SEND  # and a new bind starts
    assert any(m.parse(r).method == m.CHANNEL_BIND for r in turn.datagrams_to_send())


def test_channel_bind_error_falls_back_to_send_indications():
    turn = ready()
    turn.wrap(b"x", PEER, 100.0)
    turn.unwrap(reply(one(turn), m.ERROR, error=403, key=None), 100.1)
    assert turn.channel_of(PEER) is None and turn.state == READY


def test_distinct_peers_get_distinct_channels():
    turn = ready()
    a, b = bound(turn, PEER), bound(turn, PEER2)
    assert a != b and turn.channel_of(PEER) == a


# -- incoming data -----------------------------------------------------------------------------------------

def test_unwrap_channeldata_and_data_indication():
    turn = ready()
    number = bound(turn)
    assert turn.unwrap(struct.pack("!HH", number, 3) + b"abc", 101.0) == (b"abc", PEER)
    assert turn.unwrap(struct.pack("!HH", number, 3) + b"abc\0", 101.0) == (b"abc", PEER)  # padded (stream)
    assert turn.unwrap(struct.pack("!HH", number + 1, 3) + b"abc", 101.0) is None  # nobody's channel
    # A Data indication from a peer that has no channel is delivered too.
    ind = Message(m.DATA, m.INDICATION).add_xor_address(m.XOR_PEER_ADDRESS, PEER2).add(m.DATA_ATTR, b"hi")
    assert turn.unwrap(ind.encode(fingerprint=False), 101.0) == (b"hi", PEER2)
    v6 = ("2001:db8::5", 9)
    ind6 = Message(m.DATA, m.INDICATION).add_xor_address(m.XOR_PEER_ADDRESS, v6).add(m.DATA_ATTR, b"6")
    assert turn.unwrap(ind6.encode(), 101.0) == (b"6", v6)


def test_wrap_refuses_a_peer_of_the_other_family():
    turn = ready()
    assert turn.wrap(b"x", ("2001:db8::5", 9), 100.0) is None
    assert turn.datagrams_to_send() == []


def test_malformed_truncated_and_random_input_changes_nothing():
    turn = ready(now=0.0)
    number = bound(turn, now=0.0)
    turn.handle_timers(480.0)
    pending = turn.datagrams_to_send()
    assert pending  # refresh and rebind outstanding: answers to them must not be faked by junk
    state = (turn.state, turn.relayed_address, turn.expires_at, turn.channel_of(PEER), turn.next_deadline())
    rng = random.Random(1)
    good = [reply(r, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))]) for r in pending]
    junk: list[bytes] = [b"", b"\x40", b"\x40\x00\x00", struct.pack("!HH", number, 100) + b"short"]
    for g in good:
        junk += [g[:n] for n in range(len(g))]
        junk += [g[:20] + bytes(rng.randrange(256) for _ in range(len(g) - 20)) for _ in range(50)]
    junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(80))) for _ in range(3000)]
    junk += [m.MAGIC_COOKIE_BYTES.rjust(8, b"\x01") + bytes(rng.randrange(256) for _ in range(40)) for _ in range(500)]
    for j in junk:
        got = turn.unwrap(j, 480.5)
        assert got is None or (0x40 <= j[0] <= 0x4F and got[1] == PEER)  # only our own channel
    assert (turn.state, turn.relayed_address, turn.expires_at, turn.channel_of(PEER),
            turn.next_deadline()) == state
    for g in good:  # the real answers still work afterwards
        turn.unwrap(g, 480.6)
    assert turn.expires_at == pytest.approx(1080.6)


def test_expired_credentials_on_refresh_end_the_allocation_with_a_reason():
    turn = ready(now=0.0)
    turn.handle_timers(480.0)
    turn.unwrap(reply(one(turn), m.ERROR, error=441, key=None), 480.1)
    assert turn.state == FAILED and turn.failure.code == 441 and "credentials valid until" in turn.reason


def test_signed_but_defective_success_does_not_consume_the_transaction():
    turn = TurnClient(SERVER, CREDS)
    turn.start(0.0)
    signed = challenge(turn, one(turn), 0.0)
    turn.unwrap(reply(signed, m.SUCCESS, attrs=[(m.LIFETIME, b"\0\0\1")], xor=[(m.XOR_RELAYED_ADDRESS, RELAYED)]), 0.1)
    assert turn.state == ALLOCATING
    turn.handle_timers(0.25)
    assert turn.datagrams_to_send() == [signed]  # still retransmitting the same request
    turn.unwrap(reply(signed, m.SUCCESS, xor=[(m.XOR_RELAYED_ADDRESS, RELAYED)]), 0.3)
    assert turn.state == READY and turn.lifetime == tcm.DEFAULT_LIFETIME


def test_pinned_permission_channel_and_allocation_never_lapse_over_hours():
    """Two hours idle with a pinned peer (a direct peer's relay standby), a fake server
    that loses every third request: every permission (300 s), channel (600 s) and the
    allocation (600 s) is renewed before it expires on the server."""
    turn = ready(now=0.0, keepalive=tcm.KEEPALIVE_INTERVAL, liveness=tcm.LIVENESS_INTERVAL)
    turn.permit(PEER[0], 0.0, keep=True)
    turn.bind(PEER, 0.0, keep=True)
    renewed = {"permission": [0.0], "channel": [0.0], "allocation": [0.0]}
    requests = 0
    t = 0.0
    while t < 7200.0:
        for data in turn.datagrams_to_send():
            msg = m.parse(data)
            if msg.cls != m.REQUEST:
                continue
            requests += 1
            if requests % 3 == 0:
                continue  # lost
            kind = {m.CREATE_PERMISSION: "permission", m.CHANNEL_BIND: "channel", m.REFRESH: "allocation"}
            renewed[kind[msg.method]].append(t)
            if msg.method == m.CHANNEL_BIND:
                renewed["permission"].append(t)  # a ChannelBind refreshes the permission too
            attrs = [(m.LIFETIME, struct.pack("!I", 600))] if msg.method == m.REFRESH else []
            turn.unwrap(reply(data, m.SUCCESS, attrs=attrs), t)
        t = turn.next_deadline()
        turn.handle_timers(t)
    assert turn.state == READY and turn.has_permission(PEER[0]) and turn.channel_of(PEER) is not None
    for kind, lifetime in (("permission", 300.0), ("channel", 600.0), ("allocation", 600.0)):
        times = sorted(renewed[kind])
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) < lifetime, (kind, max(gaps))
    # ... and not wastefully often: the permission about every 240 s, the channel every 480 s.
    assert len(renewed["channel"]) < 7200 / 480 * 2 + 2
