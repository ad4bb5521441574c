"""iperf3 TCP through two tunnel endpoints in two namespaces joined by a veth.

Compares our agent (agent <-> agent) with wireguard-go (wg-go <-> wg-go), and
optionally agent <-> wireguard-go, in the same run so the ratio is meaningful
on a shared machine. Needs root, wireguard-go, wg and iperf3.

    python bench/dataplane_iperf.py [--seconds 10] [--modes agent,wggo,mixed] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from overlay.lab.netns import Namespace

PORT = 51820
OUTER = {"a": "203.0.113.1", "b": "203.0.113.2"}
INNER = {"a": "10.77.0.1", "b": "10.77.0.2"}


def genkey() -> tuple[str, str]:
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout.strip()
    return priv, pub


def run_agent_main(argv: list[str]) -> None:
    """Child process: one agent from command-line arguments, until SIGTERM."""
    from overlay.agent import Agent
    from overlay.config import EndpointSpec, InterfaceConfig, PeerConfig

    priv, addr, peer_pub, allowed, endpoint = argv
    peer = PeerConfig(public_key=base64.b64decode(peer_pub),
                      allowed_ips=[ipaddress.ip_network(allowed)],
                      endpoints=[EndpointSpec(endpoint.rsplit(":", 1)[0],
                                              int(endpoint.rsplit(":", 1)[1]))])
    cfg = InterfaceConfig(private_key=base64.b64decode(priv), listen_port=PORT,
                          addresses=[ipaddress.ip_interface(addr)], peers=[peer])

    async def main() -> None:
        agent = Agent(cfg, "ovl0")
        await agent.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await agent.stop()

    asyncio.run(main())


class Pair:
    def __init__(self, prefix: str):
        self.ns = {s: Namespace(f"{prefix}{s}") for s in "ab"}
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="dpbench")

    def __enter__(self) -> Pair:
        a, b = self.ns["a"], self.ns["b"]
        a.create()
        b.create()
        va, vb = f"{a.name}v", f"{b.name}v"
        subprocess.run(["ip", "link", "add", va, "netns", a.name, "type", "veth", "peer",
                        "name", vb, "netns", b.name], check=True)
        for s, v in (("a", va), ("b", vb)):
            self.ns[s].run("ip", "addr", "add", f"{OUTER[s]}/24", "dev", v)
            self.ns[s].run("ip", "link", "set", v, "up")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.ns.values():
            ns.delete()

    def start_agent(self, side: str, priv: str, peer_pub: str, profile: bool) -> None:
        other = "b" if side == "a" else "a"
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", f"/tmp/dataplane_{side}.prof"]
        cmd += [os.path.abspath(__file__), "--run-agent", priv, f"{INNER[side]}/24", peer_pub,
                f"{INNER[other]}/32", f"{OUTER[other]}:{PORT}"]
        p = self.ns[side].popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        seen = []
        for line in p.stdout:
            if line.strip() == "ready":
                return
            seen.append(line)
        raise RuntimeError(f"agent {side} did not start: {''.join(seen)[-2000:]}")

    def start_wggo(self, side: str, priv: str, peer_pub: str) -> None:
        other = "b" if side == "a" else "a"
        ns = self.ns[side]
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        p = subprocess.Popen(ns.argv(["wireguard-go", "-f", ns.name]), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        for _ in range(50):
            if ns.run("ip", "link", "show", ns.name, check=False).returncode == 0:
                break
            time.sleep(0.05)
        keyfile = os.path.join(self.tmp, f"{side}.key")
        with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(priv)
        ns.run("wg", "set", ns.name, "private-key", keyfile, "listen-port", str(PORT), "peer",
               peer_pub, "allowed-ips", f"{INNER[other]}/32", "endpoint", f"{OUTER[other]}:{PORT}")
        ns.run("ip", "addr", "add", f"{INNER[side]}/24", "dev", ns.name)
        ns.run("ip", "link", "set", ns.name, "mtu", "1420", "up")

    def iperf(self, seconds: int) -> float:
        b = self.ns["b"]
        srv = b.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(srv)
        time.sleep(0.3)
        # warm up (handshake) then measure
        self.ns["a"].run("ping", "-c", "3", "-i", "0.2", "-W", "2", INNER["b"], check=False)
        out = self.ns["a"].run("iperf3", "-c", INNER["b"], "-t", str(seconds), "-J",
                               timeout=seconds + 30)
        data = json.loads(out.stdout)
        self.retransmits = data["end"]["sum_sent"].get("retransmits")
        return data["end"]["sum_received"]["bits_per_second"] / 1e9


def measure(mode: str, seconds: int, profile: bool) -> float:
    ka, kb = genkey(), genkey()
    prefix = f"tD{os.getpid() % 10000}{mode[0]}"
    with Pair(prefix) as p:
        if mode in ("agent", "mixed"):
            p.start_agent("a", ka[0], kb[1], profile)
        else:
            p.start_wggo("a", ka[0], kb[1])
        if mode == "agent":
            p.start_agent("b", kb[0], ka[1], profile)
        else:
            p.start_wggo("b", kb[0], ka[1])
        gbps = p.iperf(seconds)
        print(f"{mode}: {gbps:.3f} Gbit/s, TCP retransmits {p.retransmits}", flush=True)
        return gbps


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-agent":
        run_agent_main(sys.argv[2:])
        return
    # Turn SIGTERM (e.g. from `timeout`) into an exception so the namespaces are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--modes", default="agent,wggo")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile the agents (slower)")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            results.setdefault(mode, []).append(measure(mode, args.seconds, args.profile))
    print(f"{'mode':8} {'Gbit/s (each round)':40} best")
    for mode, vals in results.items():
        print(f"{mode:8} {' '.join(f'{v:.3f}' for v in vals):40} {max(vals):.3f}")
    if "agent" in results and "wggo" in results:
        print(f"ratio agent/wggo (best of each): {max(results['agent']) / max(results['wggo']):.2f}")


if __name__ == "__main__":
    main()
