"""The agent's TURN client against the relay's own TURN core: both sans-I/O, joined in
memory with a fake clock (lost requests, hour-long lifetimes), then one real-socket case
the relay must get right for the agent: a UDP GSO burst of ChannelData frames."""

from __future__ import annotations

import asyncio
import socket

from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials
from overlay.traversal.turn_client import TurnClient
from relay_server.turn_core import ClientTransport, TurnCore, TurnSettings

from .test_turn_core import SECRET, T0, FakePorts

SERVER = ("192.0.2.1", 3478)
CLIENT = ("198.51.100.7", 50000)
PEER = ("203.0.113.5", 7000)
UDP_SEGMENT = 103  # SOL_UDP option


class Wire:
    """Client and core joined in memory; `lose` drops the next n client->server datagrams."""

    def __init__(self, client: TurnClient, core: TurnCore) -> None:
        self.client, self.core = client, core
        self.udp = ClientTransport(SERVER, stream=False)
        self.to_peer: list[tuple[bytes, tuple]] = []
        self.lose = 0

    def send(self, data: bytes, now: float) -> list[tuple[bytes, tuple]]:
        """One datagram client -> server; returns what reached peers. Answers go back to the client."""
        delivered = []
        for via, reply, dest in self.core.handle_client(data, self.udp, CLIENT, now):
            if via is self.udp:
                self.client.unwrap(reply, now)
            else:
                delivered.append((reply, dest))
        self.to_peer += delivered
        return delivered

    def pump(self, now: float) -> None:
        for _ in range(20):
            out = self.client.datagrams_to_send()
            if not out:
                return
            for data in out:
                if self.lose:
                    self.lose -= 1
                    continue
                self.send(data, now)


def _pair(**settings) -> Wire:
    core = TurnCore(TurnSettings(realm="r", shared_secret=SECRET, **settings), FakePorts())
    creds = make_rest_credentials(SECRET, "agent", 7200, now=T0)
    return Wire(TurnClient(SERVER, creds), core)


def _advance(w: Wire, now: float) -> float:
    now = max(now, w.client.next_deadline() or now)
    w.client.handle_timers(now)
    w.pump(now)
    w.core.handle_timer(now)
    return now


def test_allocates_through_401_and_relays_both_ways():
    w = _pair()
    w.client.start(T0)
    w.pump(T0)
    assert w.client.state == "ready"
    assert w.client.relayed_address[0] == "192.0.2.1"
    assert w.client.mapped_address == CLIENT
    first = w.client.wrap(b"hello", PEER, T0)
    assert first is not None and m.parse(first).method == m.SEND  # no channel yet: Send indication
    w.pump(T0)  # the permission / ChannelBind queued by wrap goes out first
    assert w.send(first, T0) == [(b"hello", PEER)]
    framed = w.client.wrap(b"again", PEER, T0 + 1)
    assert framed[:2] == b"\x40\x00" and len(framed) == 4 + 5
    assert w.send(framed, T0 + 1) == [(b"again", PEER)]
    alloc = w.udp.allocs[CLIENT]
    back = w.core.handle_peer(alloc, b"reply", PEER, T0 + 2)[0][1]
    assert w.client.unwrap(back, T0 + 2) == (b"reply", PEER)


def test_keeps_allocation_permission_and_channel_alive_for_an_hour_of_traffic():
    w = _pair()
    w.client.start(T0)
    w.pump(T0)
    w.client.wrap(b"x", PEER, T0)
    w.pump(T0)
    now = T0
    while now < T0 + 3600:
        # Traffic every 30 s keeps the permission and channel in use.
        frame = w.client.wrap(b"data", PEER, now)
        w.pump(now)
        assert w.send(frame, now) == [(b"data", PEER)], f"relaying stopped at +{now - T0:.0f}s"
        now = _advance(w, now + 30)
        assert w.core.allocations, f"allocation lapsed at +{now - T0:.0f}s"
    alloc = w.udp.allocs[CLIENT]
    assert w.core.channel_target(alloc, 0x4000, 1, now) == PEER


def test_retransmits_and_recovers_from_lost_requests():
    w = _pair()
    w.lose = 2
    w.client.start(T0)
    w.pump(T0)
    assert w.client.state == "allocating"
    now = T0
    for _ in range(5):
        now = _advance(w, now)
    assert w.client.state == "ready"


def test_wrong_secret_fails_without_looping():
    core = TurnCore(TurnSettings(realm="r", shared_secret=SECRET), FakePorts())
    w = Wire(TurnClient(SERVER, make_rest_credentials("not-the-secret", "agent", 7200, now=T0)), core)
    w.client.start(T0)
    w.pump(T0)
    assert w.client.state == "failed" and w.client.failure.code == 401
    assert not w.client.datagrams_to_send()


def test_unanswered_server_fails_in_bounded_time():
    client = TurnClient(SERVER, make_rest_credentials(SECRET, "agent", 600, now=T0))
    client.start(T0)
    now = T0
    while client.state == "allocating":
        now = client.next_deadline()
        client.handle_timers(now)
    assert client.state == "failed" and now - T0 < 6


def _gso_roundtrip(port: int, creds) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    peer.settimeout(2)
    peer.bind(("127.0.0.1", 0))
    server = ("127.0.0.1", port)
    turn = TurnClient(server, creds)
    peer_addr = peer.getsockname()

    def exchange_until(done) -> None:
        while not done():
            for d in turn.datagrams_to_send():
                sock.sendto(d, server)
            if done():
                return
            turn.unwrap(sock.recv(4096), 0.0)

    try:
        turn.start(0.0)
        exchange_until(lambda: turn.state != "allocating")
        assert turn.state == "ready", turn.reason
        turn.bind(peer_addr, 0.0)
        exchange_until(lambda: turn.channel_of(peer_addr) is not None
                       and turn.wrap(b"", peer_addr, 0.0)[:1] == b"\x40")
        # One sendmsg with UDP_SEGMENT: nine 1000-byte frames and a shorter last one.
        payloads = [bytes([i]) * 996 for i in range(9)] + [b"tail"]
        frames = [turn.wrap(p, peer_addr, 0.0) for p in payloads]
        assert all(f[:2] == b"\x40\x00" for f in frames)
        sock.sendmsg([b"".join(frames)], [(socket.SOL_UDP, UDP_SEGMENT, (1000).to_bytes(2, "little"))], 0, server)
        got = []
        relayed = None
        for _ in payloads:
            data, relayed = peer.recvfrom(2048)
            got.append(data)
        assert got == payloads
        # The other way: the peer bursts with GSO to the relayed address; the client gets one
        # ChannelData datagram per original datagram.
        back = [bytes([100 + i]) * 1200 for i in range(6)] + [b"end"]
        peer.sendmsg([b"".join(back)], [(socket.SOL_UDP, UDP_SEGMENT, (1200).to_bytes(2, "little"))], 0, relayed)
        received = []
        while len(received) < len(back):
            item = turn.unwrap(sock.recv(4096), 0.0)
            if item is not None:
                received.append(item[0])
        assert received == back
    finally:
        sock.close()
        peer.close()


async def test_client_gso_burst_is_relayed_as_separate_datagrams(relay):
    """The agent sends bursts with UDP GSO; with GRO the relay gets them in one receive and must
    still relay each frame as its own datagram, in order, short last frame included, both ways."""
    creds = make_rest_credentials(relay.secret, "gso", 600)
    await asyncio.to_thread(_gso_roundtrip, relay.port, creds)
