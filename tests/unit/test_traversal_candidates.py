"""Candidate model, host-candidate selection, interface enumeration and change events (in a namespace),
plus the first-byte demultiplexer and the TURN stream framer."""

from __future__ import annotations

import asyncio
import struct

import pytest

from overlay.lab.netns import Namespace
from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.traversal import demux
from overlay.traversal.candidates import (Candidate, CandidateError, host_candidates, interface_addresses,
                                          network_changes, parse_candidates)
from overlay.traversal.stream import StreamFramer, frame_for_stream
from relay_server.rendezvous import validate_candidates
from tests.support import needs_root

# -- candidates -----------------------------------------------------------------------------------------


def test_candidate_dict_round_trip_matches_the_rendezvous_shape():
    cands = [Candidate("host", "192.0.2.10", 51820), Candidate("srflx", "2001:db8:0::7", 40000),
             Candidate("relay", "198.51.100.1", 50000), Candidate("prflx", "203.0.113.9", 1)]
    dicts = [c.to_dict() for c in cands]
    assert dicts[1] == {"type": "srflx", "ip": "2001:db8::7", "port": 40000}  # canonical IP text
    assert validate_candidates(dicts) == dicts  # what the relay accepts, unchanged
    assert [Candidate.from_dict(d) for d in dicts] == cands
    assert cands[1].family == 6 and cands[0].address == ("192.0.2.10", 51820)


@pytest.mark.parametrize("obj,what", [
    ({"type": "bogus", "ip": "192.0.2.1", "port": 1}, "type"),
    ({"type": "host", "ip": "not-an-ip", "port": 1}, "ip"),
    ({"type": "host", "ip": "192.0.2.1", "port": 0}, "port"),
    ({"type": "host", "ip": "192.0.2.1", "port": "80"}, "port"),
    ({"type": "host", "ip": "192.0.2.1", "port": True}, "port"),
    ({"type": "host", "ip": "192.0.2.1"}, "port"),
    (["host", "192.0.2.1", 1], "object"),
])
def test_bad_candidate_is_a_clear_error(obj, what):
    with pytest.raises(CandidateError, match=what):
        Candidate.from_dict(obj)


def test_parse_candidates_skips_junk_and_duplicates():
    got = parse_candidates([{"type": "host", "ip": "192.0.2.1", "port": 5, "extra": "x"}, {"type": "host"}, 7,
                            {"type": "host", "ip": "192.0.2.1", "port": 5}])
    assert got == [Candidate("host", "192.0.2.1", 5)]
    assert parse_candidates("nope") == []


def test_host_candidates_exclude_loopback_link_local_multicast_and_overlay():
    addrs = ["127.0.0.1", "::1", "169.254.3.4", "fe80::1", "fe80::1%eth0", "224.0.0.1", "ff02::1", "0.0.0.0",
             "192.0.2.10", "2001:db8::10", "100.64.0.5", "fd7a::5", "192.0.2.10", "::ffff:192.0.2.11", "bad"]
    got = host_candidates(addrs, 51820, exclude=["100.64.0.5", "fd7a::/64"])
    assert got == [Candidate("host", "192.0.2.10", 51820), Candidate("host", "2001:db8::10", 51820)]


# -- interfaces and change events, in a namespace of our own --------------------------------------------------

@pytest.fixture
def ns(netns_prefix):
    space = Namespace(f"{netns_prefix}trv").create()
    try:
        space.run("ip", "link", "set", "lo", "up")
        # No dummy module on this kernel: a veth pair with both ends inside the namespace.
        space.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        space.run("ip", "link", "set", "d0", "up")
        space.run("ip", "link", "set", "d1", "up")
        yield space
    finally:
        space.delete()


@needs_root()
async def test_interface_addresses_and_host_candidates_in_a_namespace(ns):
    from pyroute2 import AsyncIPRoute

    ns.run("ip", "addr", "add", "192.0.2.10/24", "dev", "d0")
    ns.run("ip", "-6", "addr", "add", "2001:db8::10/64", "dev", "d0", "nodad")
    ns.run("ip", "addr", "add", "100.64.0.1/10", "dev", "d0")  # stands for the overlay address
    ipr = AsyncIPRoute(netns=ns.name)
    try:
        addrs = await interface_addresses(ipr)
    finally:
        ipr.close()
    assert {"127.0.0.1", "::1", "192.0.2.10", "2001:db8::10", "100.64.0.1"} <= set(addrs)
    assert any(a.startswith("fe80:") for a in addrs)  # the veth's link-local exists ...
    cands = host_candidates(addrs, 51820, exclude=["100.64.0.1"])
    assert cands == [Candidate("host", "192.0.2.10", 51820), Candidate("host", "2001:db8::10", 51820)]  # ... but is not used


@needs_root()
@pytest.mark.timeout(20)
async def test_network_changes_reports_address_and_route_events(ns):
    events: list[str] = []
    changes = network_changes(netns=ns.name)

    async def collect() -> None:
        async for ev in changes:
            events.append(ev)

    task = asyncio.create_task(collect())
    try:
        await asyncio.sleep(0.3)  # let the subscription bind
        ns.run("ip", "addr", "add", "192.0.2.20/24", "dev", "d0")
        ns.run("ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1")
        ns.run("ip", "addr", "del", "192.0.2.20/24", "dev", "d0")
        for _ in range(50):
            if {"RTM_NEWADDR", "RTM_NEWROUTE", "RTM_DELADDR"} <= set(events):
                break
            await asyncio.sleep(0.1)
        assert {"RTM_NEWADDR", "RTM_NEWROUTE", "RTM_DELADDR"} <= set(events), events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await changes.aclose()


# -- demultiplexing the shared socket -------------------------------------------------------------------------

def test_classify_first_bytes():
    stun = sc.binding_request().encode()
    assert demux.classify(stun) == demux.STUN
    assert demux.classify(memoryview(stun)) == demux.STUN
    assert demux.classify(m.encode_channel_data(0x4000, b"x")) == demux.CHANNEL_DATA
    assert demux.classify(m.encode_channel_data(0x4FFF, b"")) == demux.CHANNEL_DATA
    for t in (1, 2, 3, 4):  # WireGuard, even with the STUN cookie at offset 4
        assert demux.classify(bytes([t, 0, 0, 0]) + m.MAGIC_COOKIE_BYTES + bytes(140)) == demux.WIREGUARD
    assert demux.classify(bytes([5, 0, 0, 0]) + bytes(40)) == demux.OTHER
    assert demux.classify(bytes([0, 1, 0, 0]) + bytes(40)) == demux.OTHER  # STUN-like, no cookie
    assert demux.classify(bytes([0x50, 0, 0, 0])) == demux.OTHER  # beyond the RFC 8656 channel range
    assert demux.classify(b"\x01\x00\x00") == demux.OTHER


# -- stream framing ----------------------------------------------------------------------------------------

def test_stream_framer_cuts_stun_and_padded_channeldata_across_chunks():
    stun = sc.binding_request().encode()
    cd = frame_for_stream(m.encode_channel_data(0x4001, b"hello"))
    assert len(cd) == 12 and cd.endswith(b"\0\0\0")
    assert frame_for_stream(stun) == stun
    stream = stun + cd + stun + frame_for_stream(m.encode_channel_data(0x4002, b""))
    for size in (1, 3, 7, len(stream)):
        f = StreamFramer()
        frames = []
        for i in range(0, len(stream), size):
            frames += f.feed(stream[i:i + size])
        assert frames == [stun, cd, stun, struct.pack("!HH", 0x4002, 0)]
        assert f.error is None


def test_stream_framer_flags_garbage():
    f = StreamFramer()
    assert f.feed(b"\xffGET / HTTP/1.1\r\n") == []
    assert f.error and "out of sync" in f.error
    assert f.feed(sc.binding_request().encode()) == []  # nothing more is trusted on that stream
