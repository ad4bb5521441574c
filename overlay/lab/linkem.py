"""A userspace link emulator: loss, delay and jitter between two interfaces.

Used when the kernel has no `sch_netem` (this project's CI kernel lacks it).
The lab splices a link by renaming the port that leads to the node, adding a
fresh veth pair in its place, and running this program between the two:
every Ethernet frame read from one side is dropped with probability `loss`
or written to the other side after `delay ± jitter` milliseconds, in order.

Frames are read and written with a virtio-net header (PACKET_VNET_HDR), so
GSO super-frames and partial checksums pass through unchanged instead of
failing as oversized.

    python -m overlay.lab.linkem NODE_SIDE BRIDGE_SIDE --egress L,D,J [--ingress L,D,J]
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Profile:
    loss: float = 0.0  # percent
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Profile:
        loss, delay, jitter = (float(x) for x in text.split(","))
        return cls(loss, delay, jitter)

    def __str__(self) -> str:
        return f"{self.loss},{self.delay_ms},{self.jitter_ms}"


def _open(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernels: outgoing frames are filtered by pkttype below
    sock.bind((ifname, ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    return sock


def run(node_side: str, bridge_side: str, egress: Profile, ingress: Profile, seed: int | None = None) -> None:
    rng = random.Random(seed)
    a, b = _open(node_side), _open(bridge_side)
    print("ready", flush=True)  # the lab waits for this before it lets traffic flow
    # Frames from the node leave through the bridge side, and the reverse.
    routes = {a.fileno(): (b, egress), b.fileno(): (a, ingress)}
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    last_release = {a.fileno(): 0.0, b.fileno(): 0.0}
    seq = 0
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop:
        now = time.monotonic()
        wait = max(0.0, queue[0][0] - now) if queue else 0.5
        try:
            readable, _, _ = select.select([a, b], [], [], wait)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in readable:
            out, prof = routes[sock.fileno()]
            for _ in range(64):  # drain a burst before looking at the clock again
                try:
                    frame, addr = sock.recvfrom(65536 + 64)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if prof.loss and rng.random() * 100 < prof.loss:
                    continue
                delay = prof.delay_ms + (rng.uniform(-prof.jitter_ms, prof.jitter_ms) if prof.jitter_ms else 0)
                release = now + max(0.0, delay) / 1000
                # Keep each direction in order, as a single link would.
                release = max(release, last_release[out.fileno()])
                last_release[out.fileno()] = release
                if release <= now and not queue:
                    _send(out, frame)
                else:
                    heapq.heappush(queue, (release, seq, out, frame))
                    seq += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            _send(out, frame)


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:
        pass  # a full queue or a link going away: the frame is lost, as on a wire


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overlay.lab.linkem", description=__doc__.splitlines()[0])
    p.add_argument("node_side")
    p.add_argument("bridge_side")
    p.add_argument("--egress", type=Profile.parse, default=Profile(), help="loss%%,delay_ms,jitter_ms from the node")
    p.add_argument("--ingress", type=Profile.parse, default=Profile(), help="loss%%,delay_ms,jitter_ms to the node")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    run(args.node_side, args.bridge_side, args.egress, args.ingress, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
