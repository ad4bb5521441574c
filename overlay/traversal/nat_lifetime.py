"""How long our NAT keeps an idle UDP mapping, and the keepalive interval that follows.

Sans-I/O, fed `now`; keepalive.py owns the sockets and the clock.

Measuring (RFC 5780 section 4.6, "binding lifetime discovery"), in parallel for
a ladder of idle times instead of one after the other, so the answer comes
after the longest idle time tried rather than after their sum:

- one probe socket per rung sends a Binding request to the STUN server; the
  answer creates the mapping and tells its external port P;
- `rung` seconds after that answer (the last packet the mapping saw), a separate
  tester socket sends a Binding request with RESPONSE-PORT = P: the server
  answers to our public IP at port P, so the answer reaches the probe socket
  only if the NAT still holds the mapping. No answer within ANSWER_WAIT (the
  tester retransmits meanwhile, so one lost packet is not a dead mapping): dead.

Rung 0 is the control: tested at once, it must come back, else the measurement
cannot work here (the server ignores RESPONSE-PORT, e.g. coturn outside its
RFC 5780 mode, or the NAT gives the tester another public address). The result
is the longest rung alive below the first dead one. Every mapping made here
is a fresh one that nothing else uses, so nothing refreshes it by accident.

The policy (`KeepalivePolicy`) turns results into an interval: a safety margin
below the lifetime, capped at WireGuard's usual 25 s, with a floor; it says
when to measure again (every REMEASURE_EVERY, and at once after a network
change).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.message import Address, StunError

from .stun_probe import normalize

# Idle seconds tried; the finer steps at the low end matter most, since the
# interval is a fraction of the answer and anything above ~31 s hits the cap.
LADDER = (5.0, 8.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0, 90.0, 120.0)
CONTROL = 0.0
TESTER = "tester"  # the socket that sends the RESPONSE-PORT requests

MAP_RTO = 0.2  # first retransmission of a mapping request, doubling
MAP_GIVE_UP = 3.0  # no answer to the mapping request: that rung is not measured
TEST_RETRANSMIT = (0.5, 1.0)  # tester resends after the first test request
ANSWER_WAIT = 2.0  # a test unanswered this long after it was first sent: mapping dead

SAFETY = 0.8  # keepalive interval = this fraction of the measured lifetime
MAX_INTERVAL = 25.0  # WireGuard's usual PersistentKeepalive; also the default
MIN_INTERVAL = 2.0
REMEASURE_EVERY = 600.0
RETRY_FAILED_AFTER = 60.0  # a measurement that could not run (e.g. no STUN answer)

# Result kinds.
MEASURED = "measured"
UNSUPPORTED = "unsupported"  # the server or the path cannot do the RFC 5780 test
FAILED = "failed"  # no answer from the STUN server at all


@dataclass(frozen=True)
class LifetimeResult:
    kind: str  # MEASURED, UNSUPPORTED or FAILED
    lifetime: float | None  # longest idle time the mapping survived (None: not even the first rung)
    dead_at: float | None  # first rung found dead (None: alive at every rung tried)
    detail: str  # for people: what was seen


def _response_port(port: int) -> bytes:
    return struct.pack("!H2x", port)


class _Rung:
    __slots__ = ("idle", "map_tid", "map_data", "map_first", "map_rto", "map_next",
                 "port", "mapped_at", "test_tid", "test_data", "test_first", "test_resends",
                 "verdict")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.map_tid = b""
        self.map_data = b""
        self.map_first = 0.0
        self.map_rto = MAP_RTO
        self.map_next = 0.0
        self.port: int | None = None  # external port of this probe socket's mapping
        self.mapped_at: float | None = None
        self.test_tid = b""
        self.test_data = b""
        self.test_first: float | None = None
        self.test_resends: list[float] = []
        self.verdict: bool | None = None  # True alive, False dead, None not known (yet)

    @property
    def test_due(self) -> float | None:
        if self.mapped_at is None or self.test_first is not None or self.verdict is not None:
            return None
        return self.mapped_at + self.idle


class LifetimeProbe:
    """One measurement against one STUN server address.

        probe = LifetimeProbe(server)
        probe.sockets()                  # ids to open: each rung's idle time, and TESTER
        probe.start(now)
        probe.datagrams_to_send()        # [(socket id, data, destination)]
        probe.receive(sock_id, data, source, now)
        probe.handle_timers(now); probe.next_deadline()
        probe.done, probe.result, probe.finished_sockets()
    """

    def __init__(self, server: Address, ladder: tuple[float, ...] = LADDER) -> None:
        self.server = normalize(server)
        self.rungs = [_Rung(CONTROL)] + [_Rung(float(t)) for t in sorted(set(ladder)) if t > 0]
        self._by_idle = {r.idle: r for r in self.rungs}
        self._out: list[tuple[object, bytes, Address]] = []
        self.result: LifetimeResult | None = None
        self.started_at: float | None = None

    def sockets(self) -> list[object]:
        return [r.idle for r in self.rungs] + [TESTER]

    @property
    def done(self) -> bool:
        return self.result is not None

    def start(self, now: float) -> None:
        self.started_at = now
        for rung in self.rungs:
            msg = sc.binding_request()
            rung.map_tid = msg.transaction_id
            rung.map_data = msg.encode()
            rung.map_first = now
            rung.map_next = now + MAP_RTO
            self._out.append((rung.idle, rung.map_data, self.server))

    def datagrams_to_send(self) -> list[tuple[object, bytes, Address]]:
        out, self._out = self._out, []
        return out

    def finished_sockets(self) -> list[object]:
        """Probe sockets whose rung has its verdict (or never will): they can be closed."""
        if self.done:
            return self.sockets()
        return [r.idle for r in self.rungs if r.verdict is not None
                or (r.port is None and r.map_tid == b"")]

    # -- time ----------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self.done:
            return None
        times: list[float] = []
        for r in self.rungs:
            if r.verdict is not None:
                continue
            if r.port is None:
                if r.map_tid:
                    times.append(min(r.map_next, r.map_first + MAP_GIVE_UP))
                continue
            due = r.test_due
            if due is not None:
                times.append(due)
            elif r.test_first is not None:
                times.extend(r.test_resends[:1])
                times.append(r.test_first + ANSWER_WAIT)
        return min(times) if times else None

    def handle_timers(self, now: float) -> None:
        if self.done:
            return
        for r in self.rungs:
            if r.verdict is not None:
                continue
            if r.port is None:
                if not r.map_tid:
                    continue
                if now >= r.map_first + MAP_GIVE_UP:
                    r.map_tid = b""  # not measured; the other rungs still are
                elif now >= r.map_next:
                    r.map_rto *= 2
                    r.map_next = now + r.map_rto
                    self._out.append((r.idle, r.map_data, self.server))
                continue
            due = r.test_due
            if due is not None and now >= due:
                msg = sc.binding_request().add(m.RESPONSE_PORT, _response_port(r.port))
                r.test_tid = msg.transaction_id
                r.test_data = msg.encode()
                r.test_first = now
                r.test_resends = [now + d for d in TEST_RETRANSMIT]
                self._out.append((TESTER, r.test_data, self.server))
            elif r.test_first is not None:
                if now >= r.test_first + ANSWER_WAIT:
                    r.verdict = False
                elif r.test_resends and now >= r.test_resends[0]:
                    r.test_resends.pop(0)
                    self._out.append((TESTER, r.test_data, self.server))
        self._settle()

    # -- datagrams -----------------------------------------------------------------------------
    def receive(self, sock_id: object, data: bytes, source: tuple, now: float) -> bool:
        """Feed a datagram that arrived on one of our sockets; True when it was an answer we expected."""
        if self.done or len(data) < m.HEADER_LEN or bytes(data[4:8]) != m.MAGIC_COOKIE_BYTES:
            return False
        if normalize(source) != self.server:
            return False  # only the server's answers count (nothing else can prove a mapping)
        tid = bytes(data[8:20])
        try:
            msg = m.parse(data)
        except StunError:
            return False
        if msg.method != m.BINDING or msg.cls not in (m.SUCCESS, m.ERROR):
            return False
        if sock_id == TESTER:
            return self._tester_got(tid, msg)
        rung = self._by_idle.get(sock_id)  # type: ignore[arg-type]
        if rung is None:
            return False
        if tid == rung.map_tid and rung.port is None:
            mapped = sc.mapped_address(msg) if msg.cls == m.SUCCESS else None
            if mapped is None:
                rung.map_tid = b""  # an error answer: this rung cannot be measured
            else:
                rung.port = mapped[1]
                rung.mapped_at = now  # the mapping's last packet: idle time counts from here
            self._settle()
            return True
        if rung.test_tid and tid == rung.test_tid and rung.verdict is None:
            rung.verdict = True
            self._settle()
            return True
        return False

    def _tester_got(self, tid: bytes, msg: m.Message) -> bool:
        rung = next((r for r in self.rungs if r.test_tid == tid), None)
        if rung is None:
            return False
        if msg.cls == m.ERROR:
            code, reason = msg.error_code() or (0, "malformed error")
            self._finish(UNSUPPORTED, f"server refused RESPONSE-PORT ({code} {reason})")
        else:
            # The answer came back to the sender: the server ignores RESPONSE-PORT.
            self._finish(UNSUPPORTED, "server ignores RESPONSE-PORT")
        return True

    # -- verdicts ------------------------------------------------------------------------------
    def _settle(self) -> None:
        if self.done:
            return
        control = self.rungs[0]
        if control.port is None and not control.map_tid:
            if all(r.port is None and not r.map_tid for r in self.rungs):
                self._finish(FAILED, "no answer from the STUN server")
            else:
                self._finish(UNSUPPORTED, "the STUN server did not answer the control probe")
            return
        if control.verdict is False:
            self._finish(UNSUPPORTED, "no answer at RESPONSE-PORT even at once "
                                      "(server ignores it, or another public address for the tester)")
            return
        if control.verdict is None:
            return
        lifetime: float | None = None
        for r in self.rungs[1:]:
            if r.port is None and not r.map_tid:
                continue  # never mapped: says nothing
            if r.verdict is None:
                return  # the answer still depends on this rung
            if r.verdict is False:
                self._finish(MEASURED, f"alive after {lifetime:g} s, dead after {r.idle:g} s"
                             if lifetime is not None else f"dead after {r.idle:g} s",
                             lifetime, r.idle)
                return
            lifetime = r.idle
        if lifetime is None:
            self._finish(FAILED, "no STUN answer for any idle time tried")
        else:
            self._finish(MEASURED, f"alive after {lifetime:g} s (longest tried)", lifetime, None)

    def _finish(self, kind: str, detail: str, lifetime: float | None = None,
                dead_at: float | None = None) -> None:
        self.result = LifetimeResult(kind, lifetime, dead_at, detail)
        self._out.clear()

    def confirmed_lifetime(self) -> float | None:
        """While running: the longest rung alive with every rung below it alive too."""
        if self.rungs[0].verdict is not True:
            return None
        best: float | None = None
        for r in self.rungs[1:]:
            if r.port is None and not r.map_tid:
                continue
            if r.verdict is not True:
                break
            best = r.idle
        return best


def interval_for(lifetime: float | None) -> float:
    """Keepalive interval for a mapping known to live at least `lifetime` seconds."""
    if lifetime is None:
        return MIN_INTERVAL
    return max(MIN_INTERVAL, min(MAX_INTERVAL, SAFETY * lifetime))


class KeepalivePolicy:
    """The current keepalive interval, why, and when to measure (again)."""

    def __init__(self) -> None:
        self.result: LifetimeResult | None = None
        self.measured_at: float | None = None
        self.measuring_since: float | None = None
        self.next_measure: float | None = 0.0  # as soon as a server and a NAT are known
        self.behind_nat: bool | None = None  # None: not known yet (no STUN answer)
        self.server: Address | None = None
        self._progress: float | None = None  # confirmed lifetime of the running measurement

    # -- inputs --------------------------------------------------------------------------------
    def set_network(self, behind_nat: bool | None, server: Address | None) -> None:
        self.behind_nat = behind_nat
        self.server = server

    def network_changed(self, now: float, settle: float = 0.0) -> None:
        """Another network: the old lifetime means nothing; measure again once the
        addresses have settled (`settle` seconds), abandoning a measurement under way."""
        self.result = None
        self.measured_at = None
        self.measuring_since = None
        self._progress = None
        self.next_measure = now + settle

    def due(self, now: float) -> bool:
        # Also without a NAT: a stateful firewall forgets idle UDP flows just the same,
        # and this measurement is the only way to tell (alive at every rung: nothing forgets).
        return (self.measuring_since is None and self.behind_nat is not None and self.server is not None
                and self.next_measure is not None and now >= self.next_measure)

    def started(self, now: float) -> None:
        self.measuring_since = now
        self._progress = None

    def progress(self, confirmed: float | None) -> bool:
        """The running measurement confirmed a longer lifetime; True when that changed anything."""
        if confirmed == self._progress:
            return False
        self._progress = confirmed
        return True

    def aborted(self, now: float, retry_after: float = 0.0) -> None:
        """The running measurement was given up without a result (e.g. the network changed)."""
        self.measuring_since = None
        self._progress = None
        self.next_measure = now + retry_after

    def finished(self, result: LifetimeResult, now: float) -> None:
        self.measuring_since = None
        self._progress = None
        if result.kind == FAILED and self.result is not None and self.result.kind == MEASURED:
            # A lost STUN exchange does not undo a good measurement of this network.
            self.next_measure = now + RETRY_FAILED_AFTER
            return
        self.result = result
        self.measured_at = now
        self.next_measure = now + (RETRY_FAILED_AFTER if result.kind == FAILED else REMEASURE_EVERY)

    # -- outputs -------------------------------------------------------------------------------
    @property
    def forgets(self) -> bool:
        """Whether something on our side (a NAT, a stateful firewall) is known to drop
        idle mappings: behind a NAT, or a measured lifetime below the longest rung."""
        res = self.result
        return bool(self.behind_nat) or (res is not None and res.kind == MEASURED and res.dead_at is not None)

    @property
    def interval(self) -> float:
        return self.state()[0]

    def state(self) -> tuple[float, str]:
        """(interval in seconds, reason)."""
        res = self.result
        if res is not None and res.kind == MEASURED:
            return interval_for(res.lifetime), f"measured: {res.detail}"
        if self.measuring_since is not None and res is None:
            # Until the answer is in, hold the mapping for the longest idle time
            # confirmed so far (at least the first rung): a short-lived mapping
            # must not lapse during the very measurement that finds it short.
            lower = max(self._progress or 0.0, LADDER[0])
            if self._progress is None:
                return interval_for(lower), "measuring"
            return interval_for(lower), f"measuring (alive after {self._progress:g} s so far)"
        if res is not None:
            return MAX_INTERVAL, f"default: {res.detail}"
        if self.behind_nat is None:
            return MAX_INTERVAL, "default: no STUN answer yet"
        if self.server is None:
            return MAX_INTERVAL, "default: no STUN server"
        return MAX_INTERVAL, "default: not measured yet"

    def summary(self) -> dict:
        interval, reason = self.state()
        res = self.result
        return {
            "interval": interval,
            "reason": reason,
            "lifetime": res.lifetime if res is not None and res.kind == MEASURED else None,
            "dead_at": res.dead_at if res is not None and res.kind == MEASURED else None,
            "measurement": res.kind if res is not None else None,
            "measuring": self.measuring_since is not None,
            "behind_nat": self.behind_nat,
            "server": f"{self.server[0]}:{self.server[1]}" if self.server is not None else None,
        }
