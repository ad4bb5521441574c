"""A direct path that dies while the tunnel is idle: the next traffic must move to the relay
within a few seconds (the agent leaves an active path that stops answering while traffic
flows), not after WireGuard's own 15 s handshake timeout or never.

Real `overlay-relay serve`, `overlay join` and `overlay up` on the NAT lab; the cut is
the lab's blackhole between the two NATs (the relay stays reachable).
"""

from __future__ import annotations

import time

import pytest

from tests.support import needs_root, needs_tools

from .scenario import Scenario

IFNAME_LETTER = "f"
pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(180)]

IDLE = 35.0  # > the lab NATs' 30 s UDP timeout and > KEEPALIVE_TIMEOUT: mappings towards the relay are gone
FAILOVER_WITHIN = 10.0  # the agent needs about 1 s; generous for a busy 2-core box


@pytest.fixture(scope="module")
def scenario(module_lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("failover"), ifprefix)
    try:
        sc.start_relay()
        yield sc
    finally:
        sc.close()


def test_idle_direct_path_cut_moves_to_the_relay(scenario):
    sc = scenario
    na = sc.lab.add_nat("fa0", "restricted", ipv6="nat66")
    nb = sc.lab.add_nat("fb0", "port-restricted", ipv6="nat66")
    token = sc.token("failover0", uses=2)
    a = sc.join(sc.lab.add_host("ga0", na), token, "a0")
    b = sc.join(sc.lab.add_host("gb0", nb), token, "b0")
    try:
        sc.up(a)
        sc.up(b, wait=False)
        sc.wait_up(b)
        sc.wait_ping(b, a, timeout=30)
        sc.wait_path(a, b, "direct", timeout=15)
        sc.wait_path(b, a, "direct", timeout=15)
        assert sc.ping_once(a, b)
        time.sleep(IDLE)
        sc.lab.blackhole(na, nb)
        cut_at = time.monotonic()
        # Traffic after the cut, as a user's next connection would send it.
        sc.wait_ping(a, b, timeout=FAILOVER_WITHIN)
        recovered = time.monotonic() - cut_at
        sc.wait_path(a, b, "relay", timeout=5)
        sc.wait_path(b, a, "relay", timeout=5)
        assert sc.ping_once(b, a), "no reply b -> a over the relay"
        sc.transfer(a, b, 300_000)
        print(f"\nidle direct path cut: ping over the relay after {recovered:.2f} s")
    finally:
        sc.stop(a)
        sc.stop(b)
