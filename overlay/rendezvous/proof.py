"""Key-possession proof for rendezvous login (shared by the client and the server).

The server sends a random challenge and its X25519 public key. The node answers
with HMAC-SHA256 over (challenge || node public key || server public key), keyed
by SHA-256(label || X25519(node private, server public)). The server computes the
same shared secret from its private key and the node's registered public key.
Only the holder of the WireGuard private key can answer; nothing secret is sent.

The server proves itself the same way in the other direction: its welcome
carries HMAC-SHA256 over (challenge || node public key || server public key ||
SERVER_LABEL) under the same key. Computing it needs the shared secret, i.e. the
server's private key (or the node's own), so a node that has pinned the server's
public key can tell the real rendezvous from a man in the middle who substitutes
its own key in the challenge. The trailing label keeps the two MACs distinct, so
a node's proof can never be replayed as the server's.

Proving the key at login is not enough over plain http: a man in the middle
could pass the login through untouched and then inject its own "peer" frames.
So every server -> node frame from the welcome on carries "mac" =
HMAC-SHA256(frame key, sequence number (8 bytes, big endian) || canonical JSON
of the frame without "mac"), with frame key = SHA-256(FRAME_LABEL || shared ||
challenge): fresh per login, known only to the node and the real server. The
sequence number (0 for the welcome, +1 per frame) makes a dropped, replayed or
reordered frame fail too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import nacl.bindings
import nacl.exceptions

LABEL = b"overlay-rendezvous login v1"
SERVER_LABEL = b"overlay-rendezvous server v1"
FRAME_LABEL = b"overlay-rendezvous frames v1"
CHALLENGE_LEN = 32


def public_key(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def _mac(shared: bytes, challenge: bytes, node_pub: bytes, server_pub: bytes, suffix: bytes = b"") -> bytes:
    key = hashlib.sha256(LABEL + shared).digest()
    return hmac.new(key, challenge + node_pub + server_pub + suffix, hashlib.sha256).digest()


def _shared(private: bytes, public: bytes) -> bytes | None:
    if len(public) != 32:
        return None
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError:
        return None  # low-order point: no usable shared secret


def answer(node_private: bytes, challenge: bytes, server_pub: bytes) -> bytes:
    """The node's proof for `challenge`."""
    shared = nacl.bindings.crypto_scalarmult(node_private, server_pub)
    return _mac(shared, challenge, public_key(node_private), server_pub)


def verify(server_private: bytes, challenge: bytes, node_pub: bytes, proof: bytes) -> bool:
    """Constant-time check of a node's proof; False for low-order or malformed keys."""
    if len(node_pub) != 32 or len(proof) != 32:
        return False
    try:
        shared = nacl.bindings.crypto_scalarmult(server_private, node_pub)
    except nacl.exceptions.RuntimeError:
        return False  # low-order point: no usable shared secret
    expected = _mac(shared, challenge, node_pub, public_key(server_private))
    return hmac.compare_digest(expected, proof)


def server_answer(server_private: bytes, challenge: bytes, node_pub: bytes) -> bytes | None:
    """The server's proof for the welcome; None if `node_pub` is unusable."""
    shared = _shared(server_private, node_pub)
    if shared is None:
        return None
    return _mac(shared, challenge, node_pub, public_key(server_private), SERVER_LABEL)


def verify_server(node_private: bytes, challenge: bytes, server_pub: bytes, proof: bytes) -> bool:
    """Constant-time check of the server's proof against the key it claimed in the challenge."""
    if len(proof) != 32:
        return False
    shared = _shared(node_private, server_pub)
    if shared is None:
        return False
    expected = _mac(shared, challenge, public_key(node_private), server_pub, SERVER_LABEL)
    return hmac.compare_digest(expected, proof)


def frame_key(private: bytes, peer_public: bytes, challenge: bytes) -> bytes | None:
    """The per-login key for frame MACs; the same from either side's private key."""
    shared = _shared(private, peer_public)
    if shared is None:
        return None
    return hashlib.sha256(FRAME_LABEL + shared + challenge).digest()


def _canonical(obj: dict[str, Any]) -> bytes:
    # Sorted keys, no spaces: both sides serialise the same parsed object to the same bytes.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def frame_mac(key: bytes, seq: int, obj: dict[str, Any]) -> str:
    """Base64 MAC of frame number `seq` (`obj` without its "mac" field)."""
    return base64.b64encode(hmac.new(key, seq.to_bytes(8, "big") + _canonical(obj), hashlib.sha256).digest()).decode()


def verify_frame(key: bytes, seq: int, obj: dict[str, Any]) -> bool:
    """Constant-time check of a received frame's "mac" (which it removes from `obj`)."""
    mac = obj.pop("mac", None)
    if not isinstance(mac, str):
        return False
    return hmac.compare_digest(frame_mac(key, seq, obj).encode(), mac.encode())
