"""The STUN codec against an independent implementation (aioice) and its own edge cases."""

from __future__ import annotations

import pytest
from aioice import stun as astun

from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials, rest_expiry, rest_password


@pytest.mark.parametrize("addr", [("192.0.2.33", 3478), ("2001:db8::1234", 65535)])
def test_our_encoding_parses_and_verifies_in_aioice(addr):
    msg = m.Message(m.BINDING, m.SUCCESS)
    msg.add_xor_address(m.XOR_MAPPED_ADDRESS, addr).add(m.SOFTWARE, b"odd-length")
    data = msg.encode(key=b"k3y")
    theirs = astun.parse_message(data)  # checks FINGERPRINT itself
    assert theirs.check_message_integrity(b"k3y") and not theirs.check_message_integrity(b"nope")
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == addr
    assert theirs.transaction_id == msg.transaction_id


def test_aioice_encoding_parses_and_verifies_here():
    theirs = astun.Message(astun.Method.ALLOCATE, astun.Class.REQUEST)
    theirs.attributes["USERNAME"] = "u"
    theirs.attributes["XOR-PEER-ADDRESS"] = ("2001:db8::9", 99)
    theirs.add_message_integrity(b"key")
    theirs.add_fingerprint()
    ours = m.parse(bytes(theirs))
    assert ours.method == m.ALLOCATE and ours.cls == m.REQUEST
    assert ours.xor_address(m.XOR_PEER_ADDRESS) == ("2001:db8::9", 99)
    assert ours.check_integrity(b"key") and not ours.check_integrity(b"other")


def test_rejects_malformed_messages():
    good = m.Message(m.BINDING, m.REQUEST).add(m.SOFTWARE, b"x").encode()
    for bad, why in [
        (good[:10], "too short"),
        (good[:-4], "length field"),
        (good[:2] + b"\x00\x05" + good[4:], "multiple of 4"),
        (b"\xc0" + good[1:], "first two bits"),
        (good[:-1] + bytes([good[-1] ^ 1]), "FINGERPRINT"),
    ]:
        with pytest.raises(m.StunError, match=why):
            m.parse(bad)


def test_attribute_running_past_end_is_an_error():
    body = b"\x80\x22\x00\x10abc\0"
    data = b"\x00\x01" + len(body).to_bytes(2, "big") + m.MAGIC_COOKIE_BYTES + b"\1" * 12 + body
    with pytest.raises(m.StunError, match="runs past"):
        m.parse(data)


def test_channel_data_and_stream_framing():
    frame = m.encode_channel_data(0x4001, b"abcde", pad=True)
    assert frame == b"\x40\x01\x00\x05abcde\0\0\0"
    assert m.stream_frame_length(frame) == len(frame)
    assert m.decode_channel_data(frame) == (0x4001, b"abcde")
    assert m.stream_frame_length(b"\x00\x01\x00\x08") == 28
    with pytest.raises(m.StunError):
        m.stream_frame_length(b"\xff\x00\x00\x00")


def test_rest_credentials_match_coturn_formula():
    import base64, hashlib, hmac

    creds = make_rest_credentials("sec", "node1", ttl=60, now=1000)
    assert creds.username == "1060:node1" and rest_expiry(creds.username) == 1060
    expected = base64.b64encode(hmac.new(b"sec", b"1060:node1", hashlib.sha1).digest()).decode()
    assert creds.password == expected == rest_password("sec", "1060:node1")
    assert rest_expiry("plainuser") is None
