"""Config parsing: the wg-quick format, multi-endpoint peers, and every error
reported as `file:line: what`."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from overlay import keys
from overlay.config import (
    ConfigError,
    EndpointSpec,
    load_config,
    parse_config,
    render_config,
    resolve_endpoints,
    resolve_endpoints_detailed,
)

PRIV = keys.generate_private_key()
PRIV_B64 = keys.encode(PRIV)
OWN_PUB_B64 = keys.encode(keys.public_key(PRIV))
PEER1 = keys.encode(keys.public_key(keys.generate_private_key()))
PEER2 = keys.encode(keys.public_key(keys.generate_private_key()))
PSK = keys.encode(keys.generate_private_key())

FULL = f"""\
# a typical wg-quick file
[Interface]
PrivateKey = {PRIV_B64}
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
Address = 10.9.0.1
MTU = 1380
DNS = 10.0.0.53, example.internal
Table = off
PreUp = true
PostUp = iptables -A FORWARD -i %i -j ACCEPT; echo up   # hooks are ignored
PreDown = true
PostDown = true
SaveConfig = false
FwMark = 0x1234

[Peer]
PublicKey = {PEER1}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.50.0/24
Endpoint = 192.0.2.1:51820, [2001:db8::1]:51820, home.example.org:51820
PersistentKeepalive = 25

[peer]
publickey={PEER2}
allowedips = 10.0.0.3/32
persistentkeepalive = off
"""


def test_full_file_parses():
    cfg = parse_config(FULL, "wg0.conf")
    assert cfg.private_key == PRIV
    assert cfg.listen_port == 51820
    assert [str(a) for a in cfg.addresses] == ["10.0.0.1/24", "fd00::1/64", "10.9.0.1/32"]
    assert cfg.mtu == 1380
    p1, p2 = cfg.peers
    assert p1.public_key == keys.decode(PEER1)
    assert p1.preshared_key == keys.decode(PSK)
    assert [str(n) for n in p1.allowed_ips] == ["10.0.0.2/32", "fd00::2/128", "192.168.50.0/24"]
    assert p1.endpoints == [
        EndpointSpec("192.0.2.1", 51820),
        EndpointSpec("2001:db8::1", 51820),
        EndpointSpec("home.example.org", 51820),
    ]
    assert p1.persistent_keepalive == 25
    assert p2.persistent_keepalive == 0 and p2.endpoints == [] and p2.preshared_key is None


def test_minimal_file_and_defaults():
    cfg = parse_config(f"[Interface]\nPrivateKey={PRIV_B64}\n")
    assert cfg.listen_port is None and cfg.mtu is None and cfg.peers == [] and cfg.addresses == []


def test_allowed_ips_host_bits_masked_and_bare_address_is_host():
    cfg = parse_config(f"[Interface]\nPrivateKey={PRIV_B64}\n[Peer]\nPublicKey={PEER1}\nAllowedIPs=10.1.2.3/24, 2001:db8::5\n")
    assert cfg.peers[0].allowed_ips == [ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("2001:db8::5/128")]


def test_render_round_trips():
    cfg = parse_config(FULL, "wg0.conf")
    again = parse_config(render_config(cfg))
    assert render_config(again) == render_config(cfg)
    assert again.peers[0].endpoints == cfg.peers[0].endpoints


def test_repr_holds_no_key_material():
    cfg = parse_config(FULL)
    text = repr(cfg)
    assert PRIV_B64 not in text and repr(PRIV) not in text
    assert repr(keys.decode(PSK)) not in text


def _err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "bad.conf")
    return exc.value


IFACE = f"[Interface]\nPrivateKey = {PRIV_B64}\n"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("ListenPort = 1\n", 1, "outside of a section"),
        ("[Interfaces]\n", 1, "unknown section [Interfaces]"),
        ("[Interface\n", 1, "bad section header"),
        (IFACE + "Bogus = 1\n", 3, "unknown key 'Bogus' in [Interface]"),
        (IFACE + "just words\n", 3, "expected 'Key = Value'"),
        (IFACE + "ListenPort = 70000\n", 3, "must be 0..65535"),
        (IFACE + "ListenPort = eighty\n", 3, "not a number"),
        (IFACE + "ListenPort = -1\n", 3, "not a number"),
        (IFACE + "MTU = 100\n", 3, "MTU"),
        (IFACE + "Address = 10.0.0.300/24\n", 3, "bad address"),
        (IFACE + "Address = 10.0.0.1/33\n", 3, "bad address"),
        (IFACE + "PrivateKey = " + PRIV_B64 + "\n", 3, "second PrivateKey (first at line 2)"),
        (IFACE + "[Interface]\n", 3, "second [Interface] section"),
        ("[Interface]\nPrivateKey = abc\n", 2, "bad private key"),
        ("[Interface]\nPrivateKey = " + "!" * 43 + "=\n", 2, "base64"),
        ("[Interface]\nListenPort = 1\n", 1, "no PrivateKey"),
        (IFACE + "[Peer]\nAllowedIPs = 10.0.0.2/32\n", 3, "[Peer] has no PublicKey"),
        (IFACE + "[Peer]\nPublicKey = " + PEER1[:-2] + "\n", 4, "bad public key"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nPublicKey = {PEER2}\n", 5, "second PublicKey"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\n[Peer]\nPublicKey = {PEER1}\n", 6, "duplicate peer"),
        (IFACE + f"[Peer]\nPublicKey = {OWN_PUB_B64}\n", 4, "own public key"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nPresharedKey = short\n", 5, "bad preshared key"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.0/40\n", 5, "bad CIDR"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nAllowedIPs = nonsense\n", 5, "bad CIDR"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = 192.0.2.1\n", 5, "expected host:port"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = 192.0.2.1:0\n", 5, "must be 1..65535"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = 192.0.2.1:99999\n", 5, "must be 1..65535"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = 2001:db8::1:51820\n", 5, "brackets"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = [192.0.2.1]:5\n", 5, "not IPv6"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = [2001:db8::1:5\n", 5, "expected [IPv6]:port"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = bad_host!:5\n", 5, "not an IP or hostname"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = 192.0.2.1:1, nope\n", 5, "expected host:port"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint =\n", 5, "empty endpoint"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nPersistentKeepalive = 70000\n", 5, "keepalive"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nPersistentKeepalive = sometimes\n", 5, "keepalive"),
        (IFACE + f"[Peer]\nPublicKey = {PEER1}\nListenPort = 1\n", 5, "unknown key 'ListenPort' in [Peer]"),
        (IFACE + "MTU = 1000\nAddress = fd00::1/64\n", 3, "IPv6 minimum"),
    ],
)
def test_every_error_names_file_line_and_problem(text, line, fragment):
    e = _err(text)
    assert e.line == line, str(e)
    assert str(e).startswith(f"bad.conf:{line}: "), str(e)
    assert fragment in str(e), str(e)


def test_no_interface_section():
    e = _err(f"[Peer]\nPublicKey = {PEER1}\n")
    assert str(e) == "bad.conf: no [Interface] section"


def test_errors_never_echo_key_material():
    bad_private = PRIV_B64[:-4] + "!!!="
    e = _err(f"[Interface]\nPrivateKey = {bad_private}\n")
    assert bad_private not in str(e)


def test_load_config_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path / "nope.conf"))
    assert "nope.conf: cannot read" in str(exc.value)
    p = tmp_path / "latin.conf"
    p.write_bytes(f"[Interface]\nPrivateKey = {PRIV_B64}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_config(str(p))
    assert str(exc.value).startswith(f"{p}:3: not valid UTF-8")


def _fake_getaddrinfo(table):
    def resolve(host, port, type=0, **kw):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for ip in table[host]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, port, 0, 0) if fam == socket.AF_INET6 else (ip, port)
            out.append((fam, socket.SOCK_DGRAM, 17, "", sockaddr))
        return out
    return resolve


def test_hostname_stands_for_all_its_a_and_aaaa_records():
    cfg = parse_config(FULL)
    resolve = _fake_getaddrinfo({"home.example.org": ["198.51.100.7", "2001:db8::77", "198.51.100.7"]})
    assert resolve_endpoints(cfg.peers[0], resolve) == [
        ("192.0.2.1", 51820),
        ("2001:db8::1", 51820),
        ("198.51.100.7", 51820),
        ("2001:db8::77", 51820),
    ]


def test_unresolvable_hostname_is_reported_and_others_kept():
    cfg = parse_config(FULL)
    eps, failures = resolve_endpoints_detailed(cfg.peers[0], _fake_getaddrinfo({}))
    assert eps == [("192.0.2.1", 51820), ("2001:db8::1", 51820)]
    assert [spec.host for spec, _ in failures] == ["home.example.org"]


def test_localhost_resolves_with_real_getaddrinfo():
    cfg = parse_config(IFACE + f"[Peer]\nPublicKey = {PEER1}\nEndpoint = localhost:5000\n")
    eps = resolve_endpoints(cfg.peers[0])
    assert eps and all(p == 5000 for _, p in eps)
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in eps)


def test_windows_line_endings_and_bom_are_accepted(tmp_path):
    p = tmp_path / "win.conf"
    p.write_bytes(b"\xef\xbb\xbf" + f"[Interface]\r\nPrivateKey = {PRIV_B64}\r\nListenPort = 7\r\n".encode())
    cfg = load_config(str(p))
    assert cfg.listen_port == 7 and cfg.private_key == PRIV
