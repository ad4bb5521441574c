"""WireGuard keys: generation, the base64 text form `wg` uses, key files.

Key material is handled as raw 32-byte `bytes` inside the agent. Nothing in
this module ever puts a key into an exception message or a repr: errors say
*what* is wrong with a key (length, alphabet), never the key itself.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os

from nacl.bindings import crypto_scalarmult_base

KEY_LEN = 32


class InvalidKey(ValueError):
    """A key in text form could not be decoded; the message never holds the key."""


def clamp(raw: bytes) -> bytes:
    """Clamp 32 random bytes into an X25519 private scalar (RFC 7748 §5)."""
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"a private key is {KEY_LEN} bytes, got {len(raw)}")
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_LEN))


def public_key(private_key: bytes) -> bytes:
    if len(private_key) != KEY_LEN:
        raise InvalidKey(f"a private key is {KEY_LEN} bytes, got {len(private_key)}")
    # X25519 clamps internally, so an unclamped private key gives the same
    # public key as `wg pubkey` does for it.
    return crypto_scalarmult_base(private_key)


def encode(key: bytes) -> str:
    """32 raw bytes -> the 44-character base64 text `wg` prints."""
    if len(key) != KEY_LEN:
        raise InvalidKey(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode(text: str) -> bytes:
    """The base64 text form -> 32 raw bytes, with an error that names the problem."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise InvalidKey(
            f"a key is 44 characters of base64 ending in '=', got {len(text)} characters"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("a key must be base64 (A-Z a-z 0-9 + /)") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"a key decodes to {KEY_LEN} bytes, got {len(raw)}")
    # Reject non-canonical encodings (stray low bits in the last character),
    # as `wg` does: they would otherwise round-trip to a different text.
    if base64.b64encode(raw).decode("ascii") != text:
        raise InvalidKey("a key must be canonical base64")
    return raw


def encode_hex(key: bytes) -> str:
    """Lower-case hex, the form the UAPI protocol uses."""
    if len(key) != KEY_LEN:
        raise InvalidKey(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return key.hex()


def decode_hex(text: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise InvalidKey(f"a hex key is {2 * KEY_LEN} characters, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidKey("a hex key must be hex digits") from None


def keys_equal(a: bytes | None, b: bytes | None) -> bool:
    """Constant-time comparison of two keys (None equals only None)."""
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


def is_zero(key: bytes) -> bool:
    return hmac.compare_digest(key, bytes(len(key)))


def fingerprint(public: bytes) -> str:
    """A short, log-safe label for a *public* key (never use it on a private one)."""
    return encode(public)[:8] + "…"


def write_key_file(path: str, key: bytes) -> None:
    """Write a key in text form to `path`, created 0600 from the start.

    The mode is set at creation (not chmod afterwards) so the key is never
    readable by others, not even for a moment.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        os.write(fd, (encode(key) + "\n").encode("ascii"))
    finally:
        os.close(fd)


def read_key_file(path: str) -> bytes:
    """Read a key file as `wg set ... private-key FILE` does (base64, one line)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return decode(f.read())
