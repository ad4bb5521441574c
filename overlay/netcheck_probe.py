"""The UDP part of `overlay netcheck` for one address family, without I/O.

Everything goes over ONE socket, so every answer describes the same NAT mapping:

1. primary: a Binding to every STUN server of the family (is UDP answered at all,
   what is our server-reflexive address, how far is each relay);
2. mapping: RFC 5780 section 4.3 against each server that advertises an
   OTHER-ADDRESS: a Binding to (other IP, primary port) and to (other IP, other
   port), and a second Binding to the primary address for a second latency sample.
   Comparing the mapped addresses tells whether the NAT keeps one mapping for every
   destination (what hole punching needs) or makes a new one per address or port;
3. hairpin: a Binding request to our own server-reflexive address. If the NAT loops
   it back, the request itself arrives on the socket (RFC 5780 section 4.5): two
   nodes behind this NAT can then reach each other by their public addresses.

Driven like the other sans-I/O cores:

    check = FamilyCheck(4, [("203.0.113.10", 3478)])
    check.start(now)
    for data, addr in check.datagrams_to_send(): sock.sendto(data, addr)
    check.receive(data, source, now); check.handle_timers(now); check.next_deadline()
    check.done, check.result()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.message import Address, StunError
from overlay.traversal.stun_probe import StunProber, family_of, normalize

# A netcheck runs once while a user waits: a little more patience than gathering
# (a relay 1-2 s away is still worth reporting), bounded so the command ends fast.
GIVE_UP_AFTER = 3.0
HAIRPIN_RESENDS = (0.2, 0.5)  # seconds after the first hairpin request
HAIRPIN_WAIT = 1.0

PRIMARY, MAPPING, HAIRPIN, DONE = "primary", "mapping", "hairpin", "done"


@dataclass
class ServerAnswer:
    """What one STUN server address said (mapped None: no answer or an error)."""

    server: Address
    mapped: Address | None = None
    rtts: list[float] = field(default_factory=list)
    other_address: Address | None = None
    error: str | None = None


@dataclass
class MappingTest:
    """RFC 5780 mapping test against one server: the mapped address seen by each of
    its addresses (None where that address did not answer)."""

    server: Address
    other_address: Address
    same_port_other_ip: Address | None = None  # test II: (other IP, primary port)
    other_ip_other_port: Address | None = None  # test III: (other IP, other port)


@dataclass
class FamilyResult:
    family: int
    servers: list[ServerAnswer]
    mapping_tests: list[MappingTest]
    hairpin: bool | None  # None: not tried (no server-reflexive address)
    send_error: str | None = None  # the socket refused to send (no route, no address)


class FamilyCheck:
    def __init__(self, family: int, servers: list[Address], *, give_up_after: float = GIVE_UP_AFTER,
                 hairpin_wait: float = HAIRPIN_WAIT) -> None:
        self.family = family
        self.servers = [normalize(s) for s in servers if family_of(s[0]) == family]
        self.give_up_after = give_up_after
        self.hairpin_wait = hairpin_wait
        self.phase = PRIMARY
        self.answers: dict[Address, ServerAnswer] = {s: ServerAnswer(s) for s in self.servers}
        self.mapping_tests: list[MappingTest] = []
        self.hairpin: bool | None = None
        self.send_error: str | None = None
        self._prober: StunProber | None = None
        self._out: list[tuple[bytes, Address]] = []
        self._hairpin_tid: bytes | None = None
        self._hairpin_request = b""
        self._hairpin_target: Address | None = None
        self._hairpin_sends: list[float] = []
        self._hairpin_until = 0.0

    # -- driving -------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        if not self.servers:
            self.phase = DONE
            return
        self._run_prober(self.servers, now)

    @property
    def done(self) -> bool:
        return self.phase == DONE

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        if self._prober is not None:
            self._out.extend(self._prober.datagrams_to_send())
        out, self._out = self._out, []
        return out

    def send_failed(self, error: str) -> None:
        """The socket cannot send to this family at all (ENETUNREACH, no address):
        nothing will answer, so stop now rather than wait for timeouts."""
        self.send_error = error
        self._prober = None
        self.phase = DONE

    def next_deadline(self) -> float | None:
        if self.phase == HAIRPIN:
            return min([*self._hairpin_sends, self._hairpin_until])
        return self._prober.next_deadline() if self._prober is not None else None

    def handle_timers(self, now: float) -> None:
        if self.phase == HAIRPIN:
            while self._hairpin_sends and now >= self._hairpin_sends[0]:
                self._hairpin_sends.pop(0)
                assert self._hairpin_target is not None
                self._out.append((self._hairpin_request, self._hairpin_target))
            if now >= self._hairpin_until:
                self.hairpin = False
                self.phase = DONE
            return
        if self._prober is not None:
            self._prober.handle_timers(now)
            self._advance(now)

    def receive(self, data: bytes, source: tuple, now: float) -> bool:
        """Feed a datagram from the socket; True when it was part of the check."""
        if self.phase == HAIRPIN and self._is_hairpin(data):
            self.hairpin = True
            self.phase = DONE
            return True
        if self._prober is None or not self._prober.receive(data, source, now):
            return False
        self._advance(now)
        return True

    def result(self) -> FamilyResult:
        return FamilyResult(self.family, [self.answers[s] for s in self.servers], self.mapping_tests,
                            self.hairpin, self.send_error)

    # -- phases --------------------------------------------------------------------------------
    def _run_prober(self, targets: list[Address], now: float) -> None:
        self._prober = StunProber(targets, probe_other_address=False, give_up_after=self.give_up_after)
        self._prober.start(now)

    def _advance(self, now: float) -> None:
        prober = self._prober
        if prober is None or not prober.done:
            return
        if self.phase == PRIMARY:
            self._primary_done(prober, now)
        elif self.phase == MAPPING:
            self._mapping_done(prober, now)

    def _primary_done(self, prober: StunProber, now: float) -> None:
        targets: list[Address] = []
        for server, res in prober.results.items():
            ans = self.answers[server]
            ans.mapped, ans.other_address, ans.error = res.mapped, res.other_address, res.error
            if res.rtt is not None:
                ans.rtts.append(res.rtt)
            if res.mapped is None:
                continue
            targets.append(server)  # a second latency sample
            other = res.other_address
            if other is None or other[1] == 0 or other[0] == server[0] or family_of(other[0]) != self.family:
                continue
            self.mapping_tests.append(MappingTest(server, other))
            targets += [(other[0], server[1]), other]
        if not any(a.mapped for a in self.answers.values()):
            self._prober = None
            self.phase = DONE  # UDP is not answered: nothing more to learn over it
            return
        self.phase = MAPPING
        self._run_prober(list(dict.fromkeys(targets)), now)

    def _mapping_done(self, prober: StunProber, now: float) -> None:
        seen = {server: res.mapped for server, res in prober.results.items()}
        for server, res in prober.results.items():
            if server in self.answers and res.rtt is not None:
                self.answers[server].rtts.append(res.rtt)
        for test in self.mapping_tests:
            test.same_port_other_ip = seen.get((test.other_address[0], test.server[1]))
            test.other_ip_other_port = seen.get(test.other_address)
        self._prober = None
        mapped = next((a.mapped for a in self.answers.values() if a.mapped), None)
        if mapped is None:
            self.phase = DONE
            return
        self._start_hairpin(mapped, now)

    def _start_hairpin(self, mapped: Address, now: float) -> None:
        msg = sc.binding_request()
        self._hairpin_tid = msg.transaction_id
        self._hairpin_request = msg.encode()
        self._hairpin_target = mapped
        self._out.append((self._hairpin_request, mapped))
        self._hairpin_sends = [now + d for d in HAIRPIN_RESENDS if d < self.hairpin_wait]
        self._hairpin_until = now + self.hairpin_wait
        self.phase = HAIRPIN

    def _is_hairpin(self, data: bytes) -> bool:
        if self._hairpin_tid is None or len(data) < m.HEADER_LEN or data[4:8] != m.MAGIC_COOKIE_BYTES:
            return False
        if bytes(data[8:20]) != self._hairpin_tid:
            return False
        try:
            msg = m.parse(data)
        except StunError:
            return False
        return msg.method == m.BINDING and msg.cls == m.REQUEST
