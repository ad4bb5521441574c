"""`overlay ping`: the control socket's `overlay_ping` request answered by a real
Device (an in-session probe to the peer's active endpoint, carried by the
in-memory network), and the CLI's peer lookup and per-reply lines."""

from __future__ import annotations

import asyncio

import pytest

from overlay import control
from overlay.cli import UserError, describe_pong, find_peer, main, ping_summary

from .peer_fixtures import DIRECT, candidate_peer
from .wg_helpers import A1


@pytest.fixture
async def served(tmp_path):
    agent, peer, (a, b, net) = candidate_peer("bob")
    agent.send_device_output = lambda items: net.send(items, A1, agent.clock)
    server = control.UapiServer(agent, "ovping", str(tmp_path))
    await server.start()
    try:
        yield agent, peer, net, str(tmp_path)
    finally:
        await server.close()


async def _ping(socket_dir, key, timeout=0.2):
    return await asyncio.to_thread(control.ping_once, "ovping", key, timeout, socket_dir)


async def test_reply_names_the_path_that_answered(served):
    agent, peer, net, socket_dir = served
    answer = await _ping(socket_dir, peer.public_key)
    assert answer["reply"] is True
    assert answer["path"] == "direct" and answer["endpoint"] == "198.51.100.2:40002" and answer["kind"] == "srflx"
    assert answer["sent_to"] == "198.51.100.2:40002"
    assert answer["rtt_ms"] == 0.0  # the in-memory network answers within the same instant
    assert any(dst == DIRECT for _, _, dst in net.delivered)


async def test_timeout_when_the_path_is_dark(served):
    agent, peer, net, socket_dir = served
    net.blocked.add(DIRECT)
    answer = await _ping(socket_dir, peer.public_key, timeout=0.1)
    assert answer == {"reply": False, "reason": "timeout", "sent_to": "198.51.100.2:40002", "sent_path": "direct"}


async def test_unknown_peer_is_refused(served):
    agent, peer, net, socket_dir = served
    with pytest.raises(control.UapiClientError, match="no such peer"):
        await _ping(socket_dir, bytes(32))


async def test_no_session_yet(served):
    agent, peer, net, socket_dir = served
    peer.current = peer.previous = peer.next = None
    answer = await _ping(socket_dir, peer.public_key)
    assert answer["reply"] is False and answer["reason"] == "no session"


def test_find_peer_by_name_address_or_key():
    doc = {"interface": "wg0", "peers": [
        {"public_key": "AAAAkey1=", "name": "bob", "overlay_ips": ["100.64.0.2"], "allowed_ips": []},
        {"public_key": "BBBBkey2=", "name": None, "overlay_ips": [], "allowed_ips": ["10.0.0.3/32"]},
    ]}
    assert find_peer([doc], "bob")[1]["public_key"] == "AAAAkey1="
    assert find_peer([doc], "100.64.0.2")[1]["name"] == "bob"
    assert find_peer([doc], "10.0.0.3")[1]["public_key"] == "BBBBkey2="
    assert find_peer([doc], "BBBBkey2=")[1]["public_key"] == "BBBBkey2="
    assert find_peer([doc], "BBBB")[1]["public_key"] == "BBBBkey2="
    with pytest.raises(UserError, match=r"no peer 'carol' on wg0 \(peers: BBBBkey2, bob\)"):
        find_peer([doc], "carol")
    other = {"interface": "wg1", "peers": [dict(doc["peers"][0])]}
    with pytest.raises(UserError, match="matches several peers"):
        find_peer([doc, other], "bob")


def test_reply_lines_and_summary():
    reply = {"reply": True, "path": "relay", "endpoint": "203.0.113.5:40000 via 203.0.113.10:3478",
             "kind": "relay", "rtt_ms": 3.456, "sent_to": "203.0.113.5:40000 via 203.0.113.10:3478"}
    assert describe_pong("bob", 1, reply, 1.0) == \
        "reply from bob over relay 203.0.113.5:40000 via 203.0.113.10:3478 (relay): seq=1 time=3.46 ms"
    lost = {"reply": False, "reason": "timeout", "sent_to": "198.51.100.2:40002", "sent_path": "direct"}
    assert describe_pong("bob", 2, lost, 1.0) == \
        "no reply from bob: seq=2 (sent over direct 198.51.100.2:40002, waited 1 s)"
    assert ping_summary("bob", 2, [3.456]) == \
        "--- bob: 2 probes sent, 1 reply, 50% lost; rtt min/avg/max = 3.46/3.46/3.46 ms"
    assert ping_summary("bob", 3, []) == "--- bob: 3 probes sent, 0 replies, 100% lost"


def test_ping_without_a_running_agent(tmp_path, capsys):
    assert main(["ping", "bob", "--socket-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "overlay: ping: no running interface (is `overlay up` running?)\n"
    assert main(["ping", "bob", "wg9", "--socket-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == \
        "overlay: ping: no running interface wg9 (is `overlay up` running?)\n"
