"""The agent's /metrics: series per peer (bytes, path, round trip, loss, path
changes, handshake age) and the relay allocation state, in Prometheus text
format, read from a real Device; and the HTTP server on loopback."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlay import keys
from overlay.metrics import MetricsServer, make_registry, parse_listen, render
from overlay.wireguard import paths

from .peer_fixtures import RELAYED, candidate_peer


def samples(agent, clock=lambda: 60.0) -> dict[tuple[str, tuple], float]:
    registry = make_registry(agent, clock)
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_peer_series():
    agent, peer, _ = candidate_peer("bob")
    key = keys.encode(peer.public_key)
    labels = (("peer", "bob"), ("public_key", key))
    got = samples(agent, clock=lambda: peer.last_handshake + 42.0)
    assert got[("overlay_peer_receive_bytes_total", labels)] == 4096
    assert got[("overlay_peer_transmit_bytes_total", labels)] == 2048
    assert got[("overlay_peer_path_direct", labels)] == 1.0
    assert got[("overlay_peer_rtt_seconds", labels)] == pytest.approx(0.011)
    assert got[("overlay_peer_loss_ratio", labels)] == pytest.approx(0.25)
    assert got[("overlay_peer_path_changes_total", labels)] == 1
    assert got[("overlay_peer_handshake_age_seconds", labels)] == pytest.approx(42.0)
    assert got[("overlay_peers", ())] == 1


def test_relay_path_and_allocations():
    agent, peer, _ = candidate_peer("bob")
    paths.switch(peer, RELAYED, 10.0, paths.REASON_SILENT)
    got = samples(agent)
    labels = (("peer", "bob"), ("public_key", keys.encode(peer.public_key)))
    assert got[("overlay_peer_path_direct", labels)] == 0.0
    assert got[("overlay_peer_rtt_seconds", labels)] == pytest.approx(0.0305)
    assert got[("overlay_peer_path_changes_total", labels)] == 2
    assert got[("overlay_rendezvous_connected", ())] == 1.0
    assert got[("overlay_relay_allocation_ready", (("server", "203.0.113.10:3478"), ("transport", "udp")))] == 1.0
    assert got[("overlay_relay_allocation_ready", (("server", "[2001:db8::10]:3478"), ("transport", "udp")))] == 0.0
    assert got[("overlay_relay_allocation_active", (("server", "203.0.113.10:3478"), ("transport", "udp")))] == 1.0


def test_static_peer_is_labelled_by_its_key_and_has_no_path_yet():
    agent, peer, _ = candidate_peer("bob")
    agent.traversal = None
    peer.endpoint_set.active = None
    peer.last_handshake = None
    got = samples(agent)
    short = keys.encode(peer.public_key)[:8]
    names = {name for name, labels in got if dict(labels).get("peer") == short}
    assert names == {"overlay_peer_receive_bytes_total", "overlay_peer_transmit_bytes_total",
                     "overlay_peer_path_changes_total"}
    assert not any(name.startswith(("overlay_relay", "overlay_rendezvous")) for name, _ in got)


@pytest.mark.parametrize("text,expected", [
    ("9586", ("127.0.0.1", 9586)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9100", ("::1", 9100)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host:9100", "127.0.0.1:0", "127.0.0.1:70000", "::1:9100", "[::1]9100"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


async def test_server_answers_on_loopback():
    agent, peer, _ = candidate_peer("bob")
    server = MetricsServer(agent, "127.0.0.1", 0)
    await server.start()
    try:
        port = server._runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                body = await resp.text()
    finally:
        await server.close()
    assert 'overlay_peer_path_direct{peer="bob"' in body


def test_up_with_a_bad_metrics_address_is_one_line(tmp_path, capsys):
    from overlay.cli import main

    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nPrivateKey = " + "A" * 43 + "=\n")
    assert main(["up", str(conf), "--metrics", "localhost:9100"]) == 1
    assert capsys.readouterr().err == \
        "overlay: up: --metrics 'localhost:9100': 'localhost' is not an IP address\n"
