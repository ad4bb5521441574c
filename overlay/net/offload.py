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


def _emit(parts: list, v6: bool, hl: int, thl: int, mss: int, total: int, psh: int) -> bytes:
    """One buffer for a run: the packet itself, or the merged GSO packet."""
    first = parts[0]
    if len(parts) == 1:
        return ZERO_HDR + first
    hdr = bytearray(first[:hl + thl])
    tcp_len = total - hl
    if v6:
        hdr[4:6] = _H.pack(tcp_len)
        pseudo = _pseudo_sum(bytes(hdr[8:40]), tcp_len)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        hdr[2:4] = _H.pack(total)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = _H.pack(_ipv4_header_checksum(hdr))
        pseudo = _pseudo_sum(bytes(hdr[12:20]), tcp_len)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    if psh:
        hdr[hl + 13] |= TCP_PSH
    # Checksum partial: the field holds the pseudo-header sum, the kernel does the rest.
    hdr[hl + 16:hl + 18] = _H.pack(pseudo)
    vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hl + thl, mss, hl, 16)
    head = hl + thl
    return b"".join([vnet, hdr, *[memoryview(p)[head:] for p in parts]])


_V4TCP = struct.Struct("!BBHHHBB2x8sIIIBB")  # ..., proto, [csum], addrs, ports, seq, ack, doff, flags
_V6TCP = struct.Struct("!4sHBB32sIIIBB")  # ver/tc/flow, payload len, next header, hop limit, addrs, ...


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Buffers to write to a VNET_HDR TUN: merged TCP bursts and single packets."""
    if len(packets) == 1:
        # A lone packet (a ping, a TCP ACK) has nothing to merge with: skip the
        # header parsing, it is pure latency here.
        return [ZERO_HDR + packets[0]]
    out: list[bytes] = []
    append = out.append
    v4_unpack = _V4TCP.unpack_from
    v6_unpack = _V6TCP.unpack_from
    # The open run, kept in locals (this loop runs once per received packet).
    g_parts: list | None = None
    g_key = None
    g_v6 = False
    g_hl = g_thl = g_mss = g_next = g_total = g_psh = 0
    g_open = False
    for pkt in packets:
        n = len(pkt)
        key = None
        if n >= 40:
            b0 = pkt[0]
            if b0 == 0x45:
                _, tos, total, _id, frag, ttl, proto, addrs, ports, seq, ack, doff, flags = \
                    v4_unpack(pkt, 0)
                # TCP, not a fragment (DF allowed), plain ACK or ACK+PSH data
                if proto == 6 and not frag & 0x3FFF and total == n and flags & 0xF7 == 0x10:
                    thl = (doff >> 4) << 2
                    payload = n - 20 - thl
                    if thl >= 20 and payload > 0:
                        hl = 20
                        v6 = False
                        key = (tos, ttl, addrs, ports, ack, pkt[40:20 + thl] if thl > 20 else None)
            elif b0 >> 4 == 6 and n >= 60:
                vtf, plen, nxt, hop, addrs, ports, seq, ack, doff, flags = v6_unpack(pkt, 0)
                if nxt == 6 and plen + 40 == n and flags & 0xF7 == 0x10:
                    thl = (doff >> 4) << 2
                    payload = n - 40 - thl
                    if thl >= 20 and payload > 0:
                        hl = 40
                        v6 = True
                        key = (vtf, hop, addrs, ports, ack, pkt[60:40 + thl] if thl > 20 else None)
        if key is None:
            if g_parts is not None:
                append(_emit(g_parts, g_v6, g_hl, g_thl, g_mss, g_total, g_psh))
                g_parts = None
            append(ZERO_HDR + pkt)
            continue
        if (g_open and seq == g_next and key == g_key and payload <= g_mss
                and len(g_parts) < MAX_SEGMENTS and g_total + payload <= MAX_IP_TOTAL):
            g_parts.append(pkt)
            g_total += payload
            g_next = (seq + payload) & 0xFFFFFFFF
            if flags & TCP_PSH:
                g_psh = TCP_PSH
                g_open = False
            elif payload < g_mss:
                g_open = False  # a short segment ends a GSO train
            continue
        if g_parts is not None:
            append(_emit(g_parts, g_v6, g_hl, g_thl, g_mss, g_total, g_psh))
        g_parts = [pkt]
        g_key = key
        g_v6 = v6
        g_hl = hl
        g_thl = thl
        g_mss = payload
        g_next = (seq + payload) & 0xFFFFFFFF
        g_total = hl + thl + payload
        g_psh = flags & TCP_PSH
        g_open = not g_psh
    if g_parts is not None:
        append(_emit(g_parts, g_v6, g_hl, g_thl, g_mss, g_total, g_psh))
    return out


def complete_checksum(pkt: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a checksum the kernel left partial (only seen if checksum offload is on)."""
    data = bytes(pkt[csum_start:])
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    pkt[csum_start + csum_offset:csum_start + csum_offset + 2] = _H.pack((~_fold(s)) & 0xFFFF)
