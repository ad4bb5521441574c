"""Cryptokey routing table: AllowedIPs with longest-prefix match, IPv4 and IPv6.

One dict per (family, prefix length) keyed by the network's top bits; a lookup
tries the lengths present from longest to shortest. Tables rarely hold more
than a handful of distinct lengths, so this beats a bit-trie in Python.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
V = TypeVar("V")


class _FamilyTable(Generic[V]):
    __slots__ = ("bits", "by_len", "lengths")

    def __init__(self, bits: int):
        self.bits = bits
        self.by_len: dict[int, dict[int, V]] = {}
        self.lengths: list[int] = []  # descending

    def insert(self, addr: int, plen: int, value: V) -> V | None:
        table = self.by_len.get(plen)
        if table is None:
            table = self.by_len[plen] = {}
            self.lengths = sorted(self.by_len, reverse=True)
        key = addr >> (self.bits - plen)
        old = table.get(key)
        table[key] = value
        return old

    def remove(self, addr: int, plen: int) -> V | None:
        table = self.by_len.get(plen)
        if table is None:
            return None
        old = table.pop(addr >> (self.bits - plen), None)
        if not table:
            del self.by_len[plen]
            self.lengths = sorted(self.by_len, reverse=True)
        return old

    def lookup(self, addr: int) -> V | None:
        bits = self.bits
        for plen in self.lengths:
            value = self.by_len[plen].get(addr >> (bits - plen))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[V]):
    """Maps networks to values (peers); each network belongs to at most one value."""

    def __init__(self) -> None:
        self._v4: _FamilyTable[V] = _FamilyTable(32)
        self._v6: _FamilyTable[V] = _FamilyTable(128)

    def _family(self, net: IPNetwork) -> _FamilyTable[V]:
        return self._v4 if net.version == 4 else self._v6

    def insert(self, net: IPNetwork, value: V) -> V | None:
        """Assign `net` to `value`; returns the previous owner, if any."""
        return self._family(net).insert(int(net.network_address), net.prefixlen, value)

    def remove(self, net: IPNetwork) -> V | None:
        return self._family(net).remove(int(net.network_address), net.prefixlen)

    def lookup_v4(self, addr: bytes) -> V | None:
        return self._v4.lookup(int.from_bytes(addr, "big"))

    def lookup_v6(self, addr: bytes) -> V | None:
        return self._v6.lookup(int.from_bytes(addr, "big"))

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> V | None:
        ip = ipaddress.ip_address(addr)
        table = self._v4 if ip.version == 4 else self._v6
        return table.lookup(int(ip))

    def lookup_packet_destination(self, packet: bytes) -> V | None:
        """The owner of an IP packet's destination address, or None (also for junk)."""
        if not packet:
            return None
        version = packet[0] >> 4
        if version == 4 and len(packet) >= 20:
            return self._v4.lookup(int.from_bytes(packet[16:20], "big"))
        if version == 6 and len(packet) >= 40:
            return self._v6.lookup(int.from_bytes(packet[24:40], "big"))
        return None
