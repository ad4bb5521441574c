"""Framing for TURN over TCP or TLS (RFC 8656 section 12.5, RFC 6062's client side).

On a stream, STUN messages follow each other back to back and ChannelData frames
are padded to a multiple of 4 bytes, so the length field says where each frame ends.
`StreamFramer` cuts received bytes into frames `TurnClient.unwrap` can take.
"""

from __future__ import annotations

from overlay.stun import message as m
from overlay.stun.message import StunError

MAX_FRAME = 4 + 65535 + 3  # ChannelData with the largest length and its padding


class StreamFramer:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.error: str | None = None  # set once the stream is out of sync; the caller closes it

    def feed(self, data: bytes) -> list[bytes]:
        """Complete frames now available (each STUN message or padded ChannelData)."""
        if self.error:
            return []
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        while True:
            try:
                size = m.stream_frame_length(self._buf[pos : pos + 4])
            except StunError as exc:
                # Nothing after an unrecognised byte can be trusted to start a frame.
                self.error = f"TURN stream out of sync at byte {pos}: {exc}"
                self._buf.clear()
                return frames
            if size is None or size > MAX_FRAME or len(self._buf) - pos < size:
                break
            frames.append(bytes(self._buf[pos : pos + size]))
            pos += size
        del self._buf[:pos]
        return frames


def frame_for_stream(frame: bytes) -> bytes:
    """Pad a ChannelData frame built for UDP so it can go on a stream (STUN is already aligned)."""
    if frame and 0x40 <= frame[0] <= 0x7F:
        return frame + b"\0" * (-len(frame) % 4)
    return frame
