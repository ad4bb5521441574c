"""STUN/TURN message codec (RFC 8489, RFC 8656, RFC 5780, RFC 3489 compatibility).

A message is kept as its header fields plus an ordered list of raw attributes
(type, value bytes). Typed helpers encode and decode the attribute values the
server and the agent need. Parsing never raises anything but `StunError`, so a
caller can turn any malformed datagram into "drop" or "400" without guessing.

ChannelData (RFC 8656 section 12) lives here too because it shares the wire
with STUN and is told apart by its first byte.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass, field

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Classes
REQUEST = 0x000
INDICATION = 0x010
SUCCESS = 0x100
ERROR = 0x110

# Attributes (comprehension-required below 0x8000)
MAPPED_ADDRESS = 0x0001
RESPONSE_ADDRESS = 0x0002
CHANGE_REQUEST = 0x0003
SOURCE_ADDRESS = 0x0004
CHANGED_ADDRESS = 0x0005
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
PADDING = 0x0026
RESPONSE_PORT = 0x0027
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
TRANSPORT_UDP = 17

# Reason phrases for the error codes this project sends.
REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

Address = tuple[str, int]


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message (what is wrong is in the text)."""


def method_of(msg_type: int) -> int:
    return (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)


def class_of(msg_type: int) -> int:
    return msg_type & 0x0110


def message_type(method: int, cls: int) -> int:
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | cls


def new_transaction_id() -> bytes:
    return os.urandom(12)


@dataclass
class Message:
    method: int
    cls: int
    transaction_id: bytes = field(default_factory=new_transaction_id)
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    # RFC 3489 clients send a 16-byte transaction id with no magic cookie.
    classic: bool = False
    # Offset of MESSAGE-INTEGRITY in the raw datagram, set by `parse`; needed to verify it.
    integrity_offset: int = -1
    raw: bytes = b""

    # -- attribute access ------------------------------------------------------------
    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def has(self, attr_type: int) -> bool:
        return any(t == attr_type for t, _ in self.attributes)

    def add(self, attr_type: int, value: bytes) -> "Message":
        self.attributes.append((attr_type, bytes(value)))
        return self

    # -- typed helpers -------------------------------------------------------------
    def add_xor_address(self, attr_type: int, addr: Address) -> "Message":
        return self.add(attr_type, encode_xor_address(addr, self.transaction_id))

    def add_address(self, attr_type: int, addr: Address) -> "Message":
        return self.add(attr_type, encode_address(addr))

    def xor_address(self, attr_type: int) -> Address | None:
        v = self.get(attr_type)
        return None if v is None else decode_xor_address(v, self.transaction_id)

    def xor_addresses(self, attr_type: int) -> list[Address]:
        return [decode_xor_address(v, self.transaction_id) for t, v in self.attributes if t == attr_type]

    def address(self, attr_type: int) -> Address | None:
        v = self.get(attr_type)
        return None if v is None else decode_address(v)

    def add_u32(self, attr_type: int, value: int) -> "Message":
        return self.add(attr_type, struct.pack("!I", value))

    def u32(self, attr_type: int) -> int | None:
        v = self.get(attr_type)
        if v is None:
            return None
        if len(v) != 4:
            raise StunError(f"attribute 0x{attr_type:04x} must be 4 bytes, got {len(v)}")
        return struct.unpack("!I", v)[0]

    def text(self, attr_type: int) -> str | None:
        v = self.get(attr_type)
        if v is None:
            return None
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise StunError(f"attribute 0x{attr_type:04x} is not UTF-8") from None

    def add_error(self, code: int, reason: str | None = None) -> "Message":
        reason = REASONS.get(code, "Error") if reason is None else reason
        return self.add(ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode())

    def error_code(self) -> tuple[int, str] | None:
        v = self.get(ERROR_CODE)
        if v is None or len(v) < 4:
            return None
        return (v[2] & 0x07) * 100 + v[3], v[4:].decode("utf-8", "replace")

    def add_unknown_attributes(self, types: list[int]) -> "Message":
        return self.add(UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in types))

    # -- encoding --------------------------------------------------------------------
    def encode(self, key: bytes | None = None, fingerprint: bool = True) -> bytes:
        """Serialise; with `key`, append MESSAGE-INTEGRITY (HMAC-SHA1); then FINGERPRINT."""
        body = bytearray()
        for t, v in self.attributes:
            body += struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)
        msg_type = message_type(self.method, self.cls)
        tid = self.transaction_id if self.classic else MAGIC_COOKIE_BYTES + self.transaction_id
        if key is not None:
            # The length field covers the MESSAGE-INTEGRITY attribute itself when hashing.
            hdr = struct.pack("!HH", msg_type, len(body) + 24) + tid
            mac = hmac.new(key, hdr + body, hashlib.sha1).digest()
            body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
        if fingerprint and not self.classic:
            hdr = struct.pack("!HH", msg_type, len(body) + 8) + tid
            crc = (binascii.crc32(hdr + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            body += struct.pack("!HHI", FINGERPRINT, 4, crc)
        return struct.pack("!HH", msg_type, len(body)) + tid + bytes(body)

    def check_integrity(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY of a parsed message against `key` (constant time)."""
        if self.integrity_offset < 0 or not self.raw:
            return False
        off = self.integrity_offset
        raw = self.raw
        hdr = raw[0:2] + struct.pack("!H", off + 24 - HEADER_LEN) + raw[4:HEADER_LEN]
        mac = hmac.new(key, hdr + raw[HEADER_LEN:off], hashlib.sha1).digest()
        return hmac.compare_digest(mac, raw[off + 4 : off + 24])


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 long-term credential key: MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """Cheap test: first two bits zero and a plausible length (cookie not required: RFC 3489)."""
    return len(data) >= HEADER_LEN and data[0] < 0x40 and (data[3] & 3) == 0


def parse(data: bytes | bytearray | memoryview) -> Message:
    """Parse one STUN message occupying exactly `data`. Raises StunError on any defect."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise StunError(f"message too short ({len(data)} bytes, header is 20)")
    msg_type, length = struct.unpack_from("!HH", data, 0)
    if msg_type & 0xC000:
        raise StunError("first two bits of a STUN message must be zero")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise StunError(f"message length field says {length} but {len(data) - HEADER_LEN} bytes follow the header")
    classic = data[4:8] != MAGIC_COOKIE_BYTES
    tid = data[4:20] if classic else data[8:20]
    msg = Message(method_of(msg_type), class_of(msg_type), tid, [], classic, -1, data)
    pos = HEADER_LEN
    after_integrity = False
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunError(f"truncated attribute header at offset {pos}")
        t, alen = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + alen
        if end > len(data):
            raise StunError(f"attribute 0x{t:04x} at offset {pos} runs past the end of the message")
        value = data[pos + 4 : end]
        if t == FINGERPRINT:
            if alen != 4 or end + (-alen % 4) != len(data):
                raise StunError("FINGERPRINT must be the last attribute and 4 bytes long")
            crc = (binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack("!I", value)[0] != crc:
                raise StunError("FINGERPRINT does not match")
            msg.attributes.append((t, value))
            break
        if not after_integrity:
            if t == MESSAGE_INTEGRITY:
                if alen != 20:
                    raise StunError("MESSAGE-INTEGRITY must be 20 bytes")
                msg.integrity_offset = pos
                after_integrity = True
            msg.attributes.append((t, value))
        # Attributes after MESSAGE-INTEGRITY (other than FINGERPRINT) are ignored (RFC 8489 14.5).
        pos = end + (-alen % 4)
    return msg


def encode_address(addr: Address) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    return struct.pack("!BBH", 0, family, addr[1]) + ip.packed


def decode_address(value: bytes) -> Address:
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value, 0)
    if family == FAMILY_IPV4 and len(value) == 8:
        return str(ipaddress.IPv4Address(value[4:8])), port
    if family == FAMILY_IPV6 and len(value) == 20:
        return str(ipaddress.IPv6Address(value[4:20])), port
    raise StunError(f"bad address attribute (family {family}, {len(value)} bytes)")


def encode_xor_address(addr: Address, transaction_id: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        x = int.from_bytes(ip.packed, "big") ^ MAGIC_COOKIE
        return struct.pack("!BBH", 0, FAMILY_IPV4, port) + x.to_bytes(4, "big")
    mask = MAGIC_COOKIE_BYTES + transaction_id[-12:]
    x = bytes(a ^ b for a, b in zip(ip.packed, mask))
    return struct.pack("!BBH", 0, FAMILY_IPV6, port) + x


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    if len(value) < 4:
        raise StunError("XOR address attribute shorter than 4 bytes")
    _, family, xport = struct.unpack_from("!BBH", value, 0)
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == FAMILY_IPV4 and len(value) == 8:
        x = int.from_bytes(value[4:8], "big") ^ MAGIC_COOKIE
        return str(ipaddress.IPv4Address(x)), port
    if family == FAMILY_IPV6 and len(value) == 20:
        mask = MAGIC_COOKIE_BYTES + transaction_id[-12:]
        return str(ipaddress.IPv6Address(bytes(a ^ b for a, b in zip(value[4:20], mask)))), port
    raise StunError(f"bad XOR address attribute (family {family}, {len(value)} bytes)")


# -- ChannelData ----------------------------------------------------------------------

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
# RFC 5766 allowed up to 0x7FFF and coturn's clients still use that range, so a
# server accepts it (RFC 8656 only narrowed what new clients should pick).
CHANNEL_MAX_ACCEPTED = 0x7FFF


def is_channel_data(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= 4 and 0x40 <= data[0] <= 0x7F


def encode_channel_data(channel: int, payload: bytes, pad: bool = False) -> bytes:
    """ChannelData frame; `pad` rounds up to 4 bytes as required over TCP/TLS."""
    frame = struct.pack("!HH", channel, len(payload)) + payload
    if pad:
        frame += b"\0" * (-len(payload) % 4)
    return frame


def decode_channel_data(data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    if len(data) < 4:
        raise StunError("ChannelData shorter than its 4-byte header")
    channel, length = struct.unpack_from("!HH", data, 0)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX_ACCEPTED:
        raise StunError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    if 4 + length > len(data):
        raise StunError(f"ChannelData length {length} exceeds the {len(data) - 4} bytes present")
    return channel, bytes(data[4 : 4 + length])


def stream_frame_length(head: bytes | bytearray | memoryview) -> int | None:
    """Length of the next STUN or ChannelData frame on a TCP/TLS stream (None: need 4 bytes).

    ChannelData over a stream is padded to a multiple of 4 (RFC 8656 12.5).
    Raises StunError when the first byte is neither STUN nor ChannelData.
    """
    if len(head) < 4:
        return None
    first = head[0]
    length = (head[2] << 8) | head[3]
    if first < 0x40:
        return HEADER_LEN + length
    if first <= 0x7F:
        return 4 + length + (-length % 4)
    raise StunError(f"stream byte 0x{first:02x} starts neither STUN nor ChannelData")
