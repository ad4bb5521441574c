"""Tell apart what arrives on the shared tunnel socket by its first bytes.

WireGuard, STUN and TURN ChannelData share one UDP socket per address family:
- STUN: first two bits zero and the magic cookie 0x2112A442 at offset 4 (RFC 8489);
- ChannelData: first byte 0x40-0x4F (RFC 8656 channel numbers 0x4000-0x4FFF);
- WireGuard: a message type 1-4 followed by three zero bytes.
The checks are cheap on purpose: they run for every datagram on the data path.
"""

from __future__ import annotations

from overlay.stun.message import HEADER_LEN, MAGIC_COOKIE_BYTES

STUN = "stun"
CHANNEL_DATA = "channel_data"
WIREGUARD = "wireguard"
OTHER = "other"


def classify(data: bytes | bytearray | memoryview) -> str:
    """One of STUN, CHANNEL_DATA, WIREGUARD or OTHER (never raises)."""
    n = len(data)
    if n < 4:
        return OTHER
    first = data[0]
    if 1 <= first <= 4 and data[1] == 0 and data[2] == 0 and data[3] == 0:
        return WIREGUARD
    if first < 0x40:
        # RFC 3489 servers are out of scope for the agent: requiring the cookie keeps a
        # stray datagram from being parsed as STUN.
        if n >= HEADER_LEN and data[4:8] == MAGIC_COOKIE_BYTES:
            return STUN
        return OTHER
    if first <= 0x4F:
        return CHANNEL_DATA
    return OTHER
