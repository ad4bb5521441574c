"""Candidate gathering on the agent's own sockets.

- host: every interface address (IPv4 and IPv6) except loopback, link-local and the
  overlay's own, with the tunnel's listen port;
- srflx: a STUN Binding per address family to the relay (from the TURN URLs), sent
  from the tunnel socket, so the mapping is the one WireGuard traffic uses;
- relay: a TURN allocation per family on the tunnel socket; when UDP to the relay
  gets no answer, over TCP, then TLS (`turns:` URLs).

Relays: the rendezvous' TURN URLs plus the user's `Relay =` lines. The allocation goes
to the closest by STUN round trip (relay_choice.py); when its relay goes silent (no
answer to the liveness Refresh, checked at once after an ICMP error from its host or a
rendezvous reconnect), its TCP stream closes or it answers 437 (restarted: allocate
again on it), the next relay takes over at once and the failed one cools down for a
few seconds. A clearly closer relay replaces the one in use make-before-break: the new
relayed address is published first, the old allocation released RETIRE_GRACE later.

Gathering runs at start, after every address/route change (rtnetlink, debounced)
and every REGATHER_INTERVAL seconds; `on_candidates` is called whenever the set
changes (the session publishes it to the rendezvous). Host candidates are
reported at once, before STUN answers, so a peer on the same LAN needs no relay.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import structlog

from overlay.stun.credentials import TurnCredentials
from overlay.wireguard.endpoints import RelayEndpoint

from . import demux
from .candidates import Candidate, host_candidates, interface_addresses, network_changes
from .relay_choice import DEFAULT_TURN_PORT, RelayOption, RelayRanker, group_relays, parse_turn_url
from .relay_path import Allocation, RelayPath
from .stun_probe import StunProber, normalize
from .tasks import BackgroundTasks
from .turn_client import ALLOCATING, FAILED, READY

__all__ = ["Gatherer", "TurnServer", "parse_turn_url", "resolve_servers"]

log = structlog.get_logger("overlay.traversal.gatherer")

REGATHER_INTERVAL = 60.0
CHANGE_DEBOUNCE = 0.5
UDP_ANSWER_WAIT = 1.0  # seconds without any answer over UDP (3 requests sent) before trying TCP
FIRST_RTT_WAIT = 0.5  # seconds the first choice among several relays waits for their STUN round trips
# After moving to a closer relay, the previous allocation keeps relaying this long: peers
# still sending to our old relayed address get through until they have moved.
RETIRE_GRACE = 20.0
SEND_FAILED_HOLD = 1.0  # a dead allocation's endpoint is reported as failed at most this often


@dataclass(frozen=True)
class TurnServer:
    """One TURN/STUN URL, resolved: where and over what."""

    address: tuple[str, int]
    transport: str  # "udp", "tcp" or "tls"


async def resolve_servers(urls: list[str], fallback_host: str | None) -> tuple[list[tuple[str, int]], list[TurnServer]]:
    """(STUN servers, TURN servers) from the credentials' URLs; without any URL, the
    rendezvous host on the default port (STUN and TURN over UDP and TCP)."""
    parsed = [p for p in (parse_turn_url(u) for u in urls) if p is not None]
    if not parsed and fallback_host:
        parsed = [("turn", fallback_host, DEFAULT_TURN_PORT, "udp"),
                  ("turn", fallback_host, DEFAULT_TURN_PORT, "tcp")]
    loop = asyncio.get_running_loop()
    stun: list[tuple[str, int]] = []
    turn: list[TurnServer] = []
    for scheme, host, port, transport in parsed:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("cannot resolve relay", host=host, error=str(exc))
            continue
        seen = set()
        for family, _, _, _, sockaddr in infos:
            addr = normalize(sockaddr)
            if addr in seen:
                continue
            seen.add(addr)
            if transport == "udp" and addr not in stun:
                stun.append(addr)
            if scheme != "stun":
                server = TurnServer(addr, transport)
                if server not in turn:
                    turn.append(server)
    return stun, turn


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class _FamilyRelay:
    """Our relay allocation of one address family: the one in use (published) and the
    one being made (the first, a replacement, or one on a closer relay)."""

    __slots__ = ("active", "mismatches", "pending", "waiting")

    def __init__(self) -> None:
        self.active: Allocation | None = None
        self.pending: Allocation | None = None
        self.waiting = False  # a retry is scheduled (every relay cooling down)
        self.mismatches = 0  # 437 answers in a row (a restarted relay: allocate again at once)


class Gatherer:
    def __init__(self, agent, on_candidates: Callable[[list[Candidate]], None],
                 credentials: Callable[[], TurnCredentials | None], fallback_host: str | None,
                 on_relay_ready: Callable[[], None] | None = None, extra_relays: list[str] | None = None):
        self.agent = agent
        self.on_candidates = on_candidates
        self.credentials = credentials
        self.fallback_host = fallback_host
        # Called when our relayed address changes (a new allocation, or the old one lost).
        self.on_relay_ready = on_relay_ready
        # The user's `Relay =` URLs, used next to the rendezvous' TURN URLs (same credentials).
        self.extra_relays = list(extra_relays or [])
        # Called with every interface address after each gathering (the session checks
        # that its rendezvous connection still has its local address).
        self.on_addresses: Callable[[list[str]], None] | None = None
        self.relay = RelayPath(agent.send_datagram, self._deliver, self._allocation_state)
        self.candidates: list[Candidate] = []
        self.host: list[Candidate] = []
        self.prober: StunProber | None = None
        self._prober_timer: asyncio.TimerHandle | None = None
        self.stun_servers: list[tuple[str, int]] = []
        self.turn_servers: list[TurnServer] = []
        self.relays: dict[int, list[RelayOption]] = {4: [], 6: []}  # family -> relays, in URL order
        self.rankers = {4: RelayRanker(), 6: RelayRanker()}
        self._family = {4: _FamilyRelay(), 6: _FamilyRelay()}
        self._retiring: set[Allocation] = set()
        self._rtts_fed: set[tuple[str, int]] = set()  # prober results already given to the rankers
        # The last server-reflexive address each STUN server reported, kept while our own
        # addresses stay the same: a relay that stops answering (killed, failed over) does
        # not change our NAT, and peers need our public IP to permit us on their relays.
        self._srflx_seen: dict[tuple[str, int], tuple[str, int]] = {}
        self._failed_sends: dict = {}  # RelayEndpoint -> when a send to it last failed
        self._probe_progress = asyncio.Event()
        self._tasks = BackgroundTasks("gathering")
        self._wake = asyncio.Event()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.agent.other_datagram_handler = self.on_datagram
        self.agent.endpoint_sender = self._send_relayed
        self.agent.unreachable_handler = self.on_unreachable
        self._tasks.spawn(self._loop())
        self._tasks.spawn(self._watch_network())

    def close(self) -> None:
        self._closed = True
        self._tasks.cancel_all()
        if self._prober_timer is not None:
            self._prober_timer.cancel()
        self.relay.close()
        if self.agent.other_datagram_handler == self.on_datagram:
            self.agent.other_datagram_handler = None
        if self.agent.endpoint_sender == self._send_relayed:
            self.agent.endpoint_sender = None
        if getattr(self.agent, "unreachable_handler", None) == self.on_unreachable:
            self.agent.unreachable_handler = None

    def regather(self) -> None:
        self._wake.set()

    def check_relays(self) -> None:
        """Ask every relay now whether it still holds our allocation (after the rendezvous
        reconnected, say: the relay process may have restarted and forgotten it)."""
        now = time.monotonic()
        for alloc in list(self.relay.allocations.values()):
            if alloc.ready:
                alloc.turn.refresh(now)
                alloc.kick()

    def on_unreachable(self, destination: tuple) -> None:
        """An ICMP unreachable for something we sent to `destination`. When that is the
        host of one of our relays (the server itself, or a peer's relayed address on it),
        check at once that the relay still holds our allocation: a dead relay is then left
        GIVE_UP_AFTER later instead of at the next liveness check. (Rate: one Refresh in
        flight per allocation at most.)"""
        ip = normalize(destination)[0]
        now = time.monotonic()
        for alloc in list(self.relay.allocations.values()):
            if alloc.server[0] == ip and alloc.ready and alloc.transport == "udp":
                alloc.turn.refresh(now)
                alloc.kick()

    # -- the socket ---------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple) -> None:
        """Routing rule of traversal/__init__.py for non-WireGuard datagrams on the tunnel socket."""
        addr = normalize(addr)
        kind = demux.classify(data)
        if kind == demux.STUN and self.prober is not None \
                and self.prober.receive(data, addr, time.monotonic()):
            self._prober_kick()
            return
        if kind in (demux.STUN, demux.CHANNEL_DATA):
            self.relay.handle_udp(data, addr)

    def _send_relayed(self, data: bytes, endpoint) -> None:
        if isinstance(endpoint, RelayEndpoint) and not self.relay.send(data, endpoint):
            # Through an allocation we no longer have (its relay failed): a send error,
            # so the device leaves this endpoint now instead of after seconds of silence.
            now = time.monotonic()
            if now - self._failed_sends.get(endpoint, -1e18) >= SEND_FAILED_HOLD:
                if len(self._failed_sends) > 64:
                    self._failed_sends.clear()
                self._failed_sends[endpoint] = now
                asyncio.get_running_loop().call_soon(self._report_send_failure, endpoint)

    def _report_send_failure(self, endpoint: RelayEndpoint) -> None:
        if self._closed:
            return
        log.info("send failed, no allocation on that relay", endpoint=str(endpoint))
        out = self.agent.device.send_failed(endpoint, errno.ENETUNREACH, time.monotonic())
        self.agent.send_device_output(out)

    def _deliver(self, payload: bytes, source) -> None:
        self.agent.receive_datagrams([(payload, source)])

    # -- gathering ------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._closed:
            try:
                await self.gather()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive, say why
                log.warning("gathering failed", error=repr(exc))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), REGATHER_INTERVAL)
            except TimeoutError:
                pass

    async def _watch_network(self) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.TimerHandle | None = None
        try:
            async for _event in network_changes():
                # One change arrives as a burst of events (and our own routes add
                # some): gather once, CHANGE_DEBOUNCE after the burst began.
                if pending is None or pending.cancelled() or pending.when() <= loop.time():
                    pending = loop.call_later(CHANGE_DEBOUNCE, self._wake.set)
        except Exception as exc:  # noqa: BLE001 - no rtnetlink: periodic gathering still works
            log.info("not watching network changes", error=repr(exc))
        finally:
            if pending is not None:
                pending.cancel()

    def own_addresses(self) -> list[str]:
        return [str(a.ip) for a in self.agent.config.addresses] + list(getattr(self.agent, "extra_overlay_ips", []))

    async def gather(self) -> None:
        port = self.agent.listen_port
        addrs = await interface_addresses()
        host = host_candidates(addrs, port, exclude=self.own_addresses())
        if host != self.host:
            self._srflx_seen.clear()  # another network: what servers saw of us is history
        self.host = host
        self._drop_stale_streams(addrs)
        if self.on_addresses is not None:
            self.on_addresses(addrs)
        self._publish()
        creds = self.credentials()
        urls = list(creds.urls) if creds is not None else []
        await self._resolve_relays(urls)
        if self.stun_servers:
            self.prober = StunProber(self.stun_servers, probe_other_address=False)
            self._rtts_fed.clear()
            self._probe_progress.clear()
            self.prober.start(time.monotonic())
            self._prober_kick()
        if creds is None:
            return
        if any(self._family[f].active is None and len(self.relays[f]) > 1 for f in (4, 6)):
            # Several relays and none in use yet: the STUN round trips decide which one,
            # and they take a few milliseconds; wait a little for them.
            await self._wait_for_rtts(FIRST_RTT_WAIT)
        now = time.monotonic()
        for family in (4, 6):
            fam = self._family[family]
            if fam.active is None and fam.pending is None and not fam.waiting:
                self._allocate_on_best(family)
            elif fam.active is not None and fam.active.ready:
                fam.active.turn.refresh(now)  # the mapping may have changed; and is it still there?
                fam.active.kick()

    async def _resolve_relays(self, urls: list[str]) -> None:
        """The rendezvous' TURN URLs (or its host) plus the user's `Relay =` URLs."""
        stun, turn = await resolve_servers(urls, self.fallback_host)
        if self.extra_relays:
            more_stun, more_turn = await resolve_servers(self.extra_relays, None)
            stun += [s for s in more_stun if s not in stun]
            turn += [t for t in more_turn if t not in turn]
        self.stun_servers, self.turn_servers = stun, turn
        for family in (4, 6):
            options = group_relays((t.address, t.transport) for t in turn if _family(t.address[0]) == family)
            self.relays[family] = options
            self.rankers[family].set_relays([r.key for r in options])

    async def _wait_for_rtts(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.prober is not None and any(r.pending for r in self.prober.results.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._probe_progress.clear()
            try:
                await asyncio.wait_for(self._probe_progress.wait(), left)
            except TimeoutError:
                return

    def _drop_stale_streams(self, addrs: list[str]) -> None:
        """A TCP/TLS allocation whose local address is gone (the host moved) would only
        notice at the next TCP timeout: give it up now and allocate again."""
        for alloc in list(self.relay.allocations.values()):
            local = alloc.local_address()
            if local is not None and normalize(local)[0] not in addrs and alloc.turn.state != FAILED:
                alloc.turn._fail(0, "local address gone", True)
                alloc.kick()

    # -- which relay ------------------------------------------------------------------------------------
    def _relay_option(self, family: int, key: tuple[str, int] | None) -> RelayOption | None:
        return next((r for r in self.relays[family] if r.key == key), None)

    def _allocate_on_best(self, family: int) -> None:
        """Allocate on the closest relay that is not cooling down after a failure; when
        every relay is, try again as soon as the first one may be."""
        fam = self._family[family]
        ranker = self.rankers[family]
        now = time.monotonic()
        key = ranker.choose(now)
        option = self._relay_option(family, key)
        if option is None:
            at = ranker.next_available_at(now)
            if at is not None and not fam.waiting:
                fam.waiting = True
                self._tasks.spawn(self._allocate_later(family, at - now))
            return
        self._begin(family, option, 0)

    async def _allocate_later(self, family: int, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._family[family].waiting = False
        fam = self._family[family]
        if fam.active is None and fam.pending is None and not self._closed:
            self._allocate_on_best(family)

    def _begin(self, family: int, option: RelayOption, index: int) -> None:
        """Start an allocation on `option` over its `index`-th transport; it becomes the
        family's pending allocation (and its active one once ready)."""
        creds = self.credentials()
        if creds is None or self._closed:
            return
        address, transport = option.servers[index]
        alloc = self.relay.new(address, creds, transport)
        alloc.relay_key, alloc.transport_index = option.key, index
        self._family[family].pending = alloc
        log.debug("allocating", server=str(address), transport=transport)
        if transport == "udp":
            alloc.start()
            asyncio.get_running_loop().call_later(UDP_ANSWER_WAIT, self._udp_silent, alloc)
        else:
            self._tasks.spawn(self._begin_stream(alloc, tls=transport == "tls"))

    async def _begin_stream(self, alloc: Allocation, tls: bool) -> None:
        try:
            await alloc.open_stream(tls=tls)
        except (TimeoutError, OSError) as exc:
            log.info("cannot reach the relay", server=str(alloc.server), transport=alloc.transport,
                     error=str(exc))
            alloc.turn._fail(0, f"cannot connect: {exc}", True)
            alloc.kick()
            return
        if not alloc.closed:
            alloc.start()

    def _udp_silent(self, alloc: Allocation) -> None:
        """No answer at all over UDP yet: UDP to the relay is most likely blocked, and
        a user is waiting; move on to TCP now rather than after the client's 5 s."""
        if alloc.closed or alloc.turn.state != ALLOCATING or alloc.turn.realm:
            return  # answered (a 401 sets the realm), or already decided
        alloc.turn._fail(0, f"no answer over UDP within {UDP_ANSWER_WAIT:g} s", True)
        alloc.kick()

    def _consider_moving(self) -> None:
        """After fresh round trips: move to a relay that is clearly closer than the one in
        use, make-before-break (the old allocation keeps working until the new one is
        published, and RETIRE_GRACE after)."""
        now = time.monotonic()
        for family in (4, 6):
            fam = self._family[family]
            if fam.active is None or not fam.active.ready or fam.pending is not None:
                continue
            key = self.rankers[family].closer_than(fam.active.relay_key, now)
            option = self._relay_option(family, key)
            if option is not None:
                ranker = self.rankers[family]
                log.info("moving to a closer relay", current=str(fam.active.server), closer=str(option.key),
                         current_rtt_ms=_ms(ranker.srtt(fam.active.relay_key)), closer_rtt_ms=_ms(ranker.srtt(key)))
                self._begin(family, option, 0)

    def _allocation_state(self, alloc: Allocation) -> None:
        family = alloc.turn.family
        fam = self._family[family]
        ranker = self.rankers[family]
        if alloc.turn.state == READY:
            alloc.was_ready = True
            if alloc is not fam.pending:
                return
            old, fam.active, fam.pending = fam.active, alloc, None
            fam.mismatches = 0
            ranker.succeeded(alloc.relay_key)
            log.info("relay allocation ready", transport=alloc.transport, server=str(alloc.server),
                     relayed=str(alloc.turn.relayed_address))
            self._publish()  # the new relayed address goes out before the old one is released
            if self.on_relay_ready is not None:
                self.on_relay_ready()
            if old is not None and old is not alloc:
                self._retiring.add(old)
                asyncio.get_running_loop().call_later(RETIRE_GRACE, self._retire, old)
            return
        if alloc.turn.state != FAILED or self._closed:
            return
        failure = alloc.turn.failure
        log.info("relay allocation failed", transport=alloc.transport, server=str(alloc.server),
                 reason=str(failure))
        self.relay.remove(alloc)
        if alloc in self._retiring:
            self._retiring.discard(alloc)
            return
        now = time.monotonic()
        if alloc is fam.active:
            fam.active = None
            self._publish()  # stop offering a relayed address that no longer works
            if self.on_relay_ready is not None:
                self.on_relay_ready()
            if fam.pending is not None:
                return  # a move to another relay is under way: it takes over
        elif alloc is fam.pending:
            fam.pending = None
            if fam.active is not None:
                ranker.failed(alloc.relay_key, now)  # a move that did not work out: stay
                return
        else:
            return  # replaced meanwhile
        option = self._relay_option(family, alloc.relay_key)
        if option is not None and failure is not None and failure.code == 437 and fam.mismatches < 2:
            # The relay answers but has no allocation for us: it restarted (or expired us).
            fam.mismatches += 1
            self._begin(family, option, alloc.transport_index)
            return
        if (option is not None and failure is not None and failure.code == 0 and not alloc.was_ready
                and alloc.transport_index + 1 < len(option.servers)):
            # No answer over this transport: the next one (UDP -> TCP -> TLS) at once.
            self._begin(family, option, alloc.transport_index + 1)
            return
        # The relay is down, silent or refusing: the next closest one at once; this one
        # again after a short cooldown.
        ranker.failed(alloc.relay_key, now, refused=failure is not None and not failure.retryable)
        self._allocate_on_best(family)

    def _retire(self, alloc: Allocation) -> None:
        if alloc in self._retiring:
            self._retiring.discard(alloc)
            log.info("released the previous relay allocation", server=str(alloc.server))
            self.relay.remove(alloc)

    # -- STUN -------------------------------------------------------------------------------------------
    def _prober_kick(self) -> None:
        prober = self.prober
        if prober is None:
            return
        for data, addr in prober.datagrams_to_send():
            self.agent.send_datagram(data, addr)
        if self._prober_timer is not None:
            self._prober_timer.cancel()
            self._prober_timer = None
        self._feed_rtts(prober)
        if prober.done:
            self._publish()
            self._consider_moving()
            return
        deadline = prober.next_deadline()
        if deadline is not None:
            self._prober_timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - time.monotonic()), self._prober_tick)

    def _feed_rtts(self, prober: StunProber) -> None:
        """Each relay's STUN round trip (or its silence) to the rankers, once per gathering."""
        now = time.monotonic()
        progress = False
        for server, result in prober.results.items():
            if server in self._rtts_fed or result.pending:
                continue
            self._rtts_fed.add(server)
            progress = True
            ranker = self.rankers[result.family]
            if result.rtt is not None and result.mapped is not None:
                ranker.record_rtt(server, result.rtt, now)
            else:
                ranker.record_timeout(server, now)
        if progress:
            self._probe_progress.set()

    def _prober_tick(self) -> None:
        self._prober_timer = None
        if self.prober is not None:
            self.prober.handle_timers(time.monotonic())
            self._prober_kick()

    # -- result -------------------------------------------------------------------------------------------
    def current(self) -> list[Candidate]:
        out = list(self.host)
        srflx: list[tuple[str, int]] = []
        if self.prober is not None:
            for r in self.prober.results.values():
                if r.mapped is not None:
                    self._srflx_seen[r.server] = r.mapped
        srflx += [m for server, m in self._srflx_seen.items() if server in self.stun_servers and m not in srflx]
        for alloc in self.relay.ready():
            if alloc.transport == "udp" and alloc.turn.mapped_address is not None:
                srflx.append(alloc.turn.mapped_address)
        for ip, port in srflx:
            cand = Candidate("srflx", ip, port)
            if cand not in out and Candidate("host", ip, port) not in out:
                out.append(cand)
        # Only the allocation in use per family: one being retired after a move keeps
        # working for a while, but is no longer offered.
        for alloc in self.active_allocations():
            if alloc.turn.relayed_address is not None:
                cand = Candidate("relay", *alloc.turn.relayed_address)
                if cand not in out:
                    out.append(cand)
        return out

    def active_allocations(self) -> list[Allocation]:
        return [f.active for f in self._family.values() if f.active is not None and f.active.ready]

    def _publish(self) -> None:
        cands = self.current()
        if cands != self.candidates:
            self.candidates = cands
            self.on_candidates(cands)
