"""docker-compose.yml describes the lab's network, and its router command really makes a NAT.

There is no Docker engine here: compose itself validates the file, and each
router service's command is run in a lab router namespace with the same
addresses, where a host behind it must then reach the relay through it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.lab import addressing as ad
from overlay.lab.natrules import NAT_TYPES
from tests.support import needs_root, needs_tools

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

pytestmark = [needs_tools("docker-compose"), pytest.mark.timeout(60)]


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", str(COMPOSE), *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


@pytest.fixture(scope="module")
def config() -> dict:
    out = _compose("config")
    assert out.returncode == 0, out.stderr
    # docker-compose ships with PyYAML in the system Python; the project does not need it.
    proc = subprocess.run(["/usr/bin/python3", "-c", "import json,sys,yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                          input=out.stdout, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no PyYAML next to docker-compose: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def test_compose_file_is_valid():
    out = _compose("config", "-q")
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_compose_matches_the_lab_address_plan(config):
    services, networks = config["services"], config["networks"]
    assert set(services) == {"relay", "nat1", "nat2", "node1", "node2"}
    assert services["relay"]["networks"]["internet"]["ipv4_address"] == ad.RELAY_V4[0]
    for n in (1, 2):
        nat = services[f"nat{n}"]
        assert nat["networks"]["internet"]["ipv4_address"] == ad.nat_public_v4(n)
        assert "NET_ADMIN" in nat["cap_add"]
        assert nat["sysctls"]["net.netfilter.nf_conntrack_udp_timeout"] == "30" or \
            nat["sysctls"]["net.netfilter.nf_conntrack_udp_timeout"] == 30
        node = services[f"node{n}"]
        assert set(node["networks"]) == {f"lan{n}"}, "nodes sit only on their NAT's LAN"
        assert "overlay up" in " ".join(node["command"])
        assert networks[f"lan{n}"]["ipam"]["config"][0]["subnet"] == ad.lan_v4_net(n)
    assert all(net.get("internal") for net in networks.values()), "no network may reach the real internet"
    for svc in services.values():
        assert svc["build"]["context"] == str(ROOT)


def _router_args(config: dict, service: str) -> list[str]:
    command = config["services"][service]["command"]
    assert command[:3] == ["python", "-m", "overlay.lab.router"]
    args = command[3:]
    assert args[args.index("--type") + 1] in NAT_TYPES
    return [a for a in args if a != "--wait"]


@needs_root()
@pytest.mark.parametrize("service", ["nat1", "nat2"])
def test_compose_router_command_builds_a_working_nat(config, lab, service):
    relay = lab.add_relay()
    # natN is the lab's N-th NAT: same public address and LAN as the compose file's natN.
    for i in range(1, int(service[-1]) + 1):
        nat = lab.add_nat(f"nat{i}", "full-cone")
    host = lab.add_host("h1", nat)
    nat.ns.run("nft", "flush", "ruleset")
    assert host.run("ping", "-c1", "-W1", relay.ipv4, check=False).returncode != 0, "no NAT, no way back"
    proc = nat.ns.run(sys.executable, "-m", "overlay.lab.router", *_router_args(config, service), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "router ready" in proc.stdout
    rules = nat.ns.run("nft", "list", "ruleset").stdout
    assert 'oifname "wan"' in rules and f"snat to {nat.public_ipv4}" in rules
    host.run("ping", "-c1", "-W2", relay.ipv4)


@needs_root()
def test_router_command_reports_missing_interfaces(lab):
    nat = lab.add_nat("nat1", "full-cone")
    proc = nat.ns.run(sys.executable, "-m", "overlay.lab.router", "--public-ipv4", "198.51.100.7",
                      "--lan-ipv4", "10.1.0.0/24", check=False)
    assert proc.returncode == 2 and "no interface has the public address 198.51.100.7" in proc.stderr
    assert "Traceback" not in proc.stderr
