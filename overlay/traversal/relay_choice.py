"""Which relay to allocate on (sans-I/O, fed `now`): the closest that works.

A node may know several TURN servers: the ones the rendezvous hands out plus the
user's `Relay =` lines. Each relay is one `RelayOption`: an address the agent's
STUN probes time, and the transports it can be reached over (UDP first, then TCP,
then TLS). The ranker keeps a smoothed STUN round trip per relay and the relays
that failed lately:

    ranker = RelayRanker()
    ranker.set_relays([key1, key2])          # in the order the user gave them
    ranker.record_rtt(key1, 0.012, now)      # a STUN Binding answered (gatherer's prober)
    ranker.record_timeout(key2, now)         # it did not
    key = ranker.choose(now)                 # where to allocate
    ranker.failed(key, now)                  # allocation failed / relay went silent: cool down
    ranker.succeeded(key)
    ranker.closer_than(current, now)         # a relay clearly closer than `current`, or None

Ranking: relays cooling down after a failure come last; then relays whose STUN
answered, closest first; then relays never measured (no UDP, or not probed yet)
in the order given; then relays whose STUN went unanswered. Moving away from a
working relay needs a clear margin and two samples of the new one, so two relays
at about the same distance never make the agent flap between them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

DEFAULT_TURN_PORT = 3478
DEFAULT_TURNS_PORT = 5349

RTT_GAIN = 0.25  # weight of a new round trip in the smoothed one (as TCP's SRTT, 1/8, but fewer samples)
MARGIN_ABS = 0.010  # a relay must be at least 10 ms ...
MARGIN_FRACTION = 0.3  # ... and 30 % closer than the current one before the agent moves
MIN_SAMPLES_TO_MOVE = 2  # one lucky answer is no reason to move
# After a failure a relay waits before it is tried again: COOLDOWN_BASE doubling per
# failure in a row up to COOLDOWN_MAX. Short, because with a single relay the wait is
# the time a relayed session stays broken after that relay comes back.
COOLDOWN_BASE = 0.5
COOLDOWN_MAX = 4.0
# A relay that refused us for a reason retrying cannot fix (credentials, 403) waits longer.
REFUSED_COOLDOWN = 60.0


def parse_turn_url(url: str) -> tuple[str, str, int, str] | None:
    """("stun"|"turn"|"turns", host, port, transport) or None for a URL we cannot use.

    `turn:host[:port][?transport=udp|tcp]`, `turns:host[:port]` (TLS), `stun:host[:port]`;
    IPv6 literals in brackets."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme not in ("stun", "turn", "turns") or not rest or any(c.isspace() for c in url):
        return None
    parts = urlsplit("//" + rest)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.username is not None:
        return None
    transport = parse_qs(parts.query).get("transport", ["tcp" if scheme == "turns" else "udp"])[0].lower()
    if scheme == "turns":
        transport = "tls"
    if transport not in ("udp", "tcp", "tls"):
        return None
    default = DEFAULT_TURNS_PORT if scheme == "turns" else DEFAULT_TURN_PORT
    return scheme, host, port or default, transport


@dataclass
class RelayOption:
    """One relay: the address its STUN round trip is measured to, and how to reach its TURN."""

    key: tuple[str, int]  # (ip, port): the UDP STUN/TURN address, or the first TURN address
    servers: list[tuple[tuple[str, int], str]] = field(default_factory=list)  # (address, transport)


def group_relays(servers: Iterable[tuple[tuple[str, int], str]]) -> list[RelayOption]:
    """TURN servers (address, transport), in URL order, grouped into relays.

    UDP and TCP on one address are one relay; TLS (usually another port) belongs to
    a relay on the same IP when there is one. Transports are tried UDP, TCP, TLS."""
    order = {"udp": 0, "tcp": 1, "tls": 2}
    relays: list[RelayOption] = []
    for address, transport in servers:
        target = next((r for r in relays if r.key == address), None)
        if target is None and transport == "tls":
            target = next((r for r in relays if r.key[0] == address[0]), None)
        if target is None:
            target = RelayOption(address)
            relays.append(target)
        if (address, transport) not in target.servers:
            target.servers.append((address, transport))
    for relay in relays:
        relay.servers.sort(key=lambda s: order[s[1]])
    return relays


class _Stats:
    __slots__ = ("cool_until", "failures", "samples", "srtt", "unanswered")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.samples = 0
        self.unanswered = False  # the last STUN probe got no answer
        self.failures = 0  # allocation failures in a row
        self.cool_until = float("-inf")


class RelayRanker:
    def __init__(self, *, margin_abs: float = MARGIN_ABS, margin_fraction: float = MARGIN_FRACTION,
                 cooldown_base: float = COOLDOWN_BASE, cooldown_max: float = COOLDOWN_MAX) -> None:
        self.margin_abs = margin_abs
        self.margin_fraction = margin_fraction
        self.cooldown_base = cooldown_base
        self.cooldown_max = cooldown_max
        self._order: list[Hashable] = []
        self._stats: dict[Hashable, _Stats] = {}

    # -- inputs --------------------------------------------------------------------------------
    def set_relays(self, keys: Iterable[Hashable]) -> None:
        """The relays known now, in the user's order; what was learned about each one stays."""
        self._order = list(dict.fromkeys(keys))
        self._stats = {k: self._stats.get(k) or _Stats() for k in self._order}

    def record_rtt(self, key: Hashable, rtt: float, now: float) -> None:
        st = self._stats.get(key)
        if st is None or rtt < 0:
            return
        st.srtt = rtt if st.srtt is None else (1 - RTT_GAIN) * st.srtt + RTT_GAIN * rtt
        st.samples += 1
        st.unanswered = False

    def record_timeout(self, key: Hashable, now: float) -> None:
        st = self._stats.get(key)
        if st is not None:
            st.unanswered = True

    def failed(self, key: Hashable, now: float, *, refused: bool = False) -> float:
        """An allocation on `key` failed or its relay went silent. Returns when it may be tried again."""
        st = self._stats.get(key)
        if st is None:
            return now
        st.failures += 1
        wait = REFUSED_COOLDOWN if refused else min(self.cooldown_max,
                                                   self.cooldown_base * 2 ** (st.failures - 1))
        st.cool_until = now + wait
        return st.cool_until

    def succeeded(self, key: Hashable) -> None:
        st = self._stats.get(key)
        if st is not None:
            st.failures = 0
            st.cool_until = float("-inf")

    # -- outputs -------------------------------------------------------------------------------
    def srtt(self, key: Hashable) -> float | None:
        st = self._stats.get(key)
        return st.srtt if st is not None else None

    def cooling(self, key: Hashable, now: float) -> bool:
        st = self._stats.get(key)
        return st is not None and now < st.cool_until

    def ranked(self, now: float) -> list[Hashable]:
        """Every relay, best first."""
        def rank(item: tuple[int, Hashable]) -> tuple:
            index, key = item
            st = self._stats[key]
            if now < st.cool_until:
                return (3, st.cool_until, index)
            if st.unanswered:
                return (2, 0.0, index)
            if st.srtt is None:
                return (1, 0.0, index)
            return (0, st.srtt, index)
        return [key for _, key in sorted(enumerate(self._order), key=rank)]

    def choose(self, now: float, exclude: Iterable[Hashable] = ()) -> Hashable | None:
        """The best relay not cooling down (and not in `exclude`), or None."""
        skip = set(exclude)
        for key in self.ranked(now):
            if key not in skip and not self.cooling(key, now):
                return key
        return None

    def next_available_at(self, now: float) -> float | None:
        """When the first cooling relay may be tried again (None: no relays)."""
        if not self._order:
            return None
        return max(now, min(self._stats[k].cool_until for k in self._order))

    def closer_than(self, current: Hashable, now: float) -> Hashable | None:
        """A relay clearly closer than `current` (margin, enough samples), else None."""
        cur = self._stats.get(current)
        if cur is None or cur.srtt is None:
            return None
        for key in self.ranked(now):
            if key == current:
                return None  # ranked best first: nothing better comes after it
            st = self._stats[key]
            if self.cooling(key, now) or st.srtt is None or st.unanswered or st.samples < MIN_SAMPLES_TO_MOVE:
                continue
            if st.srtt + max(self.margin_abs, self.margin_fraction * cur.srtt) < cur.srtt:
                return key
            return None  # the best one is not clearly better; the rest are farther still
        return None
