"""The `[Rendezvous]` section of the config file: parsed, validated with
`file:line` errors, and written back by `render_config`."""

from __future__ import annotations

import ipaddress

import pytest

from overlay import keys
from overlay.config import ConfigError, RendezvousConfig, load_config, parse_config, render_config

PRIV_B64 = keys.encode(keys.generate_private_key())
PEER = keys.encode(keys.public_key(keys.generate_private_key()))


def test_minimal_rendezvous_config_needs_no_address_and_no_peer() -> None:
    text = f"[Interface]\nPrivateKey = {PRIV_B64}\n\n[Rendezvous]\nURL = https://relay.example.org:8443\n"
    config = parse_config(text, "node.conf")
    assert config.rendezvous == RendezvousConfig(url="https://relay.example.org:8443", token=None, name=None)
    assert config.addresses == []
    assert config.peers == []


def test_all_keys_case_insensitive_and_static_peers_beside_it() -> None:
    text = f"""\
[interface]
privatekey = {PRIV_B64}
address = 100.64.0.3/24

[RENDEZVOUS]
url = ws://203.0.113.10:8080   # a comment
TOKEN = ab12cd34.Zm9vYmFyLWJheg_-
name = laptop

[Peer]
PublicKey = {PEER}
AllowedIPs = 10.9.0.0/24
Endpoint = 192.0.2.1:51820
"""
    config = parse_config(text, "node.conf")
    assert config.rendezvous is not None
    assert config.rendezvous.url == "ws://203.0.113.10:8080"
    assert config.rendezvous.token == "ab12cd34.Zm9vYmFyLWJheg_-"
    assert config.rendezvous.name == "laptop"
    assert len(config.peers) == 1 and config.peers[0].allowed_ips == [ipaddress.ip_network("10.9.0.0/24")]


def test_without_the_section_rendezvous_is_none() -> None:
    config = parse_config(f"[Interface]\nPrivateKey = {PRIV_B64}\n", "x.conf")
    assert config.rendezvous is None


def test_token_is_not_in_repr() -> None:
    r = RendezvousConfig("https://relay.example.org", token="ab12cd34.secretsecret", name="n")
    assert "secretsecret" not in repr(r)


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("[Rendezvous]\nToken = a.b\n", 3, "[Rendezvous] has no URL"),
        ("[Rendezvous]\nURL = ftp://relay.example.org\n", 4, "scheme must be one of http, https, ws, wss"),
        ("[Rendezvous]\nURL = relay.example.org:8080\n", 4, "scheme must be one of"),
        ("[Rendezvous]\nURL = https://\n", 4, "no host"),
        ("[Rendezvous]\nURL = http://relay.example.org:99999\n", 4, "bad URL"),
        ("[Rendezvous]\nURL = http://a.example\nURL = http://b.example\n", 5, "second URL in [Rendezvous] (first at line 4)"),
        ("[Rendezvous]\nURL = http://a.example\nSecret = x\n", 5, "unknown key 'Secret' in [Rendezvous]"),
        ("[Rendezvous]\nURL = http://a.example\nToken = two words\n", 5, "bad token"),
        ("[Rendezvous]\nURL = http://a.example\nName = " + "n" * 65 + "\n", 5, "bad name"),
        ("[Rendezvous]\nURL = http://a.example\n[Rendezvous]\nURL = http://b.example\n", 5,
         "second [Rendezvous] section (first at line 3)"),
        ("[Rendezvous]\nURL = http://a.example\nServerKey = not-a-key\n", 5, "ServerKey: bad server key"),
        ("[Rendezvous]\nURL = http://a.example\nServerKey = Zm9vYmFy\n", 5, "bad server key: a key is 44 characters"),
        ("[Rendezvous]\nURL = http://a.example\nServerKey = " + PEER + "\nserverkey = " + PEER + "\n", 6,
         "second serverkey in [Rendezvous] (first at line 5)"),
    ],
)
def test_errors_name_file_and_line(section: str, line: int, message: str) -> None:
    text = f"[Interface]\nPrivateKey = {PRIV_B64}\n" + section
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.conf")
    assert str(info.value).startswith(f"node.conf:{line}: ")
    assert message in str(info.value)


def test_render_round_trip(tmp_path) -> None:
    text = f"""\
[Interface]
PrivateKey = {PRIV_B64}
Address = 100.64.0.3/24, fd00:1:2:3::3/64

[Rendezvous]
URL = wss://relay.example.org/
Name = build-box-7
Token = ab12cd34.tok

[Peer]
PublicKey = {PEER}
AllowedIPs = 10.9.0.0/24
"""
    config = parse_config(text, "a.conf")
    rendered = render_config(config)
    assert "[Rendezvous]\nURL = wss://relay.example.org/\nName = build-box-7\nToken = ab12cd34.tok\n" in rendered
    path = tmp_path / "again.conf"
    path.write_text(rendered)
    again = load_config(str(path))
    assert again.rendezvous == config.rendezvous
    assert again.rendezvous.token == "ab12cd34.tok"  # type: ignore[union-attr]
    assert again.addresses == config.addresses
    assert [p.public_key for p in again.peers] == [p.public_key for p in config.peers]


def test_render_without_token_or_name_writes_only_the_url() -> None:
    config = parse_config(f"[Interface]\nPrivateKey = {PRIV_B64}\n[Rendezvous]\nURL = http://r.example\n", "a")
    assert render_config(config).endswith("[Rendezvous]\nURL = http://r.example\n")


def test_server_key_is_parsed_pinned_and_written_back(tmp_path) -> None:
    server = keys.public_key(keys.generate_private_key())
    text = (f"[Interface]\nPrivateKey = {PRIV_B64}\n[Rendezvous]\nURL = http://r.example\n"
            f"serverkey = {keys.encode(server)}\n")
    config = parse_config(text, "a.conf")
    assert config.rendezvous is not None and config.rendezvous.server_key == server
    rendered = render_config(config)
    assert f"[Rendezvous]\nURL = http://r.example\nServerKey = {keys.encode(server)}\n" in rendered
    path = tmp_path / "again.conf"
    path.write_text(rendered)
    assert load_config(str(path)).rendezvous == config.rendezvous


def test_without_server_key_nothing_is_pinned() -> None:
    config = parse_config(f"[Interface]\nPrivateKey = {PRIV_B64}\n[Rendezvous]\nURL = http://r.example\n", "a")
    assert config.rendezvous is not None and config.rendezvous.server_key is None
    assert "ServerKey" not in render_config(config)


def test_relay_lines_in_either_section_several_allowed_and_written_back() -> None:
    text = f"""\
[Interface]
PrivateKey = {PRIV_B64}
Relay = turn:203.0.113.20:3478?transport=udp

[Rendezvous]
URL = http://203.0.113.10:8080
relay = turns:relay2.example.org, turn:[2001:db8::20]:3480?transport=tcp
Relay = turn:203.0.113.20:3478?transport=udp
"""
    config = parse_config(text, "node.conf")
    assert config.relays == ["turn:203.0.113.20:3478?transport=udp", "turns:relay2.example.org",
                             "turn:[2001:db8::20]:3480?transport=tcp"]  # file order, duplicates once
    assert parse_config(render_config(config), "again.conf").relays == config.relays


@pytest.mark.parametrize("value", ["stun:203.0.113.20", "http://203.0.113.20", "turn:203.0.113.20:99999",
                                   "turn:203.0.113.20?transport=sctp", "203.0.113.20:3478", ""])
def test_bad_relay_is_refused_with_file_and_line(value: str) -> None:
    text = f"[Interface]\nPrivateKey = {PRIV_B64}\n\n[Rendezvous]\nURL = http://203.0.113.10:8080\nRelay = {value}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.conf")
    assert str(info.value).startswith("node.conf:6: Relay:"), str(info.value)
