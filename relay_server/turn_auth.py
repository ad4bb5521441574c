"""TURN long-term credentials (RFC 8489 9.2): stateless nonces, REST and static users.

Nonces are "<expiry hex>-<HMAC>" under a per-process key: no per-client state, any
listener can check them, and an expired one gets 438 Stale Nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from overlay.stun import message as m
from overlay.stun.credentials import rest_expiry, rest_password
from overlay.stun.message import Message

from .turn_state import TurnSettings, TurnStats, error_response


class Authenticator:
    def __init__(self, settings: TurnSettings, nonce_key: bytes | None = None) -> None:
        self.s = settings
        self._nonce_key = nonce_key or os.urandom(32)

    def make_nonce(self, now: float) -> bytes:
        expiry = f"{int(now) + self.s.nonce_lifetime:x}"
        mac = hmac.new(self._nonce_key, expiry.encode(), hashlib.sha256).hexdigest()[:16]
        return f"{expiry}-{mac}".encode()

    def nonce_valid(self, nonce: bytes, now: float) -> bool:
        try:
            expiry, mac = nonce.decode("ascii").split("-", 1)
            good = hmac.new(self._nonce_key, expiry.encode(), hashlib.sha256).hexdigest()[:16]
            return hmac.compare_digest(mac, good) and int(expiry, 16) >= now
        except (ValueError, UnicodeDecodeError):
            return False

    def password_for(self, username: str, now: float) -> str | None:
        static = self.s.users.get(username)
        if static is not None:
            return static
        if self.s.shared_secret:
            expiry = rest_expiry(username)
            if expiry is not None and expiry >= now:
                return rest_password(self.s.shared_secret, username)
        return None

    def challenge(self, msg: Message, code: int, now: float, reason: str | None = None) -> bytes:
        resp = Message(msg.method, m.ERROR, msg.transaction_id)
        resp.add_error(code, reason)
        resp.add(m.REALM, self.s.realm.encode()).add(m.NONCE, self.make_nonce(now))
        if self.s.software:
            resp.add(m.SOFTWARE, self.s.software.encode())
        return resp.encode()

    def authenticate(self, msg: Message, now: float, stats: TurnStats) -> tuple[str, bytes] | bytes:
        """(username, key) for a correctly signed request, else the error response to send."""
        if msg.integrity_offset < 0:
            return self.challenge(msg, 401, now)
        username, realm, nonce = msg.get(m.USERNAME), msg.get(m.REALM), msg.get(m.NONCE)
        if username is None or realm is None or nonce is None:
            stats.bad_requests += 1
            return error_response(msg, 400, self.s.software, "USERNAME, REALM and NONCE are required with MESSAGE-INTEGRITY")
        if not self.nonce_valid(nonce, now):
            return self.challenge(msg, 438, now)
        try:
            user = username.decode("utf-8")
            realm_s = realm.decode("utf-8")
        except UnicodeDecodeError:
            stats.auth_failures += 1
            return self.challenge(msg, 401, now)
        password = self.password_for(user, now)
        if password is None or realm_s != self.s.realm:
            stats.auth_failures += 1
            return self.challenge(msg, 401, now)
        key = m.long_term_key(user, realm_s, password)
        if not msg.check_integrity(key):
            stats.auth_failures += 1
            return self.challenge(msg, 401, now)
        return user, key
