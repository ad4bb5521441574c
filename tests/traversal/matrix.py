"""The NAT-pair matrix of /work/shared/notes/natlab.md, run with real processes.

One lab holds the relay and a few "slots" (two NATs with one host each). A
case sets both NATs of a free slot to the pair's behaviours, joins two fresh
nodes into a network of their own, brings them up, and records what a user
would see: the first ping over the overlay, the path `overlay status --json`
reports on both sides, and a TCP transfer with its bytes counted on the
internet bridge (NAT to NAT, or through the relay). Several slots run at
once; the tests then assert on each pair's record.

IPv6 follows the NAT behaviour (NAT66, same mapping) in the matrix: with the
default routed IPv6 behind a stateful firewall every pair could punch over
IPv6 and the IPv4 table would not be what is being tested.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from overlay.lab import Host, Lab, Nat
from overlay.lab.addressing import RELAY_V4

from .pathmeter import PathMeter, Traffic
from .scenario import Node, Scenario, ScenarioError

CONE_AND_SYMMETRIC = ("full-cone", "restricted", "port-restricted", "symmetric")
UDP_BLOCKED = "udp-blocked"

# The table "Expected hole-punch outcomes" of notes/natlab.md: upper triangle,
# the UDP-blocked column included ("relay over TCP").
EXPECTED: dict[tuple[str, str], str] = {}
for _i, _a in enumerate(CONE_AND_SYMMETRIC):
    for _b in CONE_AND_SYMMETRIC[_i:]:
        hard = {_a, _b} in ({"port-restricted", "symmetric"}, {"symmetric"})
        EXPECTED[(_a, _b)] = "relay" if hard else "direct"
    EXPECTED[(_a, UDP_BLOCKED)] = "relay"
PAIRS = list(EXPECTED)

TRANSFER_BYTES = 2_000_000
ENDPOINT_KINDS = {"host", "srflx", "relay", "prflx", "configured", "learned"}
ENDPOINT_STATES = {"active", "ok", "trying", "failed"}


def pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}--{pair[1]}"


def selected_pairs(request: Any) -> list[tuple[str, str]]:
    """The pairs of this module's tests that pytest will run (so `-k` runs only those)."""
    chosen = [item.callspec.params["pair"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "pair" in item.callspec.params]
    return list(dict.fromkeys(chosen)) or PAIRS


@dataclass
class Slot:
    index: int
    nat_a: Nat
    nat_b: Nat
    host_a: Host
    host_b: Host
    meter: PathMeter


@dataclass
class CaseResult:
    pair: tuple[str, str]
    error: str | None = None
    ping_after_up: float | None = None  # s from the second `overlay up` to the first reply
    path_after_up: dict[str, float] = field(default_factory=dict)  # side -> s until the expected path
    peer_a: dict[str, Any] | None = None  # a's status entry for b, after the transfer
    peer_b: dict[str, Any] | None = None
    traffic: Traffic | None = None  # counted during the transfer
    transfer_seconds: float | None = None
    tcp_to_relay: list[str] = field(default_factory=list)  # conntrack lines on a UDP-blocked NAT
    udp_leaving: list[str] = field(default_factory=list)


class Matrix:
    """Slots on one lab, one relay (ours, or coturn as TURN), cases run in parallel."""

    def __init__(self, lab: Lab, scenario: Scenario, slots: int):
        self.lab = lab
        self.scenario = scenario
        self.free: queue.Queue[Slot] = queue.Queue()
        self._lock = threading.Lock()
        self._networks = 0
        for i in range(slots):
            nat_a = lab.add_nat(f"ma{i}", "port-restricted", ipv6="nat66")
            nat_b = lab.add_nat(f"mb{i}", "port-restricted", ipv6="nat66")
            slot = Slot(i, nat_a, nat_b, lab.add_host(f"ha{i}", nat_a), lab.add_host(f"hb{i}", nat_b),
                        PathMeter(lab, nat_a, nat_b, f"s{i}"))
            self.free.put(slot)
        self.slots = slots

    def run_all(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], CaseResult]:
        with ThreadPoolExecutor(self.slots) as pool:
            results = list(pool.map(self._run_on_free_slot, pairs))
        return {r.pair: r for r in results}

    def _run_on_free_slot(self, pair: tuple[str, str]) -> CaseResult:
        slot = self.free.get()
        try:
            return self.run_case(slot, pair)
        finally:
            self.free.put(slot)

    def run_case(self, slot: Slot, pair: tuple[str, str]) -> CaseResult:
        result = CaseResult(pair)
        nodes: list[Node] = []
        try:
            self._run(slot, pair, result, nodes)
        except (ScenarioError, AssertionError, OSError, TimeoutError) as e:
            result.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - recorded, reported by the pair's own test
            result.error = f"unexpected {type(e).__name__}: {e}"
        finally:
            for node in nodes:
                self.scenario.stop(node)
        return result

    def _run(self, slot: Slot, pair: tuple[str, str], result: CaseResult, nodes: list[Node]) -> None:
        sc, expected = self.scenario, EXPECTED[pair]
        self.lab.set_nat(slot.nat_a, pair[0], ipv6="nat66")
        self.lab.set_nat(slot.nat_b, pair[1], ipv6="nat66")
        with self._lock:
            self._networks += 1
            network = f"pair{self._networks}"
        token = sc.token(network, uses=2)
        a = sc.join(slot.host_a, token, f"a{slot.index}")
        nodes.append(a)
        b = sc.join(slot.host_b, token, f"b{slot.index}")
        nodes.append(b)
        sc.up(a)
        sc.up(b, wait=False)
        sc.wait_up(b)
        sc.wait_ping(b, a, timeout=20)
        result.ping_after_up = time.monotonic() - b.started_at
        for side, (me, other) in (("a", (a, b)), ("b", (b, a))):
            sc.wait_path(me, other, expected, timeout=15)
            result.path_after_up[side] = time.monotonic() - b.started_at
        before = slot.meter.read()
        result.transfer_seconds = sc.transfer(a, b, TRANSFER_BYTES)
        result.traffic = slot.meter.read() - before
        result.peer_a = sc.peer_status(a, b)
        result.peer_b = sc.peer_status(b, a)
        for nat in (slot.nat_a, slot.nat_b):
            if nat.behaviour.udp_blocked:
                result.tcp_to_relay += _conntrack(nat, "tcp", exclude_port=8080)
                result.udp_leaving += _conntrack(nat, "udp")


def _conntrack(nat: Nat, proto: str, exclude_port: int | None = None) -> list[str]:
    """Live flows of `proto` from the NAT's LAN to the relay (rendezvous HTTP excluded)."""
    out = nat.ns.run("conntrack", "-L", "-f", "ipv4", "-p", proto, check=False).stdout
    lines = []
    for line in out.splitlines():
        if not any(f"dst={ip} " in line for ip in RELAY_V4):
            continue
        if exclude_port is not None and f"dport={exclude_port} " in line:
            continue
        if proto == "tcp" and "ESTABLISHED" not in line:
            continue
        lines.append(line)
    return lines


def check_status_entry(entry: dict[str, Any], expected_path: str) -> None:
    """The fields `overlay status --json` shows per peer (agreed with the agent's author)."""
    assert entry.get("path") == expected_path, entry
    active = entry.get("endpoint")
    assert isinstance(active, str) and ":" in active, entry
    endpoints = entry.get("endpoints")
    assert isinstance(endpoints, list) and endpoints, entry
    for ep in endpoints:
        assert isinstance(ep, dict), f"endpoints must be objects: {endpoints}"
        assert ep.get("kind") in ENDPOINT_KINDS, ep
        assert ep.get("state") in ENDPOINT_STATES, ep
    actives = [ep for ep in endpoints if ep.get("endpoint") == active]
    assert actives, f"active endpoint {active} not among the candidates {endpoints}"
    assert actives[0]["state"] == "active", actives[0]
    if expected_path == "relay":
        assert actives[0]["kind"] == "relay", actives[0]
    else:
        assert actives[0]["kind"] != "relay", actives[0]
    assert entry.get("name"), entry
    assert entry.get("overlay_ips"), entry


def assert_case(result: CaseResult) -> None:
    """What each pair's test checks, with the pair's own record in every message."""
    expected = EXPECTED[result.pair]
    assert result.error is None, result.error
    assert result.peer_a is not None and result.peer_b is not None
    check_status_entry(result.peer_a, expected)
    check_status_entry(result.peer_b, expected)
    assert result.traffic is not None
    if expected == "direct":
        assert result.traffic.direct >= TRANSFER_BYTES, result.traffic
    else:
        assert result.traffic.via_relay >= TRANSFER_BYTES, result.traffic
        assert result.traffic.direct < TRANSFER_BYTES // 10, result.traffic
    if UDP_BLOCKED in result.pair:
        assert result.tcp_to_relay, "no TCP flow to the relay's TURN port on the UDP-blocked NAT"
        assert not result.udp_leaving, result.udp_leaving


def summary_table(results: dict[tuple[str, str], CaseResult], relay: str) -> str:
    head = (f"NAT pair matrix ({relay})\n{'pair':<36} {'expect':<7} {'path a/b':<14} {'ping':>6} {'path':>6}"
            f" {'xfer':>6}  result")
    rows = [head]
    for pair, r in results.items():
        paths = "/".join(str((p or {}).get("path")) for p in (r.peer_a, r.peer_b))
        ping = f"{r.ping_after_up:.2f}" if r.ping_after_up is not None else "-"
        path_t = f"{max(r.path_after_up.values()):.2f}" if len(r.path_after_up) == 2 else "-"
        try:
            assert_case(r)
            verdict = "ok"
        except AssertionError as e:
            verdict = "FAIL " + str(e).splitlines()[0][:100]
        xfer = f"{r.transfer_seconds:.2f}" if r.transfer_seconds is not None else "-"
        rows.append(f"{pair_id(pair):<36} {EXPECTED[pair]:<7} {paths:<14} {ping:>6} {path_t:>6} {xfer:>6}  {verdict}")
    return "\n".join(rows) + "\n"


def write_summary(results: dict[tuple[str, str], CaseResult], path: Any, relay: str) -> None:
    """The table a reader wants after a run (printed with -s, kept in the test's tmp dir)."""
    text = summary_table(results, relay)
    print("\n" + text)
    with open(path, "w") as f:
        f.write(text)
