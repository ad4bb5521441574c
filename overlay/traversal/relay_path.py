"""Our TURN allocations inside the agent: sending and receiving through them.

An allocation lives on the agent's own UDP socket (its family's), or, when UDP to
the relay gets no answer, on a TCP or TLS connection to the relay. Tunnel traffic
to a `RelayEndpoint(server, peer)` is wrapped by that server's `TurnClient`
(ChannelData once bound, else a Send indication); what the server delivers from a
peer is unwrapped and handed to the device with `RelayEndpoint(server, peer)` as its
source, so answers go back the same way.

The protocol logic is the sans-I/O `TurnClient`; this module only moves bytes and
keeps one timer per allocation.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import structlog

from overlay.stun.credentials import TurnCredentials
from overlay.wireguard.endpoints import RelayEndpoint

from . import demux
from .stream import StreamFramer
from .stun_probe import normalize
from .turn_client import FAILED, KEEPALIVE_INTERVAL, LIVENESS_INTERVAL, READY, TurnClient

log = structlog.get_logger("overlay.traversal.relay")

STREAM_CONNECT_TIMEOUT = 3.0
MAX_STREAM_BUFFER = 1 << 20  # bytes queued towards a TCP/TLS relay before tunnel packets are dropped


class Allocation:
    """One TurnClient and the transport it talks over (the agent's UDP socket or a stream)."""

    def __init__(self, turn: TurnClient, transport: str, send_udp: Callable[[bytes, tuple], None],
                 deliver: Callable[[bytes, RelayEndpoint], None], on_state: Callable[[Allocation], None]):
        self.turn = turn
        self.transport = transport  # "udp", "tcp" or "tls"
        self._send_udp = send_udp
        self._deliver = deliver
        self._on_state = on_state
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._state = turn.state
        self.closed = False
        # Bookkeeping of whoever chose this relay (the gatherer): which relay it belongs
        # to, which of its transports this is, and whether it ever worked.
        self.relay_key: tuple[str, int] | None = None
        self.transport_index = 0
        self.was_ready = False

    def __repr__(self) -> str:
        return f"Allocation({self.transport}, {self.turn!r})"

    @property
    def server(self) -> tuple[str, int]:
        return self.turn.server

    @property
    def ready(self) -> bool:
        return self.turn.state == READY

    async def open_stream(self, tls: bool) -> None:
        ctx = None
        if tls:
            # The relay's certificate is often self-signed; TURN's long-term credentials
            # authenticate the exchange, and the tunnel's payload is end-to-end encrypted.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.turn.server[0], self.turn.server[1], ssl=ctx),
            STREAM_CONNECT_TIMEOUT)
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def start(self) -> None:
        self.turn.start(time.monotonic())
        self.kick()

    def local_address(self) -> tuple | None:
        """The local socket address of a stream allocation (None for UDP ones)."""
        if self._writer is None:
            return None
        return self._writer.get_extra_info("sockname")

    # -- moving bytes -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport == "udp":
            self._send_udp(data, self.turn.server)
        elif self._writer is not None and not self._writer.is_closing():
            if self._writer.transport.get_write_buffer_size() > MAX_STREAM_BUFFER:
                return  # the relay connection cannot keep up: drop, as a full UDP queue would
            self._writer.write(data)

    def flush(self) -> None:
        for data in self.turn.datagrams_to_send():
            self._write(data)

    def send(self, payload: bytes, peer: tuple[str, int]) -> bool:
        frame = self.turn.wrap(payload, peer, time.monotonic())
        self.flush()  # permission / channel requests must go before the data
        if frame is None:
            return False
        self._write(frame)
        return True

    def received(self, data: bytes) -> None:
        """Anything from the server (a UDP datagram or one stream frame)."""
        got = self.turn.unwrap(data, time.monotonic())
        if got is not None:
            payload, peer = got
            if demux.classify(payload) == demux.WIREGUARD:
                self._deliver(payload, RelayEndpoint(self.turn.server, peer))
        self.kick()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        framer = StreamFramer()
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for frame in framer.feed(chunk):
                    self.received(frame)
                if framer.error:
                    log.warning("TURN stream out of sync", server=str(self.turn.server), error=framer.error)
                    break
        except (OSError, ssl.SSLError) as exc:
            log.info("TURN stream closed", server=str(self.turn.server), error=str(exc))
        finally:
            if not self.closed and self.turn.state != FAILED:
                self.turn._fail(0, "connection to the relay closed", True)
                self.kick()

    # -- timers ---------------------------------------------------------------------------------
    def kick(self) -> None:
        """Flush, report state changes, re-arm the timer at the client's next deadline."""
        if self.closed:
            return
        self.flush()
        if self.turn.state != self._state:
            self._state = self.turn.state
            self._on_state(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.turn.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.turn.handle_timers(time.monotonic())
        self.kick()

    def close(self) -> None:
        if self.closed:
            return
        self.turn.close(time.monotonic())
        self.flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()


class RelayPath:
    """All our allocations, by server address; the agent's sender for RelayEndpoints."""

    def __init__(self, send_udp: Callable[[bytes, tuple], None],
                 deliver: Callable[[bytes, RelayEndpoint], None],
                 on_state: Callable[[Allocation], None]):
        self._send_udp = send_udp
        self._deliver = deliver
        self._on_state = on_state
        self.allocations: dict[tuple[str, int], Allocation] = {}

    def new(self, server: tuple[str, int], credentials: TurnCredentials, transport: str) -> Allocation:
        """Create (not yet start) an allocation; replaces one on the same server."""
        family = 6 if ":" in server[0] else 4
        # keepalive: the relay path is the standby of peers on a direct path, idle for
        # long stretches; our NAT must still let the server's packets in when it is needed.
        turn = TurnClient(server, credentials, family=family, stream=transport != "udp",
                          software="overlay", keepalive=KEEPALIVE_INTERVAL, liveness=LIVENESS_INTERVAL)
        old = self.allocations.get(turn.server)
        if old is not None:
            old.close()
        alloc = Allocation(turn, transport, self._send_udp, self._deliver, self._on_state)
        self.allocations[turn.server] = alloc
        return alloc

    def remove(self, alloc: Allocation) -> None:
        alloc.close()
        if self.allocations.get(alloc.server) is alloc:
            del self.allocations[alloc.server]

    def ready(self) -> list[Allocation]:
        return [a for a in self.allocations.values() if a.ready]

    def send(self, payload: bytes, endpoint: RelayEndpoint) -> bool:
        """False when no working allocation on that server can carry it."""
        alloc = self.allocations.get(endpoint.server)
        if alloc is None or alloc.turn.state != READY:
            return False
        return alloc.send(payload, endpoint.peer)

    def handle_udp(self, data: bytes, addr: tuple[str, int]) -> bool:
        """A non-WireGuard datagram on the tunnel socket: ours if it came from a UDP allocation's server."""
        alloc = self.allocations.get(addr)
        if alloc is None or alloc.transport != "udp":
            return False
        alloc.received(data)
        return True

    def permit(self, peer_addresses: list[tuple[str, int]]) -> None:
        """Let these peers' packets through every ready allocation of their family, and
        bind channels early so the first data already goes as ChannelData.

        The list is the whole set of current peer addresses: their permissions and
        channels are kept while idle (a peer on a direct path needs the relay as its
        standby: when the direct path dies, the first probes through the relay must
        get through); addresses no longer listed are released and lapse."""
        now = time.monotonic()
        for alloc in self.ready():
            fam = alloc.turn.family
            wanted: set[tuple[str, int]] = set()
            for ip, port in peer_addresses:
                if (6 if ":" in ip else 4) != fam or ip == alloc.server[0]:
                    continue  # (relays refuse to relay to their own addresses)
                alloc.turn.permit(ip, now, keep=True)
                alloc.turn.bind((ip, port), now, keep=True)
                wanted.add(normalize((ip, port)))
            wanted_ips = {ip for ip, _ in wanted}
            for ip in alloc.turn.kept_permissions():
                if ip not in wanted_ips:
                    alloc.turn.release(ip)
            for peer in alloc.turn.kept_channels():
                if peer not in wanted:
                    alloc.turn.release_channel(peer)
            alloc.kick()

    def close(self) -> None:
        for alloc in list(self.allocations.values()):
            alloc.close()
        self.allocations.clear()
