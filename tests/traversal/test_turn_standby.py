"""The agent's TURN allocation as the standby path of peers on a direct path (fake clock).

A peer that went direct leaves the relay idle for minutes. When the direct path dies,
the first probes through the relay must get through at once, so while idle:
- the permissions (and channels) for the peers' addresses stay installed on the server
  (pinned with `keep=True`), instead of lapsing like ones only traffic asked for;
- the NAT mapping towards the server stays open (a Binding indication every
  `keepalive` seconds), or the server's relayed packets are filtered out by our NAT.
"""

from __future__ import annotations

import struct

from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials, rest_password
from overlay.stun.message import Message
from overlay.traversal.turn_client import KEEPALIVE_INTERVAL, READY, TurnClient

SERVER = ("192.0.2.1", 3478)
SECRET = "s3cret"
REALM = "example.org"
PEER = ("198.51.100.20", 51820)
CREDS = make_rest_credentials(SECRET, "node1", ttl=86400, now=0)
KEY = m.long_term_key(CREDS.username, REALM, rest_password(SECRET, CREDS.username))


def _reply(request: bytes, cls: int, attrs=(), xor=(), key: bytes | None = KEY, error: int | None = None) -> bytes:
    req = m.parse(request)
    resp = Message(req.method, cls, req.transaction_id)
    if error is not None:
        resp.add_error(error)
    for t, v in attrs:
        resp.add(t, v)
    for t, addr in xor:
        resp.add_xor_address(t, addr)
    return resp.encode(key=key)


def _ready(now: float = 0.0, **kw) -> TurnClient:
    turn = TurnClient(SERVER, CREDS, **kw)
    turn.start(now)
    (first,) = turn.datagrams_to_send()
    turn.unwrap(_reply(first, m.ERROR, error=401, key=None, attrs=[(m.REALM, REALM.encode()), (m.NONCE, b"n")]), now)
    (signed,) = turn.datagrams_to_send()
    turn.unwrap(_reply(signed, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))],
                       xor=[(m.XOR_RELAYED_ADDRESS, ("192.0.2.1", 50000)),
                            (m.XOR_MAPPED_ADDRESS, ("203.0.113.7", 41000))]), now)
    assert turn.state == READY
    return turn


def _answer_all(turn: TurnClient, now: float) -> list[int]:
    """Answer every request with success; the methods of everything sent."""
    methods = []
    for raw in turn.datagrams_to_send():
        msg = m.parse(raw)
        methods.append((msg.method, msg.cls))
        if msg.cls == m.REQUEST:
            turn.unwrap(_reply(raw, m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))]
                               if msg.method == m.REFRESH else ()), now)
    return methods


def _run_idle(turn: TurnClient, until: float) -> list[tuple[float, int, int]]:
    """Follow the client's own deadlines with no traffic; (time, method, class) of what it sent."""
    sent = []
    t = 0.0
    while True:
        t = turn.next_deadline()
        if t is None or t > until:
            return sent
        turn.handle_timers(t)
        sent += [(t, meth, cls) for meth, cls in _answer_all(turn, t)]


def test_pinned_permission_is_refreshed_while_idle():
    turn = _ready(keepalive=None)
    turn.permit(PEER[0], 1.0, keep=True)
    assert _answer_all(turn, 1.0) == [(m.CREATE_PERMISSION, m.REQUEST)]
    sent = _run_idle(turn, 1000.0)
    perms = [t for t, meth, _ in sent if meth == m.CREATE_PERMISSION]
    # Refreshed every 240 s, well inside the server's 300 s, with nothing relayed at all.
    assert perms == [241.0, 481.0, 721.0, 961.0]
    assert turn.has_permission(PEER[0])
    assert turn.kept_permissions() == [PEER[0]]


def test_unpinned_or_released_permission_lapses_while_idle():
    turn = _ready(keepalive=None)
    turn.permit(PEER[0], 1.0)
    _answer_all(turn, 1.0)
    assert not [s for s in _run_idle(turn, 1000.0) if s[1] == m.CREATE_PERMISSION]
    assert not turn.has_permission(PEER[0])

    turn = _ready(keepalive=None)
    turn.permit(PEER[0], 1.0, keep=True)
    _answer_all(turn, 1.0)
    turn.release(PEER[0])
    assert not [s for s in _run_idle(turn, 1000.0) if s[1] == m.CREATE_PERMISSION]
    assert not turn.has_permission(PEER[0]) and turn.kept_permissions() == []


def test_pinned_permission_survives_an_unanswered_refresh():
    turn = _ready(keepalive=None)
    turn.permit(PEER[0], 1.0, keep=True)
    _answer_all(turn, 1.0)
    t = 241.0
    turn.handle_timers(t)
    assert [m.parse(r).method for r in turn.datagrams_to_send()] == [m.CREATE_PERMISSION]
    while t < 245.9:  # every retransmission lost: the transaction gives up after 5 s
        t = turn.next_deadline()
        turn.handle_timers(t)
        turn.datagrams_to_send()
    # Still pinned, and tried again shortly after, not forgotten.
    assert turn.kept_permissions() == [PEER[0]]
    t = turn.next_deadline()
    assert t <= 246.0 + 5.0 + 0.01
    turn.handle_timers(t)
    assert m.CREATE_PERMISSION in [m.parse(r).method for r in turn.datagrams_to_send()]


def test_pinned_permission_refused_by_the_server_is_dropped():
    turn = _ready(keepalive=None)
    turn.permit(PEER[0], 1.0, keep=True)
    (req,) = turn.datagrams_to_send()
    turn.unwrap(_reply(req, m.ERROR, error=403), 1.1)
    assert turn.kept_permissions() == [] and not turn.has_permission(PEER[0])


def test_pinned_channel_is_rebound_while_idle_and_still_decodes():
    turn = _ready(keepalive=None)
    number = turn.bind(PEER, 1.0, keep=True)
    _answer_all(turn, 1.0)
    sent = _run_idle(turn, 1000.0)
    assert [t for t, meth, _ in sent if meth == m.CHANNEL_BIND] == [481.0, 961.0]
    # Data the server relays on that channel after 10 idle minutes still reaches us.
    assert turn.unwrap(struct.pack("!HH", number, 3) + b"abc", 1000.0) == (b"abc", PEER)


def test_keepalive_binding_indication_while_idle_over_udp():
    turn = _ready(keepalive=KEEPALIVE_INTERVAL)
    sent = _run_idle(turn, 100.0)
    ind = [t for t, meth, cls in sent if (meth, cls) == (m.BINDING, m.INDICATION)]
    assert ind and ind[0] <= KEEPALIVE_INTERVAL
    gaps = [b - a for a, b in zip([0.0] + ind, ind)]
    assert max(gaps) <= KEEPALIVE_INTERVAL < 30.0  # below the shortest common NAT UDP timeout
    assert len(ind) >= 100.0 / KEEPALIVE_INTERVAL - 1


def test_keepalive_skipped_when_a_request_goes_out_anyway_and_never_over_streams():
    turn = _ready(keepalive=KEEPALIVE_INTERVAL)
    turn.permit(PEER[0], 0.0, keep=True)
    _answer_all(turn, 0.0)
    turn.refresh(KEEPALIVE_INTERVAL)  # a Refresh is due at the keepalive time
    turn.handle_timers(KEEPALIVE_INTERVAL)
    assert [m.parse(r).method for r in turn.datagrams_to_send()] == [m.REFRESH]
    stream = _ready(keepalive=KEEPALIVE_INTERVAL, stream=True)
    assert not [s for s in _run_idle(stream, 100.0) if s[1] == m.BINDING]
    plain = _ready()
    assert not [s for s in _run_idle(plain, 100.0) if s[1] == m.BINDING]


def test_unanswered_channel_bind_keeps_its_number_and_is_sent_again():
    """Responses lost under load: the server may already relay on the number, so the
    client keeps decoding it and rebinds the same number instead of a new one (which the
    server would refuse with 400 for a peer it still has bound)."""
    turn = _ready(keepalive=None)
    turn.wrap(b"x", PEER, 1.0)
    bind = m.parse(next(r for r in turn.datagrams_to_send() if m.parse(r).method == m.CHANNEL_BIND))
    number = struct.unpack("!H", bind.get(m.CHANNEL_NUMBER)[:2])[0]
    t = 1.0
    while t < 5.9:  # every answer lost; traffic keeps flowing
        t = turn.next_deadline()
        turn.wrap(b"x", PEER, t)
        turn.handle_timers(t)
        turn.datagrams_to_send()
    # The server bound it and relays on it: still delivered.
    assert turn.unwrap(struct.pack("!HH", number, 2) + b"ok", t) == (b"ok", PEER)
    t = turn.next_deadline()
    turn.handle_timers(t)
    again = [m.parse(r) for r in turn.datagrams_to_send() if m.parse(r).method == m.CHANNEL_BIND]
    assert again and struct.unpack("!H", again[0].get(m.CHANNEL_NUMBER)[:2])[0] == number
    turn.unwrap(_reply(again[0].raw, m.SUCCESS), t)
    assert turn.channel_of(PEER) == number


def test_channel_dropped_when_idle_is_rebound_with_the_same_number():
    turn = _ready(keepalive=None)
    number = turn.bind(PEER, 1.0)
    _answer_all(turn, 1.0)
    turn.wrap(b"x", PEER, 2.0)
    _run_idle(turn, 1000.0)
    assert turn.channel_of(PEER) is None  # unpinned and idle: lapsed
    turn.wrap(b"later", PEER, 1001.0)
    rebind = [m.parse(r) for r in turn.datagrams_to_send() if m.parse(r).method == m.CHANNEL_BIND]
    assert struct.unpack("!H", rebind[0].get(m.CHANNEL_NUMBER)[:2])[0] == number


async def test_relay_path_pins_the_current_peer_addresses_and_releases_the_rest():
    from overlay.traversal.relay_path import RelayPath

    sent: list[bytes] = []
    path = RelayPath(lambda data, addr: sent.append(data), lambda payload, ep: None, lambda alloc: None)
    alloc = path.new(SERVER, CREDS, "udp")
    alloc.start()
    first = sent.pop()
    alloc.received(_reply(first, m.ERROR, error=401, key=None, attrs=[(m.REALM, REALM.encode()), (m.NONCE, b"n")]))
    alloc.received(_reply(sent.pop(), m.SUCCESS, attrs=[(m.LIFETIME, struct.pack("!I", 600))],
                          xor=[(m.XOR_RELAYED_ADDRESS, ("192.0.2.1", 50000))]))
    assert alloc.ready and alloc.turn.keepalive == KEEPALIVE_INTERVAL
    other = ("198.51.100.30", 40000)
    path.permit([PEER, other, ("2001:db8::1", 5000), (SERVER[0], 1234)])
    assert sorted(alloc.turn.kept_permissions()) == sorted([PEER[0], other[0]])  # not v6, not the relay itself
    assert sorted(alloc.turn.kept_channels()) == sorted([PEER, other])
    path.permit([PEER])  # `other` left the network
    assert alloc.turn.kept_permissions() == [PEER[0]] and alloc.turn.kept_channels() == [PEER]
    path.close()
