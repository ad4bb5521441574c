"""The rendezvous session's mapping from pushes to device state, on a real Device.

No network: the rendezvous client's peer map is filled the way its reader fills
it, and the session's event handler is called with the pushes. What is checked is
what the tunnel then does: peers with their overlay addresses as AllowedIPs,
candidates as endpoints with their kinds, removal, hole punching on `connect`,
and a `connect` request when traffic for a peer without a session appears.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import pytest

from overlay import uapi
from overlay.config import EndpointSpec, InterfaceConfig, PeerConfig
from overlay.rendezvous.client import Peer as RvPeer
from overlay.rendezvous.client import RendezvousClient
from overlay.traversal.candidates import Candidate
from overlay.traversal.session import (
    AUTO_KEEPALIVE,
    RendezvousSession,
    candidate_endpoints,
)
from overlay.wireguard import paths
from overlay.wireguard.endpoints import RelayEndpoint

from .wg_helpers import ip4, make_device


class FakeAgent:
    """What the session uses of the Agent, around a real sans-I/O Device."""

    def __init__(self, config: InterfaceConfig):
        self.config = config
        self.device = make_device(10)
        self.ifname = "ovtest"
        self.listen_port = 51820
        self.other_datagram_handler = None
        self.endpoint_sender = None
        self.sent: list = []
        self.changes = 0
        self.route_sources: dict = {}

    def changed(self) -> None:
        self.changes += 1

    def send_device_output(self, items) -> None:
        self.sent.extend(items)

    def send_datagram(self, data, addr) -> None:
        pass

    @staticmethod
    def monotonic_to_wall(t: float) -> float:
        return t


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


OTHER = make_device(11).public_key
STATIC = make_device(12).public_key
CANDS = [
    {"type": "relay", "ip": "203.0.113.10", "port": 50000},
    {"type": "srflx", "ip": "198.51.100.2", "port": 40002},
    {"type": "host", "ip": "10.2.0.10", "port": 40002},
]


def make_session(static: bool = False) -> tuple[RendezvousSession, FakeAgent]:
    peers = []
    if static:
        peers.append(PeerConfig(STATIC, allowed_ips=[ipaddress.ip_network("192.168.50.0/24")],
                                endpoints=[EndpointSpec("192.0.2.80", 51820)], persistent_keepalive=10))
    agent = FakeAgent(InterfaceConfig(private_key=bytes(range(32)), peers=peers))
    for pc in peers:
        agent.device.set_peer(pc.public_key, 0.0, allowed_ips=pc.allowed_ips,
                              endpoints=[("192.0.2.80", 51820)], persistent_keepalive=10)
    session = RendezvousSession(agent, "http://203.0.113.10:8080", name="me")
    agent.traversal = session  # what start() does, without starting tasks
    return session, agent


def push_peers(session: RendezvousSession, *peers: dict) -> None:
    session.client.peers["net1"] = {p["public_key"]: RvPeer.from_json(p) for p in peers}
    session._on_event({"type": "peers", "network": "net1", "peers": list(peers)})


def other(cands=CANDS, key: bytes = OTHER, name: str = "bob") -> dict:
    return {"public_key": b64(key), "name": name, "ipv4": "100.64.0.2", "ipv6": "fd00::2",
            "candidates": cands, "online": True}


def test_a_rendezvous_peer_becomes_a_device_peer_with_its_candidates():
    session, agent = make_session()
    push_peers(session, other())
    peer = agent.device.peers[OTHER]
    assert [str(n) for n in peer.allowed_ips] == ["100.64.0.2/32", "fd00::2/128"]
    assert peer.persistent_keepalive == AUTO_KEEPALIVE
    assert peer.endpoints == [("10.2.0.10", 40002), ("198.51.100.2", 40002), ("203.0.113.10", 50000)]
    assert agent.changes >= 1  # routes follow
    doc = uapi.status_dict(agent)["peers"][0]
    assert doc["name"] == "bob" and doc["overlay_ips"] == ["100.64.0.2", "fd00::2"]
    assert [(e["endpoint"], e["kind"]) for e in doc["endpoints"]] == [
        ("10.2.0.10:40002", "host"), ("198.51.100.2:40002", "srflx"), ("203.0.113.10:50000", "relay")]
    assert doc["path"] == "direct" and doc["endpoint"] == "10.2.0.10:40002"


def test_new_candidates_replace_the_old_ones_and_removal_removes_the_peer():
    session, agent = make_session()
    push_peers(session, other())
    push_peers(session, other(cands=[{"type": "srflx", "ip": "198.51.100.99", "port": 1234}]))
    assert agent.device.peers[OTHER].endpoint_set.candidates == [("198.51.100.99", 1234)]
    session._on_event({"type": "peer_removed", "network": "net1", "public_key": b64(OTHER)})
    assert OTHER not in agent.device.peers


def test_a_static_peer_keeps_its_configuration_when_the_rendezvous_drops_it():
    session, agent = make_session(static=True)
    push_peers(session, other(key=STATIC, name="static"))
    peer = agent.device.peers[STATIC]
    assert peer.persistent_keepalive == 10  # the configured keepalive wins
    assert {str(n) for n in peer.allowed_ips} == {"192.168.50.0/24", "100.64.0.2/32", "fd00::2/128"}
    assert ("192.0.2.80", 51820) in peer.endpoints and ("198.51.100.2", 40002) in peer.endpoints
    push_peers(session)  # gone from the network
    peer = agent.device.peers[STATIC]
    assert peer.endpoints == [("192.0.2.80", 51820)]


def test_malformed_pushes_change_nothing():
    session, agent = make_session()
    push_peers(session, other())
    before = list(agent.device.peers[OTHER].endpoints)
    session._on_event({"type": "peer_removed", "network": "net1", "public_key": "not base64!"})
    session._on_event({"type": "connect", "network": "net1", "peer": "junk"})
    push_peers(session, other(cands=CANDS + [{"type": "bogus", "ip": "x", "port": 0}, "junk"]),
               {"public_key": "AAAA", "name": "short key", "ipv4": "", "ipv6": ""})
    assert list(agent.device.peers) == [OTHER]
    assert agent.device.peers[OTHER].endpoints == before


def test_connect_event_punches_every_endpoint_at_once():
    session, agent = make_session()
    push_peers(session, other())
    agent.sent.clear()

    async def run():
        session._on_event({"type": "connect", "network": "net1", "peer": other(), "initiator": b64(OTHER)})
        first = list(agent.sent)
        await asyncio.sleep(0.15)  # the first repeat
        return first, list(agent.sent)

    first, after_repeat = asyncio.run(run())
    assert sorted(d for _, d in first) == sorted(agent.device.peers[OTHER].endpoints)
    assert len({m for m, _ in first}) == 1 and first[0][0][0] == 1  # one initiation, to all
    assert len(after_repeat) == 2 * len(first)  # sent again, the same bytes
    assert {m for m, _ in after_repeat} == {first[0][0]}


async def test_traffic_without_a_session_asks_the_rendezvous_to_connect(monkeypatch):
    monkeypatch.setattr(RendezvousClient, "connected", property(lambda self: True))
    requests = []

    async def fake_connect(self, network, key, request_id=None):
        requests.append((network, key))

    monkeypatch.setattr(RendezvousClient, "request_connect", fake_connect)
    session, agent = make_session()
    agent.device.on_new_handshake = session._on_new_handshake
    push_peers(session, other())
    agent.device.tun_packets([ip4("100.64.0.1", "100.64.0.2")], 100.0)
    await asyncio.sleep(0)
    assert requests == [("net1", b64(OTHER))]
    peer = agent.device.peers[OTHER]
    peer.last_initiation_sent = None  # even a new handshake right away asks no second time
    agent.device.tun_packets([ip4("100.64.0.1", "100.64.0.2")], 100.5)
    await asyncio.sleep(0)
    assert len(requests) == 1
    await session.client.close()


def test_udp_blocked_adds_endpoints_through_our_own_allocation():
    cands = [Candidate("relay", "203.0.113.10", 50000), Candidate("srflx", "198.51.100.2", 40002),
             Candidate("relay", "203.0.113.77", 50001)]
    ours = ("203.0.113.10", 3478)
    plain = candidate_endpoints(cands, [ours], udp_blocked=False)
    assert [k for _, k in plain] == ["srflx", "relay", "relay"]
    blocked = [e for e, _ in candidate_endpoints(cands, [ours], udp_blocked=True)]
    assert RelayEndpoint(ours, ("198.51.100.2", 40002)) in blocked
    assert RelayEndpoint(ours, ("203.0.113.77", 50001)) in blocked
    # A relay does not relay to itself: no path through ours to an allocation on the same server.
    assert RelayEndpoint(ours, ("203.0.113.10", 50000)) not in blocked


@pytest.mark.parametrize("active,expected", [(("198.51.100.2", 40002), "direct"),
                                              (("203.0.113.10", 50000), "relay")])
def test_path_follows_the_kind_of_the_active_endpoint(active, expected):
    session, agent = make_session()
    push_peers(session, other())
    peer = agent.device.peers[OTHER]
    peer.endpoint_set.confirm(active)
    assert paths.path_of(peer) == expected
    assert uapi.status_dict(agent)["peers"][0]["path"] == expected


def test_status_shows_the_rendezvous_side():
    session, agent = make_session()
    doc = uapi.status_dict(agent)["rendezvous"]
    assert doc["url"] == "http://203.0.113.10:8080" and doc["connected"] is False
    assert doc["candidates"] == [] and doc["relays"] == [] and doc["error"] is None
    session.gatherer.host = [Candidate("host", "10.2.0.10", 51820)]
    session.gatherer._publish = lambda: None
    session.gatherer.candidates = session.gatherer.current()
    assert uapi.status_dict(agent)["rendezvous"]["candidates"] == [{"type": "host", "ip": "10.2.0.10", "port": 51820}]


def test_human_status_names_the_path_and_endpoint_kinds():
    from overlay.cli import format_status

    session, agent = make_session()
    push_peers(session, other())
    agent.device.peers[OTHER].endpoint_set.confirm(("203.0.113.10", 50000))
    text = format_status(uapi.status_dict(agent))
    assert "name: bob (100.64.0.2, fd00::2)" in text and "path: relay" in text
    assert "203.0.113.10:50000 (relay, active)" in text and "10.2.0.10:40002 (host, trying)" in text


def test_routes_to_peers_prefer_our_overlay_address_as_source():
    from overlay.rendezvous.client import Membership

    session, agent = make_session()
    agent.config.addresses = [ipaddress.ip_interface("10.99.0.1/24"), ipaddress.ip_interface("100.64.0.1/24"),
                              ipaddress.ip_interface("fd00::1/64")]
    session.client.memberships["net1"] = Membership("net1", "me", "100.64.0.1", "fd00::1")
    push_peers(session, other())
    assert agent.route_sources == {ipaddress.ip_network("100.64.0.2/32"): "100.64.0.1",
                                   ipaddress.ip_network("fd00::2/128"): "fd00::1"}
    session._on_event({"type": "peer_removed", "network": "net1", "public_key": b64(OTHER)})
    assert agent.route_sources == {}
