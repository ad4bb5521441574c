"""Key-possession proof for rendezvous login (shared by the client and the server).

The server sends a random challenge and its X25519 public key. The node answers
with HMAC-SHA256 over (challenge || node public key || server public key), keyed
by SHA-256(label || X25519(node private, server public)). The server computes the
same shared secret from its private key and the node's registered public key.
Only the holder of the WireGuard private key can answer; nothing secret is sent.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings
import nacl.exceptions

LABEL = b"overlay-rendezvous login v1"
CHALLENGE_LEN = 32


def public_key(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def _mac(shared: bytes, challenge: bytes, node_pub: bytes, server_pub: bytes) -> bytes:
    key = hashlib.sha256(LABEL + shared).digest()
    return hmac.new(key, challenge + node_pub + server_pub, hashlib.sha256).digest()


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
