"""The rendezvous server proves its key and nodes pin it (trust on first use),
over real WebSockets against real `overlay-relay` processes and an in-process impostor.

What a user sees: `overlay join` writes `ServerKey`; a later login to a server
with another key is refused with "rendezvous server key changed"; `--server-key`
that does not match refuses the join before the token is sent; a server that
announces the right key without holding it cannot complete a login.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from overlay import keys
from overlay.config import InterfaceConfig, RendezvousConfig, load_config
from overlay.rendezvous import RendezvousClient, RendezvousError, proof

from .relayproc import Relay, free_port

pytestmark = pytest.mark.timeout(90)

OVERLAY = [sys.executable, "-m", "overlay.cli"]


def overlay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(OVERLAY + list(args), capture_output=True, text=True, timeout=30, check=False)


def printed_server_key(relay: Relay) -> bytes:
    out = relay.cli("server-key")
    assert out.returncode == 0, out.stderr
    return keys.decode(out.stdout.strip())


@pytest.fixture
def relay_pair(tmp_path):
    """Two relays with different data directories (so different keys), one after
    the other on the same HTTP port: the same URL, another server."""
    http_port = free_port()
    first = Relay(tmp_path / "first", ipv6=False, http_port=http_port)
    second = Relay(tmp_path / "second", ipv6=False, http_port=http_port)
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_server_key_command_matches_the_key_serve_uses_and_logs(tmp_path: Path) -> None:
    r = Relay(tmp_path / "d", ipv6=False)
    before = subprocess.run([sys.executable, "-m", "relay_server.cli", "server-key", "--data-dir", str(r.data_dir)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert before.returncode == 0, before.stderr  # available before the first start
    r.start()
    try:
        assert printed_server_key(r) == keys.decode(before.stdout.strip())
        assert before.stdout.strip() in r.log_path.read_text()  # in serve's start log
        assert oct((r.data_dir / "server_key").stat().st_mode & 0o777) == "0o600"
    finally:
        r.stop()


async def test_join_pins_the_key_and_a_changed_server_is_refused(relay_pair, tmp_path: Path) -> None:
    first, second = relay_pair
    first.start()
    path = tmp_path / "node.conf"
    joined = await asyncio.to_thread(overlay, "join", first.http_url, "--token", first.token("pin"), str(path))
    assert joined.returncode == 0, joined.stderr
    config = load_config(str(path))
    assert config.rendezvous is not None and config.rendezvous.server_key == printed_server_key(first)
    assert keys.encode(config.rendezvous.server_key) in joined.stdout
    url = config.rendezvous.url

    # Every later login is checked against the pinned key: the real server passes...
    again = RendezvousClient(url, config.private_key, server_key=config.rendezvous.server_key)
    await again.connect()
    assert again.server_key == config.rendezvous.server_key and "pin" in again.memberships
    await again.close()

    # ...another server at the same URL does not, and no peer map is taken from it.
    first.stop()
    second.start()
    assert second.http_url == url and printed_server_key(second) != config.rendezvous.server_key
    impostor = RendezvousClient(url, config.private_key, server_key=config.rendezvous.server_key)
    with pytest.raises(RendezvousError) as e:
        await impostor.connect()
    assert e.value.code == "server_key_mismatch"
    assert e.value.message.startswith("rendezvous server key changed")
    assert keys.encode(config.rendezvous.server_key) in e.value.message and "refusing" in e.value.message
    assert impostor.memberships == {} and impostor.peers == {} and not impostor.connected

    # Re-joining the same file at the same URL checks against the key the file pins.
    before = path.read_bytes()
    rejoin = await asyncio.to_thread(overlay, "join", url, "--token", second.token("pin"), str(path))
    assert rejoin.returncode != 0 and "rendezvous server key changed" in rejoin.stderr, rejoin.stderr
    assert path.read_bytes() == before


async def test_server_key_mismatch_refuses_the_join_and_leaves_the_file(relay_pair, tmp_path: Path) -> None:
    first, _ = relay_pair
    first.start()
    (tmp_path / "node").mkdir()
    path = tmp_path / "node" / "node.conf"
    original = f"[Interface]\nPrivateKey = {keys.encode(keys.generate_private_key())}\n"
    path.write_text(original)
    token = first.token("guarded")
    wrong = keys.encode(keys.public_key(keys.generate_private_key()))
    proc = await asyncio.to_thread(overlay, "join", first.http_url, "--token", token, "--server-key", wrong, str(path))
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("overlay: join: rendezvous server key changed") and wrong in err, err
    assert path.read_text() == original
    assert [p.name for p in path.parent.iterdir()] == ["node.conf"]  # no temp file left
    # Refused before the hello: the one-use token is still good, and the right key joins.
    right = keys.encode(printed_server_key(first))
    ok = await asyncio.to_thread(overlay, "join", first.http_url, "--token", token, "--server-key", right, str(path))
    assert ok.returncode == 0, ok.stderr
    assert keys.encode(load_config(str(path)).rendezvous.server_key) == right  # type: ignore[union-attr]

    bad = await asyncio.to_thread(overlay, "join", first.http_url, "--token", token, "--server-key", "xyz", str(path))
    assert bad.returncode != 0 and "--server-key: bad server key" in bad.stderr


async def test_unpinned_client_learns_the_key_and_refuses_a_changed_one_on_reconnect(relay_pair) -> None:
    first, second = relay_pair
    first.start()
    key = os.urandom(32)
    client = RendezvousClient(first.http_url, key, name="tofu")
    up = asyncio.Event()
    task = asyncio.create_task(client.keep_connected(first.token("tofu"), min_delay=0.2, max_delay=0.5, connected=up))
    try:
        await asyncio.wait_for(up.wait(), 10)
        assert client.server_key == printed_server_key(first) == client.expected_server_key
        first.stop()
        second.start()
        with pytest.raises(RendezvousError) as e:
            await asyncio.wait_for(task, 15)
        assert e.value.code == "server_key_mismatch"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_session_refuses_a_changed_server_keeps_its_tunnels_and_reports_it(relay_pair) -> None:
    from structlog.testing import capture_logs

    from overlay.traversal.session import RendezvousSession
    from tests.unit.test_traversal_session import STATIC, make_session

    _, second = relay_pair
    second.start()
    pinned = keys.public_key(keys.generate_private_key())  # not the key of the server at this URL
    _, agent = make_session(static=True)
    agent.config.rendezvous = RendezvousConfig(second.http_url, server_key=pinned)
    session = RendezvousSession(agent, second.http_url, name="me")  # pinned key from the config
    with capture_logs() as logs:
        await asyncio.wait_for(session._run(), 15)
    assert session.error is not None and "rendezvous server key changed" in session.error
    assert any(entry["event"].startswith("rendezvous server key changed") and "refusing" in entry["event"]
               and entry["log_level"] == "error" for entry in logs), logs
    summary = session.summary()
    assert "server_key_mismatch" in summary["error"] and summary["connected"] is False
    assert list(agent.device.peers) == [STATIC]  # the configured tunnel stays; nothing from that server
    await session.close()


async def test_unpinned_session_logs_the_key_to_pin(relay_pair) -> None:
    from structlog.testing import capture_logs

    from overlay.traversal.session import RendezvousSession
    from tests.unit.test_traversal_session import make_session

    first, _ = relay_pair
    first.start()
    _, agent = make_session()
    agent.config = InterfaceConfig(private_key=agent.device.private_key,
                                   rendezvous=RendezvousConfig(first.http_url, token=first.token("tofu2")))
    session = RendezvousSession(agent, first.http_url, token=agent.config.rendezvous.token, name="me")
    with capture_logs() as logs:
        runner = asyncio.create_task(session._run())
        try:
            await asyncio.wait_for(session.connected.wait(), 10)
            for _ in range(50):
                if any("server_key" in entry for entry in logs):
                    break
                await asyncio.sleep(0.1)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await session.close()
    learned = [entry for entry in logs if "server_key" in entry]
    assert learned and learned[0]["server_key"] == keys.encode(printed_server_key(first)), logs
    assert "trusting it on first use" in learned[0]["event"]


class Impostor:
    """A WebSocket server that announces `announce` and answers with `welcome_proof`
    (a callable of challenge and node public key) — a man in the middle's best tries."""

    def __init__(self, announce: bytes, welcome_proof) -> None:
        self.announce = announce
        self.welcome_proof = welcome_proof
        self.hellos = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        challenge = os.urandom(32)
        await ws.send_str(json.dumps({"type": "challenge", "version": 1,
                                      "challenge": base64.b64encode(challenge).decode(),
                                      "server_key": base64.b64encode(self.announce).decode()}))
        msg = await ws.receive(timeout=10)
        if msg.type != 1:  # not text: the client refused before the hello
            return ws
        self.hellos += 1
        hello = json.loads(msg.data)
        welcome = {"type": "welcome", "public_key": hello["public_key"], "memberships": [
            {"network": "evil", "name": "n", "ipv4": "100.64.0.9", "ipv6": "fd00::9",
             "ipv4_prefix": "100.64.0.0/24", "ipv6_prefix": "fd00::/64"}],
            "turn": {"username": "1:x", "password": "cA==", "expires": 1, "urls": []}}
        forged = self.welcome_proof(challenge, base64.b64decode(hello["public_key"]))
        if forged is not None:
            welcome["server_proof"] = base64.b64encode(forged).decode()
        await ws.send_str(json.dumps(welcome))
        await ws.send_str(json.dumps({"type": "peers", "network": "evil", "peers": []}))
        await ws.receive(timeout=5)
        return ws


@pytest.mark.parametrize("forgery", ["random", "own_key_proof", "missing", "node_proof_echo"])
async def test_an_impostor_announcing_the_pinned_key_cannot_log_a_node_in(forgery: str) -> None:
    real_server = os.urandom(32)
    pinned = proof.public_key(real_server)
    impostor_private = os.urandom(32)
    node = os.urandom(32)
    forge = {
        "random": lambda c, n: os.urandom(32),
        "own_key_proof": lambda c, n: proof.server_answer(impostor_private, c, n),
        "missing": lambda c, n: None,
        "node_proof_echo": lambda c, n: proof.answer(node, c, pinned),
    }[forgery]
    impostor = Impostor(pinned, forge)
    app = web.Application()
    app.router.add_get("/v1/ws", impostor.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for server_key in (pinned, None):  # pinned up front, or trusting on first use
            client = RendezvousClient(f"http://127.0.0.1:{port}", node, server_key=server_key)
            with pytest.raises(RendezvousError) as e:
                await client.connect(timeout=5)
            assert e.value.code == "server_auth_failed"
            assert client.memberships == {} and client.peers == {}
            assert client.server_key is None and not client.connected
    finally:
        await runner.cleanup()


async def test_an_impostor_with_its_own_key_is_refused_before_the_hello() -> None:
    pinned = proof.public_key(os.urandom(32))
    impostor_private = os.urandom(32)
    impostor = Impostor(proof.public_key(impostor_private),
                        lambda c, n: proof.server_answer(impostor_private, c, n))
    app = web.Application()
    app.router.add_get("/v1/ws", impostor.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = RendezvousClient(f"http://127.0.0.1:{port}", os.urandom(32), server_key=pinned)
        with pytest.raises(RendezvousError) as e:
            await client.connect(timeout=5)
        assert e.value.code == "server_key_mismatch"
        await asyncio.sleep(0.2)
        assert impostor.hellos == 0  # the node's proof never reached it
    finally:
        await runner.cleanup()


class Proxy:
    """A man in the middle that passes a real login through to the relay untouched,
    then sends the node one frame of its own: a forged peer, or a replayed real frame."""

    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = upstream
        self.mode = mode
        self.injected = asyncio.Event()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        import aiohttp

        down = web.WebSocketResponse()
        await down.prepare(request)
        async with aiohttp.ClientSession() as http, http.ws_connect(self.upstream) as up:
            async def node_to_server() -> None:
                async for msg in down:
                    await up.send_str(msg.data)

            pump = asyncio.create_task(node_to_server())
            last = None
            try:
                async for msg in up:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    await down.send_str(msg.data)
                    frame = json.loads(msg.data)
                    if frame["type"] == "peers" and not self.injected.is_set():
                        last = msg.data
                        if self.mode == "forged":
                            fake = {"public_key": base64.b64encode(os.urandom(32)).decode(), "name": "mallory",
                                    "ipv4": "100.64.0.66", "ipv6": "fd00::66", "candidates": [
                                        {"type": "host", "ip": "203.0.113.66", "port": 51820}], "online": True}
                            forged = {"type": "peer", "network": frame["network"], "peer": fake,
                                      "mac": frame["mac"]}
                            await down.send_str(json.dumps(forged))
                        else:
                            await down.send_str(last)
                        self.injected.set()
            finally:
                pump.cancel()
        return down


@pytest.mark.parametrize("mode", ["forged", "replayed"])
async def test_a_man_in_the_middle_cannot_inject_frames_into_a_real_session(relay_pair, mode: str) -> None:
    first, _ = relay_pair
    first.start()
    member_key = os.urandom(32)
    member = RendezvousClient(first.http_url, member_key, name="m")
    await member.connect(token=first.token("mitm", "--uses", "2"))
    proxy = Proxy(first.http_url + "/v1/ws", mode)
    app = web.Application()
    app.router.add_get("/v1/ws", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    victim = RendezvousClient(f"http://127.0.0.1:{port}", os.urandom(32), name="v",
                              server_key=printed_server_key(first))
    try:
        # The login itself is genuine and passes through: memberships and the real peer.
        await victim.connect(token=first.token("mitm"))
        assert set(victim.peers["mitm"]) == {member.public_key}
        event = await victim.wait_for(lambda e: e["type"] == "error", 10)
        assert event["code"] == "server_auth_failed"
        await victim.wait_for(lambda e: e["type"] == "closed", 10)
        # Nothing of the injected frame was applied.
        assert set(victim.peers["mitm"]) == {member.public_key}
        assert all(p.name != "mallory" for p in victim.peers["mitm"].values())
    finally:
        await victim.close()
        await member.close()
        await runner.cleanup()
