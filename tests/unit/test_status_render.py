"""`overlay status`: the path fields of the status document (round trip and loss
from the probes, since when and why) and how they read on screen."""

from __future__ import annotations

import time

from overlay import uapi
from overlay.status_render import format_status
from overlay.wireguard import paths

from .peer_fixtures import DIRECT, RELAYED, candidate_peer
from .wg_helpers import WALL


def _entry(agent) -> dict:
    return uapi.status_dict(agent)["peers"][0]


def test_status_document_has_the_active_paths_numbers_and_history():
    agent, peer, _ = candidate_peer()
    entry = _entry(agent)
    assert entry["path"] == "direct" and entry["endpoint"] == "198.51.100.2:40002"
    assert entry["path_rtt_ms"] == 11.0  # the median of 10, 12, 11 ms
    assert entry["path_loss"] == 0.25  # 1 of 4 probes
    assert entry["path_since"] == WALL + 2.0
    assert entry["path_reason"] == paths.REASON_DIRECT
    assert entry["path_changes"] == 1
    by_ep = {e["endpoint"]: e for e in entry["endpoints"]}
    # the keys other tools and tests read keep their meaning
    assert by_ep["198.51.100.2:40002"]["state"] == "active" and by_ep["198.51.100.2:40002"]["kind"] == "srflx"
    relay = by_ep["203.0.113.10:50000"]
    assert relay["kind"] == "relay" and relay["rtt_ms"] == 30.5 and relay["loss"] == 0.0 and relay["probes"] == 2
    host = by_ep["10.2.0.10:40002"]
    assert host["kind"] == "host" and host["rtt_ms"] is None and host["loss"] is None and host["probes"] == 0


def test_human_status_shows_path_since_why_and_alternatives():
    agent, peer, _ = candidate_peer()
    doc = uapi.status_dict(agent)
    text = format_status(doc, now=WALL + 62.0)
    assert "name: bob (100.64.0.2, fd00::2)" in text
    assert "path: direct 198.51.100.2:40002 (srflx, active), rtt 11.00 ms, loss 25% of 4 probes" in text
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(WALL + 2.0))
    assert f"since: {since} (1 minute ago), because: direct path answered (1 path change)" in text
    assert "alternatives:" in text
    assert "    203.0.113.10:50000 (relay, ok), rtt 30.50 ms, loss 0% of 2 probes" in text \
        or "    203.0.113.10:50000 (relay, trying), rtt 30.50 ms, loss 0% of 2 probes" in text
    assert "    10.2.0.10:40002 (host, trying)" in text
    assert "transfer: 4.00 KiB received, 2.00 KiB sent" in text


def test_human_status_after_a_failover_to_the_relay():
    agent, peer, _ = candidate_peer()
    paths.switch(peer, RELAYED, 50.0, paths.REASON_SILENT)
    text = format_status(uapi.status_dict(agent), now=WALL + 55.0)
    assert "path: relay 203.0.113.10:50000 (relay, active), rtt 30.50 ms" in text
    assert "(5 seconds ago), because: active path silent (2 path changes)" in text
    assert f"{DIRECT[0]}:{DIRECT[1]} (srflx," in text.split("alternatives:")[1]


def test_human_status_of_a_static_peer_keeps_the_endpoint_line():
    doc = {
        "interface": "wg0", "public_key": "PUB", "listen_port": 51820, "pid": 1,
        "peers": [{
            "public_key": "PEER", "preshared_key": False, "path": "direct", "endpoint": "192.0.2.1:51820",
            "path_rtt_ms": None, "path_loss": None, "path_since": None, "path_reason": None, "path_changes": 0,
            "endpoints": [{"endpoint": "192.0.2.1:51820", "kind": "configured", "state": "active",
                           "rtt_ms": None, "loss": None, "probes": 0}],
            "active_endpoint": "192.0.2.1:51820", "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0,
            "persistent_keepalive": 0, "allowed_ips": ["10.0.0.2/32"],
        }],
    }
    text = format_status(doc, now=1000.0)
    assert "path: direct 192.0.2.1:51820 (configured, active)\n" in text
    assert "endpoints: 192.0.2.1:51820 (active)" in text and "alternatives" not in text
    assert "since:" not in text


def test_peer_without_any_path_yet():
    agent, peer, _ = candidate_peer()
    peer.endpoint_set.active = None
    text = format_status(uapi.status_dict(agent), now=WALL + 60)
    assert "path: none yet" in text
