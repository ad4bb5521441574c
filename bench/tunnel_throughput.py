"""Tunnel throughput and latency: overlay agent <-> agent vs wireguard-go <-> wireguard-go.

    sudo .venv/bin/python bench/tunnel_throughput.py [--seconds 10] [--pings 100]
        [--rounds 3] [--profile] [--only overlay|wireguard-go]

Same two-namespace topology for both (one veth link, IPv4 outer endpoint).
Each round measures both implementations back to back (the order alternates
between rounds so a load spike from other work on a shared machine does not
always hit the same one): ping round trips inside the tunnel, then iperf3 TCP
one way and reversed. Prints each round's figures and one table of the
medians with the ratio overlay / wireguard-go. `--profile` runs the agents
under cProfile and prints where their time went (slows them down; the
figures of a profiled run are not comparable). Not a test: the numbers depend
on the machine and on whatever else runs on it. Namespaces (prefix
`ovbench`) and processes are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import re
import shutil
import signal
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
    TunnelProcess,
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
KINDS = ("overlay", "wireguard-go")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q * (len(s) - 1))))
    return s[k]


def measure(pair, pings: int, interval: float, seconds: int) -> dict[str, float]:
    out = pair.a.run("ping", "-n", "-c", str(pings), "-i", str(interval), TUN4["b"],
                     check=False, timeout=pings * interval + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    nan = float("nan")
    result: dict[str, float] = {
        "ping_p50_ms": percentile(rtts, 0.50) if rtts else nan,
        "ping_p90_ms": percentile(rtts, 0.90) if rtts else nan,
        "ping_p99_ms": percentile(rtts, 0.99) if rtts else nan,
        "ping_avg_ms": statistics.fmean(rtts) if rtts else nan,
        "ping_loss_pct": 100.0 * (pings - len(rtts)) / pings,
    }
    for label, extra in (("a_to_b", []), ("b_to_a", ["-R"])):
        server = pair.b.popen(["iperf3", "-s", "-1", "-B", TUN4["b"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            r = pair.a.run("iperf3", "-c", TUN4["b"], "-t", str(seconds), "-J", *extra,
                           check=False, timeout=seconds + 60)
            end = json.loads(r.stdout)["end"]
            result[f"tcp_{label}_gbps"] = end["sum_received"]["bits_per_second"] / 1e9
            result[f"tcp_{label}_retr"] = float(end["sum_sent"].get("retransmits", 0))
        except (ValueError, KeyError):
            result[f"tcp_{label}_gbps"] = nan
            result[f"tcp_{label}_retr"] = nan
        finally:
            server.kill()
            server.wait()
    return result


def start_profiled_agent(ns, workdir: Path, ifname: str, config_text: str,
                         prof: Path) -> TunnelProcess:
    """`overlay up` under cProfile; the profile is written when it exits on SIGTERM."""
    conf = workdir / f"{ifname}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
    log_path = workdir / f"{ifname}.log"
    with open(log_path, "wb") as logf:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = ns.popen([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "overlay.cli",
                         "up", str(conf)], stdout=logf, stderr=subprocess.STDOUT, env=env)
    return TunnelProcess(ns, ifname, proc, log_path)


def run_one(kind: str, pair, workdir: Path, args, profiles: list[Path]) -> dict[str, float]:
    ia, ib = Identity(), Identity()
    link = pair.links[0]
    names = {"a": f"{PREFIX}{kind[0]}a", "b": f"{PREFIX}{kind[0]}b"}
    with AgentPair() as ap:
        if kind == "overlay":
            for me, mine, theirs, port, eps in (("a", ia, ib, PORT_A, [ep(link.b4, PORT_B)]),
                                                ("b", ib, ia, PORT_B, [])):
                text = agent_config(me, mine, theirs, listen_port=port, endpoints=eps)
                ns = getattr(pair, me)
                if args.profile:
                    prof = workdir / f"agent_{me}_{len(profiles)}.prof"
                    profiles.append(prof)
                    ap.add(start_profiled_agent(ns, workdir, names[me], text, prof))
                else:
                    ap.add(start_agent(ns, workdir, names[me], text))
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
        return measure(pair, args.pings, args.interval, args.seconds)


ROWS = [
    ("TCP a->b (Gbit/s)", "tcp_a_to_b_gbps", "{:.3f}"),
    ("TCP b->a (Gbit/s)", "tcp_b_to_a_gbps", "{:.3f}"),
    ("TCP a->b retransmits", "tcp_a_to_b_retr", "{:.0f}"),
    ("TCP b->a retransmits", "tcp_b_to_a_retr", "{:.0f}"),
    ("ping p50 (ms)", "ping_p50_ms", "{:.3f}"),
    ("ping p90 (ms)", "ping_p90_ms", "{:.3f}"),
    ("ping p99 (ms)", "ping_p99_ms", "{:.3f}"),
    ("ping avg (ms)", "ping_avg_ms", "{:.3f}"),
    ("ping loss (%)", "ping_loss_pct", "{:.1f}"),
]


def median(values: list[float]) -> float:
    ok = [v for v in values if v == v]  # drop NaN (a failed iperf3 run)
    return statistics.median(ok) if ok else float("nan")


def print_rounds(results: dict[str, list[dict[str, float]]]) -> None:
    for kind, rounds in results.items():
        for i, r in enumerate(rounds, 1):
            print(f"{kind:13} round {i}: TCP {r['tcp_a_to_b_gbps']:.3f}/{r['tcp_b_to_a_gbps']:.3f}"
                  f" Gbit/s, ping p50 {r['ping_p50_ms']:.3f} ms p99 {r['ping_p99_ms']:.3f} ms")


def print_table(results: dict[str, list[dict[str, float]]], args) -> None:
    kinds = [k for k in KINDS if k in results]
    med = {k: {key: median([r[key] for r in results[k]]) for _, key, _ in ROWS} for k in kinds}
    header = f"{'median of ' + str(args.rounds) + ' round(s)':26}" + "".join(f"{k:>13}" for k in kinds)
    both = len(kinds) == 2
    print(header + (f"{'ratio':>8}" if both else ""))
    for label, key, fmt in ROWS:
        line = f"{label:26}" + "".join(f"{fmt.format(med[k][key]):>13}" for k in kinds)
        if both:
            wg = med["wireguard-go"][key]
            line += f"{med['overlay'][key] / wg:>8.2f}" if wg else f"{'-':>8}"
        print(line)
    print(f"({args.seconds} s iperf3 per direction, {args.pings} pings every {args.interval} s;"
          " ratio = overlay / wireguard-go)")


def print_profiles(profiles: list[Path], top: int = 30) -> None:
    for prof in profiles:
        if not prof.exists():
            print(f"(no profile written at {prof})")
            continue
        buf = io.StringIO()
        stats = pstats.Stats(str(prof), stream=buf)
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        print(f"===== {prof.name} (sorted by own time) =====")
        print(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration per direction")
    p.add_argument("--pings", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between pings")
    p.add_argument("--rounds", type=int, default=1, help="rounds; the table shows medians")
    p.add_argument("--only", choices=KINDS, help="measure one implementation only")
    p.add_argument("--profile", action="store_true",
                   help="run the agents under cProfile and print the hot functions")
    p.add_argument("--keep-profiles", metavar="DIR",
                   help="copy the .prof files here (with --profile)")
    args = p.parse_args(argv)
    for tool in ("iperf3", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 1
    # A SIGTERM (e.g. from `timeout`) becomes an exception so the cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [args.only] if args.only else list(KINDS)
    sweep(PREFIX)
    workdir = Path(tempfile.mkdtemp(prefix="overlay-bench-"))
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    profiles: list[Path] = []
    pair = build_pair(PREFIX, links=1)
    try:
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else list(reversed(kinds))
            for kind in order:
                print(f"round {rnd + 1}/{args.rounds}: measuring {kind} ...", file=sys.stderr,
                      flush=True)
                results[kind].append(run_one(kind, pair, workdir, args, profiles))
        print_rounds(results)
        print_table(results, args)
        if args.profile:
            print_profiles(profiles)
            if args.keep_profiles:
                os.makedirs(args.keep_profiles, exist_ok=True)
                for prof in profiles:
                    if prof.exists():
                        shutil.copy(prof, args.keep_profiles)
    finally:
        pair.delete()
        sweep(PREFIX)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
