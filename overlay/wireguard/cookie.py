"""MAC1/MAC2 and cookie replies (paper section 5.4.7), both directions.

`CookieChecker` is the receiving side (one per device): it verifies MAC1 with
our own public key, and under load demands a MAC2 made from a cookie bound to
the sender's address. `CookieJar` is the sending side (one per peer): it adds
MAC1 for that peer and MAC2 while it holds a fresh cookie from it.
"""

from __future__ import annotations

import hmac as _hmac

from .constants import COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1
from .crypto import HandshakeCryptoError, hash_, mac, xaead_decrypt, xaead_encrypt
from .endpoints import Endpoint, endpoint_bytes
from .messages import COOKIE_REPLY_PREFIX, u32

_ZERO16 = bytes(16)


def mac1_key(public_key: bytes) -> bytes:
    return hash_(LABEL_MAC1 + public_key)


def cookie_key(public_key: bytes) -> bytes:
    return hash_(LABEL_COOKIE + public_key)


class CookieChecker:
    """Verifies MACs on handshake messages we receive and makes cookie replies."""

    def __init__(self, public_key: bytes, rng, now: float):
        self._rng = rng
        self.set_public_key(public_key)
        self._secret = rng(32)
        self._secret_born = now

    def __repr__(self) -> str:
        return "CookieChecker()"

    def set_public_key(self, public_key: bytes) -> None:
        self._mac1_key = mac1_key(public_key)
        self._cookie_key = cookie_key(public_key)

    def _current_secret(self, now: float) -> bytes:
        if now - self._secret_born >= COOKIE_REFRESH_TIME:
            self._secret = self._rng(32)
            self._secret_born = now
        return self._secret

    def _cookie(self, source: Endpoint, now: float) -> bytes:
        return mac(self._current_secret(now), endpoint_bytes(source))

    def check_mac1(self, msg: bytes, mac1_offset: int) -> bool:
        expected = mac(self._mac1_key, bytes(msg[:mac1_offset]))
        return _hmac.compare_digest(expected, bytes(msg[mac1_offset:mac1_offset + 16]))

    def check_mac2(self, msg: bytes, mac1_offset: int, source: Endpoint, now: float) -> bool:
        mac2 = bytes(msg[mac1_offset + 16:mac1_offset + 32])
        if mac2 == _ZERO16:
            return False
        expected = mac(self._cookie(source, now), bytes(msg[:mac1_offset + 16]))
        return _hmac.compare_digest(expected, mac2)

    def make_reply(self, msg: bytes, mac1_offset: int, source: Endpoint, now: float) -> bytes:
        """Cookie reply to a handshake message (whose sender index sits at offset 4)."""
        sender_index = bytes(msg[4:8])
        nonce = self._rng(24)
        mac1 = bytes(msg[mac1_offset:mac1_offset + 16])
        sealed = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now), mac1)
        return COOKIE_REPLY_PREFIX + sender_index + nonce + sealed


class CookieJar:
    """Adds MAC1/MAC2 to the handshake messages we send to one peer."""

    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_time", "last_mac1")

    def __init__(self, peer_public_key: bytes):
        self._mac1_key = mac1_key(peer_public_key)
        self._cookie_key = cookie_key(peer_public_key)
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self.last_mac1: bytes | None = None

    def __repr__(self) -> str:
        return "CookieJar()"

    def add_macs(self, msg: bytes, now: float) -> bytes:
        mac1 = mac(self._mac1_key, msg)
        self.last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            mac2 = mac(self._cookie, msg + mac1)
        else:
            mac2 = _ZERO16
        return msg + mac1 + mac2

    def consume_reply(self, reply: bytes, now: float) -> None:
        """Store the cookie from a reply to our last message; raises if it does not decrypt."""
        if self.last_mac1 is None:
            raise HandshakeCryptoError("cookie reply without a message of ours")
        nonce = bytes(reply[8:32])
        cookie = xaead_decrypt(self._cookie_key, nonce, bytes(reply[32:64]), self.last_mac1)
        self._cookie = cookie
        self._cookie_time = now

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None


def reply_receiver_index(reply: bytes) -> int:
    return u32(reply, 4)
