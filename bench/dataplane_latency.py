"""Per-packet CPU cost of the agent's single-packet path, on real fds.

    sudo .venv/bin/python bench/dataplane_latency.py [--packets 3000]

A ping's time inside the agent is two readiness callbacks per host: a TUN
read that is encrypted and sent, and a UDP receive that is decrypted and
written to the TUN. This drives exactly those callbacks of a real Agent (TUN
device in a throwaway namespace `ovlat<pid>`, UDP sockets on loopback) against a
sans-I/O Device as the peer, one packet at a time, and reports the median
time per callback. The kernel's share (the syscalls) is included, the event
loop's wakeup is not. Each call is timed with `perf_counter_ns`; run it
several times on a shared machine and compare the lower figures.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overlay.lab.netns import Namespace  # noqa: E402

A_TUN, B_TUN = "10.79.0.1", "10.79.0.2"


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    total = 28 + len(payload)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr) + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


async def bursts(agent, b_dev, b_sock, app, app_port: int, burst: int, rounds: int) -> None:
    """The throughput shape: `burst` full-size packets per callback, each way.
    B's datagrams go out as one UDP GSO send, so the agent reads them as one
    GRO batch, as it does under iperf3."""
    from overlay.net.udp import UdpSockets

    pc = time.perf_counter_ns
    b_udp = UdpSockets(b_sock, None, b_sock.getsockname()[1])
    payload = bytes(1420 - 28)
    inner = ipv4_udp(B_TUN, A_TUN, 9, app_port, payload)
    sock4 = agent._udp.s4
    app.setblocking(False)
    b_sock.setblocking(False)
    t_out: list[int] = []
    t_in: list[int] = []
    for _ in range(rounds):
        for _ in range(burst):
            app.sendto(payload, (B_TUN, 9))
        t0 = pc()
        agent._on_tun_readable()
        t_out.append(pc() - t0)
        time.sleep(0.002)
        while True:  # B's socket: discard what arrived
            try:
                b_sock.recv(65535)
            except BlockingIOError:
                break
        out = b_dev.tun_packets([inner] * burst, time.monotonic())
        b_udp.send_batch(out, lambda ep, err: None)
        time.sleep(0.002)
        t0 = pc()
        agent._on_socket_readable(sock4)
        t_in.append(pc() - t0)
        while True:
            try:
                app.recv(65535)
            except BlockingIOError:
                break
    for name, vals in ((f"burst of {burst}: TUN -> UDP, per packet", t_out),
                       (f"burst of {burst}: UDP -> TUN, per packet", t_in)):
        print(f"{name:38} median {statistics.median(vals) / burst / 1000:7.2f} us   "
              f"min {min(vals) / burst / 1000:7.2f} us")


async def drive(packets: int, gap: float = 0.0, burst: int = 0) -> None:
    from overlay.agent import Agent
    from overlay.config import EndpointSpec, InterfaceConfig, PeerConfig
    from overlay.wireguard.device import Device

    b_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b_sock.bind(("127.0.0.1", 0))
    b_addr = b_sock.getsockname()
    a_priv, b_priv = os.urandom(32), os.urandom(32)
    b_dev = Device(b_priv, now=time.monotonic())
    cfg = InterfaceConfig(private_key=a_priv, listen_port=0,
                          addresses=[ipaddress.ip_interface(f"{A_TUN}/24")],
                          peers=[PeerConfig(public_key=b_dev.public_key,
                                            allowed_ips=[ipaddress.ip_network(f"{B_TUN}/32")],
                                            endpoints=[EndpointSpec(*b_addr)])])
    agent = Agent(cfg, "ovlat0")
    await agent.start()
    try:
        a_addr = ("127.0.0.1", agent.listen_port)
        b_dev.set_peer(agent.device.public_key, time.monotonic(), endpoints=[a_addr],
                       allowed_ips=[ipaddress.ip_network(f"{A_TUN}/32")])
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.bind((A_TUN, 0))
        app.settimeout(2)
        app_port = app.getsockname()[1]
        b_sock.settimeout(2)

        def b_receive() -> list[bytes]:
            data, src = b_sock.recvfrom(65535)
            pkts, out = b_dev.datagrams([(data, src)], time.monotonic())
            for msg, ep in out:
                b_sock.sendto(msg, ep)
            return pkts

        # Handshake: the first packet makes the agent initiate; B answers.
        app.sendto(b"x", (B_TUN, 9))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.05)
        await loop.run_in_executor(None, b_receive)
        await asyncio.sleep(0.05)
        sock4 = agent._udp.s4
        pc = time.perf_counter_ns
        t_out: list[int] = []
        t_in: list[int] = []
        inner = ipv4_udp(B_TUN, A_TUN, 9, app_port, bytes(56))
        for _ in range(packets):
            if gap:
                time.sleep(gap)  # let other work evict our caches, as between pings
            # TUN -> UDP: the kernel queues the app's datagram on the TUN.
            app.sendto(bytes(56), (B_TUN, 9))
            t0 = pc()
            agent._on_tun_readable()
            t_out.append(pc() - t0)
            b_receive()
            # UDP -> TUN: B seals a packet for A; the agent decrypts and writes it.
            for msg, ep in b_dev.tun_packets([inner], time.monotonic()):
                b_sock.sendto(msg, ep)
            t0 = pc()
            agent._on_socket_readable(sock4)
            t_in.append(pc() - t0)
            app.recv(65535)
        for name, vals in (("TUN read -> encrypt -> send", t_out),
                           ("UDP receive -> decrypt -> TUN write", t_in)):
            vals.sort()
            print(f"{name:38} median {statistics.median(vals) / 1000:7.1f} us   "
                  f"p10 {vals[len(vals) // 10] / 1000:7.1f} us")
        if burst:
            await bursts(agent, b_dev, b_sock, app, app_port, burst, max(packets // 10, 20))
    finally:
        await agent.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packets", type=int, default=3000)
    p.add_argument("--gap", type=float, default=0.0,
                   help="seconds to sleep between packets (0.02 = cold caches, as with ping)")
    p.add_argument("--burst", type=int, default=32,
                   help="also time bursts of this many full-size packets (0 = no)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        asyncio.run(drive(args.packets, args.gap, args.burst))
        return 0
    ns = Namespace(f"ovlat{os.getpid()}")
    ns.create()
    try:
        ns.run("ip", "link", "set", "lo", "up")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        r = subprocess.run(ns.argv([sys.executable, __file__, "--inside", "--packets",
                                    str(args.packets), "--gap", str(args.gap),
                                    "--burst", str(args.burst)]), check=False, env=env)
        return r.returncode
    finally:
        ns.delete()


if __name__ == "__main__":
    sys.exit(main())
