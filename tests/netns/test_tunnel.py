"""Agent <-> agent through real TUN devices, namespaces and `overlay up` processes.

Topology: two namespaces joined by three veth links (tests/netns/topology.py);
a dead path is a silent nft blackhole on both ends of a link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

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
    status_json,
    wait_tunnel_addresses,
    wait_until,
)
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), pytest.mark.timeout(180)]

PORT_A, PORT_B = 51820, 51821


@pytest.fixture(scope="module")
def pair(netns_prefix):
    p = build_pair(f"{netns_prefix}tu", links=3)
    try:
        yield p
    finally:
        p.delete()
        shutil.rmtree(f"/etc/netns/{p.a.name}", ignore_errors=True)  # hosts file of the DNS test


@pytest.fixture(scope="module")
def names(netns_prefix):
    # Interface names are global through /var/run/wireguard: unique per run.
    return {"a": f"{netns_prefix}ova", "b": f"{netns_prefix}ovb"}


@pytest.fixture
def confdir(tmp_path):
    return tmp_path


def start_pair(pair, names, confdir, a_endpoints, b_endpoints, *, keepalive=0, extra=None):
    ia, ib = Identity(), Identity()
    ap = AgentPair()
    try:
        ap.add(start_agent(pair.a, confdir, names["a"],
                           agent_config("a", ia, ib, listen_port=PORT_A, endpoints=a_endpoints,
                                        keepalive=keepalive), extra))
        ap.add(start_agent(pair.b, confdir, names["b"],
                           agent_config("b", ib, ia, listen_port=PORT_B, endpoints=b_endpoints), extra))
        for p in ap.procs:
            p.wait_ready()
        wait_tunnel_addresses(pair.a, names["a"])
        wait_tunnel_addresses(pair.b, names["b"])
    except BaseException:
        logs = ap.logs()
        ap.stop()
        raise AssertionError(f"agents did not start:\n{logs}") from None
    return ap, ia, ib


def transfer_ok(src, dst, addr, port, size=1_000_000, rate=None, timeout=60):
    t = Transfer(src, dst, addr, port, size, rate)
    sent, received = t.wait(timeout)
    assert sent == received and sent.startswith(f"{size} "), (sent, received)


@pytest.mark.parametrize("outer", ["v4", "v6"])
@pytest.mark.parametrize("initiator", ["a", "b"])
def test_ping_and_tcp_both_directions(pair, names, confdir, outer, initiator):
    link = pair.links[0]
    b_ep = ep(link.b4 if outer == "v4" else link.b6, PORT_B)
    a_ep = ep(link.a4 if outer == "v4" else link.a6, PORT_A)
    ap, _, _ = start_pair(pair, names, confdir, [b_ep], [a_ep])
    with ap:
        first, second = (pair.a, pair.b) if initiator == "a" else (pair.b, pair.a)
        other = "b" if initiator == "a" else "a"
        ping_until(first, TUN4[other])
        for src, dst, me in ((pair.a, pair.b, "b"), (pair.b, pair.a, "a")):
            for addr in (TUN4[me], TUN6[me]):
                r = ping(src, addr, count=3)
                assert r.returncode == 0, r.stdout + ap.logs()
        for i, (src, dst, me) in enumerate(((pair.a, pair.b, "b"), (pair.b, pair.a, "a"))):
            transfer_ok(src, dst, TUN4[me], 5100 + i)
            transfer_ok(src, dst, TUN6[me], 5110 + i)
        peer = peer_status(pair.a, names["a"])
        assert peer["active_endpoint"] == b_ep, peer
        assert peer["latest_handshake"] and abs(peer["latest_handshake"] - time.time()) < 60
        assert peer["rx_bytes"] > 2_000_000 and peer["tx_bytes"] > 2_000_000
        # the responder learned the initiator's address from its packets
        assert peer_status(pair.b, names["b"])["active_endpoint"] == a_ep
    assert [p.proc.returncode for p in ap.procs] == [0, 0], ap.logs()


def _link_state(pair, link, state):
    pair.a.run("ip", "link", "set", link.a_dev, state)
    if state == "up":  # IPv6 addresses are dropped with the link; put them back
        pair.a.run("ip", "-6", "addr", "replace", f"{link.a6}/64", "dev", link.a_dev, "nodad")


@pytest.mark.parametrize("how", ["blackholed", "link-down"])
def test_three_endpoints_two_dead(pair, names, confdir, how):
    """Blackholed = packets vanish silently; link down = sends fail at once."""
    l0, l1, l2 = pair.links
    endpoints = [ep(l0.b4, PORT_B), ep(l1.b6, PORT_B), ep(l2.b4, PORT_B)]
    if how == "blackholed":
        tables = [cut_link(pair, l0, "dead0"), cut_link(pair, l1, "dead1")]
    else:
        tables = []
        for link in (l0, l1):
            _link_state(pair, link, "down")
    try:
        ap, _, _ = start_pair(pair, names, confdir, endpoints, [])
        with ap:
            start = time.monotonic()
            ping_until(pair.a, TUN4["b"], timeout=30)
            took = time.monotonic() - start
            r = ping(pair.a, TUN6["b"], count=3)
            assert r.returncode == 0, r.stdout
            peer = peer_status(pair.a, names["a"])
            assert [e["endpoint"] for e in peer["endpoints"]][:3] == endpoints
            assert peer["active_endpoint"] == ep(l2.b4, PORT_B)
            assert took < 10, f"first ping over the live endpoint took {took:.1f}s"
    finally:
        for t in tables:
            heal_link(pair, t)
        if how == "link-down":
            for link in (l0, l1):
                _link_state(pair, link, "up")


def test_active_endpoint_dies_mid_transfer(pair, names, confdir):
    l0, l1, l2 = pair.links
    endpoints = [ep(l0.b4, PORT_B), ep(l1.b6, PORT_B), ep(l2.b4, PORT_B)]
    ap, _, _ = start_pair(pair, names, confdir, endpoints, [])
    table = None
    with ap:
        ping_until(pair.a, TUN4["b"])
        before = peer_status(pair.a, names["a"])["active_endpoint"]
        assert before in endpoints
        dead = pair.links[endpoints.index(before)]
        size, rate = 3_000_000, 400_000  # ~7.5 s of traffic on one TCP connection
        t = Transfer(pair.a, pair.b, TUN4["b"], 5200, size, rate)
        try:
            time.sleep(2.0)
            table = cut_link(pair, dead, "middead")
            cut_at = time.monotonic()
            sent, received = t.wait(timeout=120)
        except BaseException:
            t.kill()
            raise AssertionError(ap.logs()) from None
        finally:
            if table:
                heal_link(pair, table)
        assert sent == received and sent.startswith(f"{size} "), (sent, received)
        after = peer_status(pair.a, names["a"])
        assert after["active_endpoint"] in endpoints and after["active_endpoint"] != before, after
        print(f"transfer done {time.monotonic() - cut_at:.1f}s after the cut; {before} -> {after['active_endpoint']}")


@needs_tools("wg")
def test_wg_tool_and_status_against_running_agent(pair, names, confdir):
    l0 = pair.links[0]
    ap, ia, ib = start_pair(pair, names, confdir, [ep(l0.b4, PORT_B), ep(l0.b6, PORT_B)], [])
    with ap:
        ping_until(pair.a, TUN4["b"])
        assert ping(pair.a, TUN6["b"]).returncode == 0
        # wg show: the peer, its handshake and counters, read over our UAPI socket
        r = pair.a.run("wg", "show", names["a"], "dump")
        iface, peer_line = r.stdout.strip().splitlines()
        assert iface.split("\t")[1] == ia.public_b64 and iface.split("\t")[2] == str(PORT_A)
        f = peer_line.split("\t")
        assert f[0] == ib.public_b64 and f[2] == ep(l0.b4, PORT_B)
        assert abs(int(f[4]) - time.time()) < 60 and int(f[5]) > 0 and int(f[6]) > 0
        assert "latest handshake" in pair.a.run("wg", "show", names["a"]).stdout
        assert f"PublicKey = {ib.public_b64}" in pair.a.run("wg", "showconf", names["a"]).stdout

        # wg set: keepalive shows in both tools
        pair.a.run("wg", "set", names["a"], "peer", ib.public_b64, "persistent-keepalive", "7")
        assert peer_status(pair.a, names["a"])["persistent_keepalive"] == 7
        assert "every 7 seconds" in pair.a.run("wg", "show", names["a"]).stdout

        # wg set allowed-ips: dropping the IPv6 route stops IPv6, putting it back restores it
        pair.a.run("wg", "set", names["a"], "peer", ib.public_b64, "allowed-ips", f"{TUN4['b']}/32")
        assert ping(pair.a, TUN6["b"], count=2).returncode != 0
        assert ping(pair.a, TUN4["b"], count=2).returncode == 0
        pair.a.run("wg", "set", names["a"], "peer", ib.public_b64, "allowed-ips",
                   f"{TUN4['b']}/32,{TUN6['b']}/128")
        assert ping(pair.a, TUN6["b"], count=2).returncode == 0

        # wg set listen-port: the agent moves, and b learns the new port from its packets
        pair.a.run("wg", "set", names["a"], "listen-port", "52999")
        assert status_json(pair.a, names["a"])["listen_port"] == 52999
        assert ping(pair.a, TUN4["b"], count=3).returncode == 0
        assert peer_status(pair.b, names["b"])["active_endpoint"].endswith(":52999")

        # a bad request is refused by wg and changes nothing
        r = pair.a.run("wg", "set", names["a"], "peer", ib.public_b64, "endpoint", "[::1", check=False)
        assert r.returncode != 0
        assert peer_status(pair.a, names["a"])["persistent_keepalive"] == 7

        # overlay status (human): all endpoints, the active one marked
        out = pair.a.run(sys.executable, "-m", "overlay.cli", "status", names["a"]).stdout
        assert f"{ep(l0.b4, PORT_B)} (active)" in out and ep(l0.b6, PORT_B) in out
        assert "latest handshake:" in out and "received" in out
        # without a name, every running overlay interface is listed
        listed = pair.a.run(sys.executable, "-m", "overlay.cli", "status", "--json").stdout
        assert names["a"] in listed and names["b"] in listed

        # wg set peer ... remove
        pair.a.run("wg", "set", names["a"], "peer", ib.public_b64, "remove")
        assert status_json(pair.a, names["a"])["peers"] == []
        assert ping(pair.a, TUN4["b"], count=1).returncode != 0


def test_sigterm_tears_everything_down(pair, names, confdir):
    ap, _, _ = start_pair(pair, names, confdir, [ep(pair.links[0].b4, PORT_B)], [])
    codes = ap.stop()
    assert codes == [0, 0], ap.logs()
    for ns, name in ((pair.a, names["a"]), (pair.b, names["b"])):
        assert name not in ns.run("ip", "-o", "link").stdout
        assert not os.path.exists(f"/var/run/wireguard/{name}.sock")


def _run_up(ns, path, timeout=30):
    return ns.run(sys.executable, "-m", "overlay.cli", "up", str(path), check=False, timeout=timeout)


def _links(ns):
    return ns.run("ip", "-o", "link").stdout


def test_bad_config_refused_with_file_line_and_nothing_left(pair, names, confdir):
    ia, ib = Identity(), Identity()
    good = agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[])
    before = _links(pair.a)
    bad = good.replace("[Peer]\n", "[Peer]\nEndpoint = 203.0.113.2:99999\n")
    path = confdir / f"{names['a']}.conf"
    path.write_text(bad)
    line = bad.splitlines().index("Endpoint = 203.0.113.2:99999") + 1
    r = _run_up(pair.a, path)
    assert r.returncode != 0
    assert f"{path}:{line}: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _links(pair.a) == before
    assert not os.path.exists(f"/var/run/wireguard/{names['a']}.sock")


def test_startup_failures_are_one_line_and_leave_nothing(pair, names, confdir):
    ia, ib = Identity(), Identity()
    before = _links(pair.a)
    # a busy listen port
    blocker = pair.a.popen([sys.executable, "-c",
                            "import socket,time; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
                            f"s.bind(('::', {PORT_A})); print('bound', flush=True); time.sleep(60)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "bound"
        path = confdir / f"{names['a']}.conf"
        path.write_text(agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[]))
        r = _run_up(pair.a, path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("overlay: ") and "in use" in last, r.stderr
    finally:
        blocker.kill()
        blocker.wait()
    assert _links(pair.a) == before
    assert not os.path.exists(f"/var/run/wireguard/{names['a']}.sock")
    # a file whose stem is not a valid interface name
    long_path = confdir / "a-name-far-too-long-for-linux.conf"
    long_path.write_text(agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[]))
    r = _run_up(pair.a, long_path)
    assert r.returncode != 0 and "not a valid interface name" in r.stderr
    assert _links(pair.a) == before
    # the same interface name twice: the second is refused, the first keeps running
    path = confdir / f"{names['a']}.conf"
    first = start_agent(pair.a, confdir, names["a"], agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[]))
    try:
        first.wait_ready()
        r = _run_up(pair.b, path)
        assert r.returncode != 0 and "already up" in r.stderr, r.stderr
        assert first.proc.poll() is None
        assert os.path.exists(first.socket_path)
    finally:
        first.stop()


@needs_tools("unshare")
def test_missing_dev_net_tun_is_one_line_error(pair, names, confdir):
    """A private mount namespace hides /dev/net/tun from this one `overlay up`."""
    ia, ib = Identity(), Identity()
    path = confdir / f"{names['a']}.conf"
    path.write_text(agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[]))
    before = _links(pair.a)
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /dev/net && exec "$@"', "sh",
         *pair.a.argv([sys.executable, "-m", "overlay.cli", "up", str(path)])],
        capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("overlay: ") and "/dev/net/tun" in r.stderr, r.stderr
    assert _links(pair.a) == before
    assert not os.path.exists(f"/var/run/wireguard/{names['a']}.sock")


def test_hostname_endpoint_all_records_and_reresolution(pair, names, confdir):
    """`Endpoint = name:port` stands for all of the name's A and AAAA records,
    and a changed record is picked up while the agent runs. The name lives in a
    per-namespace hosts file (`ip netns exec` bind-mounts /etc/netns/NS/hosts)."""
    l0, l1, l2 = pair.links
    etc = f"/etc/netns/{pair.a.name}"
    os.makedirs(etc, exist_ok=True)
    hosts = f"{etc}/hosts"
    try:
        with open(hosts, "w") as f:
            f.write(f"{l0.b4} peer-b.test\n{l1.b6} peer-b.test\n")
        ap, _, _ = start_pair(pair, names, confdir, [f"peer-b.test:{PORT_B}"], [],
                              extra=["--resolve-interval", "1"])
        with ap:
            ping_until(pair.a, TUN4["b"])
            peer = peer_status(pair.a, names["a"])
            assert set(peer["configured_endpoints"]) == {ep(l0.b4, PORT_B), ep(l1.b6, PORT_B)}
            with open(hosts, "w") as f:  # in place: the bind mount keeps the inode
                f.write(f"{l2.b4} peer-b.test\n")
            wait_until(lambda: peer_status(pair.a, names["a"])["configured_endpoints"] == [ep(l2.b4, PORT_B)],
                       15, "re-resolved endpoint")
            # the old paths are gone for good: traffic must now use the new address
            t0 = cut_link(pair, l0, "oldaddr0")
            t1 = cut_link(pair, l1, "oldaddr1")
            try:
                ping_until(pair.a, TUN4["b"], timeout=60)
                assert peer_status(pair.a, names["a"])["active_endpoint"] == ep(l2.b4, PORT_B)
            finally:
                heal_link(pair, t0)
                heal_link(pair, t1)
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def test_restart_after_sigkill_replaces_stale_socket(pair, names, confdir):
    """A crashed agent leaves its socket file; the next `overlay up` takes it over."""
    ia, ib = Identity(), Identity()
    text = agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[])
    first = start_agent(pair.a, confdir, names["a"], text)
    try:
        first.wait_ready()
        first.proc.kill()
        first.proc.wait(10)
        assert os.path.exists(first.socket_path)  # stale: nobody listens any more
        second = start_agent(pair.a, confdir, names["a"], text)
        try:
            second.wait_ready()
            assert status_json(pair.a, names["a"])["pid"] != first.proc.pid
        finally:
            assert second.stop() == 0, second.log()
    finally:
        first.stop()
    assert not os.path.exists(first.socket_path)
