"""Helpers for the WireGuard core unit tests: deterministic devices, IP packets,
and a tiny in-memory network that carries datagrams between Device instances."""

from __future__ import annotations

import ipaddress
import random
import struct

from overlay.wireguard.device import Device

WALL = 1_700_000_000.0
A1 = ("192.0.2.1", 51820)
B1 = ("192.0.2.2", 51820)
B2 = ("2001:db8::2", 51820)
B3 = ("198.51.100.2", 4500)


def make_device(seed: int, **kw) -> Device:
    rng = random.Random(seed).randbytes
    return Device(rng(32), rng=rng, wall_clock=lambda t: WALL + t, **kw)


def ip4(src: str, dst: str, payload: bytes = b"ping" * 5) -> bytes:
    total = 20 + len(payload)
    return (bytes([0x45, 0]) + struct.pack(">H", total) + bytes(4) + bytes([64, 17, 0, 0])
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload)


def ip6(src: str, dst: str, payload: bytes = b"ping" * 5) -> bytes:
    return (bytes([0x60, 0, 0, 0]) + struct.pack(">HBB", len(payload), 17, 64)
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload)


def net(s: str):
    return ipaddress.ip_network(s)


class Net:
    """Endpoints -> devices. A reply leaves from the address its trigger arrived on."""

    def __init__(self) -> None:
        self.hosts: dict[object, Device] = {}
        self.blocked: set[object] = set()
        self.delivered: list[tuple[bytes, object, object]] = []  # (msg, src, dst)
        self.tun: dict[Device, list[bytes]] = {}

    def add(self, dev: Device, *endpoints) -> None:
        for e in endpoints:
            self.hosts[e] = dev
        self.tun.setdefault(dev, [])

    def send(self, out, src, now: float, depth: int = 0) -> None:
        for msg, dst in out:
            if dst in self.blocked or src in self.blocked or dst not in self.hosts:
                continue
            self.delivered.append((bytes(msg), src, dst))
            dev = self.hosts[dst]
            pkts, replies = dev.datagrams([(msg, src)], now)
            self.tun[dev].extend(pkts)
            if depth < 10:
                self.send(replies, dst, now, depth + 1)


def pair(**kw):
    """Two devices, A (at A1) knowing B's endpoint B1, B knowing no endpoint of A."""
    a, b = make_device(1, **kw), make_device(2, **kw)
    a.set_peer(b.public_key, 0.0, endpoints=[B1], allowed_ips=[net("10.0.0.2/32"), net("fd00::2/128")])
    b.set_peer(a.public_key, 0.0, allowed_ips=[net("10.0.0.1/32"), net("fd00::1/128")])
    n = Net()
    n.add(a, A1)
    n.add(b, B1)
    return a, b, n


def handshake(a: Device, b: Device, n: Net, now: float = 1.0, src=A1) -> None:
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], now)
    n.send(out, src, now)
