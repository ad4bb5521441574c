"""Rendezvous over real WebSockets against a running overlay-relay, with the overlay.rendezvous client."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os

import aiohttp
import pytest

from overlay.rendezvous import RendezvousClient, RendezvousError
from overlay.stun.credentials import rest_password

from .relayproc import Relay

pytestmark = pytest.mark.timeout(90)


def _key() -> bytes:
    return os.urandom(32)


async def _client(relay: Relay, token: str | None = None, name: str = "", key: bytes | None = None) -> RendezvousClient:
    c = RendezvousClient(relay.http_url, key or _key(), name=name)
    await c.connect(token=token)
    return c


async def test_join_gives_addresses_peers_and_turn_credentials(relay):
    token = relay.token("alpha", "--uses", "3")
    a = await _client(relay, token, "a")
    b = await _client(relay, token, "b")
    try:
        ma, mb = a.memberships["alpha"], b.memberships["alpha"]
        net4 = ipaddress.ip_network(ma.ipv4_prefix)
        assert net4.subnet_of(ipaddress.ip_network("100.64.0.0/10"))
        assert ipaddress.ip_address(ma.ipv4) in net4 and ipaddress.ip_address(mb.ipv4) in net4
        assert ma.ipv4 != mb.ipv4 and ma.ipv6 != mb.ipv6
        assert ipaddress.ip_address(ma.ipv6) in ipaddress.ip_network(ma.ipv6_prefix)
        assert ma.ipv6.startswith("fd")
        # b saw a in its initial map; a hears about b live.
        assert b.peers["alpha"][a.public_key].online
        await a.wait_for(lambda e: e["type"] == "peer" and e["peer"]["public_key"] == b.public_key)
        assert a.peers["alpha"][b.public_key].ipv4 == mb.ipv4
        # TURN REST credentials derived from the shared secret, with URLs.
        creds = a.turn
        assert creds.password == rest_password(relay.secret, creds.username)
        assert any(u.startswith("turn:127.0.0.1:") for u in creds.urls)
        fresh = await a.refresh_turn()
        assert fresh.password == rest_password(relay.secret, fresh.username)
    finally:
        await a.close()
        await b.close()


async def test_wrong_unknown_used_up_expired_and_revoked_tokens_are_refused(relay):
    with pytest.raises(RendezvousError) as e:
        await _client(relay, "deadbeef.not-a-real-token")
    assert e.value.code == "join_refused"

    token = relay.token("beta", "--uses", "1")
    first = await _client(relay, token)
    await first.close()
    with pytest.raises(RendezvousError) as e:
        await _client(relay, token)
    assert e.value.code == "join_refused" and "used up" in e.value.message

    expiring = relay.token("beta", "--uses", "5", "--expires", "1s")
    await asyncio.sleep(1.6)
    with pytest.raises(RendezvousError) as e:
        await _client(relay, expiring)
    assert "expired" in e.value.message

    revoked = relay.token("beta", "--uses", "5")
    token_id = revoked.split(".")[0]
    out = relay.cli("token", "revoke", token_id)
    assert out.returncode == 0, out.stderr
    with pytest.raises(RendezvousError) as e:
        await _client(relay, revoked)
    assert "revoked" in e.value.message
    listing = relay.cli("token", "list").stdout
    assert token_id in listing and "yes" in listing
    # A token with the right id but a wrong secret is refused too.
    good = relay.token("beta", "--uses", "5")
    with pytest.raises(RendezvousError):
        await _client(relay, good.split(".")[0] + ".wrong-secret")


async def test_key_proof_with_wrong_key_is_refused(relay):
    token = relay.token("gamma")
    key = _key()
    member = await _client(relay, token, key=key)
    await member.close()
    # Log in claiming the member's public key but holding another private key.
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(relay.http_url + "/v1/ws") as ws:
            challenge = json.loads((await ws.receive()).data)
            from overlay.rendezvous import proof

            forged = proof.answer(_key(), base64.b64decode(challenge["challenge"]),
                                  base64.b64decode(challenge["server_key"]))
            await ws.send_str(json.dumps({"type": "hello", "public_key": member.public_key,
                                          "proof": base64.b64encode(forged).decode()}))
            reply = json.loads((await ws.receive()).data)
            assert reply["code"] == "auth_failed"
            closing = await ws.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # An unknown key without a token is refused as well; the real key still logs in.
    with pytest.raises(RendezvousError) as e:
        await _client(relay)
    assert e.value.code == "auth_failed"
    again = await _client(relay, key=key)
    assert "gamma" in again.memberships
    await again.close()


async def test_member_of_x_never_sees_y(relay):
    x1 = await _client(relay, relay.token("net-x"), "x1")
    y1 = await _client(relay, relay.token("net-y"), "y1")
    x2 = await _client(relay, relay.token("net-x"), "x2")
    try:
        await x1.publish_candidates([{"type": "host", "ip": "10.0.0.1", "port": 1000}])
        await y1.publish_candidates([{"type": "host", "ip": "10.9.9.9", "port": 9999}])
        await x2.wait_for(lambda e: e["type"] == "peer" and e["peer"]["candidates"])
        await asyncio.sleep(0.3)
        seen_by_x2 = [e for e in _drain(x2)]
        assert set(x2.peers) == {"net-x"} and set(x2.peers["net-x"]) == {x1.public_key}
        assert set(y1.peers) == {"net-y"} and y1.peers["net-y"] == {}
        assert all(y1.public_key not in json.dumps(e) for e in seen_by_x2)
        assert all(x1.public_key not in json.dumps(e) for e in _drain(y1))
        # Asking to connect to a member of another network reveals nothing.
        await y1.request_connect("net-x", x1.public_key)
        err = await y1.wait_for(lambda e: e["type"] == "error")
        assert err["code"] == "not_member"
        await y1.request_connect("net-y", x1.public_key)
        err = await y1.wait_for(lambda e: e["type"] == "error")
        assert err["code"] == "peer_offline"
    finally:
        for c in (x1, y1, x2):
            await c.close()


def _drain(client: RendezvousClient) -> list[dict]:
    out = []
    while not client.events.empty():
        out.append(client.events.get_nowait())
    return out


async def test_candidates_and_connect_reach_both_sides(relay):
    token = relay.token("delta", "--uses", "2")
    a = await _client(relay, token, "a")
    b = await _client(relay, token, "b")
    try:
        cands = [{"type": "host", "ip": "192.168.1.5", "port": 51820},
                 {"type": "srflx", "ip": "198.51.100.7", "port": 40000},
                 {"type": "relay", "ip": "2001:db8::7", "port": 50000, "server": "turn:relay"}]
        await a.publish_candidates(cands)
        ev = await b.wait_for(lambda e: e["type"] == "peer" and e["peer"]["public_key"] == a.public_key
                              and e["peer"]["candidates"])
        assert ev["peer"]["candidates"] == cands
        assert b.peers["delta"][a.public_key].candidates == cands
        _drain(a)
        await a.request_connect("delta", b.public_key, request_id=7)
        ea, eb = await asyncio.gather(a.wait_for(lambda e: e["type"] == "connect"),
                                      b.wait_for(lambda e: e["type"] == "connect"))
        assert ea["peer"]["public_key"] == b.public_key and eb["peer"]["public_key"] == a.public_key
        assert eb["peer"]["candidates"] == cands and ea["initiator"] == eb["initiator"] == a.public_key
        assert ea["id"] == eb["id"] == 7
        # Bad candidates are refused with an error and change nothing.
        await a.publish_candidates([{"type": "host", "ip": "not-an-ip", "port": 1}])
        err = await a.wait_for(lambda e: e["type"] == "error")
        assert err["code"] == "bad_request" and "ip" in err["message"]
        assert b.peers["delta"][a.public_key].candidates == cands
        # b goes away: a sees it offline.
        await b.close()
        ev = await a.wait_for(lambda e: e["type"] == "peer" and e["peer"]["public_key"] == b.public_key
                              and not e["peer"]["online"])
        assert ev["peer"]["last_seen"] is not None
    finally:
        await a.close()
        await b.close()


async def test_operator_remove_kicks_node_and_tells_peers(relay):
    token = relay.token("epsilon", "--uses", "2")
    a = await _client(relay, token, "keeper")
    b = await _client(relay, token, "victim")
    try:
        listing = relay.cli("node", "list", "--network", "epsilon").stdout
        assert "victim" in listing and b.public_key in listing
        out = relay.cli("node", "remove", "--network", "epsilon", "victim")
        assert out.returncode == 0, out.stderr
        ev = await b.wait_for(lambda e: e["type"] == "removed")
        assert ev["network"] == "epsilon"
        closed = await b.wait_for(lambda e: e["type"] == "closed")
        assert closed["code"] == 4004
        ev = await a.wait_for(lambda e: e["type"] == "peer_removed")
        assert ev["public_key"] == b.public_key and b.public_key not in a.peers["epsilon"]
        # The removed key cannot log in any more.
        with pytest.raises(RendezvousError):
            await _client(relay, key=b._private)
        assert "victim" not in relay.cli("node", "list").stdout
    finally:
        await a.close()
        await b.close()


async def test_bad_frames_get_errors_and_server_keeps_serving(relay):
    token = relay.token("zeta", "--uses", "2")
    good = await _client(relay, token, "good")
    try:
        async with aiohttp.ClientSession() as http:
            # Garbage instead of a hello.
            async with http.ws_connect(relay.http_url + "/v1/ws") as ws:
                await ws.receive()
                await ws.send_str("{not json")
                reply = json.loads((await ws.receive()).data)
                assert reply["code"] == "bad_request"
            async with http.ws_connect(relay.http_url + "/v1/ws") as ws:
                await ws.receive()
                await ws.send_bytes(b"\x00\x01binary")
                reply = json.loads((await ws.receive()).data)
                assert reply["code"] == "bad_request"
            async with http.ws_connect(relay.http_url + "/v1/ws") as ws:
                await ws.receive()
                await ws.send_str(json.dumps({"type": "hello", "public_key": "!!", "proof": 5}))
                reply = json.loads((await ws.receive()).data)
                assert reply["code"] == "bad_request"
        # After login: bad messages get errors, the session stays usable.
        for bad in ("[1,2]", "{}", '{"type": "nope"}', '{"type": "connect"}', "\xff" * 10):
            await good._ws.send_str(bad)
            err = await good.wait_for(lambda e: e["type"] == "error")
            assert err["code"] == "bad_request"
        creds = await good.refresh_turn()
        assert creds.username
        other = await _client(relay, token, "other")
        await other.close()
    finally:
        await good.close()


async def test_rate_limit_on_unauthenticated_attempts(tmp_path):
    r = Relay(tmp_path, ipv6=False, extra=["--rate-per-minute", "6", "--rate-burst", "3"])
    r.start()
    try:
        codes = []
        for _ in range(6):
            try:
                await _client(r, "aaaa.bbbb")
            except RendezvousError as exc:
                codes.append(exc.code)
        assert codes[:3] == ["join_refused"] * 3
        assert "rate_limited" in codes[3:]
    finally:
        r.stop()


async def test_restart_keeps_memberships_and_addresses(tmp_path):
    r = Relay(tmp_path, ipv6=False)
    r.start()
    key = _key()
    try:
        first = await _client(r, r.token("persist"), key=key, name="p")
        before = first.memberships["persist"]
        await first.close()
    finally:
        r.stop()
    r2 = Relay(tmp_path, ipv6=False)  # same data directory, new ports
    r2.start()
    try:
        again = await _client(r2, key=key)
        after = again.memberships["persist"]
        assert (after.ipv4, after.ipv6, after.ipv4_prefix, after.ipv6_prefix) == \
               (before.ipv4, before.ipv6, before.ipv4_prefix, before.ipv6_prefix)
        # The server's key survived too: the same relay identity, so the proof still works.
        other = await _client(r2, r2.token("persist"), name="q")
        assert other.memberships["persist"].ipv4 != after.ipv4
        await other.close()
        await again.close()
        metrics = await _get(r2.http_url + "/metrics")
        assert "overlay_relay_members_online" in metrics and "overlay_relay_allocations" in metrics
        assert '"status": "ok"' in await _get(r2.http_url + "/healthz")
    finally:
        r2.stop()


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            return await resp.text()


async def test_keep_connected_survives_a_server_restart(tmp_path):
    from .relayproc import free_port

    http_port = free_port()
    r = Relay(tmp_path, ipv6=False, http_port=http_port)
    r.start()
    token = r.token("phoenix", "--uses", "2")
    a, b = RendezvousClient(r.http_url, _key(), "a"), RendezvousClient(r.http_url, _key(), "b")
    up_a, up_b = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(a.keep_connected(token, min_delay=0.2, max_delay=0.5, connected=up_a)),
             asyncio.create_task(b.keep_connected(token, min_delay=0.2, max_delay=0.5, connected=up_b))]
    try:
        await asyncio.wait_for(asyncio.gather(up_a.wait(), up_b.wait()), 10)
        cands = [{"type": "srflx", "ip": "198.51.100.1", "port": 4242}]
        await a.publish_candidates(cands)
        await b.wait_for(lambda e: e["type"] == "peer" and e["peer"]["candidates"] == cands)
        r.stop()
        await asyncio.wait_for(b.wait_for(lambda e: e["type"] == "closed"), 10)
        r2 = Relay(tmp_path, ipv6=False, http_port=http_port)
        r2.start()
        try:
            await asyncio.wait_for(asyncio.gather(up_a.wait(), up_b.wait()), 15)

            def a_back(e):
                p = b.peers.get("phoenix", {}).get(a.public_key)
                return p is not None and p.online and p.candidates == cands

            if not a_back({}):
                await b.wait_for(a_back, 10)
            assert a.memberships["phoenix"].ipv4 == b.peers["phoenix"][a.public_key].ipv4
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await a.close()
            await b.close()
            r2.stop()
    finally:
        r.stop()


async def test_join_a_second_network_while_connected(relay):
    a = await _client(relay, relay.token("multi-1"), "a")
    b = await _client(relay, relay.token("multi-2"), "b")
    try:
        mship = await a.join(relay.token("multi-2"))
        assert mship.network == "multi-2" and set(a.memberships) == {"multi-1", "multi-2"}
        assert ipaddress.ip_address(mship.ipv4) in ipaddress.ip_network(b.memberships["multi-2"].ipv4_prefix)
        await b.wait_for(lambda e: e["type"] == "peer" and e["peer"]["public_key"] == a.public_key)
        assert a.peers["multi-2"][b.public_key].online
        with pytest.raises(RendezvousError) as e:
            await a.join("0000.bogus")
        assert e.value.code == "join_refused"
    finally:
        await a.close()
        await b.close()
