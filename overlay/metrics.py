"""Prometheus metrics of a running agent (`overlay up --metrics 127.0.0.1:9586`).

Computed from live state at scrape time (the data path keeps plain counters, as
it does anyway for `wg show`): nothing here runs per packet. Peers are labelled
with their rendezvous name (or the first characters of the key for a static peer)
and their full public key; keys are public, private material never appears.

Served by a small aiohttp app on an address of its own, loopback by default: the
numbers tell who talks to whom and through which relay, which is nobody else's
business.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from overlay import keys, path_report
from overlay.wireguard import paths

log = structlog.get_logger("overlay.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9586
PEER_LABELS = ["peer", "public_key"]
RELAY_LABELS = ["server", "transport"]


def parse_listen(text: str) -> tuple[str, int]:
    """`PORT`, `ADDR:PORT` or `[ADDR6]:PORT`; a bare port listens on loopback only."""
    text = text.strip()
    if text.isdigit():
        host, port_text = DEFAULT_HOST, text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected PORT, ADDRESS:PORT or [IPV6]:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return str(ip), int(port_text)


def peer_label(agent: Any, key: bytes) -> str:
    traversal = getattr(agent, "traversal", None)
    info = traversal.peer_info(key) if traversal is not None else None
    if info and info[0]:
        return info[0]
    return keys.encode(key)[:8]


class AgentCollector(Collector):
    """Reads the agent's device (and its rendezvous session, if any) when scraped."""

    def __init__(self, agent: Any, clock: Any = time.monotonic) -> None:
        self.agent = agent
        self.clock = clock

    def collect(self) -> Iterator:
        now = self.clock()
        rx = CounterMetricFamily("overlay_peer_receive_bytes", "Bytes received from the peer (WireGuard datagrams)",
                                 labels=PEER_LABELS)
        tx = CounterMetricFamily("overlay_peer_transmit_bytes", "Bytes sent to the peer (WireGuard datagrams)",
                                 labels=PEER_LABELS)
        direct = GaugeMetricFamily("overlay_peer_path_direct",
                                   "1 when the active path to the peer is direct, 0 when it goes through a relay",
                                   labels=PEER_LABELS)
        rtt = GaugeMetricFamily("overlay_peer_rtt_seconds",
                                "Round trip of the active path (median of recent in-session probes)",
                                labels=PEER_LABELS)
        loss = GaugeMetricFamily("overlay_peer_loss_ratio",
                                 "Share of recent in-session probes lost on the active path", labels=PEER_LABELS)
        changes = CounterMetricFamily("overlay_peer_path_changes", "Times the active path to the peer changed",
                                      labels=PEER_LABELS)
        handshake = GaugeMetricFamily("overlay_peer_handshake_age_seconds",
                                      "Seconds since the last completed handshake with the peer",
                                      labels=PEER_LABELS)
        peers = list(self.agent.device.peers.values())
        for peer in peers:
            labels = [peer_label(self.agent, peer.public_key), keys.encode(peer.public_key)]
            rx.add_metric(labels, peer.rx_bytes)
            tx.add_metric(labels, peer.tx_bytes)
            changes.add_metric(labels, peer.path_change_count)
            path = paths.path_of(peer)
            if path is not None:
                direct.add_metric(labels, 1.0 if path == paths.PATH_DIRECT else 0.0)
                seconds = path_report.rtt_seconds(peer, peer.active_endpoint)
                if seconds is not None:
                    rtt.add_metric(labels, seconds)
                ratio = path_report.loss_ratio(peer, peer.active_endpoint)
                if ratio is not None:
                    loss.add_metric(labels, ratio)
            if peer.last_handshake is not None:
                handshake.add_metric(labels, max(0.0, now - peer.last_handshake))
        yield GaugeMetricFamily("overlay_peers", "Peers configured on the interface", value=len(peers))
        yield from (rx, tx, direct, rtt, loss, changes, handshake)
        yield from self._traversal()

    def _traversal(self) -> Iterator:
        traversal = getattr(self.agent, "traversal", None)
        if traversal is None:
            return
        summary = traversal.summary()
        yield GaugeMetricFamily("overlay_rendezvous_connected", "1 while connected to the rendezvous",
                                value=1.0 if summary.get("connected") else 0.0)
        ready = GaugeMetricFamily("overlay_relay_allocation_ready",
                                  "1 while the TURN allocation on this relay is usable", labels=RELAY_LABELS)
        active = GaugeMetricFamily("overlay_relay_allocation_active",
                                   "1 for the allocation whose relayed address peers are given", labels=RELAY_LABELS)
        for relay in summary.get("relays") or []:
            labels = [str(relay.get("server")), str(relay.get("transport"))]
            ready.add_metric(labels, 1.0 if relay.get("state") == "ready" else 0.0)
            if "active" in relay:
                active.add_metric(labels, 1.0 if relay["active"] else 0.0)
        yield ready
        yield active


def make_registry(agent: Any, clock: Any = time.monotonic) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, clock))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class MetricsServer:
    """GET /metrics on `host:port` while the agent runs."""

    def __init__(self, agent: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.registry = make_registry(agent)
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics serving", url=f"http://{path_report.describe((self.host, self.port))}/metrics")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
