"""Which relays the agent talks to (from the TURN credentials' URLs) and what it publishes."""

from __future__ import annotations

import asyncio

from overlay.traversal.gatherer import TurnServer, parse_turn_url, resolve_servers


def test_turn_urls_are_parsed_with_their_transport():
    assert parse_turn_url("turn:203.0.113.10:3478?transport=udp") == ("turn", "203.0.113.10", 3478, "udp")
    assert parse_turn_url("turn:[2001:db8::1]:3478?transport=tcp") == ("turn", "2001:db8::1", 3478, "tcp")
    assert parse_turn_url("turns:relay.example:5349?transport=tcp") == ("turns", "relay.example", 5349, "tls")
    assert parse_turn_url("stun:203.0.113.10") == ("stun", "203.0.113.10", 3478, "udp")
    for bad in ("http://x", "turn:", "turn:203.0.113.10:99999", "turn:h:1?transport=sctp", "garbage"):
        assert parse_turn_url(bad) is None, bad


def test_servers_in_url_order_and_the_rendezvous_host_as_fallback():
    urls = ["stun:203.0.113.10:3478", "turn:203.0.113.10:3478?transport=udp",
            "turn:203.0.113.10:3478?transport=tcp", "turns:203.0.113.10:5349?transport=tcp", "nonsense:1"]
    stun, turn = asyncio.run(resolve_servers(urls, "198.51.100.99"))
    assert stun == [("203.0.113.10", 3478)]
    assert turn == [TurnServer(("203.0.113.10", 3478), "udp"), TurnServer(("203.0.113.10", 3478), "tcp"),
                    TurnServer(("203.0.113.10", 5349), "tls")]
    # No usable URL at all: the rendezvous host on the default port, UDP then TCP.
    stun, turn = asyncio.run(resolve_servers([], "198.51.100.99"))
    assert stun == [("198.51.100.99", 3478)]
    assert [t.transport for t in turn] == ["udp", "tcp"]
