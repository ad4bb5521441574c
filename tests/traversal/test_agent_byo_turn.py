"""Bring your own TURN: the rendezvous hands out coturn's URLs (same shared secret),
and the agents relay through coturn, not through overlay-relay's own TURN server.

Two symmetric NATs cannot punch, so every byte between the nodes goes through a
TURN relay; overlay-relay's TURN port is not in the URLs the agents get.
"""

from __future__ import annotations

import sys

import pytest

from tests.support import needs_root, needs_tools

from .scenario import Scenario

IFNAME_LETTER = "c"
pytestmark = [needs_root(), needs_tools("ping", "turnserver"), pytest.mark.timeout(180)]

COTURN_PORT = 3478
OWN_TURN_PORT = 3490  # overlay-relay's own STUN/TURN, kept out of the agents' way


@pytest.fixture(scope="module")
def scenario(module_lab, tmp_path_factory, ifprefix):
    relay = module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("byoturn"), ifprefix)
    try:
        urls = [f"turn:{relay.ipv4}:{COTURN_PORT}?transport=udp", f"turn:{relay.ipv4}:{COTURN_PORT}?transport=tcp",
                f"turn:[{relay.ipv6}]:{COTURN_PORT}?transport=udp"]
        sc.start_relay(port=OWN_TURN_PORT, secret="byo-secret", turn_urls=urls)
        sc.start_coturn(secret="byo-secret", port=COTURN_PORT)
        yield sc
    finally:
        sc.close()


def test_symmetric_pair_relays_through_coturn(scenario):
    sc = scenario
    na = sc.lab.add_nat("ca", "symmetric", ipv6="nat66")
    nb = sc.lab.add_nat("cb", "symmetric", ipv6="nat66")
    token = sc.token("byo", uses=2)
    a = sc.join(sc.lab.add_host("ha", na), token, "a")
    b = sc.join(sc.lab.add_host("hb", nb), token, "b")
    try:
        sc.up(a)
        sc.up(b)
        sc.wait_ping(b, a, timeout=30)
        entry = sc.wait_path(a, b, "relay", timeout=15)
        sc.wait_path(b, a, "relay", timeout=15)
        relayed = [e for e in entry["endpoints"] if e["kind"] == "relay"]
        assert relayed, entry
        sc.transfer(a, b, 300_000)
        log = (sc.workdir / "turnserver.log").read_text(errors="replace")
        assert "ALLOCATE processed, success" in log, log[-2000:]
        # While the nodes are up and relaying, overlay-relay's own TURN server holds no allocation.
        health = sc.lab.relay.ns.run(sys.executable, "-c", (
            "import json, urllib.request, sys; "
            "print(json.load(urllib.request.urlopen(sys.argv[1] + '/healthz', timeout=5))['allocations'])"),
            sc.relay.http_url).stdout.strip()
        assert health == "0", health
    finally:
        sc.stop(a)
        sc.stop(b)
