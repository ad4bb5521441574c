"""A transport session: the two ChaCha20-Poly1305 ciphers, counters, replay window.

The cipher objects are built once per keypair; building them per packet costs
more than the encryption itself.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .replay import ReplayWindow

_HEADER = struct.Struct("<IIQ")  # type 4 + reserved, receiver index, counter
_NONCE = struct.Struct("<4xQ")


class Keypair:
    __slots__ = ("peer", "send_cipher", "recv_cipher", "send_counter", "replay", "created",
                 "initiator", "local_index", "remote_index")

    def __init__(self, peer, send_key: bytes, recv_key: bytes, *, initiator: bool,
                 local_index: int, remote_index: int, created: float):
        self.peer = peer
        self.send_cipher = ChaCha20Poly1305(send_key)
        self.recv_cipher = ChaCha20Poly1305(recv_key)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index

    def __repr__(self) -> str:
        return (f"Keypair(local={self.local_index}, remote={self.remote_index}, "
                f"initiator={self.initiator}, sent={self.send_counter})")

    def seal(self, plaintext: bytes) -> bytes:
        """One transport message carrying `plaintext` (already padded)."""
        counter = self.send_counter
        self.send_counter = counter + 1
        return _HEADER.pack(4, self.remote_index, counter) + self.send_cipher.encrypt(
            _NONCE.pack(counter), plaintext, None)


def nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)
