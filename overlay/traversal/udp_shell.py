"""Thin asyncio shells around the sans-I/O STUN prober and TURN client (for tests and tools).

`TraversalSocket`: one UDP socket, as the agent's tunnel socket will be, carrying STUN
Binding, TURN (to any number of servers) and everything else (WireGuard), told apart
by first bytes and source. `TurnStream`: one TCP or TLS connection to a relay for when
UDP gets no answer. Both only move bytes and call `handle_timers` at the deadline
the cores ask for; all decisions are in the cores.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from typing import Callable

from overlay.stun.message import Address

from . import demux
from .stream import StreamFramer
from .stun_probe import StunProber, normalize
from .turn_client import ALLOCATING, TurnClient

PeerData = tuple[bytes, Address, Address]  # payload, peer address, TURN server it came through


class _Timers:
    """Calls `tick(now)` at the earliest deadline `deadline()` reports; `kick()` re-plans."""

    def __init__(self, tick: Callable[[float], None], deadline: Callable[[], float | None]) -> None:
        self._tick, self._deadline = tick, deadline
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def kick(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self._deadline()
            delay = None if due is None else max(0.0, due - loop.time())
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()
            self._tick(loop.time())

    def stop(self) -> None:
        self._task.cancel()


class TraversalSocket(asyncio.DatagramProtocol):
    def __init__(self, on_other: Callable[[bytes, Address], None] | None = None) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.prober: StunProber | None = None
        self.turns: dict[Address, TurnClient] = {}
        self.peer_data: asyncio.Queue[PeerData] = asyncio.Queue()
        self.other: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()  # WireGuard etc.
        self._on_other = on_other
        self.received_kinds: Counter[str] = Counter()  # demux kind -> datagrams seen
        self._changed = asyncio.Event()
        self._timers: _Timers | None = None

    @classmethod
    async def open(cls, local: Address, on_other: Callable[[bytes, Address], None] | None = None
                   ) -> "TraversalSocket":
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        _, proto = await loop.create_datagram_endpoint(lambda: cls(on_other), local_addr=local, family=family)
        proto._timers = _Timers(proto._tick, proto._deadline)
        return proto

    @property
    def local_address(self) -> Address:
        assert self.transport is not None
        return normalize(self.transport.get_extra_info("sockname"))

    def close(self) -> None:
        now = asyncio.get_running_loop().time()
        for turn in self.turns.values():
            turn.close(now)
        self._flush()
        if self._timers:
            self._timers.stop()
        if self.transport:
            self.transport.close()

    def sendto(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    # -- STUN ----------------------------------------------------------------------------------
    async def gather(self, servers: list[Address], **kw) -> StunProber:
        """Run Binding transactions to `servers` from this socket until all answered or gave up."""
        self.prober = StunProber(servers, **kw)
        self.prober.start(asyncio.get_running_loop().time())
        self._after_change()
        await self._until(lambda: self.prober is not None and self.prober.done)
        return self.prober

    # -- TURN ----------------------------------------------------------------------------------
    async def allocate(self, turn: TurnClient) -> TurnClient:
        """Start `turn` on this socket and wait until it is ready or failed."""
        self.turns[turn.server] = turn
        turn.start(asyncio.get_running_loop().time())
        self._after_change()
        await self._until(lambda: turn.state != ALLOCATING)
        return turn

    def send_via(self, turn: TurnClient, payload: bytes, peer: Address, *, channel: bool = True) -> bool:
        frame = turn.wrap(payload, peer, asyncio.get_running_loop().time(), channel=channel)
        self._flush()  # requests the wrap queued (bind, permission) go first
        if frame is None:
            return False
        self.sendto(frame, turn.server)
        self._after_change()
        return True

    def kick(self, fn: Callable[[float], object]) -> None:
        """Run `fn(now)` against a core (e.g. `turn.permit`), then send what it queued."""
        fn(asyncio.get_running_loop().time())
        self._after_change()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._until(condition), timeout)

    # -- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        source = normalize(addr)
        now = asyncio.get_running_loop().time()
        kind = demux.classify(data)
        self.received_kinds[kind] += 1
        turn = self.turns.get(source)
        # The prober goes first: one relay is usually both STUN and TURN server, and its
        # Binding answers carry transaction ids only the prober knows.
        if kind == demux.STUN and self.prober is not None and self.prober.receive(data, source, now):
            pass
        elif turn is not None and kind in (demux.STUN, demux.CHANNEL_DATA):
            got = turn.unwrap(data, now)
            if got is not None:
                self.peer_data.put_nowait((got[0], got[1], source))
        elif self._on_other is not None:
            self._on_other(data, source)
        else:
            self.other.put_nowait((data, source))
        self._after_change()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: the cores' timeouts handle an unreachable server

    # -- internals ------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.prober is not None:
            for data, addr in self.prober.datagrams_to_send():
                self.transport.sendto(data, addr)
        for turn in self.turns.values():
            for data in turn.datagrams_to_send():
                self.transport.sendto(data, turn.server)

    def _tick(self, now: float) -> None:
        if self.prober is not None:
            self.prober.handle_timers(now)
        for turn in self.turns.values():
            turn.handle_timers(now)
        self._after_change(kick=False)

    def _deadline(self) -> float | None:
        times = [t.next_deadline() for t in self.turns.values()]
        if self.prober is not None:
            times.append(self.prober.next_deadline())
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def _after_change(self, kick: bool = True) -> None:
        self._flush()
        if kick and self._timers:
            self._timers.kick()
        self._changed.set()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()


class TurnStream:
    """One TurnClient(stream=True) over a TCP or (with `tls`) TLS connection to its server."""

    def __init__(self, turn: TurnClient, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.turn, self.reader, self.writer = turn, reader, writer
        self.framer = StreamFramer()
        self.peer_data: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._timers = _Timers(self._tick, turn.next_deadline)
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, turn: TurnClient, *, tls: ssl.SSLContext | None = None,
                      server_hostname: str | None = None, timeout: float = 5.0) -> "TurnStream":
        if not turn.stream:
            raise ValueError("TurnStream needs a TurnClient created with stream=True")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(turn.server[0], turn.server[1], ssl=tls,
                                    server_hostname=server_hostname if tls else None), timeout)
        return cls(turn, reader, writer)

    async def allocate(self) -> TurnClient:
        self.turn.start(asyncio.get_running_loop().time())
        self._after_change()
        while self.turn.state == ALLOCATING and not self.closed.is_set():
            self._changed.clear()
            await self._changed.wait()
        return self.turn

    def send_via(self, payload: bytes, peer: Address, *, channel: bool = True) -> bool:
        frame = self.turn.wrap(payload, peer, asyncio.get_running_loop().time(), channel=channel)
        self._flush()
        if frame is None:
            return False
        self.writer.write(frame)
        self._after_change()
        return True

    def kick(self, fn: Callable[[float], object]) -> None:
        fn(asyncio.get_running_loop().time())
        self._after_change()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async def until() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(until(), timeout)

    async def close(self) -> None:
        self.turn.close(asyncio.get_running_loop().time())
        self._flush()
        self._timers.stop()
        self._reader_task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                for frame in self.framer.feed(chunk):
                    got = self.turn.unwrap(frame, loop.time())
                    if got is not None:
                        self.peer_data.put_nowait(got)
                if self.framer.error:
                    break
                self._after_change()
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            self._changed.set()

    def _tick(self, now: float) -> None:
        self.turn.handle_timers(now)
        self._after_change(kick=False)

    def _flush(self) -> None:
        if not self.writer.is_closing():
            for data in self.turn.datagrams_to_send():
                self.writer.write(data)

    def _after_change(self, kick: bool = True) -> None:
        self._flush()
        if kick:
            self._timers.kick()
        self._changed.set()
