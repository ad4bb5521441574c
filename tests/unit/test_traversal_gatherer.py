"""Which relays the agent talks to (the TURN credentials' URLs plus `Relay =` lines), which one it
allocates on, how it fails over between them, and what it publishes."""

from __future__ import annotations

import asyncio

from overlay.stun.credentials import make_rest_credentials
from overlay.traversal import gatherer as gmod
from overlay.traversal.gatherer import TurnServer, parse_turn_url, resolve_servers
from overlay.traversal.turn_client import ALLOCATING, FAILED, READY, TurnFailure


def test_turn_urls_are_parsed_with_their_transport():
    assert parse_turn_url("turn:203.0.113.10:3478?transport=udp") == ("turn", "203.0.113.10", 3478, "udp")
    assert parse_turn_url("turn:[2001:db8::1]:3478?transport=tcp") == ("turn", "2001:db8::1", 3478, "tcp")
    assert parse_turn_url("turns:relay.example:5349?transport=tcp") == ("turns", "relay.example", 5349, "tls")
    assert parse_turn_url("stun:203.0.113.10") == ("stun", "203.0.113.10", 3478, "udp")
    for bad in ("http://x", "turn:", "turn:203.0.113.10:99999", "turn:h:1?transport=sctp", "garbage"):
        assert parse_turn_url(bad) is None, bad


def test_servers_in_url_order_and_the_rendezvous_host_as_fallback():
    urls = ["stun:203.0.113.10:3478", "turn:203.0.113.10:3478?transport=udp",
            "turn:203.0.113.10:3478?transport=tcp", "turns:203.0.113.10:5349?transport=tcp", "nonsense:1"]
    stun, turn = asyncio.run(resolve_servers(urls, "198.51.100.99"))
    assert stun == [("203.0.113.10", 3478)]
    assert turn == [TurnServer(("203.0.113.10", 3478), "udp"), TurnServer(("203.0.113.10", 3478), "tcp"),
                    TurnServer(("203.0.113.10", 5349), "tls")]
    # No usable URL at all: the rendezvous host on the default port, UDP then TCP.
    stun, turn = asyncio.run(resolve_servers([], "198.51.100.99"))
    assert stun == [("198.51.100.99", 3478)]
    assert [t.transport for t in turn] == ["udp", "tcp"]


# -- choosing and failing over between relays (the gatherer's state machine, fake allocations) ----------

NEAR = ("203.0.113.10", 3478)
FAR = ("198.51.100.20", 3478)


class _FakeTurn:
    def __init__(self, server, transport):
        self.server, self.family = server, 4
        self.state, self.failure, self.realm = ALLOCATING, None, ""
        self.relayed_address = (server[0], 40000 + len(server[0]))
        self.mapped_address = None
        self.refreshed = 0

    def refresh(self, now):
        self.refreshed += 1

    def _fail(self, code, reason, retryable):
        self.state, self.failure = FAILED, TurnFailure(code, reason, retryable)


class _FakeAlloc:
    def __init__(self, server, transport, on_state):
        self.turn = _FakeTurn(server, transport)
        self.transport, self.on_state = transport, on_state
        self.closed = False
        self.relay_key, self.transport_index, self.was_ready = None, 0, False
        self.started = False

    server = property(lambda self: self.turn.server)
    ready = property(lambda self: self.turn.state == READY)

    def start(self):
        self.started = True

    def kick(self):
        self.on_state(self)

    def close(self):
        self.closed = True

    def local_address(self):
        return None

    async def open_stream(self, tls):
        pass

    def become(self, state, code=0, retryable=True):
        if state == FAILED:
            self.turn._fail(code, "test", retryable)
        else:
            self.turn.state = state
        self.on_state(self)


class _FakeRelayPath:
    def __init__(self, on_state):
        self.on_state = on_state
        self.allocations: dict = {}
        self.made: list[_FakeAlloc] = []

    def new(self, server, creds, transport):
        alloc = _FakeAlloc(server, transport, self.on_state)
        self.allocations[server] = alloc
        self.made.append(alloc)
        return alloc

    def remove(self, alloc):
        alloc.close()
        if self.allocations.get(alloc.server) is alloc:
            del self.allocations[alloc.server]

    def ready(self):
        return [a for a in self.allocations.values() if a.ready]

    def close(self):
        pass


class _Agent:
    class config:
        addresses = []

    other_datagram_handler = endpoint_sender = unreachable_handler = None

    def send_datagram(self, data, addr):
        pass


def _gatherer(published: list) -> gmod.Gatherer:
    creds = make_rest_credentials("s", "n", ttl=3600, now=0)
    g = gmod.Gatherer(_Agent(), lambda c: published.append(c), lambda: creds, None)
    g.relay = _FakeRelayPath(g._allocation_state)
    servers = [(NEAR, "udp"), (NEAR, "tcp"), (FAR, "udp")]
    g.relays[4] = gmod.group_relays(servers)
    g.rankers[4].set_relays([r.key for r in g.relays[4]])
    return g


def _relay_cands(g) -> list[str]:
    return [f"{c.ip}:{c.port}" for c in g.current() if c.kind == "relay"]


def test_gatherer_allocates_on_the_closest_and_fails_over_then_comes_back():
    async def run():
        published: list = []
        g = _gatherer(published)
        g.rankers[4].record_rtt(FAR, 0.005, 0.0)
        g.rankers[4].record_rtt(NEAR, 0.050, 0.0)
        g._allocate_on_best(4)
        first = g.relay.made[-1]
        assert first.server == FAR and first.transport == "udp" and first.started
        first.become(READY)
        assert g._family[4].active is first and _relay_cands(g) == [f"{FAR[0]}:{first.turn.relayed_address[1]}"]
        # The relay goes silent (no answer to the liveness Refresh): the next one at once.
        first.become(FAILED, code=0)
        second = g.relay.made[-1]
        assert second.server == NEAR and second.transport == "udp"
        assert _relay_cands(g) == []  # the dead relayed address is no longer offered
        second.become(READY)
        assert _relay_cands(g) == [f"{NEAR[0]}:{second.turn.relayed_address[1]}"]
        # A restarted relay answers 437: a new allocation on the same relay, at once.
        second.become(FAILED, code=437)
        third = g.relay.made[-1]
        assert third.server == NEAR and third is not second
        third.become(READY)
        assert g._family[4].active is third
        g.close()
    asyncio.run(run())


def test_gatherer_tries_the_next_transport_before_the_next_relay():
    async def run():
        g = _gatherer([])
        g._allocate_on_best(4)  # nothing measured: the first relay given
        udp = g.relay.made[-1]
        assert udp.server == NEAR and udp.transport == "udp"
        udp.become(FAILED, code=0)  # no answer over UDP
        await asyncio.sleep(0)
        tcp = g.relay.made[-1]
        assert tcp.server == NEAR and tcp.transport == "tcp"
        tcp.become(FAILED, code=0)  # nor over TCP: the relay is down
        await asyncio.sleep(0)
        assert g.relay.made[-1].server == FAR
        g.close()
    asyncio.run(run())


def test_gatherer_moves_to_a_clearly_closer_relay_make_before_break(monkeypatch):
    async def run():
        published: list = []
        g = _gatherer(published)
        g._allocate_on_best(4)
        old = g.relay.made[-1]
        old.become(READY)
        assert old.server == NEAR
        ranker = g.rankers[4]
        for t in (1.0, 2.0):
            ranker.record_rtt(NEAR, 0.060, t)
            ranker.record_rtt(FAR, 0.008, t)
        monkeypatch.setattr(gmod, "RETIRE_GRACE", 0.05)
        g._consider_moving()
        new = g.relay.made[-1]
        assert new.server == FAR and not old.closed
        assert _relay_cands(g) == [f"{NEAR[0]}:{old.turn.relayed_address[1]}"]  # still the old one
        new.become(READY)
        # Published first, the old allocation still relaying ...
        assert _relay_cands(g) == [f"{FAR[0]}:{new.turn.relayed_address[1]}"] and not old.closed
        await asyncio.sleep(0.1)
        assert old.closed  # ... and released after the grace
        g._consider_moving()
        assert g.relay.made[-1] is new  # no move back
        g.close()
    asyncio.run(run())
