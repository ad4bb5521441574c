"""TURN REST time-limited credentials (draft-uberti-behave-turn-rest, as coturn's use-auth-secret).

username = "<unix expiry>:<name>", password = base64(HMAC-SHA1(shared secret, username)).
A TURN server holding the same secret derives the password from the username alone,
so credentials issued by one server work on any other configured with the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TurnCredentials:
    username: str
    password: str = field(repr=False)  # a secret: never in logs or reprs
    expires: int  # unix time
    urls: tuple[str, ...] = ()


def rest_password(secret: str | bytes, username: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return base64.b64encode(hmac.new(key, username.encode(), hashlib.sha1).digest()).decode()


def make_rest_credentials(
    secret: str | bytes, name: str, ttl: int = 86400, now: float | None = None, urls: tuple[str, ...] = ()
) -> TurnCredentials:
    expires = int((time.time() if now is None else now) + ttl)
    username = f"{expires}:{name}"
    return TurnCredentials(username, rest_password(secret, username), expires, tuple(urls))


def rest_expiry(username: str) -> int | None:
    """The expiry encoded in a REST username, or None when it has no leading number."""
    head = username.split(":", 1)[0]
    return int(head) if head.isdigit() else None
