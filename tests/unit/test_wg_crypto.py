"""Known-answer checks of the primitives the handshake is built from."""

from overlay.wireguard import crypto
from overlay.wireguard.cookie import mac1_key


def test_construction_and_identifier_hashes():
    assert crypto.INITIAL_CHAIN_KEY.hex() == (
        "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36")
    assert crypto.INITIAL_HASH.hex() == (
        "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3")


def test_blake2s_rfc7693_vector():
    assert crypto.hash_(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")


def test_hmac_blake2s_vectors_short_and_long_key():
    msg = b"wireguard hmac-blake2s vector"
    assert crypto.hmac(bytes(range(32)), msg).hex() == (
        "8c4c063b533b2d34800d148200ab6ef98f87751f673a8c13af5d2ee3794ecd26")
    long_key = bytes((i * 7) & 0xFF for i in range(100))
    assert crypto.hmac(long_key, msg).hex() == (
        "21381bd6d3e1587acc6e924c7124888f27a8aa419ea1ab21c2d959ddae4342e4")


def test_hkdf_chain_vector():
    t = crypto.kdf(crypto.INITIAL_CHAIN_KEY, bytes(range(0xA0, 0xC0)), 3)
    assert [x.hex() for x in t] == [
        "01c60c3cca9f140e11e55e302d1d34c3a812781c5a8137b2164e4fb3f7940b12",
        "0d62641054b13a75421848b67947d571d01736e9356ba41edf250bc816f7cc45",
        "27bc6978c99652c19d54c6c67486f19563d8ef8add6b92b4f8f060d24b0b6a0d",
    ]
    # kdf with fewer outputs is a prefix of the longer chain
    assert crypto.kdf(crypto.INITIAL_CHAIN_KEY, bytes(range(0xA0, 0xC0)), 1) == t[:1]


def test_mac1_label_key_vector():
    assert mac1_key(bytes(range(0x10, 0x30))).hex() == (
        "0610c88c434d08c6ec4e701b3a605c2dbb7ff85281a697b206b4100778dc1118")


def test_x25519_rfc7748_vector():
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert crypto.public_key(a).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert crypto.dh(a, crypto.public_key(b)).hex() == shared
    assert crypto.dh(b, crypto.public_key(a)).hex() == shared


def test_low_order_point_is_rejected():
    import pytest
    with pytest.raises(crypto.HandshakeCryptoError):
        crypto.dh(bytes(range(32)), bytes(32))


def test_tai64n_is_big_endian_monotonic_and_whitened():
    t1 = crypto.tai64n(1_700_000_000.0)
    assert len(t1) == 12
    assert int.from_bytes(t1[:8], "big") == (1 << 62) + 10 + 1_700_000_000
    assert crypto.tai64n(1_700_000_000.001) == t1  # below the ~16 ms granularity
    assert crypto.tai64n(1_700_000_000.5) > t1
    assert crypto.tai64n(1_700_000_001.0) > crypto.tai64n(1_700_000_000.99)
