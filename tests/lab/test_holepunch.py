"""Plain UDP hole punching across every pair of NAT types reproduces the expected table.

Each side learns its public mapping from a STUN query to coturn on the relay,
then both send to each other's mapping at once, each answering the source it
actually sees. "direct" means both sides got an answer; "relay" means they did
not while the relay stays reachable over UDP; "relay over TCP" means a side
cannot use UDP at all but reaches the relay over TCP. Two NATs of every type
are built once and all fifteen pairs punch concurrently (one port per pair).
"""

from __future__ import annotations

import itertools

import pytest

from overlay.lab.coturn import STUN_PORT, start_turnserver, stop_process
from tests.lab.udp_agent import UdpAgent
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("turnserver", "conntrack"), pytest.mark.timeout(180)]

TYPES = ["full-cone", "restricted", "port-restricted", "symmetric", "udp-blocked"]

# The table of /work/shared/notes/natlab.md (symmetric in its two arguments).
EXPECTED = {
    ("full-cone", "full-cone"): "direct",
    ("full-cone", "restricted"): "direct",
    ("full-cone", "port-restricted"): "direct",
    ("full-cone", "symmetric"): "direct",
    ("restricted", "restricted"): "direct",
    ("restricted", "port-restricted"): "direct",
    ("restricted", "symmetric"): "direct",
    ("port-restricted", "port-restricted"): "direct",
    ("port-restricted", "symmetric"): "relay",
    ("symmetric", "symmetric"): "relay",
}
for _t in TYPES:
    EXPECTED[("udp-blocked", _t)] = "relay over TCP"
PAIRS = list(itertools.combinations_with_replacement(TYPES, 2))


def _host_name(nat_type: str, side: str) -> str:
    return f"h_{nat_type.replace('-', '')[:10]}_{side}"


@pytest.fixture(scope="module")
def punch_lab(module_lab, tmp_path_factory):
    relay = module_lab.add_relay()
    hosts = {}
    for nat_type in TYPES:
        for side in ("a", "b"):
            nat = module_lab.add_nat(f"n_{nat_type.replace('-', '')[:10]}_{side}", nat_type)
            hosts[(nat_type, side)] = module_lab.add_host(_host_name(nat_type, side), nat)
    server = start_turnserver(relay, tmp_path_factory.mktemp("coturn"))
    try:
        yield module_lab, relay, hosts
    finally:
        stop_process(server)


def _outcome(maps, results, tcp) -> str:
    if maps[0] is None or maps[1] is None:
        return "relay over TCP" if all(tcp) else "unreachable"
    return "direct" if results[0] and results[1] else "relay"


def test_hole_punch_table(punch_lab):
    lab, relay, hosts = punch_lab
    stun = (relay.ipv4, STUN_PORT)
    agents: dict[tuple[str, str], tuple[UdpAgent, UdpAgent]] = {}
    try:
        for i, (t1, t2) in enumerate(PAIRS):
            port = 40000 + i
            agents[(t1, t2)] = (UdpAgent(hosts[(t1, "a")].ns, port), UdpAgent(hosts[(t2, "b")].ns, port))
        for pair in agents.values():
            for a in pair:
                a.command("stun", server=list(stun))
        maps = {k: tuple(_mapped(a) for a in pair) for k, pair in agents.items()}
        # Both sides of every pair start at the same moment.
        for k, (a, b) in agents.items():
            if None not in maps[k]:
                a.command("punch", to=list(maps[k][1]), duration=3)
                b.command("punch", to=list(maps[k][0]), duration=3)
        results = {}
        for k, (a, b) in agents.items():
            if None in maps[k]:
                results[k] = (False, False)
                continue
            ra, rb = a.wait("punch", timeout=15), b.wait("punch", timeout=15)
            results[k] = (bool(ra and ra["ok"]), bool(rb and rb["ok"]))
        tcp = {}
        for k, (a, b) in agents.items():
            if None in maps[k]:
                for agent in (a, b):
                    agent.command("tcp", to=[relay.ipv4, STUN_PORT])
                tcp[k] = tuple(bool((e := agent.wait("tcp", timeout=10)) and e["ok"]) for agent in (a, b))
        got = {k: _outcome(maps[k], results[k], tcp.get(k, (False, False))) for k in agents}
    finally:
        for pair in agents.values():
            for a in pair:
                a.close()
    want = {k: EXPECTED.get(k) or EXPECTED[(k[1], k[0])] for k in agents}
    table = "\n".join(f"{k[0]:>16} x {k[1]:<16} want {want[k]:<15} got {got[k]}" for k in agents)
    assert got == want, "\n" + table


def _mapped(agent: UdpAgent):
    e = agent.wait("mapped", timeout=10)
    return tuple(e["addr"]) if e and e["addr"] else None


def test_udp_blocked_side_really_cannot_send_udp(punch_lab):
    """The blocked NAT drops UDP even to the relay, while its host's TCP to the relay works."""
    lab, relay, hosts = punch_lab
    host = hosts[("udp-blocked", "a")]
    agent = UdpAgent(host.ns, 39000)
    try:
        assert agent.stun((relay.ipv4, STUN_PORT), timeout=4) is None
        agent.command("tcp", to=[relay.ipv4, STUN_PORT])
        assert agent.wait("tcp", timeout=10)["ok"]
    finally:
        agent.close()
