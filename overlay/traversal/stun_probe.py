"""Sans-I/O STUN Binding transactions for gathering server-reflexive addresses.

The agent sends these from its own tunnel socket, so the mapping STUN reports is the
NAT mapping of the very socket that carries WireGuard. The prober never touches a
socket or a clock:

    prober = StunProber([("198.51.100.1", 3478), ("2001:db8::1", 3478)])
    prober.start(now)
    for data, addr in prober.datagrams_to_send(): sock.sendto(data, addr)
    prober.receive(data, source, now)          # True: it was one of ours
    prober.handle_timers(now); prober.next_deadline()
    prober.done, prober.results, prober.observations

`results` has one `ProbeResult` per configured server (mapped address, round trip or
the failure). `observations` has every answered Binding, including the extra probe
to the RFC 5780 OTHER-ADDRESS a server advertises; `overlay netcheck` compares the
mapped addresses across destinations to see whether the NAT mapping depends on them
(`mapping_varies_by_destination`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.message import Address, StunError

# An agent gathers while a user waits for a connection, so the schedule is much
# tighter than RFC 8489's (500 ms RTO, 7 tries, ~39.5 s): the first retransmission
# after 200 ms covers a lost packet on a typical path, doubling covers a slow server,
# and after 3 s the server is treated as unreachable (a relay farther than that is
# useless for interactive traffic anyway).
INITIAL_RTO = 0.2
GIVE_UP_AFTER = 3.0
# Sends happen at 0, 0.2, 0.6, 1.4 s; a 5th would land at 3.0 s, the give-up moment.


def family_of(ip: str) -> int:
    """4 or 6."""
    return ipaddress.ip_address(ip.split("%", 1)[0]).version


def normalize(addr: tuple) -> Address:
    """(ip, port) from a socket address (IPv6 ones carry flowinfo and scope id)."""
    ip = str(addr[0])
    if ip.startswith("::ffff:") and "." in ip:  # IPv4-mapped, from a dual-stack socket
        ip = ip[7:]
    return ip, int(addr[1])


@dataclass(frozen=True)
class Observation:
    """One answered Binding: what `server` saw as our address."""

    server: Address  # where the request went (a configured server or its OTHER-ADDRESS)
    family: int
    mapped: Address
    rtt: float
    primary: Address  # the configured server this probe belongs to
    response_origin: Address | None = None
    other_address: Address | None = None


@dataclass
class ProbeResult:
    """What one configured server told us (mapped is None when it failed)."""

    server: Address
    family: int
    mapped: Address | None = None
    rtt: float | None = None
    other_address: Address | None = None
    error: str | None = None  # "timeout", or "420 Unknown Attribute" etc.

    @property
    def pending(self) -> bool:
        return self.mapped is None and self.error is None


class _Transaction:
    __slots__ = ("tid", "data", "dest", "primary", "first_sent", "next_send", "rto")

    def __init__(self, tid: bytes, data: bytes, dest: Address, primary: Address, now: float) -> None:
        self.tid, self.data, self.dest, self.primary = tid, data, dest, primary
        self.first_sent = now
        self.rto = INITIAL_RTO
        self.next_send = now + INITIAL_RTO


class StunProber:
    def __init__(self, servers: list[Address], *, probe_other_address: bool = True,
                 initial_rto: float = INITIAL_RTO, give_up_after: float = GIVE_UP_AFTER) -> None:
        self.servers = [normalize(s) for s in servers]
        self.probe_other_address = probe_other_address
        self.initial_rto = initial_rto
        self.give_up_after = give_up_after
        self.results: dict[Address, ProbeResult] = {}
        self.observations: list[Observation] = []
        self.unanswered: list[Address] = []  # extra (OTHER-ADDRESS) probes that timed out
        self._txs: dict[bytes, _Transaction] = {}
        self._out: list[tuple[bytes, Address]] = []

    # -- driving -----------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """(Re)gather: forget earlier results and send one Binding to every server."""
        self.results = {s: ProbeResult(s, family_of(s[0])) for s in self.servers}
        self.observations = []
        self.unanswered = []
        self._txs.clear()
        self._out.clear()
        for server in self.servers:
            self._send_new(server, server, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        if not self._txs:
            return None
        return min(min(tx.next_send, tx.first_sent + self.give_up_after) for tx in self._txs.values())

    def handle_timers(self, now: float) -> None:
        for tid, tx in list(self._txs.items()):
            if now >= tx.first_sent + self.give_up_after:
                del self._txs[tid]
                result = self.results.get(tx.dest)
                if result is None:
                    self.unanswered.append(tx.dest)
                elif result.pending:
                    result.error = "timeout"
                continue
            if now >= tx.next_send:
                tx.rto *= 2
                tx.next_send = now + tx.rto
                self._out.append((tx.data, tx.dest))

    @property
    def done(self) -> bool:
        """Every transaction answered or given up."""
        return not self._txs

    def receive(self, data: bytes, source: tuple, now: float) -> bool:
        """Feed a datagram; True when it answered one of our transactions (then it is consumed)."""
        if len(data) < m.HEADER_LEN or data[4:8] != m.MAGIC_COOKIE_BYTES:
            return False
        tx = self._txs.get(bytes(data[8:20]))
        if tx is None or normalize(source) != tx.dest:
            return False  # not ours, or an off-path guess from elsewhere
        try:
            msg = m.parse(data)
            if msg.method != m.BINDING or msg.cls not in (m.SUCCESS, m.ERROR):
                return False
            if msg.cls == m.ERROR:
                code, reason = msg.error_code() or (0, "malformed error")
                self._finish(tx)
                result = self.results.get(tx.dest)
                if result is not None:
                    result.error = f"{code} {reason}"
                return True
            mapped = sc.mapped_address(msg)
            origin = msg.address(m.RESPONSE_ORIGIN)
            other = msg.address(m.OTHER_ADDRESS)
        except StunError:
            return False  # a malformed answer is dropped; the transaction keeps retrying
        if mapped is None:
            return False
        self._finish(tx)
        rtt = max(0.0, now - tx.first_sent)
        # `other` may legitimately name a different family; keep it raw for netcheck.
        self.observations.append(Observation(tx.dest, family_of(tx.dest[0]), mapped, rtt, tx.primary, origin, other))
        result = self.results.get(tx.dest)
        if result is not None:
            result.mapped, result.rtt, result.other_address = mapped, rtt, other
            if (self.probe_other_address and other is not None and family_of(other[0]) == result.family
                    and other != tx.dest and other[1] != 0):
                self._send_new(other, tx.primary, now)
        return True

    # -- views ---------------------------------------------------------------------------------
    def mapped_addresses(self, family: int | None = None) -> list[Address]:
        """Distinct server-reflexive addresses seen (by configured servers), in server order."""
        seen: list[Address] = []
        for r in self.results.values():
            if r.mapped and (family is None or r.family == family) and r.mapped not in seen:
                seen.append(r.mapped)
        return seen

    def mapping_varies_by_destination(self, family: int) -> bool | None:
        """True when destinations saw different mappings; None with fewer than two observations."""
        mapped = [o.mapped for o in self.observations if o.family == family]
        if len(mapped) < 2:
            return None
        return len(set(mapped)) > 1

    # -- internals -----------------------------------------------------------------------------
    def _send_new(self, dest: Address, primary: Address, now: float) -> None:
        msg = sc.binding_request()
        data = msg.encode()
        tx = _Transaction(msg.transaction_id, data, dest, primary, now)
        tx.rto = self.initial_rto
        tx.next_send = now + self.initial_rto
        self._txs[msg.transaction_id] = tx
        self._out.append((data, dest))

    def _finish(self, tx: _Transaction) -> None:
        self._txs.pop(tx.tid, None)
