"""Prometheus metrics on a private registry, computed from live state at scrape time.

Counters live as plain ints in the TURN core and the rendezvous (cheap on the hot
path); this collector reads them only when /metrics is scraped.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .rendezvous import Rendezvous
from .turn_core import TurnCore


class RelayCollector(Collector):
    def __init__(self, core: TurnCore, rendezvous: Rendezvous) -> None:
        self.core = core
        self.rdv = rendezvous

    def collect(self) -> Iterator:
        t = self.core.totals()
        yield GaugeMetricFamily("overlay_relay_allocations", "TURN allocations alive", value=len(self.core.allocations))
        yield CounterMetricFamily("overlay_relay_allocations", "TURN allocations created", value=t.allocations_total)
        pk = CounterMetricFamily("overlay_relay_relayed_packets", "Packets relayed", labels=["direction"])
        pk.add_metric(["client_to_peer"], t.pkts_out)
        pk.add_metric(["peer_to_client"], t.pkts_in)
        yield pk
        by = CounterMetricFamily("overlay_relay_relayed_bytes", "Payload bytes relayed", labels=["direction"])
        by.add_metric(["client_to_peer"], t.bytes_out)
        by.add_metric(["peer_to_client"], t.bytes_in)
        yield by
        yield GaugeMetricFamily("overlay_relay_members_online", "Nodes with a live rendezvous session",
                                value=self.rdv.online_count())
        af = CounterMetricFamily("overlay_relay_auth_failures", "Failed authentications", labels=["service"])
        af.add_metric(["turn"], t.auth_failures)
        af.add_metric(["rendezvous"], self.rdv.auth_failures)
        yield af
        yield CounterMetricFamily("overlay_relay_bad_requests", "Malformed STUN/TURN requests", value=t.bad_requests)


def make_registry(core: TurnCore, rendezvous: Rendezvous) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(core, rendezvous))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
