"""Two-namespace topologies and real tunnel processes for the tunnel tests,
the interop tests, the demo-like benchmark.

Host "a" and host "b" are joined by N veth links (created inside the
namespaces; nothing touches the root namespace). Link i carries
203.0.113.(16*i+1|2)/28 and 2001:db8:i+1::1|2/64, so a peer can be given one
endpoint per link and links can be cut one by one. Faults are injected with nft
drops on b's input (a silent blackhole, as a dead path looks on the internet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from overlay import keys
from overlay.control import socket_is_live
from overlay.lab.netns import Namespace

REPO = Path(__file__).resolve().parents[2]
WG_DIR = "/var/run/wireguard"


@dataclass
class Link:
    index: int
    a4: str
    b4: str
    a6: str
    b6: str
    a_dev: str
    b_dev: str


@dataclass
class Pair:
    a: Namespace
    b: Namespace
    links: list[Link]

    def delete(self) -> None:
        for ns in (self.a, self.b):
            ns.delete()


def build_pair(prefix: str, links: int = 1) -> Pair:
    a = Namespace(f"{prefix}a")
    b = Namespace(f"{prefix}b")
    made: list[Namespace] = []
    try:
        for ns in (a, b):
            ns.create()
            made.append(ns)
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", 0)
        out = []
        for i in range(links):
            a_dev, b_dev = f"ab{i}", f"ba{i}"
            a.run("ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name)
            link = Link(i, f"203.0.113.{16 * i + 1}", f"203.0.113.{16 * i + 2}",
                        f"2001:db8:{i + 1}::1", f"2001:db8:{i + 1}::2", a_dev, b_dev)
            a.run("ip", "addr", "add", f"{link.a4}/28", "dev", a_dev)
            b.run("ip", "addr", "add", f"{link.b4}/28", "dev", b_dev)
            a.run("ip", "-6", "addr", "add", f"{link.a6}/64", "dev", a_dev, "nodad")
            b.run("ip", "-6", "addr", "add", f"{link.b6}/64", "dev", b_dev, "nodad")
            a.run("ip", "link", "set", a_dev, "up")
            b.run("ip", "link", "set", b_dev, "up")
            out.append(link)
        return Pair(a, b, out)
    except BaseException:
        for ns in made:
            ns.delete()
        raise


# ---------------------------------------------------------------------------
# tunnel endpoints: tunnel addresses and keys
# ---------------------------------------------------------------------------

TUN4 = {"a": "10.77.0.1", "b": "10.77.0.2"}
TUN6 = {"a": "fd77::1", "b": "fd77::2"}


@dataclass
class Identity:
    private: bytes = field(default_factory=keys.generate_private_key, repr=False)

    @property
    def public(self) -> bytes:
        return keys.public_key(self.private)

    @property
    def public_b64(self) -> str:
        return keys.encode(self.public)


def agent_config(me: str, my_id: Identity, peer_id: Identity, *, listen_port: int | None,
                 endpoints: list[str], keepalive: int = 0, psk: bytes | None = None) -> str:
    other = "b" if me == "a" else "a"
    lines = [
        "[Interface]",
        f"PrivateKey = {keys.encode(my_id.private)}",
        f"Address = {TUN4[me]}/24, {TUN6[me]}/64",
    ]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    lines += ["", "[Peer]", f"PublicKey = {peer_id.public_b64}",
              f"AllowedIPs = {TUN4[other]}/32, {TUN6[other]}/128"]
    if psk is not None:
        lines.append(f"PresharedKey = {keys.encode(psk)}")
    if endpoints:
        lines.append("Endpoint = " + ", ".join(endpoints))
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"


def ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------




def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class TunnelProcess:
    """A running `overlay up` or `wireguard-go` in a namespace."""

    def __init__(self, ns: Namespace, ifname: str, proc: subprocess.Popen, log_path: Path):
        self.ns = ns
        self.ifname = ifname
        self.proc = proc
        self.log_path = log_path

    @property
    def socket_path(self) -> str:
        return f"{WG_DIR}/{self.ifname}.sock"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 20) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.ifname} exited {self.proc.returncode}:\n{self.log()}")
            return socket_is_live(self.socket_path)

        wait_until(ready, timeout, f"{self.ifname} UAPI socket")

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            # `ip netns exec` execs the program, so this signals the tunnel itself.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_agent(ns: Namespace, conf_dir: Path, ifname: str, config_text: str,
                extra: list[str] | None = None) -> TunnelProcess:
    conf = conf_dir / f"{ifname}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
    log_path = conf_dir / f"{ifname}.log"
    logf = open(log_path, "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = ns.popen([sys.executable, "-m", "overlay.cli", "up", str(conf), *(extra or [])],
                    stdout=logf, stderr=subprocess.STDOUT, env=env)
    logf.close()
    return TunnelProcess(ns, ifname, proc, log_path)


def start_wireguard_go(ns: Namespace, conf_dir: Path, ifname: str, me: str, my_id: Identity,
                       peer_id: Identity, *, listen_port: int, endpoints: list[str],
                       keepalive: int = 0) -> TunnelProcess:
    """wireguard-go configured the stock way: `wg setconf` + `ip addr`/`ip link`."""
    log_path = conf_dir / f"{ifname}.log"
    logf = open(log_path, "wb")
    env = dict(os.environ, LOG_LEVEL="error")
    proc = ns.popen(["wireguard-go", "-f", ifname], stdout=logf, stderr=subprocess.STDOUT, env=env)
    logf.close()
    tp = TunnelProcess(ns, ifname, proc, log_path)
    try:
        tp.wait_ready()
        other = "b" if me == "a" else "a"
        wgconf = [
            "[Interface]", f"PrivateKey = {keys.encode(my_id.private)}", f"ListenPort = {listen_port}",
            "[Peer]", f"PublicKey = {peer_id.public_b64}", f"AllowedIPs = {TUN4[other]}/32, {TUN6[other]}/128",
        ]
        if endpoints:
            wgconf.append(f"Endpoint = {endpoints[0]}")  # stock WireGuard: one endpoint
        if keepalive:
            wgconf.append(f"PersistentKeepalive = {keepalive}")
        path = conf_dir / f"{ifname}.wg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(wgconf) + "\n")
        ns.run("wg", "setconf", ifname, str(path))
        ns.run("ip", "addr", "add", f"{TUN4[me]}/24", "dev", ifname)
        ns.run("ip", "-6", "addr", "add", f"{TUN6[me]}/64", "dev", ifname, "nodad")
        ns.run("ip", "link", "set", ifname, "mtu", "1420", "up")
    except BaseException:
        tp.stop()
        raise
    return tp


def wait_tunnel_addresses(ns: Namespace, ifname: str, timeout: float = 10) -> None:
    """Wait until the tunnel interface is up with its IPv6 address usable."""
    def ok():
        out = ns.run("ip", "-o", "addr", "show", "dev", ifname, check=False).stdout
        return "inet " in out and "inet6 fd77" in out and "tentative" not in out
    wait_until(ok, timeout, f"addresses on {ifname}")


# ---------------------------------------------------------------------------
# traffic
# ---------------------------------------------------------------------------


def ping(ns: Namespace, addr: str, count: int = 3, timeout: float = 20, interval: float = 0.2):
    return ns.run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", addr,
                  check=False, timeout=timeout)


def ping_until(ns: Namespace, addr: str, timeout: float = 20) -> None:
    """First contact: the handshake may take a moment; wait until one ping answers."""
    def one():
        return ping(ns, addr, count=1, timeout=5).returncode == 0
    wait_until(one, timeout, f"ping {addr}", interval=0.2)


TRANSFER_SCRIPT = REPO / "tests" / "netns" / "transfer.py"


class Transfer:
    """One TCP connection carrying `size` random bytes, sha256 checked at both ends.

    `rate` (bytes/s) stretches the transfer over time, so a path can be cut while
    it runs; the single connection must survive (no reconnect is attempted).
    """

    def __init__(self, src: Namespace, dst: Namespace, addr: str, port: int, size: int,
                 rate: int | None = None):
        self.server = dst.popen([sys.executable, str(TRANSFER_SCRIPT), "serve", addr, str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()  # "listening"
        if "listening" not in line:
            self.server.kill()
            raise RuntimeError(f"transfer server failed: {line}{self.server.stderr.read()}")
        args = [sys.executable, str(TRANSFER_SCRIPT), "send", addr, str(port), str(size)]
        if rate:
            args.append(str(rate))
        self.client = src.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 60) -> tuple[str, str]:
        try:
            c_out, c_err = self.client.communicate(timeout=timeout)
            s_out, s_err = self.server.communicate(timeout=10)
        finally:
            for p in (self.client, self.server):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if self.client.returncode != 0 or self.server.returncode != 0:
            raise AssertionError(f"transfer failed: client {self.client.returncode} {c_err.strip()} "
                                 f"server {self.server.returncode} {s_err.strip()}")
        return c_out.strip(), s_out.strip()

    def kill(self) -> None:
        for p in (self.client, self.server):
            if p.poll() is None:
                p.kill()
                p.wait()


def blackhole(ns: Namespace, table: str, addrs: list[str]) -> None:
    """Silently drop UDP arriving at `addrs` in `ns` (a dead path, no ICMP)."""
    rules = []
    for a in addrs:
        fam = "ip6" if ":" in a else "ip"
        rules.append(f"    {fam} daddr {a} meta l4proto udp drop")
    ns.nft(f"table inet {table} {{\n  chain input {{\n    type filter hook input priority -10;\n"
           + "\n".join(rules) + "\n  }\n}\n")


def unblackhole(ns: Namespace, table: str) -> None:
    ns.run("nft", "delete", "table", "inet", table, check=False)


def cut_link(pair: Pair, link: Link, table: str | None = None) -> str:
    """Blackhole one link's UDP in both directions; returns the nft table name."""
    table = table or f"cut{link.index}"
    blackhole(pair.b, table, [link.b4, link.b6])
    blackhole(pair.a, table, [link.a4, link.a6])
    return table


def heal_link(pair: Pair, table: str) -> None:
    unblackhole(pair.a, table)
    unblackhole(pair.b, table)


def status_json(ns: Namespace, ifname: str) -> dict:
    import json

    r = ns.run(sys.executable, "-m", "overlay.cli", "status", ifname, "--json")
    return json.loads(r.stdout)


def peer_status(ns: Namespace, ifname: str) -> dict:
    (peer,) = status_json(ns, ifname)["peers"]
    return peer


class AgentPair:
    """Two `overlay up` processes (or one and a wireguard-go) that always get stopped."""

    def __init__(self):
        self.procs: list[TunnelProcess] = []

    def add(self, tp: TunnelProcess) -> TunnelProcess:
        self.procs.append(tp)
        return tp

    def logs(self) -> str:
        return "\n".join(f"--- {p.ifname} ---\n{p.log()[-4000:]}" for p in self.procs)

    def stop(self) -> list[int | None]:
        return [p.stop() for p in self.procs]

    def __enter__(self) -> AgentPair:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
