"""The README demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from overlay.lab import netns
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("iperf3"), pytest.mark.timeout(120)]


def test_demo_runs_and_cleans_up(netns_prefix):
    prefix = f"{netns_prefix}dm"
    r = subprocess.run([sys.executable, "-m", "overlay.lab.demo", "--seconds", "1", "--pings", "3",
                        "--prefix", prefix], capture_output=True, text=True, timeout=100)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"first ping answered after \d+ ms", out), out
    assert re.search(r"ping IPv4 10\.88\.0\.2: min/avg/max [\d.]+/", out), out
    assert re.search(r"ping IPv6 fd88::2: min/avg/max [\d.]+/", out), out
    assert re.search(r"iperf3 TCP through the tunnel, 1 s: [\d.]+ Gbit/s", out), out
    assert "(active)" in out and "latest handshake:" in out
    assert "PrivateKey = (hidden)" in out
    assert "Torn down" in out
    assert netns.list_namespaces(prefix) == []
    assert not any(n.startswith(prefix) for n in os.listdir("/var/run/wireguard"))
