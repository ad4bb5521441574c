"""The README demo runs end to end: direct, the direct path cut under a TCP stream, the relay
takes over, the path comes back, direct again, the stream intact; nothing left behind.

Only what a user reads is asserted, not the timing targets: the figures belong to
bench/failover.py, and this machine is shared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from overlay.lab import netns
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("nft", "conntrack"), pytest.mark.timeout(300)]


def test_demo_survives_the_cut_and_cleans_up(netns_prefix):
    prefix = f"{netns_prefix}dm"
    r = subprocess.run([sys.executable, "-m", "overlay.lab.demo", "--prefix", prefix],
                       capture_output=True, text=True, timeout=280)
    out = r.stdout
    report = f"--- stdout:\n{out}\n--- stderr:\n{r.stderr}"
    assert r.returncode == 0, report
    assert re.search(r"connected directly, [\d.]+ s after", out), report
    assert "path: direct" in out, report  # the real `overlay status` output
    assert re.search(r"relay took over after [\d.]+ s", out), report
    assert "path: relay" in out, report
    assert re.search(r"still running over the relay: [\d.]+ MB arrived since the cut", out), report
    assert re.search(r"back to direct after [\d.]+ s", out), report
    m = re.search(r"stream: +([\d.]+) MB in ([\d.]+) s on one TCP connection .*no reset, checksum ok", out)
    assert m, report
    # 20 Mbit/s for well over 10 s: even a loaded machine moves several megabytes.
    assert float(m.group(1)) > 5, report
    assert re.search(r"longest pause: +[\d.]+ s, starting [\d.]+ s (before|after) the (cut|restore)", out), report
    assert re.search(r"target < 1 s: (met|MISSED)", out) and re.search(r"target < 5 s: (met|MISSED)", out), report
    assert "Torn down" in out, report
    assert netns.list_namespaces(prefix) == []
    assert not any(n.startswith(prefix) for n in os.listdir("/var/run/wireguard"))
