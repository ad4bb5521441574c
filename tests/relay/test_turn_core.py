"""The sans-I/O TURN core with a fake clock and fake relay ports (no sockets)."""

from __future__ import annotations

import struct

import pytest

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials
from relay_server.turn_core import ClientTransport, TurnCore, TurnSettings

SECRET = "s3cret"
T0 = 1_700_000_000.0
CLIENT = ("198.51.100.20", 40000)
PEER = ("203.0.113.9", 5000)


class FakePorts:
    def __init__(self, limit: int = 1000) -> None:
        self.open_handles: set[str] = set()
        self.next = 50000
        self.limit = limit

    def open(self, family, alloc, even=False, reserve=False):
        if len(self.open_handles) >= self.limit:
            return None
        self.next += 2
        handle = f"relay{self.next}"
        self.open_handles.add(handle)
        ip = "2001:db8::1" if family == m.FAMILY_IPV6 else "192.0.2.1"
        spare = None
        if reserve:
            spare = f"relay{self.next + 1}"
            self.open_handles.add(spare)
        return handle, (ip, self.next), spare

    def adopt(self, handle, alloc):
        return "192.0.2.1", int(handle[5:])

    def close(self, handle):
        self.open_handles.discard(handle)


class Client:
    """A TURN client driven by hand against the core."""

    def __init__(self, core: TurnCore, transport: ClientTransport, addr=CLIENT, name="alice", ttl=3600) -> None:
        self.core, self.transport, self.addr = core, transport, addr
        self.creds = make_rest_credentials(SECRET, name, ttl, now=T0)
        self.nonce = b""
        self.key = m.long_term_key(self.creds.username, core.s.realm, self.creds.password)

    def raw(self, data: bytes, now: float = T0):
        return self.core.handle_client(data, self.transport, self.addr, now)

    def request(self, msg: m.Message, now: float = T0, sign: bool = True) -> m.Message:
        if sign:
            if not self.nonce:
                self.nonce = self.core.make_nonce(now)
            sc.add_auth(msg, self.creds.username, self.core.s.realm, self.nonce)
        out = self.raw(msg.encode(key=self.key if sign else None), now)
        assert len(out) == 1, out
        via, data, dest = out[0]
        assert via is self.transport and dest == self.addr
        reply = m.parse(data)
        assert reply.transaction_id == msg.transaction_id
        if reply.cls == m.SUCCESS:
            assert reply.check_integrity(self.key)
        return reply

    def allocate(self, now: float = T0, **kw) -> m.Message:
        return self.request(sc.allocate_request(**kw), now)


def code(reply: m.Message) -> int | None:
    ec = reply.error_code()
    return ec[0] if ec else None


@pytest.fixture
def core():
    return TurnCore(TurnSettings(realm="test", shared_secret=SECRET, max_allocations_per_user=2), FakePorts(), b"k" * 32)


@pytest.fixture
def udp():
    return ClientTransport(("192.0.2.1", 3478), stream=False)


def test_binding_reports_mapped_address(core, udp):
    reply = m.parse(core.handle_client(sc.binding_request().encode(), udp, CLIENT, T0)[0][1])
    assert reply.cls == m.SUCCESS and sc.mapped_address(reply) == CLIENT
    assert reply.address(m.MAPPED_ADDRESS) == CLIENT


def test_allocate_needs_credentials_then_succeeds(core, udp):
    c = Client(core, udp)
    first = c.request(sc.allocate_request(), sign=False)
    assert code(first) == 401 and first.get(m.REALM) == b"test" and first.get(m.NONCE)
    c.nonce = first.get(m.NONCE)
    ok = c.allocate()
    assert ok.cls == m.SUCCESS
    assert ok.xor_address(m.XOR_RELAYED_ADDRESS)[0] == "192.0.2.1"
    assert ok.xor_address(m.XOR_MAPPED_ADDRESS) == CLIENT
    assert ok.u32(m.LIFETIME) == 600


def test_wrong_password_unknown_user_and_expired_rest_username_get_401(core, udp):
    c = Client(core, udp)
    c.key = m.long_term_key(c.creds.username, "test", "wrong")
    assert code(c.allocate()) == 401
    expired = Client(core, udp, ttl=-5)
    assert code(expired.allocate()) == 401
    assert not core.allocations and core.stats.auth_failures == 2


def test_stale_nonce_gives_438_with_fresh_nonce(core, udp):
    c = Client(core, udp)
    c.nonce = core.make_nonce(T0)
    reply = c.allocate(now=T0 + 601)
    assert code(reply) == 438 and reply.get(m.NONCE) != c.nonce
    c.nonce = reply.get(m.NONCE)
    assert c.allocate(now=T0 + 601).cls == m.SUCCESS
    forged = Client(core, udp, addr=("198.51.100.21", 1))
    forged.nonce = b"ffffffff-0000000000000000"
    assert code(forged.allocate()) == 438


def test_error_codes_for_bad_allocations(core, udp):
    c = Client(core, udp)
    msg = m.Message(m.ALLOCATE, m.REQUEST)  # no REQUESTED-TRANSPORT
    assert code(c.request(msg)) == 400
    tcp = m.Message(m.ALLOCATE, m.REQUEST).add(m.REQUESTED_TRANSPORT, struct.pack("!B3x", 6))
    assert code(c.request(tcp)) == 442
    bad_family = sc.allocate_request().add(m.REQUESTED_ADDRESS_FAMILY, b"\x05\0\0\0")
    assert code(c.request(bad_family)) == 440
    both = sc.allocate_request(m.FAMILY_IPV6).add(m.ADDITIONAL_ADDRESS_FAMILY, b"\x02\0\0\0")
    assert code(c.request(both)) == 400
    unknown = sc.allocate_request().add(0x7777, b"abcd").add(0xC001, b"ok")
    reply = c.request(unknown)
    assert code(reply) == 420 and reply.get(m.UNKNOWN_ATTRIBUTES) == b"\x77\x77"
    assert not core.allocations


def test_second_allocate_is_437_but_retransmission_is_answered_again(core, udp):
    c = Client(core, udp)
    req = sc.allocate_request()
    sc.add_auth(req, c.creds.username, "test", core.make_nonce(T0))
    data = req.encode(key=c.key)
    first, again = c.raw(data)[0][1], c.raw(data)[0][1]
    assert first == again and m.parse(first).cls == m.SUCCESS
    assert code(c.allocate()) == 437
    assert len(core.allocations) == 1


def test_other_user_on_same_allocation_gets_441(core, udp):
    Client(core, udp).allocate()
    mallory = Client(core, udp, name="mallory")
    assert code(mallory.request(sc.create_permission_request([PEER]))) == 441


def test_requests_without_allocation_get_437(core, udp):
    c = Client(core, udp)
    for msg in (sc.refresh_request(600), sc.create_permission_request([PEER]), sc.channel_bind_request(0x4000, PEER)):
        assert code(c.request(msg)) == 437


def test_quota_per_user_486_and_capacity_508(udp):
    core = TurnCore(TurnSettings(realm="test", shared_secret=SECRET, max_allocations_per_user=2), FakePorts(limit=3))
    for i in range(2):
        assert Client(core, udp, addr=("198.51.100.1", 1000 + i)).allocate().cls == m.SUCCESS
    assert code(Client(core, udp, addr=("198.51.100.1", 1002)).allocate()) == 486
    assert Client(core, udp, addr=("198.51.100.1", 1003), name="bob").allocate().cls == m.SUCCESS
    assert code(Client(core, udp, addr=("198.51.100.1", 1004), name="carol").allocate()) == 508


def test_ipv6_relay_and_family_mismatch_443(core, udp):
    c = Client(core, udp)
    ok = c.allocate(family=m.FAMILY_IPV6)
    assert ok.xor_address(m.XOR_RELAYED_ADDRESS)[0] == "2001:db8::1"
    assert code(c.request(sc.create_permission_request([PEER]))) == 443
    assert c.request(sc.create_permission_request([("2001:db8:5::5", 9)])).cls == m.SUCCESS
    assert code(c.request(sc.refresh_request(600).add(m.REQUESTED_ADDRESS_FAMILY, b"\x01\0\0\0"))) == 443


def test_additional_family_is_refused_cleanly_keeping_ipv4(core, udp):
    c = Client(core, udp)
    ok = c.request(sc.allocate_request().add(m.ADDITIONAL_ADDRESS_FAMILY, b"\x02\0\0\0"))
    assert ok.cls == m.SUCCESS and ok.xor_address(m.XOR_RELAYED_ADDRESS)[0] == "192.0.2.1"
    assert ok.get(m.ADDRESS_ERROR_CODE)[0] == m.FAMILY_IPV6


def test_loopback_and_own_addresses_are_forbidden_403(udp):
    core = TurnCore(TurnSettings(realm="test", shared_secret=SECRET, own_ips={"192.0.2.1"}), FakePorts())
    c = Client(core, udp)
    c.allocate()
    for peer in (("127.0.0.1", 9), ("192.0.2.1", 9), ("0.0.0.0", 9), ("224.0.0.1", 9)):
        assert code(c.request(sc.create_permission_request([peer]))) == 403
    assert code(c.request(sc.channel_bind_request(0x4000, ("127.0.0.1", 9)))) == 403


def test_channel_data_both_ways_and_data_indication(core, udp):
    c = Client(core, udp)
    c.allocate()
    alloc = udp.allocs[CLIENT]
    # Without permission nothing is relayed in either direction.
    assert c.raw(m.encode_channel_data(0x4000, b"x")) == []
    assert core.handle_peer(alloc, b"hello", PEER, T0) == []
    assert c.request(sc.channel_bind_request(0x4001, PEER)).cls == m.SUCCESS
    out = c.raw(m.encode_channel_data(0x4001, b"payload"))
    assert out == [(alloc.relay, b"payload", PEER)]
    back = core.handle_peer(alloc, b"pong", PEER, T0 + 1)
    assert back == [(udp, m.encode_channel_data(0x4001, b"pong"), CLIENT)]
    # A permitted peer port without a channel answers through a Data indication.
    other = (PEER[0], 6000)
    ind = m.parse(core.handle_peer(alloc, b"via-indication", other, T0 + 1)[0][1])
    assert ind.method == m.DATA and ind.cls == m.INDICATION
    assert ind.xor_address(m.XOR_PEER_ADDRESS) == other and ind.get(m.DATA_ATTR) == b"via-indication"
    # Send indication to a permitted address goes out; to an unpermitted one it does not.
    assert c.raw(sc.send_indication(other, b"si").encode()) == [(alloc.relay, b"si", other)]
    assert c.raw(sc.send_indication(("203.0.113.99", 1), b"no").encode()) == []


def test_channel_bind_rules(core, udp):
    c = Client(core, udp)
    c.allocate()
    assert code(c.request(sc.channel_bind_request(0x3FFF, PEER))) == 400
    assert code(c.request(sc.channel_bind_request(0x8000, PEER))) == 400
    assert c.request(sc.channel_bind_request(0x4000, PEER)).cls == m.SUCCESS
    assert code(c.request(sc.channel_bind_request(0x4000, ("203.0.113.10", 1)))) == 400
    assert code(c.request(sc.channel_bind_request(0x4002, PEER))) == 400
    assert c.request(sc.channel_bind_request(0x4000, PEER)).cls == m.SUCCESS  # refresh is fine


def test_lifetimes_with_fake_clock(core, udp):
    c = Client(core, udp)
    c.allocate()
    alloc = udp.allocs[CLIENT]
    c.request(sc.channel_bind_request(0x4000, PEER))
    # Permission (300 s) lapses before the channel (600 s): relaying stops at 300 s.
    assert c.raw(m.encode_channel_data(0x4000, b"a"), now=T0 + 299)
    assert c.raw(m.encode_channel_data(0x4000, b"a"), now=T0 + 301) == []
    assert core.handle_peer(alloc, b"z", PEER, T0 + 301) == []
    # Refreshing the permission alone brings it back until the channel's 600 s.
    c.nonce = core.make_nonce(T0 + 302)
    c.request(sc.create_permission_request([PEER]), now=T0 + 302)
    assert c.raw(m.encode_channel_data(0x4000, b"a"), now=T0 + 599)
    assert c.raw(m.encode_channel_data(0x4000, b"a"), now=T0 + 601) == []
    # The allocation itself expires at 600 s unless refreshed; a deadline is announced.
    assert core.next_deadline() <= T0 + 600
    core.handle_timer(T0 + 600.5)
    assert not core.allocations and CLIENT not in udp.allocs and not core.ports.open_handles


def test_refresh_extends_caps_and_deletes(core, udp):
    c = Client(core, udp)
    c.allocate()
    assert c.request(sc.refresh_request(10_000)).u32(m.LIFETIME) == 3600
    assert c.request(sc.refresh_request(30)).u32(m.LIFETIME) == 600  # never below the default
    core.handle_timer(T0 + 599)
    assert core.allocations
    assert c.request(sc.refresh_request(0)).u32(m.LIFETIME) == 0
    assert not core.allocations and not core.ports.open_handles


def test_tcp_allocation_pads_channel_data_and_dies_with_connection(core):
    tcp = ClientTransport(("192.0.2.1", 3478), stream=True, name="tcp")
    c = Client(core, tcp)
    c.allocate()
    alloc = tcp.allocs[CLIENT]
    c.request(sc.channel_bind_request(0x4000, PEER))
    frame = core.handle_peer(alloc, b"abcde", PEER, T0)[0][1]
    assert frame == b"\x40\x00\x00\x05abcde\0\0\0"
    core.transport_closed(tcp)
    assert not core.allocations and not core.ports.open_handles


def test_bandwidth_token_bucket(udp):
    core = TurnCore(TurnSettings(realm="test", shared_secret=SECRET, bandwidth=1000), FakePorts())
    c = Client(core, udp)
    c.allocate()
    c.request(sc.channel_bind_request(0x4000, PEER))
    sent = sum(len(c.raw(m.encode_channel_data(0x4000, b"x" * 100))) for _ in range(30))
    assert sent == 10  # one second of burst at 1000 B/s
    assert len(c.raw(m.encode_channel_data(0x4000, b"x" * 100), now=T0 + 0.5)) == 1  # refilled 500 B


def test_even_port_reservation(core, udp):
    c = Client(core, udp)
    ok = c.request(sc.allocate_request().add(m.EVEN_PORT, b"\x80"))
    token = ok.get(m.RESERVATION_TOKEN)
    port = ok.xor_address(m.XOR_RELAYED_ADDRESS)[1]
    assert port % 2 == 0 and len(token) == 8
    other = Client(core, udp, addr=("198.51.100.20", 40001))
    ok2 = other.request(m.Message(m.ALLOCATE, m.REQUEST).add(m.REQUESTED_TRANSPORT, b"\x11\0\0\0")
                        .add(m.RESERVATION_TOKEN, token))
    assert ok2.xor_address(m.XOR_RELAYED_ADDRESS)[1] == port + 1
    third = Client(core, udp, addr=("198.51.100.20", 40002), name="bob")
    again = m.Message(m.ALLOCATE, m.REQUEST).add(m.REQUESTED_TRANSPORT, b"\x11\0\0\0").add(m.RESERVATION_TOKEN, token)
    assert code(third.request(again)) == 508  # a token is single-use


def test_garbage_is_dropped_or_400_and_state_is_untouched(core, udp):
    c = Client(core, udp)
    c.allocate()
    before = (len(core.allocations), dict(udp.allocs))
    valid = sc.create_permission_request([PEER])
    sc.add_auth(valid, c.creds.username, "test", c.nonce)
    data = valid.encode(key=c.key)
    # Truncated: header intact, length disagrees -> 400 for a request with a readable header.
    out = c.raw(data[:-8])
    assert len(out) == 1 and code(m.parse(out[0][1])) == 400
    # Flipped byte inside: integrity fails -> 401, nothing installed.
    broken = bytearray(data)
    broken[30] ^= 0xFF
    reply = c.raw(bytes(broken))
    assert reply == [] or code(m.parse(reply[0][1])) in (400, 401)
    assert PEER[0] not in udp.allocs[CLIENT].perms
    import random

    rnd = random.Random(7)
    for _ in range(2000):
        blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 80)))
        for via, payload, dest in c.raw(blob):
            assert dest == CLIENT  # only ever an answer to the sender, never relayed
    assert (len(core.allocations), dict(udp.allocs)) == before


def test_rfc5780_change_request_selects_other_listener(udp):
    core = TurnCore(TurnSettings(alternate_ip={"192.0.2.1": "192.0.2.2"}, alternate_port={3478: 3479}), FakePorts())
    req = sc.binding_request().add(m.CHANGE_REQUEST, b"\0\0\0\x06")
    via, data, dest = core.handle_client(req.encode(), udp, CLIENT, T0)[0]
    assert via == ("192.0.2.2", 3479) and dest == CLIENT
    reply = m.parse(data)
    assert reply.address(m.RESPONSE_ORIGIN) == ("192.0.2.2", 3479)
    assert reply.address(m.OTHER_ADDRESS) == ("192.0.2.2", 3479)
    only_port = sc.binding_request().add(m.CHANGE_REQUEST, b"\0\0\0\x02")
    assert core.handle_client(only_port.encode(), udp, CLIENT, T0)[0][0] == ("192.0.2.1", 3479)
    plain = TurnCore(TurnSettings(), FakePorts())
    assert code(m.parse(plain.handle_client(req.encode(), udp, CLIENT, T0)[0][1])) == 420
