"""Wire layouts of the four WireGuard messages (all integers little-endian)."""

from __future__ import annotations

import struct

from .constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
)

# type(1) reserved(3) as one little-endian u32
INITIATION_PREFIX = struct.pack("<I", MSG_INITIATION)
RESPONSE_PREFIX = struct.pack("<I", MSG_RESPONSE)
COOKIE_REPLY_PREFIX = struct.pack("<I", MSG_COOKIE_REPLY)
TRANSPORT_PREFIX = struct.pack("<I", MSG_TRANSPORT)

# Initiation: prefix, sender, ephemeral(32), static(32+16), timestamp(12+16), mac1, mac2
INITIATION_MAC1_OFFSET = 116
# Response: prefix, sender, receiver, ephemeral(32), empty(0+16), mac1, mac2
RESPONSE_MAC1_OFFSET = 60

TRANSPORT_HEADER = struct.Struct("<III")  # type, receiver, counter low... (see pack_transport_header)
_U32 = struct.Struct("<I")


def message_type(data: bytes) -> int:
    """The WireGuard message type (1-4) or 0 if the datagram is not WireGuard-shaped."""
    if len(data) < 4 or data[1] or data[2] or data[3]:
        return 0
    t = data[0]
    return t if 1 <= t <= 4 else 0


def is_wireguard(data: bytes) -> bool:
    return message_type(data) != 0


def mac_offsets(msg_type: int) -> int:
    return INITIATION_MAC1_OFFSET if msg_type == MSG_INITIATION else RESPONSE_MAC1_OFFSET


def expected_size(msg_type: int) -> int:
    return {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE,
            MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}[msg_type]


def u32(data: bytes, offset: int) -> int:
    return _U32.unpack_from(data, offset)[0]
