"""The lab comes up in well under a few seconds, goes down cleanly, and is swept after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from overlay.lab import Lab, LabError, NatConfigError, netns
from tests.lab_fixtures import lab_processes
from tests.support import needs_root

pytestmark = [needs_root(), pytest.mark.timeout(60)]


def test_lab_up_and_down_fast_and_clean(lab_factory):
    lab = lab_factory()
    start = time.monotonic()
    relay = lab.add_relay()
    nats = [lab.add_nat(f"nat{i}", t) for i, t in enumerate(["full-cone", "symmetric", "port-restricted"], 1)]
    hosts = [lab.add_host(f"h{i}", nats[i % 3]) for i in range(6)]
    up = time.monotonic() - start
    assert up < 5, f"lab took {up:.1f}s to come up"
    for h in hosts:
        h.run("ping", "-c1", "-W2", relay.ipv4)
    lab.netem(hosts[1], delay_ms=5)  # an emulator namespace too
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    ours = {"br0", "wan", "lan", "prelay", "le0", "le1", *(f"p{i}" for i in range(1, 4)),
            *(h.lan_port for h in hosts)}
    leaked = [line.split(":")[1].strip().split("@")[0] for line in root_links.splitlines()]
    assert not ours & set(leaked), "the lab must not create links in the root namespace"
    sleeper = hosts[0].popen(["sleep", "300"])
    names = [ns.name for ns in lab.namespaces()]
    assert len(names) == 12 and all(netns.list_namespaces(n) for n in names)
    deadline = time.monotonic() + 5  # `ip netns exec` enters the namespace a moment after it starts
    while sleeper.pid not in lab_processes(lab) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sleeper.pid in lab_processes(lab)
    start = time.monotonic()
    lab.teardown()
    down = time.monotonic() - start
    assert down < 5, f"lab took {down:.1f}s to go down"
    sleeper.wait(5)  # killed by the teardown, not left running
    assert not netns.list_namespaces(lab.prefix + "-")
    print(f"\nlab with relay, 3 NATs, 6 hosts: up {up:.2f}s, down {down:.2f}s")


def test_context_manager_tears_down_on_error(netns_prefix):
    prefix = f"{netns_prefix}labcm"
    with pytest.raises(RuntimeError):
        with Lab(prefix) as lab:
            lab.add_nat("nat1", "full-cone")
            raise RuntimeError("boom")
    assert not netns.list_namespaces(prefix)


def test_sweep_after_crash_by_cli(netns_prefix, tmp_path):
    """A process that built a lab and was killed leaves namespaces; `overlay-lab down` removes them."""
    prefix = f"{netns_prefix}labcrash"
    script = textwrap.dedent(f"""
        import sys, time
        from overlay.lab import Lab
        lab = Lab({prefix!r})
        lab.add_relay(); n = lab.add_nat("nat1", "symmetric"); lab.add_host("h1", n)
        lab.hosts["h1"].popen(["sleep", "300"])
        print("built", flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "built"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = netns.list_namespaces(prefix)
        assert len(left) == 4
        out = subprocess.run([sys.executable, "-m", "overlay.lab.cli", "--prefix", prefix, "down"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "removed 4 namespace(s)" in out.stdout
        assert not netns.list_namespaces(prefix)
    finally:
        proc.kill()
        netns.sweep(prefix)


def test_bad_requests_are_clear_errors_and_change_nothing(lab):
    with pytest.raises(NatConfigError, match="NAT type 'cone' unknown"):
        lab.add_nat("nat1", "cone")
    with pytest.raises(NatConfigError, match="udp_timeout"):
        lab.add_nat("nat1", "full-cone", udp_timeout=0)
    assert not netns.list_namespaces(lab.prefix + "-nat1")
    nat = lab.add_nat("nat1", "full-cone")
    with pytest.raises(LabError, match="already exists"):
        lab.add_nat("nat1", "symmetric")
    with pytest.raises(LabError, match="no NAT named 'nat9'"):
        lab.add_host("h1", "nat9")
    with pytest.raises(LabError, match="must be lower-case"):
        lab.add_host("H 1", nat)
    with pytest.raises(NatConfigError, match="filtering 'sideways'"):
        lab.set_nat(nat, filtering="sideways")
    assert nat.behaviour.filtering == "endpoint-independent"
    rules = nat.ns.run("nft", "list", "chain", "ip", "lab_nat4", "forward_filter").stdout
    assert "ct status dnat accept" in rules, "a refused change must leave the running rules alone"
    with pytest.raises(ValueError, match="loss"):
        lab.netem(nat, loss=150)
    with pytest.raises(LabError, match="no relay"):
        lab.relay_offline()
