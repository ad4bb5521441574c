"""The cryptographic primitives WireGuard is built from, named as in the paper.

HASH/MAC/HMAC are BLAKE2s (hashlib); DH is X25519 (pynacl); the handshake AEAD
and the cookie XAEAD come from pynacl, the transport AEAD from `cryptography`
(much faster per packet, see keypair.py).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

import nacl.bindings as _nacl
import nacl.exceptions

from .constants import CONSTRUCTION, IDENTIFIER


class HandshakeCryptoError(Exception):
    """A handshake or cookie message failed authentication or used a bad point."""


def hash_(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> list[bytes]:
    """HKDF as WireGuard defines it: up to three 32-byte outputs."""
    prk = hmac(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(prk, prev + bytes([i]))
        out.append(prev)
    return out


def dh(private: bytes, public: bytes) -> bytes:
    try:
        shared = _nacl.crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError as exc:  # low-order point
        raise HandshakeCryptoError("bad public key") from exc
    if shared == bytes(32):
        raise HandshakeCryptoError("bad public key")
    return shared


def public_key(private: bytes) -> bytes:
    return _nacl.crypto_scalarmult_base(private)


def clamp_private_key(key: bytes) -> bytes:
    b = bytearray(key)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def _nonce12(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return _nacl.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, _nonce12(counter), key)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return _nacl.crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, aad, _nonce12(counter), key
        )
    except nacl.exceptions.CryptoError as exc:
        raise HandshakeCryptoError("authentication failed") from exc


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except nacl.exceptions.CryptoError as exc:
        raise HandshakeCryptoError("authentication failed") from exc


# Initial chaining key and hash, the same for every handshake.
INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY + IDENTIFIER)

_TAI64_BASE = (1 << 62) + 10
# WireGuard rounds the nanoseconds down so that the timestamp does not leak a
# fine-grained clock; 2^24 ns is about 16.8 ms.
_NANO_WHITENER = (1 << 24) - 1


def tai64n(wall_time: float) -> bytes:
    secs = int(wall_time)
    nanos = int((wall_time - secs) * 1e9) & ~_NANO_WHITENER
    return struct.pack(">QI", _TAI64_BASE + secs, nanos)
