"""GRO-style coalescing of TCP segments for VNET_HDR TUN writes."""

import ipaddress
import struct

from overlay.net import offload


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp4(seq, payload, flags=0x10, src="10.0.0.1", dst="10.0.0.2", ack=77, opts=b""):
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, seq, ack, (thl // 4) << 4, flags, 500, 0, 0) + opts
    total = 20 + thl + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                               ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed))
    ip[10:12] = struct.pack("!H", (~_csum(bytes(ip))) & 0xFFFF)
    return bytes(ip) + tcp + payload


def tcp6(seq, payload, flags=0x10):
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, seq, 5, 5 << 4, flags, 500, 0, 0)
    return (struct.pack("!IHBB", 0x60000000, len(tcp) + len(payload), 6, 64)
            + ipaddress.ip_address("fd00::1").packed + ipaddress.ip_address("fd00::2").packed
            + tcp + payload)


def parse_vnet(buf):
    return offload._VNET.unpack_from(buf, 0), buf[offload.VNET_HDR_LEN:]


def test_consecutive_segments_merge_into_one_gso_write():
    opts = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps
    segs = [tcp4(1000 + i * 100, bytes([i]) * 100, opts=opts) for i in range(5)]
    segs[-1] = tcp4(1400, b"\x04" * 40, flags=0x18, opts=opts)  # short last one with PSH
    out = offload.coalesce(segs)
    assert len(out) == 1
    (flags, gso_type, hdr_len, gso_size, cstart, coff), pkt = parse_vnet(out[0])
    assert (flags, gso_type, hdr_len, gso_size, cstart, coff) == (1, 1, 52, 100, 20, 16)
    assert struct.unpack("!H", pkt[2:4])[0] == len(pkt) == 52 + 440
    assert _csum(pkt[:20]) == 0xFFFF  # valid IPv4 header checksum
    assert pkt[33] == 0x18  # PSH carried over
    assert pkt[52:] == b"".join(bytes([i]) * 100 for i in range(4)) + b"\x04" * 40
    # checksum field = folded pseudo header sum (src, dst, proto, TCP length)
    pseudo = _csum(pkt[12:20] + struct.pack("!HH", 6, len(pkt) - 20))
    assert struct.unpack("!H", pkt[36:38])[0] == pseudo


def test_ipv6_segments_merge():
    segs = [tcp6(5 + i * 64, b"z" * 64) for i in range(3)]
    out = offload.coalesce(segs)
    (flags, gso_type, hdr_len, gso_size, _, _), pkt = parse_vnet(out[0])
    assert len(out) == 1 and gso_type == 4 and hdr_len == 60 and gso_size == 64
    assert struct.unpack("!H", pkt[4:6])[0] == 20 + 192


def test_gaps_flags_and_other_flows_break_runs():
    a = tcp4(0, b"a" * 50)
    gap = tcp4(100, b"b" * 50)  # not consecutive
    syn = tcp4(150, b"c" * 50, flags=0x12)
    other = tcp4(200, b"d" * 50, src="10.0.0.9")
    udp = bytearray(tcp4(250, b"e" * 50))
    udp[9] = 17
    out = offload.coalesce([a, gap, syn, other, bytes(udp)])
    assert len(out) == 5
    for buf, orig in zip(out, [a, gap, syn, other, bytes(udp)]):
        assert buf == offload.ZERO_HDR + orig


def test_segment_after_short_one_or_psh_starts_new_run():
    s1 = tcp4(0, b"a" * 100)
    s2 = tcp4(100, b"b" * 60)  # short: ends the train
    s3 = tcp4(160, b"c" * 100)
    s4 = tcp4(260, b"d" * 100, flags=0x18)
    s5 = tcp4(360, b"e" * 100)
    out = offload.coalesce([s1, s2, s3, s4, s5])
    assert len(out) == 3
    assert offload._VNET.unpack_from(out[0], 0)[3] == 100
    assert out[2] == offload.ZERO_HDR + s5


def test_size_limit_respected():
    segs = [tcp4(i * 1400, b"x" * 1400) for i in range(60)]
    out = offload.coalesce(segs)
    assert len(out) == 2
    assert all(len(b) - offload.VNET_HDR_LEN <= 65535 for b in out)
    assert sum(len(b) - offload.VNET_HDR_LEN - 40 for b in out) == 60 * 1400


def test_lone_packet_is_written_as_is_with_a_zero_header():
    # The single-packet fast path (pings, lone ACKs) must give what the general
    # path gives: the packet unchanged behind an all-zero virtio-net header.
    icmp = bytes.fromhex("4500001c0000400040010000") + bytes(16)
    for pkt in (tcp4(1000, b"x" * 100), tcp6(5, b"y" * 10), icmp):
        out = offload.coalesce([pkt])
        assert out == [offload.ZERO_HDR + pkt]
        assert out == offload.coalesce([pkt, icmp])[:1]
