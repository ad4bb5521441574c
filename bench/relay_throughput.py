"""Relay benchmark: overlay-relay against coturn (turnserver) on loopback, in one run. Not a test.

Prints two tables:

1. Relayed packets per second: C clients each hold an allocation with a channel
   bound to its own peer socket and send 1400-byte ChannelData as fast as the
   generator can (UDP GSO: one sendmsg carries 32 datagrams); the peers count what
   arrives. Reported: packets/s on the wall clock, and packets per CPU-second of the
   server process (utime+stime from /proc) — the second is the fair "one core"
   figure on a shared, noisy machine. coturn runs single-threaded (-m 0).
   overlay-relay runs twice: with --no-gro (one receive per datagram, like coturn:
   the like-for-like row and ratio) and with UDP GRO (its default), where a sender
   using GSO — this generator, and the overlay agent — costs one receive per burst.
2. Concurrent allocations: a pipelined allocator (epoll, thousands of Allocate
   transactions in flight, each from its own source address) allocates until the
   target or the server's limit, then reads the server's RSS: bytes per allocation.

Everything is on 127.0.0.0/8, bounded in count and time, and stops by itself.
Usage: python bench/relay_throughput.py [--seconds 4] [--clients 8] [--allocations 19000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay.stun import client as sc  # noqa: E402
from overlay.stun import message as m  # noqa: E402
from overlay.stun.credentials import make_rest_credentials, rest_password  # noqa: E402

SECRET = "bench-secret"
PAYLOAD = 1400
UDP_SEGMENT = 103
SEGMENTS = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- servers -----------------------------------------------------------------------------------

class Server:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(0.3)
                    s.sendto(sc.binding_request().encode(), ("127.0.0.1", self.port))
                    s.recv(2048)
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer STUN")


class OverlayRelay(Server):
    """Without UDP GRO: each ChannelData datagram costs the relay one receive, as with coturn."""

    name = "overlay-relay"
    extra: list[str] = ["--no-gro"]

    def start(self) -> None:
        data = self.workdir / "overlay-relay"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay_server.cli", "serve", "--data-dir", str(data), "--listen", "127.0.0.1",
             "--port", str(self.port), "--tls-port", "-1", "--http-listen", "127.0.0.1", "--http-port", "0",
             "--secret", SECRET, "--allow-loopback-peers", "--max-allocations-per-user", "1000000",
             "--log-level", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "overlay-relay.log", "ab"),
            cwd=str(Path(__file__).resolve().parents[1]))
        self.wait_ready()


class OverlayRelayGro(OverlayRelay):
    """With UDP GRO (the default): a client sending with GSO, as the overlay agent does and as
    this generator does, hands the relay a whole run of frames per receive. Not like-for-like
    with coturn, which reads one datagram at a time; shown separately."""

    name = "overlay-relay+GRO"
    extra: list[str] = []


class Coturn(Server):
    name = "coturn"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["turnserver", "-n", "--no-cli", "--listening-ip=127.0.0.1", f"--listening-port={self.port}",
             "--relay-ip=127.0.0.1", "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=bench",
             "--allow-loopback-peers", "--no-tls", "--no-dtls", "--relay-threads=0", "--min-port=10000",
             "--max-port=65000", f"--pidfile={self.workdir}/coturn.pid", f"--log-file={self.workdir}/coturn.log",
             "--no-stdout-log", "--simple-log", "--stale-nonce=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()


# -- pipelined TURN client ------------------------------------------------------------------------

class Pending:
    __slots__ = ("sock", "stage", "txid", "sent_at", "tries", "key", "nonce", "realm", "relayed", "username")

    def __init__(self, sock: socket.socket, username: str) -> None:
        self.sock = sock
        self.stage = 0
        self.txid = b""
        self.sent_at = 0.0
        self.tries = 0
        self.key = b""
        self.nonce = b""
        self.realm = ""
        self.relayed = None
        self.username = username


def allocate_many(server_port: int, sockets: list[socket.socket], password_for, timeout: float = 20.0,
                  window: int = 2000) -> list[Pending]:
    """Allocate one relayed address per socket, `window` transactions in flight. Returns successes."""
    creds = make_rest_credentials(SECRET, "bench", 3600)
    ep = select.epoll()
    todo = [Pending(s, creds.username) for s in sockets]
    by_fd = {p.sock.fileno(): p for p in todo}
    done: list[Pending] = []
    in_flight: dict[int, Pending] = {}
    queue = list(reversed(todo))
    server = ("127.0.0.1", server_port)
    deadline = time.monotonic() + timeout

    def send(p: Pending) -> None:
        req = sc.allocate_request()
        p.txid = req.transaction_id
        if p.stage == 0:
            data = req.encode()
        else:
            sc.add_auth(req, p.username, p.realm, p.nonce)
            data = req.encode(key=p.key)
        p.sent_at = time.monotonic()
        p.tries += 1
        try:
            p.sock.sendto(data, server)
        except OSError:
            pass

    while (queue or in_flight) and time.monotonic() < deadline:
        while queue and len(in_flight) < window:
            p = queue.pop()
            ep.register(p.sock.fileno(), select.EPOLLIN)
            in_flight[p.sock.fileno()] = p
            send(p)
        for fd, _ in ep.poll(0.05):
            p = by_fd[fd]
            try:
                data = p.sock.recv(2048)
                msg = m.parse(data)
            except (OSError, m.StunError):
                continue
            if msg.transaction_id != p.txid:
                continue
            if msg.cls == m.SUCCESS:
                p.relayed = msg.xor_address(m.XOR_RELAYED_ADDRESS)
                done.append(p)
            else:
                err = msg.error_code()
                if err and err[0] in (401, 438) and p.stage < 3:
                    p.stage += 1
                    p.realm = (msg.get(m.REALM) or b"").decode()
                    p.nonce = msg.get(m.NONCE) or b""
                    p.key = m.long_term_key(p.username, p.realm, password_for(p.username))
                    p.tries = 0
                    send(p)
                    continue
            ep.unregister(fd)
            del in_flight[fd]
        now = time.monotonic()
        for fd, p in list(in_flight.items()):
            if now - p.sent_at > 1.0:
                if p.tries >= 4:
                    ep.unregister(fd)
                    del in_flight[fd]
                else:
                    send(p)
    ep.close()
    return done


def request(p: Pending, msg: m.Message, server: tuple[str, int]) -> m.Message:
    sc.add_auth(msg, p.username, p.realm, p.nonce)
    p.sock.settimeout(2)
    for _ in range(3):
        p.sock.sendto(msg.encode(key=p.key), server)
        try:
            while True:
                reply = m.parse(p.sock.recv(2048))
                if reply.transaction_id == msg.transaction_id:
                    return reply
        except socket.timeout:
            continue
    raise RuntimeError("no answer")


# -- benchmarks ------------------------------------------------------------------------------------

def packet_rate(server: Server, clients: int, seconds: float, direction: str = "to_peer") -> dict:
    """`to_peer`: clients send ChannelData, peers count; `to_client`: peers send UDP to the
    relayed addresses, clients count the ChannelData the relay makes of it."""
    socks = []
    for _ in range(clients):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        socks.append(s)
    allocs = allocate_many(server.port, socks, lambda u: rest_password(SECRET, u))
    if len(allocs) != clients:
        raise RuntimeError(f"{server.name}: only {len(allocs)}/{clients} allocations")
    peers = []
    for i, p in enumerate(allocs):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        try:
            peer.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
        except OSError:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        peer.setblocking(False)
        reply = request(p, sc.channel_bind_request(0x4000, peer.getsockname()), ("127.0.0.1", server.port))
        if reply.cls != m.SUCCESS:
            raise RuntimeError(f"{server.name}: ChannelBind failed {reply.error_code()}")
        p.sock.setblocking(False)
        peers.append(peer)
    if direction == "to_peer":
        frame = struct.pack("!HH", 0x4000, PAYLOAD) + os.urandom(PAYLOAD)
        senders = [(p.sock, ("127.0.0.1", server.port)) for p in allocs]
        receivers = peers
    else:
        frame = os.urandom(PAYLOAD)
        senders = [(peer, tuple(p.relayed)) for peer, p in zip(peers, allocs)]
        receivers = [p.sock for p in allocs]
        for r in receivers:
            try:
                r.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
            except OSError:
                r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    burst = frame * SEGMENTS
    gso = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(frame)))]
    buf = bytearray(2048)
    received = sent = 0
    ep = select.epoll()
    for r in receivers:
        ep.register(r.fileno(), select.EPOLLIN)
    by_fd = {r.fileno(): r for r in receivers}

    def drain() -> int:
        n = 0
        for fd, _ in ep.poll(0):
            recv = by_fd[fd].recv_into
            try:
                while True:
                    recv(buf)
                    n += 1
            except BlockingIOError:
                pass
        return n

    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        for sock, dest in senders:
            try:
                sock.sendmsg([burst], gso, 0, dest)
                sent += SEGMENTS
            except BlockingIOError:
                pass
        received += drain()
    stop_t = time.monotonic()
    time.sleep(0.3)
    received += drain()
    elapsed = stop_t - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0
    for s in socks + peers:
        s.close()
    return {"sent": sent, "received": received, "seconds": elapsed, "server_cpu": cpu,
            "pps": received / elapsed, "pps_per_cpu": received / cpu if cpu else 0.0}


def allocation_capacity(server: Server, target: int, batch: int = 2000) -> dict:
    rss0 = rss_bytes(server.proc.pid)
    total = 0
    t0 = time.monotonic()
    batch_no = 0
    failures = 0
    while total < target and time.monotonic() - t0 < 120:
        want = min(batch, target - total)
        socks = []
        # Each batch from a fresh loopback source address, so closed sockets' ports never collide.
        src = f"127.1.{batch_no // 250}.{batch_no % 250 + 1}"
        batch_no += 1
        for _ in range(want):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.setblocking(False)
            socks.append(s)
        ok = allocate_many(server.port, socks, lambda u: rest_password(SECRET, u), timeout=30)
        for s in socks:
            s.close()  # UDP allocations outlive the client socket (until their lifetime ends)
        total += len(ok)
        if len(ok) < want:
            failures += want - len(ok)
            break  # the server reached its limit
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    rss1 = rss_bytes(server.proc.pid)
    return {"allocations": total, "seconds": elapsed, "rate": total / elapsed if elapsed else 0.0,
            "rss_before": rss0, "rss_after": rss1,
            "bytes_per_allocation": (rss1 - rss0) / total if total else 0.0, "failed": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--allocations", type=int, default=19000)
    ap.add_argument("--skip-coturn", action="store_true")
    ap.add_argument("--skip-allocations", action="store_true", help="only the packet-rate runs")
    ap.add_argument("--json", action="store_true", help="print raw results as JSON too")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    results: dict[str, dict] = {}
    kinds = [OverlayRelay, OverlayRelayGro] + ([] if args.skip_coturn else [Coturn])
    with tempfile.TemporaryDirectory(prefix="relaybench") as tmp:
        for kind in kinds:
            phases = ("rate",) if kind is OverlayRelayGro or args.skip_allocations else ("rate", "alloc")
            for phase in phases:
                server = kind(Path(tmp))
                try:
                    server.start()
                    if phase == "rate":
                        results.setdefault(kind.name, {})["rate"] = packet_rate(server, args.clients, args.seconds)
                        results[kind.name]["rate_back"] = packet_rate(server, args.clients, args.seconds, "to_client")
                    else:
                        results[kind.name]["alloc"] = allocation_capacity(server, args.allocations)
                except Exception as exc:  # report and carry on with the other server
                    results.setdefault(kind.name, {})[phase] = {"error": str(exc)}
                finally:
                    server.stop()

    print(f"\nRelayed 1400-byte payloads, {args.clients} clients, {args.seconds:.0f} s per run "
          f"(loopback, {os.cpu_count()} shared cores)")
    print(f"{'server':18} {'direction':26} {'sent':>9} {'relayed':>9} {'pkt/s':>8} {'CPU s':>6} {'pkt/CPU-s':>10} {'µs/pkt':>7}")
    for name, r in results.items():
        for key, label in (("rate", "client->ChannelData->peer"), ("rate_back", "peer->ChannelData->client")):
            x = r.get(key, {})
            if not x or "error" in x:
                print(f"{name:18} {label:26} error: {x.get('error')}")
                continue
            us = 1e6 / x["pps_per_cpu"] if x["pps_per_cpu"] else float("nan")
            print(f"{name:18} {label:26} {x['sent']:>9} {x['received']:>9} {x['pps']:>8.0f} {x['server_cpu']:>6.2f} "
                  f"{x['pps_per_cpu']:>10.0f} {us:>7.1f}")
    print(f"\nConcurrent allocations (target {args.allocations}, pipelined allocator)")
    print(f"{'server':15} {'allocations':>12} {'alloc/s':>9} {'RSS before MB':>14} {'RSS after MB':>13} {'bytes/alloc':>12}")
    for name, r in results.items():
        if name == OverlayRelayGro.name:
            continue
        x = r.get("alloc", {})
        if not x:
            continue
        if "error" in x:
            print(f"{name:15} error: {x['error']}")
            continue
        print(f"{name:15} {x['allocations']:>12} {x['rate']:>9.0f} {x['rss_before'] / 2**20:>14.1f} "
              f"{x['rss_after'] / 2**20:>13.1f} {x['bytes_per_allocation']:>12.0f}")
    ours, theirs = results.get("overlay-relay", {}), results.get("coturn", {})
    gro = results.get(OverlayRelayGro.name, {})
    if ours and theirs and "pps" in ours.get("rate", {}) and "pps" in theirs.get("rate", {}):
        print("\nRatios overlay-relay / coturn:")
        for key, label in (("rate", "client->peer"), ("rate_back", "peer->client")):
            o, t = ours.get(key, {}), theirs.get(key, {})
            if "pps" in o and "pps" in t and t["pps"] and t["pps_per_cpu"]:
                print(f"  {label:13} pkt/s (wall clock)     {o['pps'] / t['pps']:.2f}")
                print(f"  {label:13} pkt per server CPU-s   {o['pps_per_cpu'] / t['pps_per_cpu']:.2f}")
        g, t = gro.get("rate", {}), theirs.get("rate", {})
        if "pps" in g and t.get("pps_per_cpu"):
            print(f"  with GRO, client->peer per CPU-s  {g['pps_per_cpu'] / t['pps_per_cpu']:.2f}  (not like-for-like)")
        oa, ta = ours.get("alloc", {}), theirs.get("alloc", {})
        if oa.get("allocations") and ta.get("allocations"):
            print(f"  concurrent allocations          {oa['allocations'] / ta['allocations']:.2f}")
            if ta["bytes_per_allocation"]:
                print(f"  memory per allocation           {oa['bytes_per_allocation'] / ta['bytes_per_allocation']:.2f}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
