"""The agent's traversal, end to end: real `overlay-relay serve`, real `overlay join`
and `overlay up` processes on the NAT lab, pinging over the overlay addresses.

- two port-restricted NATs: the first ping comes fast, then the path is direct;
- the direct path blackholed: the same pair works through the relay;
- symmetric <-> symmetric: relay;
- a UDP-blocked NAT: the relay over TCP.

Each case gets fresh NATs of its own behaviour (one lab, one relay for the module).
"""

from __future__ import annotations

import itertools
import subprocess
import time

import pytest

from tests.support import needs_root, needs_tools

from .scenario import OVERLAY as OVERLAY_CLI
from .scenario import Scenario

IFNAME_LETTER = "p"
pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(180)]

_n = itertools.count()


@pytest.fixture(scope="module")
def scenario(module_lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("agentpaths"), ifprefix)
    try:
        sc.start_relay()
        yield sc
    finally:
        sc.close()


def _pair(sc: Scenario, nat_a: str, nat_b: str):
    i = next(_n)
    # IPv6 behind the same NAT behaviour (NAT66): with the default routed IPv6 and a
    # stateful firewall every pair could punch over IPv6.
    na = sc.lab.add_nat(f"pa{i}", nat_a, ipv6="nat66")
    nb = sc.lab.add_nat(f"pb{i}", nat_b, ipv6="nat66")
    ha, hb = sc.lab.add_host(f"qa{i}", na), sc.lab.add_host(f"qb{i}", nb)
    token = sc.token(f"agent{i}", uses=2)
    a = sc.join(ha, token, f"a{i}")
    b = sc.join(hb, token, f"b{i}")
    return na, nb, a, b


def _bring_up(sc: Scenario, a, b) -> float:
    """Both up; seconds from b's `overlay up` to the first ping reply b -> a."""
    sc.up(a)
    sc.up(b, wait=False)
    sc.wait_up(b)
    sc.wait_ping(b, a, timeout=30)
    return time.monotonic() - b.started_at


def _check_entry(entry: dict, path: str) -> None:
    assert entry["path"] == path, entry
    kinds = {e["endpoint"]: e["kind"] for e in entry["endpoints"]}
    states = {e["endpoint"]: e["state"] for e in entry["endpoints"]}
    assert states.get(entry["endpoint"]) == "active", entry
    assert (kinds[entry["endpoint"]] == "relay") == (path == "relay"), entry
    assert entry["name"] and entry["overlay_ips"], entry


def test_port_restricted_pair_goes_direct(scenario):
    sc = scenario
    _, _, a, b = _pair(sc, "port-restricted", "port-restricted")
    try:
        first_ping = _bring_up(sc, a, b)
        sc.wait_path(a, b, "direct", timeout=10)
        sc.wait_path(b, a, "direct", timeout=10)
        direct_after = time.monotonic() - b.started_at
        _check_entry(sc.peer_status(a, b), "direct")
        _check_entry(sc.peer_status(b, a), "direct")
        assert sc.ping_once(a, b, family=6), "no reply over the overlay IPv6 address"
        launched = time.time() - (time.monotonic() - b.started_at)
        print(f"\nport-restricted pair: first ping {first_ping:.2f} s, direct on both sides {direct_after:.2f} s"
              f" (b launched at {time.strftime('%H:%M:%S', time.gmtime(launched))}.{int(launched % 1 * 1000):03d})")
    finally:
        sc.stop(a)
        sc.stop(b)


def test_blackholed_direct_path_uses_the_relay(scenario):
    sc = scenario
    na, nb, a, b = _pair(sc, "port-restricted", "port-restricted")
    sc.lab.blackhole(na, nb)
    try:
        first_ping = _bring_up(sc, a, b)
        sc.wait_path(a, b, "relay", timeout=10)
        sc.wait_path(b, a, "relay", timeout=10)
        time.sleep(3)  # probes keep failing; the path stays on the relay
        _check_entry(sc.peer_status(a, b), "relay")
        _check_entry(sc.peer_status(b, a), "relay")
        assert sc.ping_once(a, b)
        # The direct path heals: the peers move to it, without a new session.
        sc.lab.unblackhole(na, nb)
        sc.wait_path(a, b, "direct", timeout=15)
        sc.wait_path(b, a, "direct", timeout=15)
        assert sc.ping_once(a, b)
        # The direct path dies during the session: traffic moves back to the relay.
        sc.lab.blackhole(na, nb)
        lost_at = time.monotonic()
        sc.wait_ping(a, b, timeout=30)
        recovered = time.monotonic() - lost_at
        sc.wait_path(a, b, "relay", timeout=10)
        print(f"\nblackholed pair: first ping over the relay {first_ping:.2f} s; "
              f"after losing the direct path, ping again after {recovered:.2f} s")
    finally:
        sc.stop(a)
        sc.stop(b)


def test_symmetric_pair_uses_the_relay(scenario):
    sc = scenario
    _, _, a, b = _pair(sc, "symmetric", "symmetric")
    try:
        first_ping = _bring_up(sc, a, b)
        sc.wait_path(a, b, "relay", timeout=10)
        sc.wait_path(b, a, "relay", timeout=10)
        _check_entry(sc.peer_status(a, b), "relay")
        sc.transfer(a, b, 500_000)
        print(f"\nsymmetric pair: first ping {first_ping:.2f} s")
    finally:
        sc.stop(a)
        sc.stop(b)


def test_udp_blocked_side_uses_the_relay_over_tcp(scenario):
    sc = scenario
    na, _, a, b = _pair(sc, "udp-blocked", "port-restricted")
    try:
        first_ping = _bring_up(sc, a, b)
        sc.wait_path(a, b, "relay", timeout=10)
        sc.wait_path(b, a, "relay", timeout=10)
        entry = sc.peer_status(a, b)
        _check_entry(entry, "relay")
        assert " via " in entry["endpoint"], entry  # through a's own (TCP) allocation
        sc.transfer(a, b, 500_000)
        flows = na.ns.run("conntrack", "-L", "-p", "tcp", check=False).stdout
        assert "dport=3478" in flows, flows
        print(f"\nudp-blocked pair: first ping {first_ping:.2f} s")
    finally:
        sc.stop(a)
        sc.stop(b)


def test_hand_written_rendezvous_config_gets_its_addresses_from_the_relay(scenario):
    """A config with only a key and a [Rendezvous] section (URL, Token, Name): `overlay up`
    joins, puts the addresses the rendezvous assigned on its interface, and works."""
    sc = scenario
    i = next(_n)
    na = sc.lab.add_nat(f"pa{i}", "port-restricted", ipv6="nat66")
    nb = sc.lab.add_nat(f"pb{i}", "port-restricted", ipv6="nat66")
    token = sc.token(f"agent{i}", uses=2)
    a = sc.join(sc.lab.add_host(f"qa{i}", na), token, f"a{i}")
    c = sc.new_node(sc.lab.add_host(f"qc{i}", nb), f"c{i}")
    key = subprocess.run(OVERLAY_CLI + ["genkey"], capture_output=True, text=True, check=True).stdout.strip()
    c.config.write_text(f"[Interface]\nPrivateKey = {key}\n\n[Rendezvous]\nURL = {sc.relay.http_url}\n"
                        f"Token = {token}\nName = c{i}\n")
    c.config.chmod(0o600)
    c.load()
    assert not c.overlay_ipv4  # nothing in the file
    try:
        sc.up(a)
        sc.up(c)
        entry = sc.wait_peer(a, c, lambda p: bool(p.get("overlay_ips")), 15, "showed overlay addresses")
        c.overlay_ipv4 = next(ip for ip in entry["overlay_ips"] if ":" not in ip)
        c.overlay_ipv6 = next(ip for ip in entry["overlay_ips"] if ":" in ip)
        addrs = c.host.ns.run("ip", "-o", "addr", "show", "dev", c.ifname).stdout
        assert c.overlay_ipv4 in addrs and c.overlay_ipv6 in addrs, addrs
        sc.wait_ping(c, a, timeout=20)
        sc.wait_ping(a, c, timeout=20)
        assert sc.ping_once(a, c, family=6)
        sc.wait_path(c, a, "direct", timeout=10)
        # The token is spent (two uses, two nodes): a restart still logs in, by key.
        sc.stop(c)
        sc.up(c)
        sc.wait_ping(c, a, timeout=20)
        assert sc.status(c)["rendezvous"]["connected"] is True
    finally:
        sc.stop(a)
        sc.stop(c)


def test_moving_to_another_nat_regathers_and_reconnects(scenario):
    """A node's host moves to another NAT (new LAN address, new public address): the agent
    notices the address change, gathers and publishes new candidates, and the pair is
    direct again without restarting anything."""
    sc = scenario
    _, _, a, b = _pair(sc, "port-restricted", "port-restricted")
    i = next(_n)
    elsewhere = sc.lab.add_nat(f"pm{i}", "port-restricted", ipv6="nat66")
    try:
        _bring_up(sc, a, b)
        sc.wait_path(a, b, "direct", timeout=10)
        before = {e["endpoint"] for e in sc.peer_status(b, a)["endpoints"] if e["kind"] == "srflx"}
        sc.lab.move(a.host, elsewhere)
        moved_at = time.monotonic()
        sc.wait_peer(b, a, lambda p: any(e["kind"] == "srflx" and e["endpoint"] not in before
                                         for e in p["endpoints"]), 15, "learned a's new candidates")
        sc.wait_ping(a, b, timeout=30)
        sc.wait_path(a, b, "direct", timeout=15)
        sc.wait_path(b, a, "direct", timeout=15)
        print(f"\nmoved host: ping again after {time.monotonic() - moved_at:.2f} s")
    finally:
        sc.stop(a)
        sc.stop(b)
