"""The tools that show what the tunnel does, as a user runs them, against real
`overlay-relay` and `overlay up` processes on the NAT lab:

- `overlay ping PEER`: each reply names the path that answered and its round trip;
- `overlay status`: the active path with its round trip, since when and why, and
  the alternatives;
- `overlay up --metrics`: /metrics has the peer's series;
- `overlay netcheck`: UDP works, the public address is the NAT's, the mapping
  behaviour of a real nftables NAT is recognised, hairpinning, relay latency and
  the TCP fallback.

One lab and one relay for the module; two port-restricted NATs (hairpinning on
the first) with a joined agent behind each, and a symmetric NAT for netcheck alone.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.support import needs_root, needs_tools

from .scenario import OVERLAY, PYTHON, Scenario

IFNAME_LETTER = "k"
METRICS_PORT = 9586
pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tools(module_lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    sc = Scenario(module_lab, tmp_path_factory.mktemp("tools"), ifprefix)
    try:
        sc.start_relay()
        na = module_lab.add_nat("ka", "port-restricted", hairpin=True, ipv6="nat66")
        nb = module_lab.add_nat("kb", "port-restricted", ipv6="nat66")
        ha, hb = module_lab.add_host("kha", na), module_lab.add_host("khb", nb)
        token = sc.token("tools", uses=2)
        a = sc.join(ha, token, "alice")
        b = sc.join(hb, token, "bob")
        sc.up(a, extra=["--metrics", f"127.0.0.1:{METRICS_PORT}"])
        sc.up(b)
        sc.wait_ping(a, b, timeout=60)
        sc.wait_path(a, b, "direct", timeout=60)
        sc.wait_path(b, a, "direct", timeout=60)
        yield sc, a, b, na
    finally:
        sc.close()


def run_overlay(node, *args, timeout: float = 60.0):
    return node.host.ns.run(*OVERLAY, *args, check=False, timeout=timeout)


def test_ping_names_the_path_and_round_trip(tools):
    sc, a, b, _ = tools
    out = run_overlay(a, "ping", "bob", a.ifname, "-c", "3", "-i", "0.3", "-W", "3",
                      "--socket-dir", str(sc.socket_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    entry = sc.peer_status(a, b)
    replies = re.findall(r"^reply from bob over (\w+) (.+?) \((\w+)\): seq=\d+ time=([\d.]+) ms", out.stdout, re.M)
    assert len(replies) >= 2, out.stdout  # generous: one probe may be lost on a loaded machine
    for path, endpoint, kind, rtt in replies:
        assert path == "direct" and endpoint == entry["endpoint"] and kind != "relay", out.stdout
        assert 0 < float(rtt) < 3000, out.stdout
    assert "--- bob: 3 probes sent" in out.stdout
    # by overlay address and by key too; an unknown peer is one clear line
    by_ip = run_overlay(a, "ping", b.overlay_ipv4, "-c", "1", "-W", "3", "--socket-dir", str(sc.socket_dir))
    assert by_ip.returncode == 0 and "reply from bob over direct" in by_ip.stdout, by_ip.stdout + by_ip.stderr
    unknown = run_overlay(a, "ping", "carol", "-c", "1", "--socket-dir", str(sc.socket_dir))
    assert unknown.returncode == 1 and unknown.stderr.startswith("overlay: ping: no peer 'carol'"), unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_status_shows_path_since_and_alternatives(tools):
    sc, a, b, _ = tools
    # A probe or two so that the active path has a measured round trip.
    run_overlay(a, "ping", "bob", "-c", "2", "-i", "0.2", "-W", "3", "--socket-dir", str(sc.socket_dir))
    entry = sc.status_cli(a)["peers"][0]
    assert entry["path"] == "direct" and entry["path_rtt_ms"] is not None and entry["path_rtt_ms"] > 0
    assert entry["path_loss"] is not None and entry["path_changes"] >= 1 and entry["path_reason"]
    assert abs(entry["path_since"] - time.time()) < 600, entry
    kinds = {e["kind"] for e in entry["endpoints"] if e["state"] != "active"}
    assert "relay" in kinds, entry
    text = run_overlay(a, "status", a.ifname, "--socket-dir", str(sc.socket_dir)).stdout
    assert f"path: direct {entry['endpoint']} (" in text, text
    assert re.search(r"^  since: \S+ \S+ \(.* ago\), because: .+ \(\d+ path changes?\)$", text, re.M), text
    assert "alternatives:" in text and re.search(r"^    \S+ \(relay, \w+\)", text, re.M), text


def test_metrics_have_the_peers_series(tools):
    sc, a, b, _ = tools
    fetch = ("import urllib.request,sys; "
             f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10)"
             ".read().decode())")
    out = a.host.ns.run(PYTHON, "-c", fetch, check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    series = {}
    for line in out.stdout.splitlines():
        if line.startswith("overlay_") and 'peer="bob"' in line:
            name, value = line.rsplit(" ", 1)
            series[name.split("{")[0]] = float(value)
    assert series.get("overlay_peer_path_direct") == 1.0, out.stdout
    assert series.get("overlay_peer_receive_bytes_total", 0) > 0 and series.get("overlay_peer_transmit_bytes_total", 0) > 0
    assert "overlay_peer_handshake_age_seconds" in series and "overlay_peer_path_changes_total" in series
    assert re.search(r'^overlay_relay_allocation_ready\{.*\} 1\.0$', out.stdout, re.M), out.stdout
    # loopback only: the host's own address does not serve it
    other = a.host.ns.run(PYTHON, "-c", fetch.replace("127.0.0.1", a.host.ipv4), check=False, timeout=30)
    assert other.returncode != 0


def test_netcheck_against_the_lab_relay(tools):
    sc, a, _, na = tools
    relay = sc.lab.relay
    out = run_overlay(a, "netcheck", "--relay", sc.relay.http_url, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    v4 = report["ipv4"]
    assert report["udp"] is True and v4["udp"] is True, report
    assert [s.rsplit(":", 1)[0] for s in v4["srflx"]] == [na.public_ipv4], report
    assert v4["behind_nat"] is True and v4["local_ip"] == a.host.ipv4
    assert v4["mapping"] == "endpoint-independent" and v4["mapping_varies_by_destination"] is False, report
    assert v4["hairpinning"] is True, report
    (entry,) = [r for r in report["relays"] if r["server"] == f"{relay.ipv4}:3478"]
    assert entry["udp_rtt_ms"] is not None and 0 < entry["udp_rtt_ms"] < 3000, entry
    assert entry["tcp"] is True and report["tcp_fallback"] is True, entry
    # From a running interface: the relays its agent uses, both families.
    text = run_overlay(a, "netcheck", a.ifname, "--socket-dir", str(sc.socket_dir))
    assert text.returncode == 0, text.stderr
    assert "UDP IPv4: yes" in text.stdout and "UDP IPv6: yes" in text.stdout, text.stdout
    assert f"public address: {na.public_ipv4}:" in text.stdout and "(closest)" in text.stdout, text.stdout


def test_netcheck_recognises_a_symmetric_nat(tools):
    sc, _, _, _ = tools
    nat = sc.lab.add_nat("ks", "symmetric")
    host = sc.lab.add_host("khs", nat)
    out = host.ns.run(*OVERLAY, "netcheck", "--relay", sc.relay.http_url, "--json", check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    v4 = json.loads(out.stdout)["ipv4"]
    assert v4["udp"] is True and v4["srflx"][0].startswith(f"{nat.public_ipv4}:"), v4
    assert v4["mapping"] == "address-and-port-dependent" and v4["mapping_varies_by_destination"] is True, v4
    assert v4["hairpinning"] is False, v4


def test_ping_and_status_follow_the_relay_when_the_direct_path_is_dark(tools):
    """Last in the module: it leaves the direct path between the two NATs dark."""
    sc, a, b, na = tools
    direct = sc.peer_status(a, b)["endpoint"]
    sc.lab.blackhole(na, sc.lab.nats["kb"])
    # Traffic makes the agent notice the dead path; generous bounds for a loaded machine.
    sc.wait_ping(a, b, timeout=60)
    sc.wait_path(a, b, "relay", timeout=60)
    out = run_overlay(a, "ping", "bob", "-c", "3", "-i", "0.3", "-W", "3", "--socket-dir", str(sc.socket_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^reply from bob over relay .+? \(relay\): seq=\d+ time=[\d.]+ ms", out.stdout, re.M), out.stdout
    assert "over direct" not in out.stdout, out.stdout
    text = run_overlay(a, "status", a.ifname, "--socket-dir", str(sc.socket_dir)).stdout
    assert "path: relay " in text and re.search(r"because: \S+", text), text
    assert f"    {direct} (" in text.split("alternatives:")[1], text
