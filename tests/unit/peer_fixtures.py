"""A rendezvous-style peer on a real Device with probe results on its endpoints, and
the little of the Agent that the status document, the metrics and the control
socket read. Shared by the status, metrics and ping unit tests."""

from __future__ import annotations

from overlay.wireguard import paths
from overlay.wireguard.pathstats import PathStats

from .wg_helpers import WALL, handshake, pair

DIRECT = ("198.51.100.2", 40002)
HOST = ("10.2.0.10", 40002)
RELAYED = ("203.0.113.10", 50000)


class FakeTraversal:
    def __init__(self, names: dict[bytes, str]):
        self.names = names
        self.connected = True
        self.relays = [{"server": "203.0.113.10:3478", "transport": "udp", "state": "ready", "active": True,
                        "relayed": None},
                       {"server": "[2001:db8::10]:3478", "transport": "udp", "state": "failed", "active": False,
                        "relayed": None}]

    def peer_info(self, key: bytes):
        name = self.names.get(key)
        return (name, ["100.64.0.2", "fd00::2"]) if name else None

    def summary(self) -> dict:
        return {"url": "http://203.0.113.10:8080", "connected": self.connected, "relays": self.relays}


class FakeAgent:
    def __init__(self, device, traversal=None, now: float = 0.0):
        self.device = device
        self.traversal = traversal
        self.ifname = "ovtest"
        self.listen_port = 51820
        self.clock = now
        self.sent: list = []

    def now(self) -> float:
        return self.clock

    @staticmethod
    def monotonic_to_wall(t: float) -> float:
        return WALL + t

    def send_device_output(self, items) -> None:
        self.sent.extend(items)


def stats(rtts: list[float], lost: int = 0) -> PathStats:
    st = PathStats()
    for rtt in rtts:
        st.answered(rtt)
    for _ in range(lost):
        st.lost()
    return st


def candidate_peer(name: str = "bob"):
    """Device `a` with peer `b` known by its candidates, a session, the direct
    (srflx) endpoint active since t=2 s for `direct path answered`; the agent's
    clock at 60 s. `b` also answers at the direct endpoint of the in-memory net."""
    a, b, net = pair()
    handshake(a, b, net)
    peer = a.peers[b.public_key]
    peer.endpoint_set.set_candidates([(HOST, "host"), (DIRECT, "srflx"), (RELAYED, "relay")])
    paths.switch(peer, DIRECT, 2.0, paths.REASON_DIRECT)
    peer.path_stats[DIRECT] = stats([0.010, 0.012, 0.011], lost=1)
    peer.path_stats[RELAYED] = stats([0.030, 0.031])
    peer.rx_bytes, peer.tx_bytes = 4096, 2048
    agent = FakeAgent(a, FakeTraversal({b.public_key: name}), now=60.0)
    net.add(b, DIRECT)
    return agent, peer, (a, b, net)
