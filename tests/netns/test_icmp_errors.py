"""ICMP errors move traffic off a path at once (IP_RECVERR), instead of after the
seconds it takes to notice a silent one.

Two namespaces joined by two veth links (tests/netns/topology.py); agent a knows
agent b by two endpoints, one per link. While pings flow through the tunnel, b's
host starts rejecting the tunnel's UDP on the active link with an ICMP error (an
nft `reject` rule: the port closed, or the host unreachable, as a router or a
peer's firewall would answer); a must move to the other endpoint within a
fraction of a second.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.netns.topology import (
    TUN4,
    AgentPair,
    Identity,
    agent_config,
    build_pair,
    ep,
    peer_status,
    ping,
    ping_until,
    start_agent,
    wait_tunnel_addresses,
)
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("ping", "nft"), pytest.mark.timeout(120)]

PORT_A, PORT_B = 51830, 51831
# These are static peers: nothing probes them, so without the ICMP error the agent
# would stay on the rejected endpoint until WireGuard's handshake timers give up
# (15 s and more); the error takes one round trip. The bound is generous for a
# loaded 2-core machine; the figure measured is printed.
SWITCH_WITHIN = 3.0


@pytest.fixture(scope="module")
def pair(netns_prefix):
    p = build_pair(f"{netns_prefix}ic", links=2)
    try:
        yield p
    finally:
        p.delete()


@pytest.fixture(scope="module")
def names(netns_prefix):
    return {"a": f"{netns_prefix}ica", "b": f"{netns_prefix}icb"}


def _reject(ns, table: str, addr: str, port: int, how: str) -> None:
    fam = "ip6" if ":" in addr else "ip"
    ns.nft(f"table inet {table} {{\n  chain input {{\n    type filter hook input priority -10;\n"
           f"    {fam} daddr {addr} udp dport {port} reject with {how}\n  }}\n}}\n")


@pytest.mark.parametrize("family,how", [
    (4, "icmp type port-unreachable"),
    (4, "icmp type host-unreachable"),
    (6, "icmpv6 type port-unreachable"),
])
def test_icmp_error_moves_traffic_to_the_other_endpoint(pair, names, tmp_path, family, how):
    l0, l1 = pair.links
    first = ep(l0.b4 if family == 4 else l0.b6, PORT_B)
    second = ep(l1.b4 if family == 4 else l1.b6, PORT_B)
    ia, ib = Identity(), Identity()
    table = "icmpreject"
    with AgentPair() as ap:
        ap.add(start_agent(pair.a, tmp_path, names["a"],
                           agent_config("a", ia, ib, listen_port=PORT_A, endpoints=[first, second])))
        ap.add(start_agent(pair.b, tmp_path, names["b"],
                           agent_config("b", ib, ia, listen_port=PORT_B, endpoints=[])))
        for p in ap.procs:
            p.wait_ready()
        wait_tunnel_addresses(pair.a, names["a"])
        wait_tunnel_addresses(pair.b, names["b"])
        ping_until(pair.a, TUN4["b"])
        assert peer_status(pair.a, names["a"])["active_endpoint"] == first, ap.logs()

        # Steady traffic through the tunnel, as a user's connection would send it.
        flow = pair.a.popen(["ping", "-n", "-i", "0.05", "-c", "120", "-W", "1", TUN4["b"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(1.0)
            addr = first.rsplit(":", 1)[0].strip("[]")
            _reject(pair.b, table, addr, PORT_B, how)
            rejected_at = time.monotonic()
            switched = None
            while time.monotonic() - rejected_at < 10:
                if peer_status(pair.a, names["a"])["active_endpoint"] == second:
                    switched = time.monotonic() - rejected_at
                    break
                time.sleep(0.02)
            out, _ = flow.communicate(timeout=30)
        finally:
            if flow.poll() is None:
                flow.kill()
                flow.wait()
            pair.b.run("nft", "delete", "table", "inet", table, check=False)
        logs = ap.logs()
        assert switched is not None, f"still on {first} 10 s after the reject\n{logs}"
        assert switched < SWITCH_WITHIN, f"switch took {switched:.2f} s\n{logs}"
        assert "ICMP error, leaving endpoint" in logs, logs
        # The tunnel carries on over the other link.
        r = ping(pair.a, TUN4["b"], count=3)
        assert r.returncode == 0, r.stdout + logs
        assert peer_status(pair.a, names["a"])["active_endpoint"] == second
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        lost = int(m.group(1)) - int(m.group(2)) if m else -1
        print(f"\nIPv{family} {how}: moved to {second} {switched * 1000:.0f} ms after the reject "
              f"(status polled every 20 ms); pings lost of 120 every 50 ms: {lost}")
    assert [p.proc.returncode for p in ap.procs] == [0, 0], ap.logs()



def test_a_pending_icmp_error_does_not_fail_an_innocent_send():
    """With IP_RECVERR the kernel reports a queued ICMP error on the socket's next send,
    whatever its destination, and drops that datagram: the socket layer must read the
    error queue, hand the error on, and send the innocent datagram anyway. (Loopback.)"""
    import socket

    from overlay.net.udp import UdpSockets, bind_pair

    s4, s6, port = bind_pair(None)
    udp = UdpSockets(s4, s6, port)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the kernel answers port unreachable
    try:
        failures = []
        udp.send_batch([(b"to nobody", ("127.0.0.1", closed_port))], lambda ep, err: failures.append(ep))
        time.sleep(0.05)
        udp.send_batch([(b"innocent", sink.getsockname())], lambda ep, err: failures.append(ep))
        sink.settimeout(2)
        assert sink.recv(100) == b"innocent"
        assert failures == []
        (err,) = udp.icmp_errors
        assert err.destination == ("127.0.0.1", closed_port) and err.unreachable
        assert (err.icmp_type, err.icmp_code) == (3, 3)
    finally:
        sink.close()
        udp.close()
