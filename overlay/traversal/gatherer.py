"""Candidate gathering on the agent's own sockets.

- host: every interface address (IPv4 and IPv6) except loopback, link-local and the
  overlay's own, with the tunnel's listen port;
- srflx: a STUN Binding per address family to the relay (from the TURN URLs), sent
  from the tunnel socket, so the mapping is the one WireGuard traffic uses;
- relay: a TURN allocation per family on the tunnel socket; when UDP to the relay
  gets no answer, over TCP, then TLS (`turns:` URLs).

Gathering runs at start, after every address/route change (rtnetlink, debounced)
and every REGATHER_INTERVAL seconds; `on_candidates` is called whenever the set
changes (the session publishes it to the rendezvous). Host candidates are
reported at once, before STUN answers, so a peer on the same LAN needs no relay.
"""

from __future__ import annotations

import asyncio
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
from .relay_path import Allocation, RelayPath
from .stun_probe import StunProber, normalize
from .tasks import BackgroundTasks
from .turn_client import ALLOCATING, FAILED, READY, retry_delay

log = structlog.get_logger("overlay.traversal.gatherer")

REGATHER_INTERVAL = 60.0
CHANGE_DEBOUNCE = 0.5
DEFAULT_TURN_PORT = 3478
UDP_ANSWER_WAIT = 1.0  # seconds without any answer over UDP (3 requests sent) before trying TCP


@dataclass(frozen=True)
class TurnServer:
    """One TURN/STUN URL, resolved: where and over what."""

    address: tuple[str, int]
    transport: str  # "udp", "tcp" or "tls"


def parse_turn_url(url: str) -> tuple[str, str, int, str] | None:
    """("stun"|"turn"|"turns", host, port, transport) or None for a URL we cannot use."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme not in ("stun", "turn", "turns") or not rest:
        return None
    parts = urlsplit("//" + rest)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    transport = parse_qs(parts.query).get("transport", ["tcp" if scheme == "turns" else "udp"])[0].lower()
    if scheme == "turns":
        transport = "tls"
    if transport not in ("udp", "tcp", "tls"):
        return None
    return scheme, host, port or (5349 if scheme == "turns" else DEFAULT_TURN_PORT), transport


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


class Gatherer:
    def __init__(self, agent, on_candidates: Callable[[list[Candidate]], None],
                 credentials: Callable[[], TurnCredentials | None], fallback_host: str | None,
                 on_relay_ready: Callable[[], None] | None = None):
        self.agent = agent
        self.on_candidates = on_candidates
        self.credentials = credentials
        self.fallback_host = fallback_host
        self.on_relay_ready = on_relay_ready
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
        self._failures: dict[int, int] = {}  # family -> consecutive allocation failures
        self._transport_index: dict[int, int] = {}  # family -> index into that family's TURN servers
        self._tasks = BackgroundTasks("gathering")
        self._wake = asyncio.Event()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.agent.other_datagram_handler = self.on_datagram
        self.agent.endpoint_sender = self._send_relayed
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

    def regather(self) -> None:
        self._wake.set()

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
        if isinstance(endpoint, RelayEndpoint):
            self.relay.send(data, endpoint)

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
        self.host = host_candidates(addrs, port, exclude=self.own_addresses())
        self._drop_stale_streams(addrs)
        if self.on_addresses is not None:
            self.on_addresses(addrs)
        self._publish()
        creds = self.credentials()
        urls = list(creds.urls) if creds is not None else []
        self.stun_servers, self.turn_servers = await resolve_servers(urls, self.fallback_host)
        if self.stun_servers:
            self.prober = StunProber(self.stun_servers, probe_other_address=False)
            self.prober.start(time.monotonic())
            self._prober_kick()
        if creds is not None:
            for family in (4, 6):
                alloc = self._allocation_for(family)
                if alloc is None or alloc.turn.state == FAILED:
                    await self._allocate(family)
                elif alloc.ready:
                    alloc.turn.refresh(time.monotonic())  # the mapping may have changed
                    alloc.kick()

    def _drop_stale_streams(self, addrs: list[str]) -> None:
        """A TCP/TLS allocation whose local address is gone (the host moved) would only
        notice at the next TCP timeout: give it up now and allocate again."""
        for alloc in list(self.relay.allocations.values()):
            local = alloc.local_address()
            if local is not None and normalize(local)[0] not in addrs and alloc.turn.state != FAILED:
                alloc.turn._fail(0, "local address gone", True)
                alloc.kick()

    def _servers(self, family: int) -> list[TurnServer]:
        return [s for s in self.turn_servers if _family(s.address[0]) == family]

    def _allocation_for(self, family: int) -> Allocation | None:
        for alloc in self.relay.allocations.values():
            if alloc.turn.family == family:
                return alloc
        return None

    async def _allocate(self, family: int) -> None:
        servers = self._servers(family)
        creds = self.credentials()
        if not servers or creds is None or self._closed:
            return
        index = self._transport_index.get(family, 0) % len(servers)
        server = servers[index]
        alloc = self.relay.new(server.address, creds, server.transport)
        if server.transport != "udp":
            try:
                await alloc.open_stream(tls=server.transport == "tls")
            except (TimeoutError, OSError) as exc:
                log.info("cannot reach the relay", server=str(server.address), transport=server.transport,
                         error=str(exc))
                alloc.turn._fail(0, f"cannot connect: {exc}", True)
                self._allocation_state(alloc)
                return
        log.debug("allocating", server=str(server.address), transport=server.transport)
        alloc.start()
        if server.transport == "udp":
            asyncio.get_running_loop().call_later(UDP_ANSWER_WAIT, self._udp_silent, alloc)

    def _udp_silent(self, alloc: Allocation) -> None:
        """No answer at all over UDP yet: UDP to the relay is most likely blocked, and
        a user is waiting; move on to TCP now rather than after the client's 5 s."""
        if alloc.closed or alloc.turn.state != ALLOCATING or alloc.turn.realm:
            return  # answered (a 401 sets the realm), or already decided
        alloc.turn._fail(0, f"no answer over UDP within {UDP_ANSWER_WAIT:g} s", True)
        alloc.kick()

    def _allocation_state(self, alloc: Allocation) -> None:
        family = alloc.turn.family
        if alloc.turn.state == READY:
            self._failures[family] = 0
            log.info("relay allocation ready", transport=alloc.transport, server=str(alloc.server),
                     relayed=str(alloc.turn.relayed_address))
            self._publish()
            if self.on_relay_ready is not None:
                self.on_relay_ready()
        elif alloc.turn.state == FAILED and not self._closed:
            failure = alloc.turn.failure
            log.info("relay allocation failed", transport=alloc.transport, server=str(alloc.server),
                     reason=str(failure))
            self.relay.remove(alloc)
            self._publish()
            attempt = self._failures.get(family, 0)
            self._failures[family] = attempt + 1
            servers = self._servers(family)
            # No answer at all: the next transport (UDP -> TCP -> TLS) at once;
            # anything else: the same one again after a backoff.
            delay = 0.0
            if failure is not None and failure.code == 0 and servers:
                self._transport_index[family] = self._transport_index.get(family, 0) + 1
                if self._transport_index[family] % len(servers) == 0:
                    delay = retry_delay(attempt)
            elif failure is not None and not failure.retryable:
                delay = retry_delay(max(attempt, 4))
            else:
                delay = retry_delay(attempt)
            self._tasks.spawn(self._allocate_later(family, delay))

    async def _allocate_later(self, family: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._allocation_for(family) is None:
            await self._allocate(family)

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
        if prober.done:
            self._publish()
            return
        deadline = prober.next_deadline()
        if deadline is not None:
            self._prober_timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - time.monotonic()), self._prober_tick)

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
            srflx += [r.mapped for r in self.prober.results.values() if r.mapped is not None]
        for alloc in self.relay.ready():
            if alloc.transport == "udp" and alloc.turn.mapped_address is not None:
                srflx.append(alloc.turn.mapped_address)
        for ip, port in srflx:
            cand = Candidate("srflx", ip, port)
            if cand not in out and Candidate("host", ip, port) not in out:
                out.append(cand)
        for alloc in self.relay.ready():
            if alloc.turn.relayed_address is not None:
                cand = Candidate("relay", *alloc.turn.relayed_address)
                if cand not in out:
                    out.append(cand)
        return out

    def _publish(self) -> None:
        cands = self.current()
        if cands != self.candidates:
            self.candidates = cands
            self.on_candidates(cands)
