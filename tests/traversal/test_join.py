"""`overlay join` against a real `overlay-relay serve` process on loopback.

What a user sees: a config file that `overlay up` can use, written 0600, with
the key, the addresses the relay assigned and the [Rendezvous] section (no
token); a refused, unreachable or rate-limited join is one line on stderr, a
non-zero exit and the file left exactly as it was.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overlay import keys
from overlay.config import load_config
from tests.relay.relayproc import Relay, free_port

pytestmark = pytest.mark.timeout(60)

OVERLAY = [sys.executable, "-m", "overlay.cli"]


def overlay(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(OVERLAY + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(tmp_path_factory.mktemp("joinrelay"), ipv6=False,
              extra=["--rate-per-minute", "100000", "--rate-burst", "10000"])
    r.start()
    try:
        yield r
    finally:
        r.stop()


def node_rows(relay: Relay, network: str) -> list[list[str]]:
    out = relay.cli("node", "list", "--network", network)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]


def test_join_writes_a_config_up_can_use(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("alpha")
    path = tmp_path / "alpha0.conf"
    proc = overlay("join", relay.http_url, "--token", token, "--name", "laptop", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "joined alpha as laptop" in proc.stdout

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text and "Token" not in text  # spent; never stored
    config = load_config(str(path))
    assert config.rendezvous is not None
    assert config.rendezvous.url == relay.http_url and config.rendezvous.name == "laptop"
    assert config.peers == []

    # The relay's own view: this key, this name, these addresses.
    rows = node_rows(relay, "alpha")
    public = keys.encode(keys.public_key(config.private_key))
    row = next(r for r in rows if r[2] == public)
    assert row[1] == "laptop"
    v4 = next(a for a in config.addresses if a.version == 4)
    v6 = next(a for a in config.addresses if a.version == 6)
    assert str(v4.ip) == row[3] and str(v6.ip) == row[4]
    # The network's prefix lengths, so the whole overlay routes into the tunnel.
    networks = relay.cli("network", "list").stdout
    assert str(v4.network) in networks and str(v6.network) in networks
    assert v4.network.prefixlen == 24 and v6.network.prefixlen == 64
    assert ipaddress.ip_address(row[3]) in ipaddress.ip_network("100.64.0.0/10")


def test_two_nodes_get_different_addresses_and_default_name_is_the_host_name(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("beta", "--uses", "2")
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    assert overlay("join", relay.http_url, "--token", token, str(a)).returncode == 0
    assert overlay("join", relay.http_url, "--token", token, str(b)).returncode == 0
    ca, cb = load_config(str(a)), load_config(str(b))
    assert not keys.keys_equal(ca.private_key, cb.private_key)
    assert set(ca.addresses).isdisjoint(cb.addresses)
    assert ca.rendezvous.name == os.uname().nodename[:64]  # type: ignore[union-attr]


def test_rejoin_reuses_the_key_and_keeps_static_peers(relay: Relay, tmp_path: Path) -> None:
    peer = keys.encode(keys.public_key(keys.generate_private_key()))
    private = keys.generate_private_key()
    path = tmp_path / "static.conf"
    path.write_text(f"[Interface]\nPrivateKey = {keys.encode(private)}\nAddress = 10.77.0.1/24\nListenPort = 51999\n\n"
                    f"[Peer]\nPublicKey = {peer}\nAllowedIPs = 10.77.0.2/32\nEndpoint = 192.0.2.7:51820\n")
    path.chmod(0o644)
    proc = overlay("join", relay.http_url, "--token", relay.token("gamma"), "--name", "n1", str(path))
    assert proc.returncode == 0, proc.stderr
    config = load_config(str(path))
    assert keys.keys_equal(config.private_key, private)
    assert config.listen_port == 51999
    assert [keys.encode(p.public_key) for p in config.peers] == [peer]
    assert ipaddress.ip_interface("10.77.0.1/24") in config.addresses  # the user's own address stays
    assert any(a.ip in ipaddress.ip_network("100.64.0.0/10") for a in config.addresses)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # Joining again with the same key spends no use: a used-up token still works for it.
    first = [str(a) for a in config.addresses]
    again = overlay("join", relay.http_url, "--token", relay.token("gamma"), "--name", "n1", str(path))
    assert again.returncode == 0, again.stderr
    assert [str(a) for a in load_config(str(path)).addresses] == first


def _assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("overlay: join: "), err
    for needle in needles:
        assert needle in err, err


def test_wrong_token_is_refused_and_nothing_is_written(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("delta")
    token_id = token.split(".")[0]
    path = tmp_path / "d.conf"
    proc = overlay("join", relay.http_url, "--token", token_id + ".not-the-secret", str(path))
    _assert_refused(proc, "join refused", "invalid token")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left either
    assert node_rows(relay, "delta") == []


def test_reused_token_is_refused_and_the_existing_file_is_untouched(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("epsilon")  # one use
    assert overlay("join", relay.http_url, "--token", token, str(tmp_path / "first.conf")).returncode == 0
    second = tmp_path / "second.conf"
    second.write_text("# not a config yet, but must survive\n")
    before = second.read_bytes()
    proc = overlay("join", relay.http_url, "--token", token, str(tmp_path / "third.conf"))
    _assert_refused(proc, "join refused", "used up")
    assert not (tmp_path / "third.conf").exists()
    assert second.read_bytes() == before


def test_revoked_token_is_refused(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("zeta")
    assert relay.cli("token", "revoke", token.split(".")[0]).returncode == 0
    _assert_refused(overlay("join", relay.http_url, "--token", token, str(tmp_path / "z.conf")), "revoked")


def test_existing_file_of_another_rendezvous_needs_force(relay: Relay, tmp_path: Path) -> None:
    private = keys.generate_private_key()
    path = tmp_path / "other.conf"
    original = f"[Interface]\nPrivateKey = {keys.encode(private)}\n\n[Rendezvous]\nURL = https://elsewhere.example:8443\n"
    path.write_text(original)
    token = relay.token("eta")
    proc = overlay("join", relay.http_url, "--token", token, str(path))
    _assert_refused(proc, "already belongs to the rendezvous at https://elsewhere.example:8443", "--force")
    assert path.read_text() == original
    assert node_rows(relay, "eta") == []  # refused before the token was spent

    proc = overlay("join", relay.http_url, "--token", token, "--force", str(path))
    assert proc.returncode == 0, proc.stderr
    config = load_config(str(path))
    assert keys.keys_equal(config.private_key, private)
    assert config.rendezvous.url == relay.http_url  # type: ignore[union-attr]


def test_existing_broken_file_is_not_overwritten(relay: Relay, tmp_path: Path) -> None:
    path = tmp_path / "broken.conf"
    path.write_text("[Interface]\nPrivateKey = nonsense\n")
    proc = overlay("join", relay.http_url, "--token", relay.token("theta"), str(path))
    _assert_refused(proc, f"{path}:2:", "bad private key")
    assert path.read_text() == "[Interface]\nPrivateKey = nonsense\n"


@pytest.mark.parametrize(("url", "needle"), [
    ("ftp://127.0.0.1:1", "scheme must be one of"),
    ("http://", "no host"),
])
def test_bad_url_is_refused(url: str, needle: str, tmp_path: Path) -> None:
    _assert_refused(overlay("join", url, "--token", "a.b", str(tmp_path / "x.conf")), needle)


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    path = tmp_path / "x.conf"
    proc = overlay("join", f"http://127.0.0.1:{port}", "--token", "abcd.efgh", str(path))
    _assert_refused(proc, "cannot reach the rendezvous at", f"127.0.0.1:{port}")
    assert not path.exists()


def test_silent_server_times_out_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as listener:  # accepts TCP, never answers HTTP
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = overlay("join", f"http://127.0.0.1:{port}", "--token", "abcd.efgh", "--timeout", "1",
                       str(tmp_path / "x.conf"))
    _assert_refused(proc, "no answer within 1 s")


def test_not_a_rendezvous_is_named(tmp_path: Path) -> None:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proc = overlay("join", f"http://127.0.0.1:{server.server_port}", "--token", "abcd.efgh",
                       str(tmp_path / "x.conf"))
    finally:
        server.shutdown()
        server.server_close()
    _assert_refused(proc, "is not an overlay rendezvous", "HTTP")


def test_rate_limited_join_says_so(tmp_path: Path) -> None:
    r = Relay(tmp_path / "limited", ipv6=False, extra=["--rate-per-minute", "1", "--rate-burst", "1"])
    r.start()
    try:
        token = r.token("iota", "--uses", "5")
        assert overlay("join", r.http_url, "--token", token, str(tmp_path / "1.conf")).returncode == 0
        path = tmp_path / "2.conf"
        proc = overlay("join", r.http_url, "--token", token, str(path))
        _assert_refused(proc, "rate limiting", "try again")
        assert not path.exists()
    finally:
        r.stop()


def test_unwritable_directory_fails_before_the_token_is_spent(relay: Relay, tmp_path: Path) -> None:
    token = relay.token("kappa")
    proc = overlay("join", relay.http_url, "--token", token, str(tmp_path / "missing-dir" / "k.conf"))
    _assert_refused(proc, "cannot write in")
    assert node_rows(relay, "kappa") == []
    assert overlay("join", relay.http_url, "--token", token, str(tmp_path / "k.conf")).returncode == 0


def test_addresses_take_the_network_prefix_or_fall_back_to_host_routes() -> None:
    from overlay.join import membership_addresses
    from overlay.rendezvous import Membership

    with_prefix = Membership("n", "x", "100.64.3.7", "fd00:1:2:3::7", "100.64.3.0/24", "fd00:1:2:3::/64")
    assert [str(a) for a in membership_addresses(with_prefix)] == ["100.64.3.7/24", "fd00:1:2:3::7/64"]
    without = Membership("n", "x", "100.64.3.7", "fd00:1:2:3::7", None, None)
    assert [str(a) for a in membership_addresses(without)] == ["100.64.3.7/32", "fd00:1:2:3::7/128"]
    # A prefix that does not contain the address is not believed.
    odd = Membership("n", "x", "100.64.3.7", "", "10.0.0.0/8", None)
    assert [str(a) for a in membership_addresses(odd)] == ["100.64.3.7/32"]


@pytest.mark.parametrize(("a", "b", "same"), [
    ("http://relay.example:8080", "ws://relay.example:8080/", True),
    ("https://Relay.Example", "wss://relay.example:443/v1/ws", True),
    ("http://relay.example:8080", "http://relay.example:8081", False),
    ("http://relay.example", "http://other.example", False),
])
def test_same_rendezvous(a: str, b: str, same: bool) -> None:
    from overlay.join import same_rendezvous

    assert same_rendezvous(a, b) is same
