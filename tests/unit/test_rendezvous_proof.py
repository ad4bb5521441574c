"""Both directions of the rendezvous login proof (overlay/rendezvous/proof.py):
the node proves its WireGuard key, and the server proves the key it announced."""

from __future__ import annotations

import os

from overlay.rendezvous import proof

# A point of small order on Curve25519: X25519 with it gives no usable secret.
LOW_ORDER = bytes(32)


def _keys() -> tuple[bytes, bytes, bytes, bytes, bytes]:
    node, server = os.urandom(32), os.urandom(32)
    return node, proof.public_key(node), server, proof.public_key(server), os.urandom(proof.CHALLENGE_LEN)


def test_the_real_server_proof_verifies_and_the_node_proof_still_does():
    node, node_pub, server, server_pub, challenge = _keys()
    assert proof.verify(server, challenge, node_pub, proof.answer(node, challenge, server_pub))
    server_proof = proof.server_answer(server, challenge, node_pub)
    assert server_proof is not None and len(server_proof) == 32
    assert proof.verify_server(node, challenge, server_pub, server_proof)


def test_an_impostor_with_its_own_key_cannot_prove_the_pinned_key():
    node, node_pub, _server, server_pub, challenge = _keys()
    impostor = os.urandom(32)
    # It announces the real (pinned) key but signs with what it holds.
    forged = proof.server_answer(impostor, challenge, node_pub)
    assert forged is not None
    assert not proof.verify_server(node, challenge, server_pub, forged)
    # Announcing its own key, its proof is valid, but for another key: the client's
    # pin check (server_key_mismatch) is what refuses that one.
    assert proof.verify_server(node, challenge, proof.public_key(impostor), forged)


def test_forged_replayed_and_stale_server_proofs_are_refused():
    node, node_pub, server, server_pub, challenge = _keys()
    assert not proof.verify_server(node, challenge, server_pub, os.urandom(32))
    assert not proof.verify_server(node, challenge, server_pub, b"")
    # The node's own proof (same key, same inputs) is not a server proof: distinct label.
    assert not proof.verify_server(node, challenge, server_pub, proof.answer(node, challenge, server_pub))
    # A proof from an earlier login (another challenge) does not verify now.
    old = proof.server_answer(server, os.urandom(32), node_pub)
    assert old is not None and not proof.verify_server(node, challenge, server_pub, old)
    # A proof made for another node does not verify for this one.
    other_pub = proof.public_key(os.urandom(32))
    theirs = proof.server_answer(server, challenge, other_pub)
    assert theirs is not None and not proof.verify_server(node, challenge, server_pub, theirs)


def test_low_order_and_malformed_keys_give_no_proof():
    node, node_pub, server, server_pub, challenge = _keys()
    assert proof.server_answer(server, challenge, LOW_ORDER) is None
    assert not proof.verify_server(node, challenge, LOW_ORDER, bytes(32))
    assert not proof.verify_server(node, challenge, server_pub[:31], proof.server_answer(server, challenge, node_pub))


def test_frame_macs_bind_key_sequence_and_content():
    node, node_pub, server, server_pub, challenge = _keys()
    key = proof.frame_key(server, node_pub, challenge)
    assert key is not None and key == proof.frame_key(node, server_pub, challenge)  # both sides agree
    frame = {"type": "peer", "network": "n", "peer": {"public_key": "x", "last_seen": 1700000000.123, "ipv4": "100.64.0.2"}}
    sent = {**frame, "mac": proof.frame_mac(key, 7, frame)}
    assert proof.verify_frame(key, 7, dict(sent))
    assert not proof.verify_frame(key, 8, dict(sent))  # replayed or reordered
    tampered = {**sent, "peer": {**frame["peer"], "ipv4": "100.64.0.66"}}
    assert not proof.verify_frame(key, 7, tampered)
    assert not proof.verify_frame(key, 7, dict(frame))  # no mac at all
    other_login = proof.frame_key(server, node_pub, os.urandom(32))
    assert other_login is not None and not proof.verify_frame(other_login, 7, dict(sent))
    assert proof.frame_key(server, LOW_ORDER, challenge) is None
