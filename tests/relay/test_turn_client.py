"""The sans-I/O TURN client: against the sans-I/O core with a fake clock, then over real UDP
against overlay-relay and coturn (IPv4 and IPv6 relayed addresses)."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials
from overlay.stun.turn_client import Allocated, AllocationFailed, PeerData, TurnAllocation
from relay_server.turn_core import ClientTransport, TurnCore, TurnSettings
from tests.support import needs_tools

from .relayproc import free_port
from .test_turn_core import SECRET, T0, FakePorts

CLIENT = ("198.51.100.7", 50000)
PEER = ("203.0.113.5", 7000)


class Wire:
    """Client and core joined in memory; `lose` drops the next n client->server datagrams."""

    def __init__(self, client: TurnAllocation, core: TurnCore) -> None:
        self.client, self.core = client, core
        self.udp = ClientTransport(("192.0.2.1", 3478), stream=False)
        self.to_peer: list[tuple[bytes, tuple]] = []
        self.lose = 0

    def pump(self, now: float) -> list:
        events = []
        for _ in range(20):
            out = self.client.datagrams_to_send()
            if not out:
                break
            for data in out:
                if self.lose:
                    self.lose -= 1
                    continue
                for via, reply, dest in self.core.handle_client(data, self.udp, CLIENT, now):
                    if via is self.udp:
                        events += self.client.receive(reply, now)
                    else:
                        self.to_peer.append((reply, dest))
        return events


def _pair(**settings):
    core = TurnCore(TurnSettings(realm="r", shared_secret=SECRET, **settings), FakePorts())
    creds = make_rest_credentials(SECRET, "agent", 7200, now=T0)
    return Wire(TurnAllocation(creds.username, creds.password), core)


def test_allocates_through_401_and_relays_both_ways():
    w = _pair()
    w.client.start(T0)
    events = w.pump(T0)
    assert isinstance(events[0], Allocated) and events[0].relayed[0] == "192.0.2.1"
    assert events[0].mapped == CLIENT
    first = w.client.wrap(PEER, b"hello", T0)
    w.pump(T0)  # ChannelBind goes out and is answered
    assert first is not None and m.parse(first).method == m.SEND  # before the channel: Send indication
    w.core.handle_client(first, w.udp, CLIENT, T0)
    framed = w.client.wrap(PEER, b"again", T0 + 1)
    assert framed[:2] == b"\x40\x00" and len(framed) == 4 + 5
    out = w.core.handle_client(framed, w.udp, CLIENT, T0 + 1)
    assert out[0][1:] == (b"again", PEER)
    alloc = w.udp.allocs[CLIENT]
    back = w.core.handle_peer(alloc, b"reply", PEER, T0 + 2)[0][1]
    assert w.client.receive(back, T0 + 2) == [PeerData(PEER, b"reply")]


def test_keeps_allocation_permission_and_channel_alive_for_an_hour():
    w = _pair()
    w.client.start(T0)
    w.pump(T0)
    w.client.wrap(PEER, b"x", T0)
    w.pump(T0)
    now = T0
    while now < T0 + 3600:
        now = max(now + 1, w.client.next_deadline())
        w.client.handle_timer(now)
        w.pump(now)
        assert w.core.allocations, f"allocation lapsed at +{now - T0:.0f}s"
        w.core.handle_timer(now)
    alloc = w.udp.allocs[CLIENT]
    assert w.core.channel_target(alloc, 0x4000, 1, now) == PEER  # channel and permission still live


def test_retransmits_and_recovers_from_lost_requests():
    w = _pair()
    w.lose = 2
    w.client.start(T0)
    assert w.pump(T0) == []
    now = T0
    events = []
    for _ in range(5):
        now = w.client.next_deadline()
        w.client.handle_timer(now)
        events += w.pump(now)
    assert any(isinstance(e, Allocated) for e in events)


def test_wrong_password_fails_without_looping():
    w = _pair()
    w.client._password = "wrong"
    w.client.start(T0)
    events = w.pump(T0)
    assert events == [AllocationFailed(401, "Unauthorized")]
    assert w.client.state == "failed" and not w.client.datagrams_to_send()


def test_unanswered_server_fails_in_bounded_time():
    client = TurnAllocation("u", "p")
    client.start(T0)
    now, events = T0, []
    while not events:
        now = client.next_deadline()
        events = client.handle_timer(now)
    assert events[0].code == 408 and now - T0 < 40


def _udp_roundtrip(server: tuple[str, int], username: str, password: str, family: int) -> None:
    af = socket.AF_INET6 if family == m.FAMILY_IPV6 else socket.AF_INET
    host = "::1" if family == m.FAMILY_IPV6 else "127.0.0.1"
    sock = socket.socket(af, socket.SOCK_DGRAM)
    peer = socket.socket(af, socket.SOCK_DGRAM)
    sock.settimeout(2)
    peer.settimeout(2)
    sock.bind((host, 0))
    peer.bind((host, 0))
    turn = TurnAllocation(username, password, family=family)
    clock = 0.0
    try:
        turn.start(clock)
        events = []
        while not any(isinstance(e, (Allocated, AllocationFailed)) for e in events):
            for d in turn.datagrams_to_send():
                sock.sendto(d, server)
            events += turn.receive(sock.recv(4096), clock)
        assert isinstance(events[-1], Allocated), events
        relayed = events[-1].relayed
        assert m.FAMILY_IPV6 == family if ":" in relayed[0] else m.FAMILY_IPV4 == family
        peer_addr = peer.getsockname()[:2]
        for i in range(4):
            data = turn.wrap(peer_addr, b"msg%d" % i, clock)
            for d in turn.datagrams_to_send() + [data]:
                sock.sendto(d, server)
            got, src = peer.recvfrom(4096)
            assert got == b"msg%d" % i and src[:2] == tuple(relayed)
            peer.sendto(b"ack%d" % i, src)
            seen = []
            while not seen:
                seen = [e for e in turn.receive(sock.recv(4096), clock) if isinstance(e, PeerData)]
            assert seen == [PeerData(peer_addr, b"ack%d" % i)]
        turn.close(clock)
        for d in turn.datagrams_to_send():
            sock.sendto(d, server)
    finally:
        sock.close()
        peer.close()


@pytest.mark.parametrize("family", [m.FAMILY_IPV4, m.FAMILY_IPV6])
async def test_real_udp_against_overlay_relay(relay, family):
    creds = make_rest_credentials(relay.secret, "sansio", 600)
    server = ("::1", relay.port) if family == m.FAMILY_IPV6 else ("127.0.0.1", relay.port)
    await asyncio.to_thread(_udp_roundtrip, server, creds.username, creds.password, family)


@needs_tools("turnserver")
async def test_real_udp_against_coturn(tmp_path):
    port = free_port()
    coturn = subprocess.Popen(
        ["turnserver", "-n", "--no-cli", "--listening-ip=127.0.0.1", "--listening-ip=::1",
         f"--listening-port={port}", "--relay-ip=127.0.0.1", "--relay-ip=::1", "--use-auth-secret",
         "--static-auth-secret=cs", "--realm=c", "--allow-loopback-peers", "--no-tls", "--no-dtls",
         f"--pidfile={tmp_path}/p", f"--log-file={tmp_path}/log", "--min-port=51000", "--max-port=51999"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(1.0)
        creds = make_rest_credentials("cs", "sansio", 600)
        await asyncio.to_thread(_udp_roundtrip, ("127.0.0.1", port), creds.username, creds.password, m.FAMILY_IPV4)
        await asyncio.to_thread(_udp_roundtrip, ("::1", port), creds.username, creds.password, m.FAMILY_IPV6)
    finally:
        coturn.terminate()
        coturn.wait(10)


def _gso_roundtrip(port: int, creds) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    peer.settimeout(2)
    peer.bind(("127.0.0.1", 0))
    server = ("127.0.0.1", port)
    turn = TurnAllocation(creds.username, creds.password)
    try:
        turn.start(0.0)
        events = []
        while not any(isinstance(e, (Allocated, AllocationFailed)) for e in events):
            for d in turn.datagrams_to_send():
                sock.sendto(d, server)
            events += turn.receive(sock.recv(4096), 0.0)
        turn.bind_channel(peer.getsockname(), 0.0)
        for d in turn.datagrams_to_send():
            sock.sendto(d, server)
        while not turn.channel_bound(peer.getsockname()):
            turn.receive(sock.recv(4096), 0.0)
        # One sendmsg with UDP_SEGMENT: nine 1000-byte frames and a shorter last one.
        payloads = [bytes([i]) * 996 for i in range(9)] + [b"tail"]
        frames = [turn.wrap(peer.getsockname(), p, 0.0) for p in payloads]
        assert all(f[:2] == b"\x40\x00" for f in frames)
        sock.sendmsg([b"".join(frames)], [(socket.SOL_UDP, 103, (1000).to_bytes(2, "little"))], 0, server)
        got = []
        for _ in payloads:
            data, relayed = peer.recvfrom(2048)
            got.append(data)
        assert got == payloads
        # The other way: the peer bursts with GSO to the relayed address; the client gets one
        # ChannelData datagram per original datagram.
        back = [bytes([100 + i]) * 1200 for i in range(6)] + [b"end"]
        peer.sendmsg([b"".join(back)], [(socket.SOL_UDP, 103, (1200).to_bytes(2, "little"))], 0, relayed)
        received = []
        while len(received) < len(back):
            received += [e.data for e in turn.receive(sock.recv(4096), 0.0) if isinstance(e, PeerData)]
        assert received == back
    finally:
        sock.close()
        peer.close()


async def test_client_gso_burst_is_relayed_as_separate_datagrams(relay):
    """The agent sends bursts with UDP GSO; with GRO the relay gets them in one receive and must
    still relay each frame as its own datagram, in order, short last frame included, both ways."""
    creds = make_rest_credentials(relay.secret, "gso", 600)
    await asyncio.to_thread(_gso_roundtrip, relay.port, creds)
