"""Path logic of the core with a fake clock: relayed endpoints, candidate endpoints,
in-session probes, the relay -> direct upgrade and the roaming rules, punching.

The little network below has two nodes behind NATs: A at A_D and B at B_D (their
server-reflexive addresses), and B's TURN allocation on server S with relayed
address R_B. A reaches B through the relay by sending to R_B straight from its
socket; B sees those packets arrive through its allocation with the source
RelayEndpoint(S, A_D) and answers through it. The direct path can be blocked.
"""

from __future__ import annotations

import pytest

from overlay.wireguard import paths
from overlay.wireguard.endpoints import (
    MAX_CANDIDATE_ENDPOINTS,
    RELAY_ROAM_HOLD,
    EndpointSet,
    RelayEndpoint,
    endpoint_bytes,
    normalize,
)

from .wg_helpers import ip4, make_device, net

A_D = ("198.51.100.1", 40001)
B_D = ("198.51.100.2", 40002)
S = ("203.0.113.10", 3478)
R_B = ("203.0.113.10", 50000)
VIA_RELAY_FROM_A = RelayEndpoint(S, A_D)  # how A's packets to R_B show up at B


class World:
    def __init__(self, tiebreak: bool = True):
        self.a, self.b = make_device(1), make_device(2)
        self.a.set_peer(self.b.public_key, 0.0, allowed_ips=[net("10.0.0.2/32")])
        self.b.set_peer(self.a.public_key, 0.0, allowed_ips=[net("10.0.0.1/32")])
        self.pa = self.a.peers[self.b.public_key]
        self.pb = self.b.peers[self.a.public_key]
        self.pa.endpoint_set.set_candidates([(B_D, "srflx"), (R_B, "relay")])
        self.pb.endpoint_set.set_candidates([(A_D, "srflx")])
        self.pa.crossing_tiebreak = self.pb.crossing_tiebreak = tiebreak
        self.direct_open = True
        self.tun = {self.a: [], self.b: []}
        self.log: list[tuple[str, object, bytes]] = []  # (sender, destination, datagram)

    def send(self, sender, out, now: float, depth: int = 0) -> None:
        for msg, dst in out:
            msg = bytes(msg)
            if sender is self.a:
                self.log.append(("a", dst, msg))
                if dst == B_D:
                    target, src = (self.b, A_D) if self.direct_open else (None, None)
                elif dst == R_B:
                    target, src = self.b, VIA_RELAY_FROM_A
                else:
                    target, src = None, None
            else:
                self.log.append(("b", dst, msg))
                if dst == A_D:
                    target, src = (self.a, B_D) if self.direct_open else (None, None)
                elif dst == VIA_RELAY_FROM_A:
                    target, src = self.a, R_B
                else:
                    target, src = None, None
            if target is None:
                continue
            pkts, replies = target.datagrams([(msg, src)], now)
            self.tun[target].extend(pkts)
            if depth < 10:
                self.send(target, replies, now, depth + 1)

    def timers(self, now: float) -> None:
        for dev in (self.a, self.b):
            self.send(dev, dev.handle_timers(now), now)

    def ping_a_to_b(self, now: float) -> None:
        self.send(self.a, self.a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], now), now)

    def ping_b_to_a(self, now: float) -> None:
        self.send(self.b, self.b.tun_packets([ip4("10.0.0.2", "10.0.0.1")], now), now)


# -- endpoints ----------------------------------------------------------------------------------

def test_relay_endpoint_is_a_distinct_hashable_value():
    ep = RelayEndpoint(S, A_D)
    assert ep == RelayEndpoint(("203.0.113.10", 3478), ("198.51.100.1", 40001))
    assert len({ep, RelayEndpoint(S, A_D), A_D}) == 2
    assert normalize(ep) is ep and type(ep) is not tuple
    assert str(ep) == "198.51.100.1:40001 via 203.0.113.10:3478"
    assert endpoint_bytes(ep) != endpoint_bytes(RelayEndpoint(S, B_D))


def test_candidates_map_to_kinds_and_path_classification():
    eset = EndpointSet()
    eset.set_configured([("192.0.2.9", 51820)])
    eset.set_candidates([(B_D, "srflx"), (R_B, "relay"), (("10.2.0.10", 40002), "host")])
    assert eset.all() == [("192.0.2.9", 51820), B_D, R_B, ("10.2.0.10", 40002)]
    assert [eset.kind_of(e) for e in eset.all()] == ["configured", "srflx", "relay", "host"]
    assert eset.is_relayed(R_B) and eset.is_relayed(RelayEndpoint(S, B_D))
    assert not eset.is_relayed(B_D)
    eset.confirm(("192.0.2.77", 1))  # an address not announced: peer-reflexive
    assert eset.kind_of(("192.0.2.77", 1)) == "prflx"


def test_candidates_replace_the_group_and_stay_bounded():
    eset = EndpointSet()
    many = [((f"198.51.100.{i}", 1000 + i), "srflx") for i in range(40)]
    eset.set_candidates(many)
    assert len(eset.candidates) == MAX_CANDIDATE_ENDPOINTS
    assert eset.active == many[0][0]
    eset.confirm(("192.0.2.50", 9))  # learned while talking
    eset.set_candidates([(B_D, "host")])
    # The previous group is gone as a whole; the learned and the active one stay.
    assert eset.candidates == [B_D]
    assert ("192.0.2.50", 9) in eset.all() and many[1][0] not in eset.all()
    # A learned address announced later becomes a candidate of its kind, not learned.
    eset.set_candidates([(("192.0.2.50", 9), "srflx")])
    assert eset.learned == [] and eset.kind_of(("192.0.2.50", 9)) == "srflx"


def test_learned_endpoints_are_evicted_oldest_first():
    eset = EndpointSet(max_learned=3)
    for i in range(5):
        eset.confirm((f"192.0.2.{i}", 1))
    assert eset.learned == [("192.0.2.2", 1), ("192.0.2.3", 1), ("192.0.2.4", 1)]


# -- fast first packet and the upgrade ------------------------------------------------------------

def test_first_packet_goes_through_the_relay_when_direct_is_not_open_yet():
    w = World()
    w.direct_open = False
    w.ping_a_to_b(1.0)
    w.timers(1.0 + 0.011)  # happy eyeballs: the relay copy goes 10 ms after the first
    assert w.tun[w.b], "the first packet did not arrive"
    assert w.pa.active_endpoint == R_B and paths.path_of(w.pa) == "relay"
    assert w.pb.active_endpoint == VIA_RELAY_FROM_A and paths.path_of(w.pb) == "relay"


def test_probe_pong_moves_relay_to_direct_without_a_new_handshake():
    w = World()
    w.direct_open = False
    w.ping_a_to_b(1.0)
    w.timers(1.011)
    w.ping_b_to_a(1.02)  # b's data confirms the session on both sides
    kp_a, kp_b, hs = w.pa.current, w.pb.current, w.pa.last_handshake
    # Probes while direct is still closed: nothing changes, the endpoint shows failed later.
    w.send(w.a, w.a.probe(w.pa, paths.direct_endpoints(w.pa), 2.0), 2.0)
    assert w.pa.active_endpoint == R_B
    assert paths.endpoint_state(w.pa, B_D, 2.5) == "trying"
    assert paths.endpoint_state(w.pa, B_D, 2.0 + paths.PROBE_FAIL_AFTER) == "failed"
    w.direct_open = True
    w.send(w.a, w.a.probe(w.pa, paths.direct_endpoints(w.pa), 6.0), 6.0)
    assert w.pa.active_endpoint == B_D and paths.path_of(w.pa) == "direct"
    assert paths.endpoint_state(w.pa, B_D, 6.0) == "active"
    assert paths.endpoint_state(w.pa, R_B, 6.0) == "ok"
    assert w.pa.current is kp_a and w.pb.current is kp_b and w.pa.last_handshake == hs
    # b follows a as soon as a's data arrives on the direct path.
    n_tun = len(w.tun[w.b])
    w.ping_a_to_b(6.1)
    assert len(w.tun[w.b]) == n_tun + 1
    assert w.pb.active_endpoint == A_D and paths.path_of(w.pb) == "direct"


def test_probes_never_make_the_receiver_roam():
    w = World()
    w.direct_open = False
    w.ping_a_to_b(1.0)
    w.timers(1.011)
    w.ping_b_to_a(1.02)
    w.direct_open = True
    # Only a ping from a to b on the direct path, no pong delivered back to a yet.
    pings = w.a.probe(w.pa, [B_D], 2.0)
    assert len(pings) == 1
    pkts, replies = w.b.datagrams([(pings[0][0], A_D)], 2.0)
    assert pkts == []  # not an IP packet: nothing reaches b's TUN
    assert w.pb.active_endpoint == VIA_RELAY_FROM_A  # no roaming on a probe
    pong = [(m, d) for m, d in replies if d == A_D]
    assert pong, "the pong goes back on the path the ping came by"


def test_a_stock_style_packet_from_the_relay_does_not_pull_direct_back():
    w = World()
    w.ping_a_to_b(1.0)  # direct works: the session is direct from the start
    w.ping_b_to_a(1.01)
    assert w.pa.active_endpoint == B_D and w.pb.active_endpoint == A_D
    # b sends one data packet through the relay (e.g. an old path of its own).
    kp = w.pb.current
    data = w.b._seal(w.pb, kp, VIA_RELAY_FROM_A, [ip4("10.0.0.2", "10.0.0.1")], 2.0)
    w.send(w.b, data, 2.0)
    assert len(w.tun[w.a]) == 2  # delivered
    assert w.pa.active_endpoint == B_D, "one relayed packet pulled a working direct path"
    # Once the direct path has been silent for the hold time, the relay takes over.
    later = 1.01 + RELAY_ROAM_HOLD + 0.1
    data = w.b._seal(w.pb, kp, VIA_RELAY_FROM_A, [ip4("10.0.0.2", "10.0.0.1")], later)
    w.send(w.b, data, later)
    assert w.pa.active_endpoint == R_B


def test_data_from_a_direct_source_always_roams_off_the_relay():
    eset = EndpointSet()
    eset.set_candidates([(B_D, "srflx"), (R_B, "relay")])
    eset.confirm(R_B)
    assert eset.roam(B_D, 10.0) and eset.active == B_D


def test_unanswered_probes_do_not_start_a_rekey():
    w = World()
    w.ping_a_to_b(1.0)
    w.ping_b_to_a(1.01)
    before = (w.pa.t_new_handshake, w.pa.t_send_keepalive, w.pa.t_persistent)
    out = w.a.probe(w.pa, [("192.0.2.200", 1)], 2.0)
    assert len(out) == 1
    assert (w.pa.t_new_handshake, w.pa.t_send_keepalive, w.pa.t_persistent) == before


# -- punching -------------------------------------------------------------------------------------------

def test_punch_sends_the_initiation_to_every_endpoint_at_once():
    w = World()
    out = paths.punch(w.a, w.pa, 1.0)
    assert sorted(map(str, (d for _, d in out))) == sorted(map(str, [B_D, R_B]))
    assert len({m for m, _ in out}) == 1 and out[0][0][0] == 1  # one initiation, copied
    assert w.pa.eyeballs is None  # nothing held back for later
    again = paths.punch(w.a, w.pa, 1.2)  # still in flight: the same bytes again
    assert {m for m, _ in again} == {out[0][0]} and len(again) == 2


def test_punch_with_a_session_probes_the_direct_endpoints_only():
    w = World()
    w.direct_open = False
    w.ping_a_to_b(1.0)
    w.timers(1.011)
    w.ping_b_to_a(1.02)
    out = paths.punch(w.a, w.pa, 2.0)
    assert [d for _, d in out] == [B_D]
    assert all(m[0] == 4 for m, _ in out)  # transport messages (pings), no handshake


@pytest.mark.parametrize("tiebreak", [True, False])
def test_crossing_initiations(tiebreak):
    """Both sides punch at once. Without the tie-break both handshakes are lost
    (each side drops its own for the other's) until the 5 s retransmission."""
    w = World(tiebreak=tiebreak)
    out_a = paths.punch(w.a, w.pa, 1.0)
    out_b = paths.punch(w.b, w.pb, 1.0)
    init_a = next(m for m, d in out_a if d == B_D)
    init_b = next(m for m, d in out_b if d == A_D)
    # Both initiations arrive before either answer does.
    _, answers_b = w.b.datagrams([(init_a, A_D)], 1.01)
    _, answers_a = w.a.datagrams([(init_b, B_D)], 1.01)
    w.send(w.b, answers_b, 1.015)
    w.send(w.a, answers_a, 1.015)
    w.ping_a_to_b(1.02)
    w.ping_b_to_a(1.02)
    w.timers(1.03)
    got_both = bool(w.tun[w.a]) and bool(w.tun[w.b])
    assert got_both == tiebreak


def test_a_dead_direct_path_fails_over_to_the_relay_on_probes():
    w = World()
    w.ping_a_to_b(1.0)
    w.ping_b_to_a(1.01)
    assert paths.path_of(w.pa) == "direct"
    w.direct_open = False
    w.ping_a_to_b(2.0)  # lost; nothing comes back
    assert not paths.check_silence(w.pa, 2.0 + paths.SILENCE_FLOOR - 0.01)
    t = 2.0 + 1.0  # no round trip measured yet: 1 s of silence
    assert paths.check_silence(w.pa, t) and w.pa.suspect_since == t
    w.send(w.a, w.a.probe(w.pa, w.pa.endpoints, t), t)
    # The relay answered, but one missed answer is no outage yet: the path keeps its place...
    assert w.pa.active_endpoint == B_D and not paths.active_failed(w.pa, t + 0.5)
    # ... until its silence has lasted twice the limit.
    t = 2.0 + 2 * 1.0
    paths.resolve_doubt(w.pa, t)
    assert w.pa.active_endpoint == R_B and paths.path_of(w.pa) == "relay"
    assert w.pa.path_reason == paths.REASON_SILENT and w.pa.suspect_since is None
    n = len(w.tun[w.b])
    w.ping_a_to_b(t + 0.1)
    assert len(w.tun[w.b]) == n + 1


def test_a_quiet_but_working_direct_path_is_not_given_up():
    w = World()
    w.ping_a_to_b(1.0)
    w.ping_b_to_a(1.01)
    # Nothing sent for a long while: silence alone is not a dead path.
    assert not paths.check_silence(w.pa, 100.0)
    assert w.pa.suspect_since is None


def test_an_active_relay_endpoint_dropped_from_the_candidates_is_still_a_relay_path():
    eset = EndpointSet()
    eset.set_candidates([(B_D, "srflx"), (R_B, "relay")])
    eset.confirm(R_B)
    eset.set_candidates([(B_D, "srflx"), (("203.0.113.10", 50001), "relay")])  # a new allocation
    assert eset.active == R_B and eset.is_relayed(R_B) and eset.kind_of(R_B) == "relay"
    assert R_B not in eset.all()
