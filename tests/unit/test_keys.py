"""Keys: `wg`'s text formats, clamping, key files, no key material in errors."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys

import pytest

from overlay import keys
from overlay.cli import main

HAS_WG = shutil.which("wg") is not None


def test_generated_private_key_is_clamped_and_44_chars():
    for _ in range(20):
        k = keys.generate_private_key()
        assert len(k) == 32
        assert k[0] & 7 == 0 and k[31] & 0x80 == 0 and k[31] & 0x40
        text = keys.encode(k)
        assert len(text) == 44 and text.endswith("=")
        assert keys.decode(text) == k


def test_public_key_matches_rfc7748_vector():
    # Alice's key pair from RFC 7748 section 6.1.
    priv = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert keys.public_key(priv) == pub


@pytest.mark.skipif(not HAS_WG, reason="needs wg")
def test_genkey_and_pubkey_agree_with_wg():
    proc = subprocess.run([sys.executable, "-m", "overlay.cli", "genkey"], capture_output=True, text=True)
    assert proc.returncode == 0
    private = proc.stdout
    assert len(private.strip()) == 44
    ours = subprocess.run([sys.executable, "-m", "overlay.cli", "pubkey"], input=private,
                          capture_output=True, text=True)
    theirs = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True)
    assert ours.returncode == 0 and theirs.returncode == 0
    assert ours.stdout == theirs.stdout
    # and the other way round: a key from `wg genkey` is accepted by us
    wgkey = subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout
    ours = subprocess.run([sys.executable, "-m", "overlay.cli", "pubkey"], input=wgkey,
                          capture_output=True, text=True)
    theirs = subprocess.run(["wg", "pubkey"], input=wgkey, capture_output=True, text=True)
    assert ours.stdout == theirs.stdout


def test_pubkey_rejects_garbage_without_traceback(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("not a key\n"))
    assert main(["pubkey"]) == 1
    err = capsys.readouterr().err
    assert "invalid private key" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "44 characters"),
        ("abc=", "44 characters"),
        ("A" * 43 + "!", "44 characters"),  # no trailing '='
        ("!" * 43 + "=", "base64"),
        (base64.b64encode(b"x" * 31).decode() + "AAAA", "44 characters"),
        ("A" * 42 + "B=", "canonical"),  # stray low bits in the last character
    ],
)
def test_decode_errors_name_the_problem_not_the_key(text, fragment):
    with pytest.raises(keys.InvalidKey) as exc:
        keys.decode(text)
    assert fragment in str(exc.value)
    if len(text) > 4:
        assert text not in str(exc.value)


def test_hex_round_trip_and_errors():
    k = keys.generate_private_key()
    assert keys.decode_hex(keys.encode_hex(k)) == k
    with pytest.raises(keys.InvalidKey):
        keys.decode_hex("00" * 31)
    with pytest.raises(keys.InvalidKey):
        keys.decode_hex("zz" * 32)


def test_key_file_written_0600_even_over_a_wider_file(tmp_path):
    path = tmp_path / "priv.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    k = keys.generate_private_key()
    keys.write_key_file(str(path), k)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.read_key_file(str(path)) == k


def test_keys_equal_is_exact():
    a = keys.generate_private_key()
    assert keys.keys_equal(a, bytes(a))
    assert not keys.keys_equal(a, a[:-1] + bytes([a[-1] ^ 1]))
    assert keys.keys_equal(None, None) and not keys.keys_equal(a, None)


def test_genkey_warns_when_redirected_into_a_readable_file(tmp_path):
    for mode, warned in ((0o644, True), (0o600, False)):
        path = tmp_path / f"key{mode:o}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        os.fchmod(fd, mode)
        r = subprocess.run([sys.executable, "-m", "overlay.cli", "genkey"], stdout=fd,
                           stderr=subprocess.PIPE, text=True)
        os.close(fd)
        assert r.returncode == 0
        assert ("readable by others" in r.stderr) == warned
        assert len(keys.decode(path.read_text())) == 32
