"""Agent <-> wireguard-go (a stock WireGuard nobody here wrote, configured with
`wg setconf`), each side initiating, IPv4 and IPv6 inside and outside."""

from __future__ import annotations

import json
import sys
import time

import pytest

from overlay import keys

from tests.netns.topology import (
    TUN4,
    TUN6,
    AgentPair,
    Identity,
    Transfer,
    agent_config,
    build_pair,
    cut_link,
    ep,
    heal_link,
    peer_status,
    ping,
    ping_until,
    start_agent,
    start_wireguard_go,
    wait_tunnel_addresses,
)
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("wireguard-go", "wg"), pytest.mark.timeout(180)]

PORT_A, PORT_B = 51830, 51831


@pytest.fixture(scope="module")
def pair(netns_prefix):
    p = build_pair(f"{netns_prefix}wi", links=2)
    try:
        yield p
    finally:
        p.delete()


@pytest.fixture(scope="module")
def names(netns_prefix):
    return {"a": f"{netns_prefix}iova", "b": f"{netns_prefix}iwgb"}


def start(pair, names, tmp_path, a_endpoints, b_endpoint, psk=None):
    ia, ib = Identity(), Identity()
    ap = AgentPair()
    try:
        a = ap.add(start_agent(pair.a, tmp_path, names["a"],
                               agent_config("a", ia, ib, listen_port=PORT_A, endpoints=a_endpoints, psk=psk)))
        ap.add(start_wireguard_go(pair.b, tmp_path, names["b"], "b", ib, ia, listen_port=PORT_B,
                                  endpoints=[b_endpoint] if b_endpoint else []))
        if psk is not None:
            psk_file = tmp_path / "psk"
            keys.write_key_file(str(psk_file), psk)
            pair.b.run("wg", "set", names["b"], "peer", ia.public_b64, "preshared-key", str(psk_file))
        a.wait_ready()
        wait_tunnel_addresses(pair.a, names["a"])
        wait_tunnel_addresses(pair.b, names["b"])
    except BaseException:
        logs = ap.logs()
        ap.stop()
        raise AssertionError(f"start failed:\n{logs}") from None
    return ap, ia, ib


def both_ways(pair, ap):
    for src, me in ((pair.a, "b"), (pair.b, "a")):
        for addr in (TUN4[me], TUN6[me]):
            r = ping(src, addr, count=3)
            assert r.returncode == 0, r.stdout + ap.logs()
    for i, (src, dst, me) in enumerate(((pair.a, pair.b, "b"), (pair.b, pair.a, "a"))):
        for j, addr in enumerate((TUN4[me], TUN6[me])):
            t = Transfer(src, dst, addr, 5300 + 10 * i + j, 1_000_000)
            sent, received = t.wait(60)
            assert sent == received and sent.startswith("1000000 "), (sent, received)


@pytest.mark.parametrize("outer", ["v4", "v6"])
@pytest.mark.parametrize("initiator", ["agent", "wireguard-go"])
def test_agent_and_wireguard_go(pair, names, tmp_path, outer, initiator):
    link = pair.links[0]
    b_ep = ep(link.b4 if outer == "v4" else link.b6, PORT_B)
    a_ep = ep(link.a4 if outer == "v4" else link.a6, PORT_A)
    ap, ia, ib = start(pair, names, tmp_path, [b_ep], a_ep)
    with ap:
        first, other = (pair.a, "b") if initiator == "agent" else (pair.b, "a")
        ping_until(first, TUN4[other])
        both_ways(pair, ap)
        # wireguard-go's own view, read with wg: a handshake with our key, traffic both ways
        dump = pair.b.run("wg", "show", names["b"], "dump").stdout.strip().splitlines()[1].split("\t")
        assert dump[0] == ia.public_b64 and dump[2] == a_ep
        assert abs(int(dump[4]) - time.time()) < 60 and int(dump[5]) > 2_000_000 and int(dump[6]) > 2_000_000
        peer = peer_status(pair.a, names["a"])
        assert peer["active_endpoint"] == b_ep and peer["rx_bytes"] > 2_000_000
        # `overlay status` knows a stock WireGuard socket is not one of ours
        r = pair.b.run(sys.executable, "-m", "overlay.cli", "status", names["b"], check=False)
        assert r.returncode == 1 and "not an overlay agent" in r.stderr, r.stderr
        listed = json.loads(pair.b.run(sys.executable, "-m", "overlay.cli", "status", "--json").stdout)
        assert names["a"] in [d["interface"] for d in listed]
        assert names["b"] not in [d["interface"] for d in listed]


def test_preshared_key_with_wireguard_go(pair, names, tmp_path):
    psk = keys.generate_private_key()
    link = pair.links[0]
    ap, _, _ = start(pair, names, tmp_path, [ep(link.b4, PORT_B)], None, psk=psk)
    with ap:
        ping_until(pair.a, TUN4["b"])
        assert ping(pair.b, TUN6["a"]).returncode == 0


def test_multi_endpoint_agent_reaches_wireguard_go_through_the_live_one(pair, names, tmp_path):
    """wireguard-go knows one endpoint; our agent has two, the first dead."""
    l0, l1 = pair.links
    table = cut_link(pair, l0, "wgdead")
    try:
        ap, _, _ = start(pair, names, tmp_path, [ep(l0.b4, PORT_B), ep(l1.b6, PORT_B)], None)
        with ap:
            ping_until(pair.a, TUN4["b"], timeout=30)
            assert ping(pair.a, TUN6["b"]).returncode == 0
            assert peer_status(pair.a, names["a"])["active_endpoint"] == ep(l1.b6, PORT_B)
    finally:
        heal_link(pair, table)


def test_agent_fails_over_and_wireguard_go_follows(pair, names, tmp_path):
    """Mid-transfer the agent's active path dies; it moves to its other endpoint
    and the stock peer follows (WireGuard roaming), on the same TCP connection."""
    l0, l1 = pair.links
    endpoints = [ep(l0.b4, PORT_B), ep(l1.b4, PORT_B)]
    ap, ia, _ = start(pair, names, tmp_path, endpoints, None)
    table = None
    with ap:
        ping_until(pair.a, TUN4["b"])
        before = peer_status(pair.a, names["a"])["active_endpoint"]
        dead = pair.links[endpoints.index(before)]
        t = Transfer(pair.a, pair.b, TUN4["b"], 5400, 2_000_000, 400_000)
        try:
            time.sleep(2.0)
            table = cut_link(pair, dead, "wgmid")
            sent, received = t.wait(timeout=120)
        except BaseException:
            t.kill()
            raise AssertionError(ap.logs()) from None
        finally:
            if table:
                heal_link(pair, table)
        assert sent == received and sent.startswith("2000000 "), (sent, received)
        after = peer_status(pair.a, names["a"])["active_endpoint"]
        assert after != before and after in endpoints
        wg_view = pair.b.run("wg", "show", names["b"], "endpoints").stdout.split()
        assert wg_view[1].startswith(pair.links[endpoints.index(after)].a4 + ":"), wg_view
