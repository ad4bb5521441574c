"""UAPI: request parsing/validation, `get` formatting, and the socket server
driven both by raw requests and by the stock `wg` tool.

The device here is a small in-test stand-in with the real Device's interface
(the real one is exercised end to end in tests/netns and tests/interop).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import shutil
import stat
import subprocess

import pytest

from overlay import control, keys, uapi
from overlay.wireguard.endpoints import EndpointSet

UNCHANGED = object()


class FakePeer:
    def __init__(self, public_key: bytes):
        self.public_key = public_key
        self.preshared_key = None
        self.allowed_ips: list = []
        self.persistent_keepalive = 0
        self.configured_endpoints: list = []
        self.learned_endpoints: list = []
        self.active_endpoint = None
        self.last_handshake = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        # Kinds and path state for the status document (no candidates here).
        self.endpoint_set = EndpointSet()
        self.probe_unanswered_since: dict = {}
        self.path_stats: dict = {}
        self.path_since = None
        self.path_reason = ""
        self.path_change_count = 0

    @property
    def endpoints(self):
        return self.configured_endpoints + [e for e in self.learned_endpoints if e not in self.configured_endpoints]


class FakeDevice:
    def __init__(self, private_key: bytes):
        self._private = private_key
        self.peers: dict[bytes, FakePeer] = {}

    @property
    def private_key(self):
        return self._private

    @property
    def public_key(self):
        return keys.public_key(self._private)

    def set_private_key(self, key, now):
        self._private = key

    def set_peer(self, public_key, now, *, preshared_key=UNCHANGED, endpoints=None, allowed_ips=None,
                 replace_allowed_ips=False, persistent_keepalive=None):
        peer = self.peers.setdefault(public_key, FakePeer(public_key))
        if preshared_key is not UNCHANGED:
            peer.preshared_key = preshared_key
        if endpoints is not None:
            peer.configured_endpoints = list(endpoints)
        if replace_allowed_ips:
            peer.allowed_ips = []
        if allowed_ips:
            peer.allowed_ips += [n for n in allowed_ips if n not in peer.allowed_ips]
        if persistent_keepalive is not None:
            peer.persistent_keepalive = persistent_keepalive
        return peer

    def remove_peer(self, public_key, now):
        self.peers.pop(public_key, None)

    def remove_all_peers(self, now):
        self.peers.clear()


class FakeAgent:
    WALL_OFFSET = 1_700_000_000.0

    def __init__(self, ifname="fake0"):
        self.device = FakeDevice(keys.generate_private_key())
        self.ifname = ifname
        self.listen_port = 51820
        self.changes = 0
        self.busy_ports = {53}

    async def set_listen_port(self, port):
        if port in self.busy_ports:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.listen_port = port

    def changed(self):
        self.changes += 1

    def monotonic_to_wall(self, t):
        return t + self.WALL_OFFSET


def hexkey():
    return keys.encode_hex(keys.public_key(keys.generate_private_key()))


# ---------------------------------------------------------------------------
# parse_set
# ---------------------------------------------------------------------------


def test_parse_full_set_request():
    pk = hexkey()
    psk = keys.encode_hex(keys.generate_private_key())
    req = uapi.parse_set([
        "private_key=" + keys.encode_hex(keys.generate_private_key()),
        "listen_port=12345",
        "fwmark=0",
        "replace_peers=true",
        "public_key=" + pk,
        "preshared_key=" + psk,
        "endpoint=[2001:db8::1]:51820",
        "endpoint=192.0.2.1:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.2/32",
        "allowed_ip=fd00::/64",
        "protocol_version=1",
    ])
    assert req.listen_port == 12345 and req.replace_peers and req.private_key
    (p,) = req.peers
    assert p.public_key.hex() == pk and p.preshared_key.hex() == psk
    assert p.endpoints == [("2001:db8::1", 51820), ("192.0.2.1", 51820)]
    assert p.persistent_keepalive == 25 and p.replace_allowed_ips
    assert p.allowed_ips == [ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::/64")]


def test_zero_preshared_key_means_remove():
    req = uapi.parse_set(["public_key=" + hexkey(), "preshared_key=" + "0" * 64])
    assert req.peers[0].preshared_key_set and req.peers[0].preshared_key is None


@pytest.mark.parametrize(
    "lines",
    [
        ["listen_port=65536"],
        ["listen_port=abc"],
        ["private_key=1234"],
        ["private_key=" + "0" * 64],
        ["replace_peers=yes"],
        ["bogus=1"],
        ["no equals sign"],
        ["public_key=" + "zz" * 32],
        ["public_key=PLACEHOLDER", "remove=false"],
        ["public_key=PLACEHOLDER", "endpoint=192.0.2.1"],
        ["public_key=PLACEHOLDER", "endpoint=2001:db8::1:5"],
        ["public_key=PLACEHOLDER", "endpoint=[192.0.2.1]:5"],
        ["public_key=PLACEHOLDER", "endpoint=example.org:5"],
        ["public_key=PLACEHOLDER", "endpoint=192.0.2.1:0"],
        ["public_key=PLACEHOLDER", "allowed_ip=10.0.0.0/33"],
        ["public_key=PLACEHOLDER", "persistent_keepalive_interval=65536"],
        ["public_key=PLACEHOLDER", "protocol_version=2"],
        ["public_key=PLACEHOLDER", "listen_port=1"],  # device key inside a peer
        ["public_key=PLACEHOLDER", "preshared_key=abcd"],
    ],
)
def test_invalid_requests_are_einval(lines):
    lines = [line.replace("PLACEHOLDER", hexkey()) for line in lines]
    with pytest.raises(uapi.UapiError) as exc:
        uapi.parse_set(lines)
    assert exc.value.errno == errno.EINVAL


# ---------------------------------------------------------------------------
# apply + get
# ---------------------------------------------------------------------------


async def test_apply_then_get_reports_everything():
    agent = FakeAgent()
    pk = hexkey()
    req = uapi.parse_set([
        "listen_port=4000",
        "public_key=" + pk,
        "endpoint=192.0.2.1:51820",
        "allowed_ip=10.0.0.2/32",
        "persistent_keepalive_interval=25",
    ])
    await uapi.apply_set(agent, req, now=10.0)
    assert agent.listen_port == 4000 and agent.changes == 1
    peer = agent.device.peers[bytes.fromhex(pk)]
    peer.last_handshake = 5.25
    peer.rx_bytes, peer.tx_bytes = 1000, 2000
    text = uapi.format_get(agent)
    lines = text.splitlines()
    assert lines[0] == "private_key=" + agent.device.private_key.hex()
    assert "listen_port=4000" in lines
    i = lines.index("public_key=" + pk)
    peer_lines = lines[i:]
    assert "preshared_key=" + "0" * 64 in peer_lines
    assert "protocol_version=1" in peer_lines
    assert "endpoint=192.0.2.1:51820" in peer_lines
    assert f"last_handshake_time_sec={int(FakeAgent.WALL_OFFSET + 5)}" in peer_lines
    assert "last_handshake_time_nsec=250000000" in peer_lines
    assert "rx_bytes=1000" in peer_lines and "tx_bytes=2000" in peer_lines
    assert "persistent_keepalive_interval=25" in peer_lines
    assert "allowed_ip=10.0.0.2/32" in peer_lines


async def test_get_shows_active_endpoint_and_brackets_ipv6():
    agent = FakeAgent()
    pk = keys.public_key(keys.generate_private_key())
    p = agent.device.set_peer(pk, 0.0, endpoints=[("192.0.2.1", 1), ("2001:db8::9", 2)])
    assert "endpoint=192.0.2.1:1" in uapi.format_get(agent)  # first known while none active
    p.active_endpoint = ("2001:db8::9", 2)
    assert "endpoint=[2001:db8::9]:2" in uapi.format_get(agent)
    doc = uapi.status_dict(agent)
    assert [e["endpoint"] for e in doc["peers"][0]["endpoints"]] == ["192.0.2.1:1", "[2001:db8::9]:2"]
    assert [e["state"] for e in doc["peers"][0]["endpoints"]] == ["trying", "active"]
    assert {e["kind"] for e in doc["peers"][0]["endpoints"]} == {"configured"}
    assert doc["peers"][0]["path"] == "direct" and doc["peers"][0]["endpoint"] == "[2001:db8::9]:2"
    assert doc["peers"][0]["active_endpoint"] == "[2001:db8::9]:2"


async def test_remove_update_only_and_replace_peers():
    agent = FakeAgent()
    a, b, c = (keys.public_key(keys.generate_private_key()) for _ in range(3))
    for k in (a, b):
        agent.device.set_peer(k, 0.0, allowed_ips=[ipaddress.ip_network("10.0.0.0/8")])
    await uapi.apply_set(agent, uapi.parse_set(["public_key=" + a.hex(), "remove=true",
                                                "public_key=" + c.hex(), "update_only=true"]), 1.0)
    assert list(agent.device.peers) == [b]
    await uapi.apply_set(agent, uapi.parse_set(["replace_peers=true", "public_key=" + c.hex()]), 2.0)
    assert list(agent.device.peers) == [c]


async def test_busy_listen_port_changes_nothing():
    agent = FakeAgent()
    pk = hexkey()
    req = uapi.parse_set(["listen_port=53", "public_key=" + pk, "allowed_ip=10.0.0.2/32"])
    with pytest.raises(uapi.UapiError) as exc:
        await uapi.apply_set(agent, req, 1.0)
    assert exc.value.errno == errno.EADDRINUSE
    assert agent.listen_port == 51820 and agent.device.peers == {} and agent.changes == 0


def test_own_key_as_peer_is_refused():
    agent = FakeAgent()
    req = uapi.parse_set(["public_key=" + agent.device.public_key.hex()])
    with pytest.raises(uapi.UapiError):
        uapi.check_against_device(req, agent.device)


# ---------------------------------------------------------------------------
# the socket server
# ---------------------------------------------------------------------------


async def _talk(path: str, text: str) -> str:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(text.encode())
    await writer.drain()
    out = b""
    while not out.endswith(b"\n\n"):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        out += chunk
    writer.close()
    return out.decode()


async def test_server_socket_mode_set_get_and_bad_request_changes_nothing(tmp_path):
    agent = FakeAgent()
    server = control.UapiServer(agent, "fake0", str(tmp_path / "wg"))
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "wg").st_mode) == 0o700
        pk = hexkey()
        ans = await _talk(server.path, f"set=1\npublic_key={pk}\nallowed_ip=10.0.0.2/32\n\n")
        assert ans == "errno=0\n\n"
        # second peer valid, but a later line is bad: nothing of it may be applied
        pk2 = hexkey()
        ans = await _talk(server.path, f"set=1\nlisten_port=999\npublic_key={pk2}\nallowed_ip=10.0.0.3/32\nendpoint=nonsense\n\n")
        assert ans == "errno=22\n\n"
        assert agent.listen_port == 51820 and list(agent.device.peers) == [bytes.fromhex(pk)]
        ans = await _talk(server.path, "get=1\n\n")
        assert ans.endswith("errno=0\n\n") and f"public_key={pk}\n" in ans and pk2 not in ans
        ans = await _talk(server.path, uapi.STATUS_OP + "\n\n")
        assert ans.startswith("json=") and ans.endswith("errno=0\n\n")
        doc = await asyncio.to_thread(control.query_status, "fake0", str(tmp_path / "wg"))
        assert doc["interface"] == "fake0" and len(doc["peers"]) == 1
    finally:
        await server.close()
    assert not os.path.exists(server.path)


async def test_stale_socket_replaced_live_socket_refused(tmp_path):
    import socket as s

    d = tmp_path / "wg"
    d.mkdir()
    stale = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    stale.bind(str(d / "fake0.sock"))
    stale.close()  # file left behind, nobody listening
    server = control.UapiServer(FakeAgent(), "fake0", str(d))
    await server.start()
    try:
        second = control.UapiServer(FakeAgent(), "fake0", str(d))
        with pytest.raises(control.UapiInUse):
            await second.start()
    finally:
        await server.close()


WG_DIR = "/var/run/wireguard"
needs_wg = pytest.mark.skipif(
    shutil.which("wg") is None or os.geteuid() != 0, reason="needs wg and root (/var/run/wireguard)"
)


def _wg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["wg", *args], capture_output=True, text=True, timeout=10)


@needs_wg
async def test_stock_wg_tool_against_the_server(tmp_path):
    """`wg show/showconf/set` against our socket: the protocol as wg speaks it."""
    name = f"ovut{os.getpid() % 100000}"
    agent = FakeAgent(name)
    server = control.UapiServer(agent, name, WG_DIR)
    await server.start()
    try:
        pub = keys.public_key(keys.generate_private_key())
        pub_b64 = keys.encode(pub)
        r = await asyncio.to_thread(
            _wg, "set", name, "listen-port", "4242", "peer", pub_b64, "endpoint", "[2001:db8::1]:51820",
            "allowed-ips", "10.0.0.2/32,fd00::2/128", "persistent-keepalive", "25",
        )
        assert r.returncode == 0, r.stderr
        peer = agent.device.peers[pub]
        assert agent.listen_port == 4242
        assert peer.configured_endpoints == [("2001:db8::1", 51820)]
        assert peer.persistent_keepalive == 25
        peer.last_handshake = 100.0
        peer.rx_bytes = 12345
        r = await asyncio.to_thread(_wg, "show", name, "dump")
        assert r.returncode == 0, r.stderr
        iface, peer_line = r.stdout.strip().splitlines()
        assert iface.split("\t")[0] == keys.encode(agent.device.private_key)
        assert iface.split("\t")[2] == "4242"
        f = peer_line.split("\t")
        assert f[0] == pub_b64 and f[1] == "(none)" and f[2] == "[2001:db8::1]:51820"
        assert f[3] == "10.0.0.2/32,fd00::2/128"
        assert f[4] == str(int(FakeAgent.WALL_OFFSET + 100)) and f[5] == "12345" and f[7] == "25"
        # a PSK from a file, then replace allowed IPs, then remove
        psk_file = tmp_path / "psk"
        psk = keys.generate_private_key()
        keys.write_key_file(str(psk_file), psk)
        r = await asyncio.to_thread(_wg, "set", name, "peer", pub_b64, "preshared-key", str(psk_file),
                                    "allowed-ips", "10.9.0.0/16")
        assert r.returncode == 0, r.stderr
        assert peer.preshared_key == psk and [str(n) for n in peer.allowed_ips] == ["10.9.0.0/16"]
        r = await asyncio.to_thread(_wg, "showconf", name)
        assert "ListenPort = 4242" in r.stdout and "AllowedIPs = 10.9.0.0/16" in r.stdout
        assert f"PresharedKey = {keys.encode(psk)}" in r.stdout
        # a bad request: wg reports the failure, our state is unchanged
        r = await asyncio.to_thread(_wg, "set", name, "listen-port", "53")
        assert r.returncode != 0 and agent.listen_port == 4242
        priv_file = tmp_path / "priv"
        new_priv = keys.generate_private_key()
        keys.write_key_file(str(priv_file), new_priv)
        r = await asyncio.to_thread(_wg, "set", name, "private-key", str(priv_file))
        assert r.returncode == 0 and agent.device.private_key == new_priv
        r = await asyncio.to_thread(_wg, "set", name, "peer", pub_b64, "remove")
        assert r.returncode == 0 and agent.device.peers == {}
        # wg setconf replaces all peers; wg addconf adds to them
        p1, p2 = (keys.public_key(keys.generate_private_key()) for _ in range(2))
        conf = tmp_path / "set.conf"
        body = f"ListenPort = 4343\n[Peer]\nPublicKey = {keys.encode(p1)}\nAllowedIPs = 10.1.0.0/16\n"
        # setconf without PrivateKey asks to remove the key; the agent cannot run
        # keyless, so the whole request is refused and nothing changes
        conf.write_text("[Interface]\n" + body)
        r = await asyncio.to_thread(_wg, "setconf", name, str(conf))
        assert r.returncode != 0 and agent.listen_port == 4242 and agent.device.private_key == new_priv
        conf.write_text(f"[Interface]\nPrivateKey = {keys.encode(new_priv)}\n" + body)
        r = await asyncio.to_thread(_wg, "setconf", name, str(conf))
        assert r.returncode == 0, r.stderr
        assert list(agent.device.peers) == [p1] and agent.listen_port == 4343
        conf.write_text(f"[Peer]\nPublicKey = {keys.encode(p2)}\nAllowedIPs = 10.2.0.0/16\n")
        r = await asyncio.to_thread(_wg, "addconf", name, str(conf))
        assert r.returncode == 0, r.stderr
        assert list(agent.device.peers) == [p1, p2]
        r = await asyncio.to_thread(_wg, "show", "interfaces")
        assert name in r.stdout.split()
    finally:
        await server.close()
    assert not os.path.exists(f"{WG_DIR}/{name}.sock")


async def test_set_and_get_against_the_real_device_core():
    """The same requests applied to the real sans-I/O Device (no sockets)."""
    from overlay.wireguard.device import Device

    agent = FakeAgent()
    agent.device = Device(keys.generate_private_key(), now=0.0)
    pk = hexkey()
    req = uapi.parse_set([
        "public_key=" + pk, "endpoint=192.0.2.1:51820", "endpoint=[2001:db8::1]:51820",
        "allowed_ip=10.0.0.2/32", "persistent_keepalive_interval=25",
        "preshared_key=" + keys.encode_hex(keys.generate_private_key()),
    ])
    uapi.check_against_device(req, agent.device)
    await uapi.apply_set(agent, req, now=1.0)
    peer = agent.device.peers[bytes.fromhex(pk)]
    assert peer.configured_endpoints == [("192.0.2.1", 51820), ("2001:db8::1", 51820)]
    text = uapi.format_get(agent)
    assert "endpoint=192.0.2.1:51820" in text and "allowed_ip=10.0.0.2/32" in text
    assert "persistent_keepalive_interval=25" in text and "preshared_key=" + "0" * 64 not in text
    await uapi.apply_set(agent, uapi.parse_set(["public_key=" + pk, "replace_allowed_ips=true",
                                                "allowed_ip=10.1.0.0/16", "preshared_key=" + "0" * 64]), 2.0)
    assert [str(n) for n in peer.allowed_ips] == ["10.1.0.0/16"] and peer.preshared_key is None
    doc = uapi.status_dict(agent)
    assert [e["endpoint"] for e in doc["peers"][0]["endpoints"]] == ["192.0.2.1:51820", "[2001:db8::1]:51820"]
