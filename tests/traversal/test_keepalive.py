"""Automatic NAT keepalives: behind NATs that forget an idle UDP mapping after 10 s, a
direct tunnel left idle for two minutes still carries the next packet at once, from
either side, on the direct path (not after a fall back to the relay).

Each agent measures its NAT's mapping lifetime against the relay's STUN server
(RFC 5780 RESPONSE-PORT, traversal/nat_lifetime.py) and keeps the direct path
warm a little more often than that. WireGuard's usual 25 s keepalive would let
both mappings lapse here, and the port-restricted NATs would then drop the next
packet from either side.

Real `overlay-relay serve`, `overlay join`, `overlay up` and nftables NATs of the lab.
"""

from __future__ import annotations

import time

import pytest

from tests.support import needs_root, needs_tools

from .scenario import Scenario

IFNAME_LETTER = "k"
pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(420)]

NAT_TIMEOUT = 10  # seconds a UDP mapping outlives its last packet in the lab NATs
IDLE = 120.0
MEASURED_WITHIN = 90.0  # the first dead rung (10 s) plus its answer wait, on a loaded machine
FIRST_REPLY_WITHIN = 2.0


@pytest.fixture(scope="module")
def scenario(module_lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("keepalive"), ifprefix)
    try:
        sc.start_relay()
        yield sc
    finally:
        sc.close()


def _nat_keepalive(sc: Scenario, node) -> dict:
    return (sc.status(node).get("rendezvous") or {}).get("nat_keepalive") or {}


def _wait_measured(sc: Scenario, node, timeout: float) -> dict:
    """Until IPv4 is measured and no family is still being measured."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        last = _nat_keepalive(sc, node)
        fams = [last.get(k) or {} for k in ("ipv4", "ipv6")]
        if fams[0].get("measurement") is not None and not any(f.get("measuring") for f in fams):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{node.name}: NAT mapping lifetime not measured within {timeout} s: {last}\n"
                         f"{sc.log_tail(node)}")


def test_idle_direct_tunnel_behind_short_lived_nats_answers_at_once(scenario):
    sc = scenario
    na = sc.lab.add_nat("ka0", "port-restricted", udp_timeout=NAT_TIMEOUT)
    nb = sc.lab.add_nat("kb0", "port-restricted", udp_timeout=NAT_TIMEOUT)
    token = sc.token("keepalive0", uses=2)
    a = sc.join(sc.lab.add_host("ha0", na), token, "a0")
    b = sc.join(sc.lab.add_host("hb0", nb), token, "b0")
    try:
        sc.up(a)
        sc.up(b)
        sc.wait_ping(a, b, timeout=30)
        sc.wait_path(a, b, "direct", timeout=20)
        sc.wait_path(b, a, "direct", timeout=20)

        for node in (a, b):
            ka = _wait_measured(sc, node, MEASURED_WITHIN)
            v4 = ka["ipv4"]
            assert v4["measurement"] == "measured" and v4["behind_nat"] is True, ka
            assert v4["lifetime"] < NAT_TIMEOUT <= (v4["dead_at"] or 1e9), ka
            assert v4["interval"] < NAT_TIMEOUT, ka
            # the tunnel's path gets keepalives at that pace (IPv4, or IPv6 behind the
            # lab's stateful firewall with the same timeout)
            assert ka["peers_kept_alive"] == 1 and ka["interval"] < NAT_TIMEOUT, ka
            for fam in ("ipv4", "ipv6"):
                f = ka[fam]
                if f["measurement"] == "measured":
                    print(f"\n{node.name} {fam}: mapping alive after {f['lifetime']} s, dead after "
                          f"{f['dead_at']} s -> keepalive every {f['interval']:.1f} s ({f['reason']})")

        # Nothing from the test for two minutes; whatever the agents send is theirs.
        before = {n.name: (sc.peer_status(n, o)) for n, o in ((a, b), (b, a))}
        time.sleep(IDLE)
        after_idle = {n.name: (sc.peer_status(n, o)) for n, o in ((a, b), (b, a))}

        for src, dst in ((a, b), (b, a)):
            start = time.monotonic()
            answered = sc.ping_once(src, dst, wait=FIRST_REPLY_WITHIN)
            took = time.monotonic() - start
            assert answered, (f"first ping {src.name} -> {dst.name} after {IDLE:g} s idle got no reply "
                              f"within {FIRST_REPLY_WITHIN} s\n{sc.log_tail(src)}\n{sc.log_tail(dst)}")
            peer = sc.peer_status(src, dst)
            assert peer["path"] == "direct", peer
            print(f"{src.name} -> {dst.name}: first ping after {IDLE:g} s idle answered in {took:.2f} s, "
                  f"path {peer['path']} {peer['endpoint']}")

        for node, other in ((a, b), (b, a)):
            was, idle = before[node.name], after_idle[node.name]
            # Never left the direct path while idle (no relay fallback and back).
            assert idle["path"] == "direct" and idle["path_changes"] == was["path_changes"], (was, idle)
            sent = idle["tx_bytes"] - was["tx_bytes"]
            print(f"{node.name}: {sent * 60 / IDLE:.0f} bytes/min sent to {other.name} while idle "
                  f"(keepalives and probes)")
    finally:
        sc.stop(a)
        sc.stop(b)
