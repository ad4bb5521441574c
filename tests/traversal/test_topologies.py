"""Topologies beyond the NAT-pair matrix, with real `overlay-relay`/`overlay` processes:
IPv6-only hosts, dual-stack hosts whose IPv6 is broken, and two nodes behind the
same NAT (hairpinning off) that must find each other on their LAN."""

from __future__ import annotations

import ipaddress
import time

import pytest

from overlay import keys
from overlay.lab import Host, Lab
from overlay.lab.addressing import lan_v4_net, lan_v6_gateway, lan_v6_net
from overlay.lab.nodes import ip_batch

from tests.support import needs_root, needs_tools

from .matrix import check_status_entry
from .pathmeter import PathMeter
from .scenario import Scenario

IFNAME_LETTER = "t"
TRANSFER_BYTES = 1_000_000
# "Without waiting for long timeouts": the agents' own figure is < 1 s; this
# bound only has to tell "tried IPv4 at once" from "waited for IPv6 to time out"
# on a machine shared with other test runs.
BROKEN_IPV6_PING_BOUND = 5.0

pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(180)]


def make_ipv6_only(host: Host) -> None:
    """Take the host's IPv4 address and route away: it only has IPv6 now."""
    ip_batch(host.ns, ["addr flush dev eth0 scope global",
                       f"addr add {host.ipv6}/64 dev eth0 nodad",
                       f"route replace ::/0 via {lan_v6_gateway(host.nat.index)}"])


def _endpoint_ip(endpoint: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return ipaddress.ip_address(host)


# -- dual stack with broken IPv6, and two nodes on one LAN: one lab, one relay ---------------------


@pytest.fixture(scope="module")
def scenario(module_lab: Lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("topologies"), ifprefix)
    try:
        sc.start_relay()
        yield sc
    finally:
        sc.close()


def test_dual_stack_with_broken_ipv6_connects_over_ipv4_at_once(scenario: Scenario) -> None:
    lab = scenario.lab
    n1 = lab.add_nat("b6a", "port-restricted", ipv6="broken")
    n2 = lab.add_nat("b6b", "port-restricted", ipv6="broken")
    h1, h2 = lab.add_host("b6h1", n1), lab.add_host("b6h2", n2)
    token = scenario.token("brokenv6")
    a, b = scenario.join(h1, token, "a"), scenario.join(h2, token, "b")
    try:
        scenario.up(a)
        scenario.up(b)
        scenario.wait_ping(b, a, timeout=20)
        since_up = time.monotonic() - b.started_at  # from the launch of b's `overlay up`
        assert since_up < BROKEN_IPV6_PING_BOUND, f"first reply only after {since_up:.1f} s"
        entry = scenario.wait_path(a, b, "direct", timeout=15)
        check_status_entry(entry, "direct")
        assert _endpoint_ip(entry["endpoint"]).version == 4, entry
        scenario.transfer(a, b, TRANSFER_BYTES)
        scenario.wait_ping(a, b, family=6, timeout=10)  # the overlay's own IPv6 works over IPv4
    finally:
        scenario.stop(a)
        scenario.stop(b)


def test_two_nodes_behind_one_nat_connect_directly_on_their_lan(scenario: Scenario) -> None:
    lab = scenario.lab
    nat = lab.add_nat("one", "port-restricted", hairpin=False, ipv6="nat66")
    h1, h2 = lab.add_host("lan1", nat), lab.add_host("lan2", nat)
    meter = PathMeter(lab, nat, nat, "lan")
    token = scenario.token("samelan")
    a, b = scenario.join(h1, token, "a"), scenario.join(h2, token, "b")
    try:
        scenario.up(a)
        scenario.up(b)
        scenario.wait_ping(a, b, timeout=20)
        for me, other in ((a, b), (b, a)):
            entry = scenario.wait_path(me, other, "direct", timeout=15)
            check_status_entry(entry, "direct")
            ip = _endpoint_ip(entry["endpoint"])
            lan = ipaddress.ip_network(lan_v4_net(nat.index) if ip.version == 4 else lan_v6_net(nat.index))
            assert ip in lan, f"{me.name} reaches {other.name} at {ip}, not on the LAN {lan}"
        before = meter.read()
        scenario.transfer(a, b, TRANSFER_BYTES)
        moved = meter.read() - before
        assert moved.via_relay < TRANSFER_BYTES // 10, f"the transfer went through the relay: {moved}"
        # What the user types shows the same: `overlay status IFNAME --json`, run in a's host.
        shown = {p["public_key"]: p for p in scenario.status_cli(a)["peers"]}
        assert shown[b.public_key]["path"] == "direct" and shown[b.public_key]["name"] == "b"
    finally:
        meter.remove()
        scenario.stop(a)
        scenario.stop(b)


def test_static_peer_keeps_working_beside_rendezvous_peers(scenario: Scenario) -> None:
    """A node joined through the rendezvous also has a hand-written [Peer]: a
    plain agent with no rendezvous at all, reachable on a routed IPv6 address."""
    lab = scenario.lab
    open_nat = lab.add_nat("stopen", "port-restricted", ipv6="open")
    nat_a, nat_b = lab.add_nat("sta", "port-restricted"), lab.add_nat("stb", "port-restricted")
    ha, hb, hc = lab.add_host("sth1", nat_a), lab.add_host("sth2", nat_b), lab.add_host("sth3", open_nat)
    a_key, c_key = keys.generate_private_key(), keys.generate_private_key()
    c = scenario.new_node(hc, "static-c")
    c.config.write_text(
        f"[Interface]\nPrivateKey = {keys.encode(c_key)}\nListenPort = 51820\nAddress = 10.99.0.2/24\n\n"
        f"[Peer]\nPublicKey = {keys.encode(keys.public_key(a_key))}\nAllowedIPs = 10.99.0.1/32\n")
    c.load()
    a = scenario.new_node(ha, "a")
    a.config.write_text(  # written by hand first; `overlay join` keeps the key, address and peer
        f"[Interface]\nPrivateKey = {keys.encode(a_key)}\nAddress = 10.99.0.1/24\n\n"
        f"[Peer]\nPublicKey = {keys.encode(keys.public_key(c_key))}\nAllowedIPs = 10.99.0.2/32\n"
        f"Endpoint = [{hc.ipv6}]:51820\nPersistentKeepalive = 25\n")
    token = scenario.token("withstatic")
    _, joined = scenario.run_join(ha, token, "a", node=a)
    assert joined.returncode == 0, joined.stderr
    a.load()
    b = scenario.join(hb, token, "b")
    try:
        for node in (c, a, b):
            scenario.up(node)
        scenario.wait_ping(a, b, timeout=20)  # learned from the rendezvous
        scenario.wait_ping(a, c, timeout=20)  # from the file
        static = scenario.peer_status(a, c)
        assert static is not None and static["endpoint"] == f"[{hc.ipv6}]:51820", static
        kinds = {e["endpoint"]: e["kind"] for e in static["endpoints"]}
        assert kinds[static["endpoint"]] == "configured", static
        learned = scenario.peer_status(a, b)
        assert learned is not None and learned["name"] == "b", learned
    finally:
        for node in (a, b, c):
            scenario.stop(node)


# -- IPv6-only hosts: the rendezvous is reached over IPv6 too ---------------------------------------


def test_ipv6_only_hosts_connect(lab: Lab, tmp_path, ifprefix) -> None:
    lab.add_relay()
    n1 = lab.add_nat("v6a", "port-restricted")  # IPv6 routed through a stateful firewall
    n2 = lab.add_nat("v6b", "port-restricted")
    h1, h2 = lab.add_host("v6h1", n1), lab.add_host("v6h2", n2)
    make_ipv6_only(h1)
    make_ipv6_only(h2)
    sc = Scenario(lab, tmp_path, ifprefix + "6")
    try:
        sc.start_relay(http_family=6)
        token = sc.token("v6only")
        a, b = sc.join(h1, token, "a"), sc.join(h2, token, "b")
        sc.up(a)
        sc.up(b)
        sc.wait_ping(b, a, family=6, timeout=20)
        sc.wait_ping(b, a, family=4, timeout=10)  # overlay IPv4 over an IPv6-only underlay
        entry = sc.wait_path(a, b, "direct", timeout=15)
        check_status_entry(entry, "direct")
        assert _endpoint_ip(entry["endpoint"]).version == 6, entry
        sc.transfer(a, b, TRANSFER_BYTES, family=6)
    finally:
        sc.close()
