"""Tunnel throughput and latency: overlay agent <-> agent vs wireguard-go <-> wireguard-go.

    sudo .venv/bin/python bench/tunnel_throughput.py [--seconds 10] [--pings 50]

Same two-namespace topology for both (one veth link, IPv4 outer endpoint),
iperf3 TCP one way and reversed, and ping round trips inside the tunnel.
Prints one table with both implementations and the ratios. Not a test: the
numbers depend on the machine and on whatever else runs on it. Namespaces
(prefix `ovbench`) and processes are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overlay.lab.netns import sweep  # noqa: E402
from tests.netns.topology import (  # noqa: E402
    TUN4,
    AgentPair,
    Identity,
    agent_config,
    build_pair,
    ep,
    ping_until,
    start_agent,
    start_wireguard_go,
    wait_tunnel_addresses,
)

PREFIX = "ovbench"
PORT_A, PORT_B = 51840, 51841


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q * (len(s) - 1))))
    return s[k]


def measure(pair, pings: int, seconds: int) -> dict[str, float]:
    out = pair.a.run("ping", "-n", "-c", str(pings), "-i", "0.05", TUN4["b"], check=False,
                     timeout=pings + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    result: dict[str, float] = {
        "ping_avg_ms": statistics.fmean(rtts) if rtts else float("nan"),
        "ping_p50_ms": percentile(rtts, 0.50) if rtts else float("nan"),
        "ping_p99_ms": percentile(rtts, 0.99) if rtts else float("nan"),
        "ping_loss_pct": 100.0 * (pings - len(rtts)) / pings,
    }
    for label, extra in (("a_to_b", []), ("b_to_a", ["-R"])):
        server = pair.b.popen(["iperf3", "-s", "-1", "-B", TUN4["b"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            r = pair.a.run("iperf3", "-c", TUN4["b"], "-t", str(seconds), "-J", *extra, check=False,
                           timeout=seconds + 60)
            end = json.loads(r.stdout)["end"]
            result[f"tcp_{label}_gbps"] = end["sum_received"]["bits_per_second"] / 1e9
            result[f"tcp_{label}_retr"] = float(end["sum_sent"].get("retransmits", 0))
        except (ValueError, KeyError):
            result[f"tcp_{label}_gbps"] = float("nan")
            result[f"tcp_{label}_retr"] = float("nan")
        finally:
            server.kill()
            server.wait()
    return result


def run_one(kind: str, pair, workdir: Path, pings: int, seconds: int) -> dict[str, float]:
    ia, ib = Identity(), Identity()
    link = pair.links[0]
    names = {"a": f"{PREFIX}{kind[0]}a", "b": f"{PREFIX}{kind[0]}b"}
    with AgentPair() as ap:
        if kind == "overlay":
            for me, mine, theirs, port, eps in (("a", ia, ib, PORT_A, [ep(link.b4, PORT_B)]),
                                                ("b", ib, ia, PORT_B, [])):
                ap.add(start_agent(pair.__dict__[me], workdir, names[me],
                                   agent_config(me, mine, theirs, listen_port=port, endpoints=eps)))
            for p in ap.procs:
                p.wait_ready()
        else:
            ap.add(start_wireguard_go(pair.a, workdir, names["a"], "a", ia, ib, listen_port=PORT_A,
                                      endpoints=[ep(link.b4, PORT_B)]))
            ap.add(start_wireguard_go(pair.b, workdir, names["b"], "b", ib, ia, listen_port=PORT_B,
                                      endpoints=[]))
        wait_tunnel_addresses(pair.a, names["a"])
        wait_tunnel_addresses(pair.b, names["b"])
        ping_until(pair.a, TUN4["b"])
        return measure(pair, pings, seconds)


ROWS = [
    ("TCP a->b (Gbit/s)", "tcp_a_to_b_gbps", "{:.3f}"),
    ("TCP b->a (Gbit/s)", "tcp_b_to_a_gbps", "{:.3f}"),
    ("TCP a->b retransmits", "tcp_a_to_b_retr", "{:.0f}"),
    ("TCP b->a retransmits", "tcp_b_to_a_retr", "{:.0f}"),
    ("ping avg (ms)", "ping_avg_ms", "{:.3f}"),
    ("ping p50 (ms)", "ping_p50_ms", "{:.3f}"),
    ("ping p99 (ms)", "ping_p99_ms", "{:.3f}"),
    ("ping loss (%)", "ping_loss_pct", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration per direction")
    p.add_argument("--pings", type=int, default=50)
    args = p.parse_args(argv)
    for tool in ("iperf3", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 1
    sweep(PREFIX)
    workdir = Path(tempfile.mkdtemp(prefix="overlay-bench-"))
    pair = build_pair(PREFIX, links=1)
    results = {}
    try:
        for kind in ("overlay", "wireguard-go"):
            print(f"measuring {kind} ...", file=sys.stderr, flush=True)
            results[kind] = run_one(kind, pair, workdir, args.pings, args.seconds)
    finally:
        pair.delete()
        sweep(PREFIX)
        shutil.rmtree(workdir, ignore_errors=True)
    ov, wg = results["overlay"], results["wireguard-go"]
    print(f"{'':24} {'overlay':>12} {'wireguard-go':>13} {'ratio':>7}")
    for label, key, fmt in ROWS:
        ratio = f"{ov[key] / wg[key]:.2f}" if wg[key] else "-"
        print(f"{label:24} {fmt.format(ov[key]):>12} {fmt.format(wg[key]):>13} {ratio:>7}")
    print(f"({args.seconds} s iperf3 per direction, {args.pings} pings at 50 ms; ratio = overlay / wireguard-go)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
