"""TURN over TLS: a NAT that blocks UDP and also TCP to the relay's TURN port leaves
only the `turns:` URL; the agent falls back UDP -> TCP -> TLS and relays through it.

overlay-relay runs here with its TLS listener on (a self-signed certificate it makes
itself), which the shared scenario does not enable.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support import needs_root, needs_tools

from .scenario import HTTP_PORT, RELAY, RelayServer, Scenario, ScenarioError

IFNAME_LETTER = "s"
pytestmark = [needs_root(), needs_tools("ping", "conntrack", "nft"), pytest.mark.timeout(180)]

TURN_PORT = 3478
TLS_PORT = 5349


@pytest.fixture(scope="module")
def scenario(module_lab, tmp_path_factory, ifprefix):
    relay = module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("turntls"), ifprefix)
    try:
        data_dir, ready, log = sc.workdir / "relay-data", sc.workdir / "relay-ready.json", sc.workdir / "relay.log"
        argv = RELAY + ["serve", "--data-dir", str(data_dir), "--listen", relay.ipv4, "--listen", relay.ipv6,
                        "--port", str(TURN_PORT), "--tls-port", str(TLS_PORT),
                        "--http-listen", relay.ipv4, "--http-port", str(HTTP_PORT), "--secret", "tls-secret",
                        "--ready-file", str(ready), "--log-format", "json"]
        with open(log, "ab") as f:
            proc = relay.ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
        sc.relay = RelayServer(relay.ns, data_dir, f"http://{relay.ipv4}:{HTTP_PORT}", "tls-secret", proc, log)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ScenarioError(f"overlay-relay with TLS did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        sc.relay.addresses = json.loads(ready.read_text())
        assert sc.relay.addresses.get("tls"), sc.relay.addresses
        yield sc
    finally:
        sc.close()


def test_tls_is_the_last_resort_and_works(scenario):
    sc = scenario
    blocked = sc.lab.add_nat("tla", "udp-blocked", ipv6="nat66")
    other = sc.lab.add_nat("tlb", "port-restricted", ipv6="nat66")
    for family, table in (("ip", "lab_nat4"), ("ip6", "lab_nat6")):
        blocked.ns.run("nft", "insert", "rule", family, table, "forward_filter", "tcp", "dport", str(TURN_PORT), "drop")
    token = sc.token("tls", uses=2)
    a = sc.join(sc.lab.add_host("tha", blocked), token, "a")
    b = sc.join(sc.lab.add_host("thb", other), token, "b")
    try:
        sc.up(a)
        sc.up(b)
        sc.wait_ping(b, a, timeout=30)
        entry = sc.wait_path(a, b, "relay", timeout=15)
        assert " via " in entry["endpoint"], entry  # through a's own allocation
        relays = sc.status(a)["rendezvous"]["relays"]
        assert relays and {r["transport"] for r in relays if r["state"] == "ready"} == {"tls"}, relays
        sc.transfer(a, b, 300_000)
        flows = blocked.ns.run("conntrack", "-L", "-p", "tcp", check=False).stdout
        assert f"dport={TLS_PORT} " in flows and "ESTABLISHED" in flows, flows
    finally:
        sc.stop(a)
        sc.stop(b)
