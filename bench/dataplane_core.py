"""Per-packet cost of the sans-I/O core alone (no sockets): encrypt a burst of
full-size TCP packets with one Device, decrypt them with another, coalesce.

    python bench/dataplane_core.py [--packets 64] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import struct
import time

from overlay.net import offload
from overlay.wireguard.device import Device

A = ("192.0.2.1", 51820)
B = ("192.0.2.2", 51820)


def tcp_packet(seq: int, size: int = 1420) -> bytes:
    payload = bytes(size - 52)
    tcp = struct.pack("!HHIIBBHHH", 5001, 40000, seq, 1, 8 << 4, 0x10, 500, 0, 0) + bytes(12)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 6, 0,
                     ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed)
    return ip + tcp + payload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    a, b = Device(os.urandom(32)), Device(os.urandom(32))
    a.set_peer(b.public_key, 0, endpoints=[B], allowed_ips=[ipaddress.ip_network("10.0.0.2/32")])
    b.set_peer(a.public_key, 0, endpoints=[A], allowed_ips=[ipaddress.ip_network("10.0.0.1/32")])
    out = a.tun_packets([tcp_packet(0)], 1.0)
    _, resp = b.datagrams([(out[0][0], A)], 1.0)
    _, ka = a.datagrams([(resp[0][0], B)], 1.0)
    b.datagrams([(m, A) for m, _ in ka], 1.0)
    burst = [memoryview(tcp_packet(i * 1368)) for i in range(args.packets)]
    t_enc = t_dec = t_co = 0.0
    for r in range(args.rounds):
        now = 2.0 + r * 1e-4
        t0 = time.perf_counter()
        sent = a.tun_packets(burst, now)
        t1 = time.perf_counter()
        received = [(memoryview(m), A) for m, _ in sent]  # as the UDP shell hands them over
        t2 = time.perf_counter()
        pkts, _ = b.datagrams(received, now)
        t3 = time.perf_counter()
        offload.coalesce(pkts)
        t4 = time.perf_counter()
        t_enc += t1 - t0
        t_dec += t3 - t2
        t_co += t4 - t3
        assert len(pkts) == args.packets
    n = args.packets * args.rounds
    print(f"per packet: encrypt path {t_enc / n * 1e6:.2f} us, decrypt path {t_dec / n * 1e6:.2f} us, "
          f"coalesce {t_co / n * 1e6:.2f} us")


if __name__ == "__main__":
    main()
