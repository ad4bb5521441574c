"""Each emulated NAT behaviour, as classified by two tools nobody here wrote.

coturn's `turnutils_natdiscovery` (RFC 5780) and the Debian `stun` client
(RFC 3489 tests) both run in a host behind each NAT against coturn's
`turnserver` on the relay (two addresses, alternate port). All NATs are
classified at once, since the tools spend most of their time waiting for
answers that a filtering NAT never lets through.
"""

from __future__ import annotations

import subprocess

import pytest

from overlay.lab.coturn import start_turnserver, stop_process
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("turnserver", "turnutils_natdiscovery", "stun", "conntrack"),
              pytest.mark.timeout(120)]

# NAT name -> (lab NAT type, hairpin), and what each tool must report.
NATS = {
    "fullcone": ("full-cone", False),
    "restricted": ("restricted", False),
    "portrestr": ("port-restricted", False),
    "symmetric": ("symmetric", False),
    "udpblocked": ("udp-blocked", False),
    "hairpin": ("port-restricted", True),
}
NATDISCOVERY = {
    "fullcone": ["NAT with Endpoint Independent Mapping!", "NAT with Endpoint Independent Filtering!"],
    "restricted": ["NAT with Endpoint Independent Mapping!", "NAT with Address Dependent Filtering!"],
    "portrestr": ["NAT with Endpoint Independent Mapping!", "NAT with Address and Port Dependent Filtering!"],
    "symmetric": ["NAT with Address and Port Dependent Mapping!", "NAT with Address and Port Dependent Filtering!"],
    "hairpin": ["NAT with Endpoint Independent Mapping!", "NAT with Address and Port Dependent Filtering!"],
}
STUN_CLIENT = {
    "fullcone": "Primary: Independent Mapping, Independent Filter, preserves ports, no hairpin",
    "restricted": "Primary: Independent Mapping, Address Dependent Filter, preserves ports, no hairpin",
    "portrestr": "Primary: Independent Mapping, Port Dependent Filter, preserves ports, no hairpin",
    "symmetric": "Primary: Dependent Mapping, random port, no hairpin",
    "udpblocked": "Primary: Blocked or could not reach STUN server",
    "hairpin": "Primary: Independent Mapping, Port Dependent Filter, preserves ports, will hairpin",
}


@pytest.fixture(scope="module")
def classified(module_lab, tmp_path_factory):
    """Run both tools behind every NAT, all at once; returns {nat: (natdiscovery out, stun out)}."""
    relay = module_lab.add_relay()
    hosts = {}
    for name, (nat_type, hairpin) in NATS.items():
        nat = module_lab.add_nat(name, nat_type, hairpin=hairpin)
        hosts[name] = module_lab.add_host(f"h_{name}", nat)
    hosts["live"] = module_lab.add_host("h_live", module_lab.add_nat("live", "full-cone"))
    server = start_turnserver(relay, tmp_path_factory.mktemp("coturn"))
    try:
        procs = {}
        for name, host in hosts.items():
            if name == "live":
                continue
            args = ["turnutils_natdiscovery", "-m", "-f", *(["-H"] if NATS[name][1] else []), relay.ipv4]
            procs[name] = (host.ns.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                           host.ns.popen(["stun", relay.ipv4], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
        results = {name: (a.communicate(timeout=60)[0], b.communicate(timeout=60)[0])
                   for name, (a, b) in procs.items()}
        yield results, hosts["live"], relay, module_lab
    finally:
        stop_process(server)


@pytest.mark.parametrize("nat", [n for n in NATS if n in NATDISCOVERY])
def test_natdiscovery_reports_configured_behaviour(classified, nat):
    out = classified[0][nat][0]
    found = [line.strip() for line in out.splitlines() if line.startswith("NAT with")]
    assert found == NATDISCOVERY[nat], out


def test_natdiscovery_sees_no_udp_through_blocked_nat(classified):
    out = classified[0]["udpblocked"][0]
    assert "NAT with" not in out and out.count("STUN receive timeout") == 2, out


def test_natdiscovery_sees_hairpinning(classified):
    assert "successful hairpinning" in classified[0]["hairpin"][0]


@pytest.mark.parametrize("nat", list(NATS))
def test_stun_client_reports_configured_behaviour(classified, nat):
    out = classified[0][nat][1]
    assert STUN_CLIENT[nat] in out.replace("\t", ""), out


def test_set_nat_changes_behaviour_live(classified):
    """One running NAT reconfigured through four behaviours; each is seen at once."""
    _, host, relay, lab = classified
    seen = []
    for nat_type, expected in [
        (None, STUN_CLIENT["fullcone"]),
        ("symmetric", STUN_CLIENT["symmetric"]),
        ("restricted", STUN_CLIENT["restricted"]),
        ("udp-blocked", STUN_CLIENT["udpblocked"]),
    ]:
        if nat_type:
            lab.set_nat(host.nat, nat_type)
        out = host.ns.run("stun", relay.ipv4, check=False, timeout=30).stdout.replace("\t", "")
        seen.append((nat_type, expected in out, out.strip().splitlines()[1:2]))
    assert all(ok for _, ok, _ in seen), seen
