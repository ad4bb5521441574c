"""`overlay-relay` as an operator meets it: config errors, startup failures, tokens, secrets."""

from __future__ import annotations

import json
import socket
import stat
import subprocess

import pytest

from .relayproc import RELAY, Relay, free_port

pytestmark = pytest.mark.timeout(60)


def _relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(RELAY + list(args), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[turn]\nport = "x"\n', "c.toml:2: turn.port must be an integer"),
        ('data_dir = "/tmp"\n[turn]\nlisten = ["not-an-ip"]\n', "c.toml:3: turn.listen: 'not-an-ip' is not an IP address"),
        ('[turn]\nport = 3478\nbogus = 1\n', "c.toml:3: unknown setting turn.bogus"),
        ('[turn]\nport = 70000\n', "c.toml:2: turn.port must be 0-65535"),
        ('[turn\nport = 1\n', "c.toml:1:"),
        ('log_format = "xml"\n', "c.toml:1: log_format must be"),
    ],
)
def test_bad_config_is_one_line_with_file_and_line(tmp_path, text, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    out = _relay("serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_port_in_use_is_a_one_line_error(tmp_path):
    port = free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", port))
    try:
        out = _relay("serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1", "--port", str(port),
                     "--tls-port", "-1", "--http-port", "0", "--http-listen", "127.0.0.1")
    finally:
        blocker.close()
    assert out.returncode == 1
    assert out.stderr.strip().endswith(f"STUN/TURN UDP 127.0.0.1:{port}: address already in use"), out.stderr
    assert "Traceback" not in out.stderr


def test_secrets_generated_private_and_logs_are_json(tmp_path):
    r = Relay(tmp_path, ipv6=False, secret="")
    r.args = [a for a in r.args if a not in ("--secret", "")]
    r.start()
    try:
        for name in ("turn_secret", "server_key", "relay.db", "tls_key.pem"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        creds = json.loads(r.cli("credentials", "--name", "x").stdout)
        secret = (tmp_path / "turn_secret").read_text().strip()
        from overlay.stun.credentials import rest_password

        assert creds["password"] == rest_password(secret, creds["username"])
    finally:
        r.stop()
    lines = [json.loads(line) for line in r.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "listening" for e in lines)
    assert secret not in r.log_path.read_text()


def test_token_create_list_revoke_offline(tmp_path):
    out = _relay("token", "create", "--network", "lab", "--uses", "2", "--expires", "1h", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    token_id, _, secret = token.partition(".")
    assert token_id and len(secret) > 20
    listing = _relay("token", "list", "--data-dir", str(tmp_path)).stdout
    assert token_id in listing and "lab" in listing and secret not in listing
    assert secret not in (tmp_path / "relay.db").read_bytes().decode("latin-1")  # stored hashed only
    assert _relay("token", "revoke", "nope", "--data-dir", str(tmp_path)).returncode == 2
    assert _relay("token", "revoke", token_id, "--data-dir", str(tmp_path)).returncode == 0
    bad = _relay("token", "create", "--network", "lab", "--expires", "soon", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "bad duration" in bad.stderr
    bad = _relay("node", "remove", "--network", "lab", "ghost", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "no node 'ghost'" in bad.stderr


def test_documented_example_config_is_valid(tmp_path):
    from relay_server import config

    doc = config.__doc__
    example = doc.split("Example file:", 1)[1]
    text = "\n".join(line[4:] for line in example.splitlines() if line.startswith("    ") or not line.strip())
    path = tmp_path / "example.toml"
    path.write_text(text)
    cfg = config.load(str(path))
    assert cfg.turn.listen == ["203.0.113.10", "2001:db8::10"] and cfg.turn.alternate_port == 3479
    assert cfg.rendezvous.turn_urls and cfg.log_format == "json"
