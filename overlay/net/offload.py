"""virtio-net headers on the TUN (IFF_VNET_HDR): GRO-style coalesced writes.

The kernel's cost per packet written to a TUN (one syscall, one trip through
IP and TCP) dominates the receive side. Consecutive TCP segments of one flow
that arrived through the tunnel are merged here into one large segment and
written once with a virtio-net header asking the kernel to treat it as a GSO
packet (gso_type TCPV4/TCPV6, checksum partial). The kernel's TCP then takes
the whole burst at once, as it does with GRO on a real NIC.

Only plain data segments merge: same addresses, ports, TOS/TTL (traffic class
and hop limit), ACK number and TCP options, consecutive sequence numbers, flags
ACK (PSH only on the last one), equal-sized segments except possibly the last,
and no IP options or IPv6 extension headers. Everything else is written as is
with an all-zero header (the kernel then verifies its checksum as usual).
"""

from __future__ import annotations

import struct

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

ZERO_HDR = bytes(VNET_HDR_LEN)
MAX_SEGMENTS = 64
MAX_IP_TOTAL = 65535

_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_V4 = struct.Struct("!BBHHHBBH4s4sHHII")  # IPv4 header (no options) + TCP ports/seq/ack
_V6 = struct.Struct("!IHBB16s16sHHII")  # IPv6 header + TCP ports/seq/ack
_H = struct.Struct("!H")
_10H = struct.Struct("!10H")

TCP_ACK = 0x10
TCP_PSH = 0x08


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _ipv4_header_checksum(hdr: bytes | bytearray) -> int:
    words = _10H.unpack_from(hdr, 0)
    s = sum(words) - words[5]  # the checksum field counts as zero
    return (~_fold(s)) & 0xFFFF


def _pseudo_sum(addrs: bytes, length: int) -> int:
    """Folded sum of the TCP pseudo header (addresses, protocol 6, TCP length)."""
    s = 6 + length
    for i in range(0, len(addrs), 2):
        s += (addrs[i] << 8) | addrs[i + 1]
    return _fold(s)


class _Group:
    __slots__ = ("first", "v6", "hl", "thl", "mss", "seq_next", "parts", "total", "psh",
                 "closed", "count")


def _start(pkt: bytes, v6: bool, hl: int, thl: int, payload: int, seq: int, flags: int) -> _Group:
    g = _Group()
    g.first = pkt
    g.v6 = v6
    g.hl = hl
    g.thl = thl
    g.mss = payload
    g.seq_next = (seq + payload) & 0xFFFFFFFF
    g.parts = [pkt]
    g.total = hl + thl + payload
    g.psh = flags & TCP_PSH
    g.closed = bool(g.psh)
    g.count = 1
    return g


def _emit(g: _Group) -> bytes:
    first = g.first
    if g.count == 1:
        return ZERO_HDR + first
    hl, thl = g.hl, g.thl
    hdr = bytearray(first[:hl + thl])
    tcp_len = g.total - hl
    if g.v6:
        hdr[4:6] = _H.pack(tcp_len)
        pseudo = _pseudo_sum(bytes(hdr[8:40]), tcp_len)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        hdr[2:4] = _H.pack(g.total)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = _H.pack(_ipv4_header_checksum(hdr))
        pseudo = _pseudo_sum(bytes(hdr[12:20]), tcp_len)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    if g.psh:
        hdr[hl + 13] |= TCP_PSH
    # Checksum partial: the field holds the pseudo-header sum, the kernel does the rest.
    hdr[hl + 16:hl + 18] = _H.pack(pseudo)
    vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hl + thl, g.mss, hl, 16)
    head = hl + thl
    return b"".join([vnet, hdr, *(memoryview(p)[head:] for p in g.parts)])


def _tcp_info(pkt: bytes):
    """(v6, ip header len, tcp header len, payload len, seq, flags, key) or None."""
    n = len(pkt)
    if n < 40:
        return None
    b0 = pkt[0]
    if b0 == 0x45:
        if pkt[9] != 6 or (pkt[6] & 0x3F) or pkt[7] or (pkt[6] & 0x20):
            return None
        total = (pkt[2] << 8) | pkt[3]
        if total != n:
            return None
        thl = (pkt[32] >> 4) * 4
        payload = n - 20 - thl
        if thl < 20 or payload <= 0:
            return None
        flags = pkt[33]
        if flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
            return None
        seq = (pkt[24] << 24) | (pkt[25] << 16) | (pkt[26] << 8) | pkt[27]
        # Everything that must match between merged segments.
        key = pkt[1:2] + pkt[8:9] + pkt[12:24] + pkt[28:32] + pkt[40:20 + thl]
        return False, 20, thl, payload, seq, flags, key
    if b0 >> 4 == 6:
        if n < 60 or pkt[6] != 6:
            return None
        if 40 + ((pkt[4] << 8) | pkt[5]) != n:
            return None
        thl = (pkt[52] >> 4) * 4
        payload = n - 40 - thl
        if thl < 20 or payload <= 0:
            return None
        flags = pkt[53]
        if flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
            return None
        seq = (pkt[44] << 24) | (pkt[45] << 16) | (pkt[46] << 8) | pkt[47]
        key = pkt[0:4] + pkt[7:8] + pkt[8:44] + pkt[48:52] + pkt[60:40 + thl]
        return True, 40, thl, payload, seq, flags, key
    return None


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Buffers to write to a VNET_HDR TUN: merged TCP bursts and single packets."""
    out: list[bytes] = []
    group: _Group | None = None
    gkey = None
    for pkt in packets:
        info = _tcp_info(pkt)
        if info is None:
            if group is not None:
                out.append(_emit(group))
                group = None
            out.append(ZERO_HDR + pkt)
            continue
        v6, hl, thl, payload, seq, flags, key = info
        if (group is not None and not group.closed and key == gkey and seq == group.seq_next
                and payload <= group.mss and group.count < MAX_SEGMENTS
                and group.total + payload <= MAX_IP_TOTAL):
            group.parts.append(pkt)
            group.total += payload
            group.count += 1
            group.seq_next = (seq + payload) & 0xFFFFFFFF
            if flags & TCP_PSH:
                group.psh = TCP_PSH
                group.closed = True
            if payload < group.mss:
                group.closed = True  # a short segment ends a GSO train
            continue
        if group is not None:
            out.append(_emit(group))
        group = _start(pkt, v6, hl, thl, payload, seq, flags)
        gkey = key
    if group is not None:
        out.append(_emit(group))
    return out


def complete_checksum(pkt: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a checksum the kernel left partial (only seen if checksum offload is on)."""
    data = bytes(pkt[csum_start:])
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    pkt[csum_start + csum_offset:csum_start + csum_offset + 2] = _H.pack((~_fold(s)) & 0xFFFF)
