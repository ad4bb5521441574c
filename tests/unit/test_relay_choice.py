"""Choosing among several relays by STUN round trip (sans-I/O, fake clock)."""

from __future__ import annotations

import pytest

from overlay.traversal.relay_choice import (
    COOLDOWN_BASE,
    COOLDOWN_MAX,
    REFUSED_COOLDOWN,
    RelayRanker,
    group_relays,
    parse_turn_url,
)

NEAR = ("203.0.113.10", 3478)
FAR = ("198.51.100.20", 3478)
THIRD = ("192.0.2.30", 3478)


def ranker_with(*keys) -> RelayRanker:
    r = RelayRanker()
    r.set_relays(keys)
    return r


def test_closest_relay_is_chosen_whatever_the_configured_order():
    r = ranker_with(FAR, NEAR)
    assert r.choose(0.0) == FAR  # nothing measured yet: the order given
    r.record_rtt(FAR, 0.080, 0.1)
    r.record_rtt(NEAR, 0.012, 0.1)
    assert r.choose(0.2) == NEAR
    assert r.ranked(0.2) == [NEAR, FAR]


def test_measured_before_unmeasured_before_unanswered():
    r = ranker_with(THIRD, FAR, NEAR)
    r.record_timeout(THIRD, 0.0)
    r.record_rtt(NEAR, 0.150, 0.0)
    assert r.ranked(1.0) == [NEAR, FAR, THIRD]
    r.record_rtt(THIRD, 0.010, 2.0)  # answers again
    assert r.ranked(3.0)[0] == THIRD


def test_failed_relay_cools_down_with_backoff_then_is_tried_again():
    r = ranker_with(NEAR, FAR)
    r.record_rtt(NEAR, 0.010, 0.0)
    r.record_rtt(FAR, 0.050, 0.0)
    until = r.failed(NEAR, 10.0)
    assert r.choose(10.0) == FAR  # fail over to the next at once
    assert r.ranked(10.0) == [FAR, NEAR]
    assert r.choose(until) == NEAR  # back once the cooldown is over
    waits = []
    for i in range(8):
        now = 100.0 + 100 * i
        waits.append(r.failed(NEAR, now) - now)
    assert waits == sorted(waits) and waits[-1] == COOLDOWN_MAX  # doubling, capped low
    r.succeeded(NEAR)
    assert r.failed(NEAR, 2000.0) - 2000.0 == COOLDOWN_BASE  # a success starts the backoff over


def test_every_relay_cooling_down_tells_when_to_retry():
    r = ranker_with(NEAR, FAR)
    a = r.failed(NEAR, 0.0)
    b = r.failed(FAR, 0.1)
    assert r.choose(0.2) is None
    assert r.next_available_at(0.2) == pytest.approx(min(a, b))
    assert ranker_with().next_available_at(0.0) is None


def test_refused_relay_waits_long():
    r = ranker_with(NEAR, FAR)
    r.failed(NEAR, 0.0, refused=True)
    assert r.cooling(NEAR, REFUSED_COOLDOWN - 1) and not r.cooling(NEAR, REFUSED_COOLDOWN)


def test_moves_only_to_a_clearly_closer_relay_with_enough_samples():
    r = ranker_with(FAR, NEAR)
    r.record_rtt(FAR, 0.050, 0.0)
    assert r.closer_than(FAR, 0.0) is None  # nothing else measured
    r.record_rtt(NEAR, 0.045, 0.0)
    r.record_rtt(NEAR, 0.045, 60.0)
    assert r.closer_than(FAR, 60.0) is None  # 5 ms better: not worth a move (margin)
    r2 = ranker_with(FAR, NEAR)
    r2.record_rtt(FAR, 0.050, 0.0)
    r2.record_rtt(NEAR, 0.010, 0.0)
    assert r2.closer_than(FAR, 0.0) is None  # one sample is not enough
    r2.record_rtt(NEAR, 0.010, 60.0)
    assert r2.closer_than(FAR, 60.0) == NEAR
    assert r2.closer_than(NEAR, 60.0) is None  # the best one stays
    r2.failed(NEAR, 61.0)
    assert r2.closer_than(FAR, 61.0) is None  # not onto a relay that just failed


def test_no_flapping_between_relays_at_about_the_same_distance():
    """Noisy round trips around 20 ms on both: whichever is in use stays in use."""
    r = ranker_with(NEAR, FAR)
    samples = [0.018, 0.026, 0.015, 0.031, 0.019, 0.022, 0.017, 0.028]
    current = NEAR
    moves = 0
    for i, rtt in enumerate(samples * 4):
        now = 60.0 * i
        r.record_rtt(NEAR, rtt, now)
        r.record_rtt(FAR, samples[(i + 3) % len(samples)], now)
        closer = r.closer_than(current, now)
        if closer is not None:
            current, moves = closer, moves + 1
    assert moves == 0


def test_relays_are_grouped_by_address_with_transports_in_fallback_order():
    servers = [((NEAR[0], 3478), "tcp"), ((NEAR[0], 3478), "udp"), ((NEAR[0], 5349), "tls"),
               ((FAR[0], 3478), "udp"), ((NEAR[0], 3480), "udp")]
    relays = group_relays(servers)
    assert [r.key for r in relays] == [(NEAR[0], 3478), (FAR[0], 3478), (NEAR[0], 3480)]
    assert [t for _, t in relays[0].servers] == ["udp", "tcp", "tls"]
    assert relays[0].servers[2][0] == (NEAR[0], 5349)


def test_turn_urls():
    assert parse_turn_url("turn:203.0.113.10:3480?transport=udp") == ("turn", "203.0.113.10", 3480, "udp")
    assert parse_turn_url("turns:relay.example") == ("turns", "relay.example", 5349, "tls")
    assert parse_turn_url("turn:[2001:db8::1]") == ("turn", "2001:db8::1", 3478, "udp")
    for bad in ("turn:h:1/path", "turn:user@h:1", "turn: h:1", "turn:h:0x10", "udp:h:1"):
        assert parse_turn_url(bad) is None, bad
