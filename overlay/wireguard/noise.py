"""Noise_IKpsk2 handshake as WireGuard uses it (paper section 5.4.2-5.4.4).

Pure functions over bytes; the device decides which peer, index and timers.
Messages are built without their MAC1/MAC2 fields (see cookie.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import nacl.bindings as _nacl

from . import crypto
from .crypto import HandshakeCryptoError, aead_decrypt, aead_encrypt, hash_, kdf
from .messages import INITIATION_PREFIX, RESPONSE_PREFIX

_ZERO32 = bytes(32)


@dataclass(repr=False)
class InitiatorState:
    """What the initiator keeps between sending the initiation and the response."""

    local_index: int
    chain_key: bytes
    hash: bytes
    ephemeral_private: bytes = field(repr=False)

    def __repr__(self) -> str:  # never show key material
        return f"InitiatorState(index={self.local_index})"


@dataclass(repr=False)
class ConsumedInitiation:
    sender_index: int
    remote_static: bytes
    remote_ephemeral: bytes
    timestamp: bytes
    chain_key: bytes
    hash: bytes

    def __repr__(self) -> str:
        return f"ConsumedInitiation(sender={self.sender_index})"


@dataclass(repr=False)
class SessionKeys:
    send_key: bytes
    recv_key: bytes
    remote_index: int

    def __repr__(self) -> str:
        return f"SessionKeys(remote_index={self.remote_index})"


def _generate_private(rng) -> bytes:
    return crypto.clamp_private_key(rng(32))


def create_initiation(
    *,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    local_index: int,
    timestamp: bytes,
    rng,
) -> tuple[bytes, InitiatorState]:
    """Build an initiation (without MACs). `static_static` = DH(our static, their static)."""
    ck = crypto.INITIAL_CHAIN_KEY
    h = hash_(crypto.INITIAL_HASH + remote_static)
    e_priv = _generate_private(rng)
    e_pub = _nacl.crypto_scalarmult_base(e_priv)
    (ck,) = kdf(ck, e_pub, 1)
    h = hash_(h + e_pub)
    ck, key = kdf(ck, crypto.dh(e_priv, remote_static), 2)
    enc_static = aead_encrypt(key, 0, local_static_public, h)
    h = hash_(h + enc_static)
    ck, key = kdf(ck, static_static, 2)
    enc_ts = aead_encrypt(key, 0, timestamp, h)
    h = hash_(h + enc_ts)
    msg = INITIATION_PREFIX + struct.pack("<I", local_index) + e_pub + enc_static + enc_ts
    return msg, InitiatorState(local_index, ck, h, e_priv)


def consume_initiation(msg: bytes, *, local_static_private: bytes,
                       local_static_public: bytes, static_static_for) -> ConsumedInitiation:
    """Decrypt an initiation addressed to us. `static_static_for(remote_static)`
    returns the precomputed DH with that peer, or None if the peer is unknown."""
    sender = struct.unpack_from("<I", msg, 4)[0]
    e_pub = bytes(msg[8:40])
    enc_static = bytes(msg[40:88])
    enc_ts = bytes(msg[88:116])
    ck = crypto.INITIAL_CHAIN_KEY
    h = hash_(crypto.INITIAL_HASH + local_static_public)
    (ck,) = kdf(ck, e_pub, 1)
    h = hash_(h + e_pub)
    ck, key = kdf(ck, crypto.dh(local_static_private, e_pub), 2)
    remote_static = aead_decrypt(key, 0, enc_static, h)
    h = hash_(h + enc_static)
    ss = static_static_for(remote_static)
    if ss is None:
        raise HandshakeCryptoError("unknown peer")
    ck, key = kdf(ck, ss, 2)
    timestamp = aead_decrypt(key, 0, enc_ts, h)
    h = hash_(h + enc_ts)
    return ConsumedInitiation(sender, remote_static, e_pub, timestamp, ck, h)


def create_response(init: ConsumedInitiation, *, local_index: int,
                    preshared_key: bytes | None, rng) -> tuple[bytes, SessionKeys]:
    """Build the response (without MACs) and derive the responder's transport keys."""
    ck, h = init.chain_key, init.hash
    e_priv = _generate_private(rng)
    e_pub = _nacl.crypto_scalarmult_base(e_priv)
    (ck,) = kdf(ck, e_pub, 1)
    h = hash_(h + e_pub)
    (ck,) = kdf(ck, crypto.dh(e_priv, init.remote_ephemeral), 1)
    (ck,) = kdf(ck, crypto.dh(e_priv, init.remote_static), 1)
    ck, tau, key = kdf(ck, preshared_key or _ZERO32, 3)
    h = hash_(h + tau)
    enc_empty = aead_encrypt(key, 0, b"", h)
    h = hash_(h + enc_empty)
    msg = RESPONSE_PREFIX + struct.pack("<II", local_index, init.sender_index) + e_pub + enc_empty
    recv_key, send_key = kdf(ck, b"", 2)
    return msg, SessionKeys(send_key, recv_key, init.sender_index)


def consume_response(msg: bytes, state: InitiatorState, *, local_static_private: bytes,
                     preshared_key: bytes | None) -> SessionKeys:
    """Check a response to our initiation and derive the initiator's transport keys."""
    sender = struct.unpack_from("<I", msg, 4)[0]
    e_pub = bytes(msg[12:44])
    enc_empty = bytes(msg[44:60])
    ck, h = state.chain_key, state.hash
    (ck,) = kdf(ck, e_pub, 1)
    h = hash_(h + e_pub)
    (ck,) = kdf(ck, crypto.dh(state.ephemeral_private, e_pub), 1)
    (ck,) = kdf(ck, crypto.dh(local_static_private, e_pub), 1)
    ck, tau, key = kdf(ck, preshared_key or _ZERO32, 3)
    h = hash_(h + tau)
    aead_decrypt(key, 0, enc_empty, h)
    send_key, recv_key = kdf(ck, b"", 2)
    return SessionKeys(send_key, recv_key, sender)
