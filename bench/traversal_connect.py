"""Connecting through NATs: how fast two joined nodes get a working overlay, and what it carries.

    sudo .venv/bin/python bench/traversal_connect.py [--pairs full-cone--symmetric,...] [--seconds 5] [--coturn]

On the NAT lab (real `overlay-relay` and `overlay` processes, nftables NATs),
for every NAT pair of notes/natlab.md:

- ping:    seconds from launching the second node's `overlay up` to the first
           echo reply over the overlay (the first node pings it every 20 ms);
- direct:  seconds from the same moment until `overlay status --json` (polled
           every 50 ms) shows `path: direct` on both sides ("-" for pairs the
           table says must be relayed);
- Mbit/s:  iperf3 TCP through the direct path, and through the relayed path
           (for direct-capable pairs the direct path is then blackholed on the
           emulated internet and the agents must fall back to the relay).

In the same run, on the same lab, wireguard-go's tunnel (two stock peers with
static endpoints on a full-cone pair) gives the reference throughput. Targets
from the issue: ping < 1 s, direct < 2 s. Not a test: the figures depend on
the machine and on what else runs on it. Everything (namespaces with prefix
`ovtrbench`, processes) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overlay import control, keys  # noqa: E402
from overlay.lab import Host, Lab, Nat, sweep  # noqa: E402
from tests.traversal.matrix import EXPECTED, PAIRS, pair_id  # noqa: E402
from overlay.lab.processes import stop_process  # noqa: E402
from tests.traversal.scenario import Node, Scenario, ScenarioError  # noqa: E402

PREFIX = "ovtrbench"
IFPREFIX = "ovtb"
WG_TUN = {"a": "10.200.0.1", "b": "10.200.0.2"}
WG_PORT = 51900
NOT_MEASURED = float("nan")


@dataclass
class Row:
    pair: str
    expected: str
    ping_s: float = NOT_MEASURED
    direct_s: float = NOT_MEASURED
    direct_mbps: float = NOT_MEASURED
    relay_mbps: float = NOT_MEASURED
    note: str = ""


def iperf(client: Host, server: Host, server_ip: str, seconds: int) -> float:
    """iperf3 TCP client -> server, Mbit/s received."""
    srv = server.ns.popen(["iperf3", "-s", "-1", "-B", server_ip, "-p", "5201"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while f"{server_ip}:5201" not in server.ns.run("ss", "-Htln", check=False).stdout:
            if time.monotonic() > deadline:
                raise ScenarioError("iperf3 server did not start")
            time.sleep(0.05)
        out = client.ns.run("iperf3", "-c", server_ip, "-p", "5201", "-t", str(seconds), "-J",
                            check=False, timeout=seconds + 30)
        if out.returncode != 0:
            raise ScenarioError(f"iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        stop_process(srv)


class FirstReply(threading.Thread):
    """`ping -D` at 20 ms intervals; remembers the wall-clock time of the first reply."""

    def __init__(self, host: Host, target: str, timeout: float):
        super().__init__(daemon=True)
        self.proc = host.ns.popen(["ping", "-n", "-D", "-i", "0.02", "-W", "1", "-w", str(int(timeout)), target],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.at: float | None = None

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from", line)
            if m:
                self.at = float(m.group(1))
                break
        stop_process(self.proc, grace=1)


def both_direct(sc: Scenario, a: Node, b: Node) -> bool:
    try:
        pa, pb = sc.peer_status(a, b), sc.peer_status(b, a)
    except control.UapiClientError:
        return False
    return bool(pa and pb and pa.get("path") == "direct" and pb.get("path") == "direct")


def measure_pair(lab: Lab, sc: Scenario, nats: tuple[Nat, Nat], hosts: tuple[Host, Host],
                 pair: tuple[str, str], seconds: int, n: int) -> Row:
    row = Row(pair_id(pair), EXPECTED[pair])
    lab.set_nat(nats[0], pair[0], ipv6="nat66")
    lab.set_nat(nats[1], pair[1], ipv6="nat66")
    token = sc.token(f"bench{n}", uses=2)
    a, b = sc.join(hosts[0], token, "a"), sc.join(hosts[1], token, "b")
    try:
        sc.up(a)
        pinger = FirstReply(hosts[0], b.overlay_ipv4, timeout=30)
        launched = time.time()
        sc.up(b, wait=False)
        pinger.start()
        deadline = time.monotonic() + 30
        direct_at = None
        while time.monotonic() < deadline:
            if direct_at is None and row.expected == "direct" and both_direct(sc, a, b):
                direct_at = time.time()
            if pinger.at is not None and (direct_at is not None or row.expected != "direct"):
                break
            time.sleep(0.05)
        pinger.join(5)
        if pinger.at is None:
            row.note = "no ping reply within 30 s"
            return row
        row.ping_s = pinger.at - launched
        if direct_at is not None:
            row.direct_s = direct_at - launched
            row.direct_mbps = iperf(hosts[0], hosts[1], b.overlay_ipv4, seconds)
            lab.blackhole(nats[0], nats[1])
            # Traffic while the direct path dies, as a user's would be: an idle
            # tunnel has no reason to notice, and that is not what is measured here.
            traffic = hosts[0].ns.popen(["ping", "-n", "-q", "-i", "0.2", "-w", "40", b.overlay_ipv4],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                sc.wait_path(a, b, "relay", timeout=30)
                row.relay_mbps = iperf(hosts[0], hosts[1], b.overlay_ipv4, seconds)
            finally:
                stop_process(traffic)
                lab.unblackhole(nats[0], nats[1])
        elif row.expected == "direct":
            row.note = "never direct within 30 s"
        else:
            sc.wait_path(a, b, "relay", timeout=10)
            row.relay_mbps = iperf(hosts[0], hosts[1], b.overlay_ipv4, seconds)
    except ScenarioError as e:
        row.note = str(e).splitlines()[0][:80]
    finally:
        sc.stop(a)
        sc.stop(b)
    return row


def wireguard_go_mbps(lab: Lab, nats: tuple[Nat, Nat], hosts: tuple[Host, Host], workdir: Path,
                      seconds: int) -> float:
    """Two stock wireguard-go peers, each configured with the other's public (NAT) endpoint."""
    for nat in nats:
        lab.set_nat(nat, "full-cone", ipv6="nat66")
    ids = {side: keys.generate_private_key() for side in "ab"}
    procs = []
    try:
        for side, host, nat, other_nat in (("a", hosts[0], nats[0], nats[1]), ("b", hosts[1], nats[1], nats[0])):
            other = "b" if side == "a" else "a"
            ifname = f"{IFPREFIX}wg{side}"
            env = dict(os.environ, LOG_LEVEL="error")
            procs.append(host.ns.popen(["wireguard-go", "-f", ifname], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while not Path(f"/var/run/wireguard/{ifname}.sock").exists():
                if time.monotonic() > deadline:
                    raise ScenarioError("wireguard-go did not start")
                time.sleep(0.05)
            conf = workdir / f"{ifname}.wg"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[Interface]\nPrivateKey = {keys.encode(ids[side])}\nListenPort = {WG_PORT}\n"
                        f"[Peer]\nPublicKey = {keys.encode(keys.public_key(ids[other]))}\n"
                        f"AllowedIPs = {WG_TUN[other]}/32\nEndpoint = {other_nat.public_ipv4}:{WG_PORT}\n"
                        "PersistentKeepalive = 1\n")
            host.ns.run("wg", "setconf", ifname, str(conf))
            host.ns.run("ip", "addr", "add", f"{WG_TUN[side]}/24", "dev", ifname)
            host.ns.run("ip", "link", "set", ifname, "mtu", "1420", "up")
        deadline = time.monotonic() + 20
        while hosts[0].ns.run("ping", "-c1", "-W1", WG_TUN["b"], check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ScenarioError("wireguard-go peers never reached each other")
        return iperf(hosts[0], hosts[1], WG_TUN["b"], seconds)
    finally:
        for proc in procs:
            stop_process(proc)


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", help="comma-separated pair ids like full-cone--symmetric (default: all)")
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per measurement")
    p.add_argument("--coturn", action="store_true", help="relay through coturn (bring your own TURN)")
    args = p.parse_args(argv)
    for tool in ("iperf3", "wireguard-go", "wg", "nft", "conntrack"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    pairs = PAIRS if not args.pairs else [pp for pp in PAIRS if pair_id(pp) in args.pairs.split(",")]
    sweep(f"{PREFIX}-")
    workdir = Path(tempfile.mkdtemp(prefix="traversal-bench-"))
    rows: list[Row] = []
    lab = Lab(PREFIX)
    sc: Scenario | None = None
    try:
        lab.add_relay()
        nats = (lab.add_nat("na", "full-cone", ipv6="nat66"), lab.add_nat("nb", "full-cone", ipv6="nat66"))
        hosts = (lab.add_host("ha", nats[0]), lab.add_host("hb", nats[1]))
        sc = Scenario(lab, workdir, IFPREFIX)
        if args.coturn:
            sc.start_coturn(secret="bench-secret")
            turn = f"turn:{lab.relay.ipv4}:3478"  # type: ignore[union-attr]
            sc.start_relay(port=3490, secret="bench-secret", turn_urls=[f"{turn}?transport=udp", f"{turn}?transport=tcp"])
        else:
            sc.start_relay()
        for n, pair in enumerate(pairs):
            row = measure_pair(lab, sc, nats, hosts, pair, args.seconds, n)
            rows.append(row)
            print(f"  {row.pair}: ping {fmt(row.ping_s)} s, direct {fmt(row.direct_s)} s "
                  f"{row.note}", file=sys.stderr, flush=True)
        wg = wireguard_go_mbps(lab, nats, hosts, workdir, args.seconds)
    finally:
        if sc is not None:
            sc.close()
        lab.teardown()
    print(f"{'NAT pair':<34} {'expect':<7} {'ping s':>7} {'direct s':>9} {'direct Mbit/s':>14} "
          f"{'relay Mbit/s':>13}  note")
    for r in rows:
        print(f"{r.pair:<34} {r.expected:<7} {fmt(r.ping_s):>7} {fmt(r.direct_s):>9} {fmt(r.direct_mbps, 0):>14} "
              f"{fmt(r.relay_mbps, 0):>13}  {r.note}")
    print(f"{'wireguard-go (static endpoints, full-cone pair)':<61} {fmt(wg, 0):>14}")
    print(f"(TURN: {'coturn' if args.coturn else 'overlay-relay'}; targets: ping < 1 s, direct < 2 s, measured from launching the second `overlay up`; "
          f"iperf3 {args.seconds} s TCP; logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
