"""`overlay-lab` from a shell: each command is its own process, as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overlay.lab import netns
from tests.support import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("conntrack", "ping"), pytest.mark.timeout(90)]


@pytest.fixture
def cli(netns_prefix, tmp_path):
    prefix = f"{netns_prefix}labcli"
    env_dir = tmp_path / "state"

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "overlay.lab.cli", "--prefix", prefix, *args],
                              capture_output=True, text=True, timeout=60,
                              env={**_env(), "OVERLAY_LAB_STATE_DIR": str(env_dir)})
        if ok:
            assert proc.returncode == 0, f"overlay-lab {' '.join(args)}: {proc.stderr}"
        return proc

    run.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        run("down", ok=False)
        netns.sweep(prefix)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _ping_ms(cli, host: str, target: str) -> float | None:
    out = cli("exec", host, "--", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target, ok=False).stdout
    times = sorted(float(line.split("time=")[1].split()[0]) for line in out.splitlines() if "time=" in line)
    return times[len(times) // 2] if times else None


def test_cli_session(cli):
    cli("up", "--nat", "home=port-restricted", "--nat", "office=symmetric",
        "--host", "laptop=home", "--host", "server=office")
    status = json.loads(cli("status", "--json").stdout)
    assert [n["name"] for n in status["nats"]] == ["home", "office"]
    assert status["nats"][1]["behaviour"]["mapping"] == "address-and-port-dependent"
    assert status["missing_namespaces"] == []
    assert len(netns.list_namespaces(cli.prefix)) == 6

    again = cli("up", ok=False)
    assert again.returncode == 2 and "already up" in again.stderr

    assert _ping_ms(cli, "laptop", "203.0.113.10") is not None
    cli("set-nat", "home", "full-cone", "--udp-timeout", "20", "--hairpin", "on")
    b = json.loads(cli("status", "--json").stdout)["nats"][0]["behaviour"]
    assert (b["filtering"], b["udp_timeout"], b["hairpin"]) == ("endpoint-independent", 20, True)
    rules = cli("exec", "home", "--", "nft", "list", "chain", "ip", "lab_nat4", "forward_filter").stdout
    assert "ct status dnat accept" in rules

    cli("netem", "home", "--delay", "40")
    assert _ping_ms(cli, "laptop", "203.0.113.10") >= 80
    cli("netem", "home")
    assert _ping_ms(cli, "laptop", "203.0.113.10") < 40

    cli("relay-offline")
    assert _ping_ms(cli, "laptop", "203.0.113.10") is None
    cli("relay-online")
    assert _ping_ms(cli, "laptop", "203.0.113.10") is not None

    cli("blackhole", "home", "office")
    assert _ping_ms(cli, "home", "203.0.113.102") is None
    assert _ping_ms(cli, "home", "203.0.113.10") is not None
    cli("unblackhole", "home", "office")
    assert _ping_ms(cli, "home", "203.0.113.102") is not None

    moved = cli("move", "laptop", "office").stdout
    assert "laptop is now 10.2.0.11" in moved
    addr = cli("exec", "laptop", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.2.0.11/24" in addr

    bad = cli("set-nat", "home", "--mapping", "weird", ok=False)
    assert bad.returncode == 2 and "mapping 'weird' not supported" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("exec", "nobody", "--", "true", ok=False)
    assert bad.returncode == 2 and "no node named 'nobody'" in bad.stderr

    down = cli("down").stdout
    assert "removed 6 namespace(s)" in down
    assert not netns.list_namespaces(cli.prefix)
    assert cli("status", ok=False).returncode == 2


def test_demo_gets_every_argument(monkeypatch):
    import types

    import overlay.lab
    from overlay.lab import cli as lab_cli

    seen = []
    fake = types.ModuleType("overlay.lab.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "overlay.lab.demo", fake)
    monkeypatch.setattr(overlay.lab, "demo", fake, raising=False)
    assert lab_cli.main(["demo", "--fast", "scenario"]) == 0
    assert seen == [["--fast", "scenario"]]


def test_demo_missing_is_a_clear_message(monkeypatch, capsys):
    import overlay.lab
    from overlay.lab import cli as lab_cli

    monkeypatch.delattr(overlay.lab, "demo", raising=False)
    monkeypatch.setitem(sys.modules, "overlay.lab.demo", None)
    assert lab_cli.main(["demo"]) == 2
    assert "the demo is not available" in capsys.readouterr().err
