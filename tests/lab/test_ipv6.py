"""IPv6 in the lab: routed global addresses behind a stateful firewall by default,
NAT66 and "IPv6 broken" as options."""

from __future__ import annotations

import itertools

import pytest

from tests.lab.udp_agent import AgentPool
from tests.lab_fixtures import build_nat_pair
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("conntrack"), pytest.mark.timeout(60)]

_ports = itertools.count(43000)


@pytest.fixture(scope="module")
def pair(module_lab):
    return build_nat_pair(module_lab, "port-restricted")


@pytest.fixture
def agents():
    # Servers on the relay pass bind= one address: it has two, and a reply from
    # the other one would rightly not count as a reply at the hosts' firewalls.
    pool = AgentPool(_ports, bind="::")
    yield pool
    pool.close()


def test_hosts_have_global_ipv6_addresses(pair):
    out = pair.h1.ns.run("ip", "-6", "addr", "show", "dev", "eth0", "scope", "global").stdout
    assert f"{pair.h1.ipv6}/64" in out and "tentative" not in out
    assert pair.h1.ipv6.startswith("2001:db8:") and pair.h1.ipv6 != pair.h2.ipv6


def test_default_firewall_passes_replies_and_blocks_unsolicited(pair, agents):
    relay = pair.relay
    server, stranger = agents(relay.ns, 7000, relay.ipv6), agents(relay.ns, 7001, relay.ipv6)
    client = agents(pair.h1.ns)
    client.send((relay.ipv6, 7000), "out")
    seen = server.received("out", timeout=5)
    assert seen and seen["from"][0] == pair.h1.ipv6, "IPv6 is routed, not translated, by default"
    server.send(tuple(seen["from"]), "reply")
    assert client.received("reply", timeout=5), "replies must come in"
    stranger.send(tuple(seen["from"]), "unsolicited")
    assert client.received("unsolicited", timeout=1.5) is None, "unsolicited inbound IPv6 must be dropped"
    # Host to host: h2's firewall drops h1's packet until h2 has sent to h1 (a punch works on IPv6 too).
    h2 = agents(pair.h2.ns)
    client.send((pair.h2.ipv6, h2.local[1]), "first")
    assert h2.received("first", timeout=1.5) is None
    h2.send((pair.h1.ipv6, client.local[1]), "opening")
    assert client.received("opening", timeout=5)
    client.send((pair.h2.ipv6, h2.local[1]), "second")
    assert h2.received("second", timeout=5)


def test_ipv6_broken_drops_ipv6_but_keeps_ipv4(pair, agents):
    lab, relay = pair.lab, pair.relay
    server6, server4 = agents(relay.ns, 7100, relay.ipv6), agents(relay.ns, 7101, relay.ipv4)
    client6, client4 = agents(pair.h1.ns), agents(pair.h1.ns, bind="0.0.0.0")
    lab.set_nat(pair.nat1, ipv6="broken")
    try:
        assert pair.h1.ipv6 in pair.h1.ns.run("ip", "-6", "addr").stdout, "the address stays"
        client6.send((relay.ipv6, 7100), "v6")
        assert server6.received("v6", timeout=1.5) is None, "IPv6 must go nowhere"
        client4.send((relay.ipv4, 7101), "v4")
        assert server4.received("v4", timeout=5), "IPv4 must still work"
    finally:
        lab.set_nat(pair.nat1, ipv6="firewall")
    client6.send((relay.ipv6, 7100), "v6-again")
    assert server6.received("v6-again", timeout=5)


def test_nat66_translates_to_the_router_address(pair, agents):
    lab, relay = pair.lab, pair.relay
    server = agents(relay.ns, 7200, relay.ipv6)
    client = agents(pair.h1.ns)
    lab.set_nat(pair.nat1, ipv6="nat66")
    try:
        client.send((relay.ipv6, 7200), "hello")
        seen = server.received("hello", timeout=5)
        assert seen and seen["from"][0] == pair.nat1.public_ipv6
        server.send(tuple(seen["from"]), "back")
        assert client.received("back", timeout=5)
    finally:
        lab.set_nat(pair.nat1, ipv6="firewall")


def test_ipv6_open_lets_unsolicited_in(pair, agents):
    lab, relay = pair.lab, pair.relay
    stranger = agents(relay.ns, 7300, relay.ipv6)
    client = agents(pair.h1.ns)
    lab.set_nat(pair.nat1, ipv6="open")
    try:
        stranger.send((pair.h1.ipv6, client.local[1]), "knock")
        assert client.received("knock", timeout=5)
    finally:
        lab.set_nat(pair.nat1, ipv6="firewall")
