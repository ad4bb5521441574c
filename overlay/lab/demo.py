"""The README demo: two hosts, two real `overlay up` processes, traffic through the tunnel.

    python -m overlay.lab.demo          (or `overlay-lab demo`)

Builds two namespaces joined by a veth link (203.0.113.0/28 and
2001:db8:1::/64, documentation ranges, nothing outside them is touched),
generates keys and wg-quick style configs, starts one agent in each, then
pings over IPv4 and IPv6 inside the tunnel, runs a short iperf3, prints
`overlay status`, and tears everything down (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overlay import keys
from overlay.config import EndpointSpec, InterfaceConfig, PeerConfig, render_config
from overlay.control import socket_is_live
from overlay.lab.netns import Namespace, sweep

PREFIX = "ovdemo"
HOSTS = {
    # name: (outer IPv4, outer IPv6, tunnel IPv4, tunnel IPv6, UDP port)
    "a": ("203.0.113.1", "2001:db8:1::1", "10.88.0.1", "fd88::1", 51820),
    "b": ("203.0.113.2", "2001:db8:1::2", "10.88.0.2", "fd88::2", 51821),
}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)




def _rtt(ping_output: str) -> str:
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", ping_output)
    loss = re.search(r"(\d+)% packet loss", ping_output)
    if not m:
        return f"no answer ({loss.group(0) if loss else 'failed'})"
    return f"min/avg/max {m.group(1)}/{m.group(2)}/{m.group(3)} ms, {loss.group(0) if loss else ''}"


def build(prefix: str) -> dict[str, Namespace]:
    ns = {h: Namespace(f"{prefix}-{h}") for h in HOSTS}
    for n in ns.values():
        n.create()
    ns["a"].run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns["b"].name)
    for h, n in ns.items():
        v4, v6, *_ = HOSTS[h]
        n.run("ip", "addr", "add", f"{v4}/28", "dev", "eth0")
        n.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        n.run("ip", "link", "set", "eth0", "up")
    return ns


def write_configs(workdir: Path, prefix: str) -> dict[str, Path]:
    priv = {h: keys.generate_private_key() for h in HOSTS}
    paths = {}
    for h, (_, _, t4, t6, port) in HOSTS.items():
        o = "b" if h == "a" else "a"
        o4, o6, ot4, ot6, oport = HOSTS[o]
        peer = PeerConfig(
            public_key=keys.public_key(priv[o]),
            allowed_ips=[ipaddress.ip_network(f"{ot4}/32"), ipaddress.ip_network(f"{ot6}/128")],
            # Two endpoints per peer: the agent picks whichever answers first.
            endpoints=[EndpointSpec(o4, oport), EndpointSpec(o6, oport)],
            persistent_keepalive=25,
        )
        cfg = InterfaceConfig(
            private_key=priv[h], listen_port=port,
            addresses=[ipaddress.ip_interface(f"{t4}/24"), ipaddress.ip_interface(f"{t6}/64")],
            peers=[peer],
        )
        path = workdir / f"{prefix}{h}.conf"  # the interface is named after the file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_config(cfg))
        paths[h] = path
    return paths


def run_demo(args: argparse.Namespace) -> int:
    prefix = args.prefix
    for leftover in sweep(prefix):
        say(f"(removed a leftover namespace {leftover})")
    workdir = Path(tempfile.mkdtemp(prefix="overlay-demo-"))
    procs: dict[str, subprocess.Popen] = {}
    ns: dict[str, Namespace] = {}
    try:
        say(f"1. Two hosts: namespaces {prefix}-a and {prefix}-b, one link, "
            f"{HOSTS['a'][0]}/{HOSTS['a'][1]} <-> {HOSTS['b'][0]}/{HOSTS['b'][1]}")
        ns = build(prefix)
        paths = write_configs(workdir, prefix)
        say(f"2. Keys generated, configs written (mode 0600): {paths['a'].name}, {paths['b'].name}")
        say("   " + "\n   ".join(
            line if not line.startswith("PrivateKey") else "PrivateKey = (hidden)"
            for line in paths["a"].read_text().splitlines()))
        for h in HOSTS:
            log = open(workdir / f"{h}.log", "wb")
            procs[h] = ns[h].popen([sys.executable, "-m", "overlay.cli", "up", str(paths[h])],
                                   stdout=log, stderr=subprocess.STDOUT)
            log.close()
        for h in HOSTS:
            path = f"/var/run/wireguard/{prefix}{h}.sock"
            _wait(lambda p=path, h=h: socket_is_live(p) or procs[h].poll() is not None, 20, f"agent {h}")
            if procs[h].poll() is not None:
                raise RuntimeError(f"agent {h} exited:\n{(workdir / f'{h}.log').read_text()}")
        say(f"3. `overlay up` running in both namespaces (pids {procs['a'].pid}, {procs['b'].pid})")

        t4b, t6b = HOSTS["b"][2], HOSTS["b"][3]
        start = time.monotonic()
        _wait(lambda: ns["a"].run("ping", "-c1", "-W1", t4b, check=False).returncode == 0, 20, "first ping")
        say(f"4. Handshake done, first ping answered after {1000 * (time.monotonic() - start):.0f} ms")
        for label, addr in (("IPv4", t4b), ("IPv6", t6b)):
            out = ns["a"].run("ping", "-n", "-c", str(args.pings), "-i", "0.2", addr, check=False).stdout
            say(f"   ping {label} {addr}: {_rtt(out)}")

        if shutil.which("iperf3"):
            server = ns["b"].popen(["iperf3", "-s", "-1", "-B", t4b], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                r = ns["a"].run("iperf3", "-c", t4b, "-t", str(args.seconds), "-J", check=False,
                                timeout=args.seconds + 30)
                try:
                    end = json.loads(r.stdout)["end"]
                    gbps = end["sum_received"]["bits_per_second"] / 1e9
                    say(f"5. iperf3 TCP through the tunnel, {args.seconds} s: {gbps:.2f} Gbit/s "
                        f"({end['sum_sent']['retransmits']} retransmits)")
                except (ValueError, KeyError):
                    say(f"5. iperf3 failed: {r.stderr.strip() or r.stdout[-300:]}")
            finally:
                server.kill()
                server.wait()
        else:
            say("5. (iperf3 not installed, throughput skipped)")

        say("6. overlay status (host a):")
        out = ns["a"].run(sys.executable, "-m", "overlay.cli", "status", f"{prefix}a").stdout
        say("   " + "\n   ".join(out.splitlines()))
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for n in ns.values():
            n.delete()
        sweep(prefix)
        shutil.rmtree(workdir, ignore_errors=True)
        say("7. Torn down: agents stopped, namespaces and configs removed.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="overlay-lab demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=3, help="iperf3 duration (default 3)")
    p.add_argument("--pings", type=int, default=10, help="pings per address family (default 10)")
    p.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 1
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
