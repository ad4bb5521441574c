"""The CLI's user-facing behaviour that needs no root: errors are one line with
no traceback, interface names are checked, status output is readable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overlay import keys
from overlay.cli import format_status, main, validate_ifname, UserError


def _conf(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_up_with_bad_config_is_file_line_and_exit_1(tmp_path):
    priv = keys.encode(keys.generate_private_key())
    p = _conf(tmp_path, "wg0.conf", f"[Interface]\nPrivateKey = {priv}\nListenPort = 123456\n")
    r = subprocess.run([sys.executable, "-m", "overlay.cli", "up", str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"overlay: {p}:3: ListenPort: bad port 123456: must be 0..65535\n"


def test_up_missing_file(tmp_path, capsys):
    assert main(["up", str(tmp_path / "nope.conf")]) == 1
    err = capsys.readouterr().err
    assert "nope.conf: cannot read" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["wg0", "a", "x" * 15, "tun_1.b-c=+"])
def test_valid_interface_names(name):
    assert validate_ifname(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "has space", "sl/ash", "col:on", ".", ".."])
def test_invalid_interface_names(name):
    with pytest.raises(UserError):
        validate_ifname(name)


def test_up_refuses_bad_interface_name_before_anything(tmp_path, capsys):
    priv = keys.encode(keys.generate_private_key())
    p = _conf(tmp_path, "this-name-is-too-long.conf", f"[Interface]\nPrivateKey = {priv}\n")
    assert main(["up", str(p)]) == 1
    assert "not a valid interface name" in capsys.readouterr().err


def test_status_of_unknown_interface(tmp_path, capsys):
    assert main(["status", "nosuch0", "--socket-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "overlay: status: no running interface nosuch0\n"


def test_status_without_interfaces_is_empty(tmp_path, capsys):
    assert main(["status", "--json", "--socket-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_format_status_marks_active_endpoint():
    doc = {
        "interface": "wg0", "public_key": "PUB", "listen_port": 51820, "pid": 1,
        "peers": [{
            "public_key": "PEER", "preshared_key": True,
            "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"],
            "configured_endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"],
            "learned_endpoints": [], "active_endpoint": "[2001:db8::1]:51820",
            "latest_handshake": 1000.0, "rx_bytes": 2048, "tx_bytes": 10,
            "persistent_keepalive": 25, "allowed_ips": ["10.0.0.2/32"],
        }],
    }
    text = format_status(doc, now=1065.0)
    assert "endpoints: 192.0.2.1:51820, [2001:db8::1]:51820 (active)" in text
    assert "latest handshake: 1 minute, 5 seconds ago" in text
    assert "transfer: 2.00 KiB received, 10 B sent" in text
    assert "persistent keepalive: every 25 seconds" in text
    assert "preshared key: (hidden)" in text and "PUB" in text


def test_genkey_output_is_a_valid_clamped_key(capsys):
    assert main(["genkey"]) == 0
    k = keys.decode(capsys.readouterr().out)
    assert keys.clamp(k) == k
