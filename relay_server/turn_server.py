"""Asyncio shell around `TurnCore`: UDP, TCP and TLS listeners and relayed UDP sockets.

The relay hot path (ChannelData client -> peer and peer -> client) lives here
because it is pure I/O. Each readable socket is drained in a loop into one
preallocated buffer (`recvfrom_into`, or `recvmsg_into` with UDP GRO so a client
sending with GSO costs one receive per run of frames); the per-packet checks are
the core's `channel_target` / `peer_target` rules, inlined; consecutive datagrams
for one destination leave together in one UDP GSO `sendmsg` (`Coalescer`). The
ChannelData header for the peer -> client direction is written into 4 bytes of
headroom in front of the received payload. Everything else (STUN/TURN requests,
indications, Data indications) goes through `TurnCore.handle_client/handle_peer`.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from overlay.stun import message as m
from overlay.stun.message import Address, StunError

from .turn_core import Allocation, ClientTransport, Out, TurnCore

BATCH = 256  # datagrams handled per readable callback before yielding to the loop
BUF_SIZE = 65536 + 4
MAX_STREAM_BUFFER = 256 * 1024
# File descriptors kept free for rendezvous connections, the database and listeners:
# relayed sockets are refused (508) before the process runs out of descriptors.
FD_RESERVE = 8
UDP_SEGMENT = 103  # SOL_UDP option: send one buffer as several equal-sized datagrams (GSO)
UDP_GRO = 104  # SOL_UDP option: receive a run of datagrams of one flow as one buffer + segment size
GRO_ANCILLARY = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_pack_into = struct.pack_into
_seg_option = struct.Struct("=H").pack


def _kernel_has_udp_gro() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


class Coalescer:
    """Joins consecutive datagrams for one destination into a single UDP GSO send.

    Relayed traffic comes in runs (a drain of one socket is mostly one flow), so
    one `sendmsg` with UDP_SEGMENT replaces up to 64 `sendto` calls; the kernel cuts
    the buffer back into the original datagrams. All but the last datagram of a run
    must have the same size, so a run ends at a larger or after a smaller one.
    If the kernel refuses GSO, it is switched off and datagrams go one by one.
    """

    __slots__ = ("buf", "mv", "used", "count", "seg", "key", "sock", "dest", "short", "enabled")

    def __init__(self) -> None:
        self.buf = bytearray(GSO_MAX_BYTES + BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.used = self.count = self.seg = 0
        self.key: object = None
        self.sock: socket.socket | None = None
        self.dest: Address = ("", 0)
        self.short = False
        self.enabled = True

    def add(self, key: object, sock: socket.socket, dest: Address, data: memoryview) -> None:
        n = len(data)
        if self.count and (key is not self.key or self.short or n > self.seg or self.count >= GSO_MAX_SEGMENTS
                           or self.used + n > GSO_MAX_BYTES or not self.enabled):
            self.flush()
        if not self.count:
            self.key, self.sock, self.dest, self.seg, self.short = key, sock, dest, n, False
        elif n < self.seg:
            self.short = True
        used = self.used
        self.mv[used : used + n] = data
        self.used = used + n
        self.count += 1

    def flush(self) -> None:
        count = self.count
        if not count:
            return
        data = self.mv[: self.used]
        sock = self.sock
        self.count = self.used = 0
        self.key = None
        try:
            if count == 1:
                sock.sendto(data, self.dest)  # type: ignore[union-attr]
            else:
                sock.sendmsg([data], [(socket.SOL_UDP, UDP_SEGMENT, _seg_option(self.seg))], 0, self.dest)  # type: ignore[union-attr]
        except BlockingIOError:
            pass  # socket buffer full: these datagrams are lost, as they would be one by one
        except OSError as exc:
            if count > 1 and exc.errno == errno.EMSGSIZE:
                # One segment plus headers exceeds the path MTU (full-size ChannelData over
                # IPv6: 1456 + 48 > 1500). GSO cannot fragment, a plain send can: send this
                # run one by one, keep GSO for the smaller runs.
                for off in range(0, len(data), self.seg):
                    try:
                        sock.sendto(data[off : off + self.seg], self.dest)  # type: ignore[union-attr]
                    except OSError:
                        break
            elif count > 1 and exc.errno in (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                self.enabled = False
                for off in range(0, len(data), self.seg):
                    try:
                        sock.sendto(data[off : off + self.seg], self.dest)  # type: ignore[union-attr]
                    except OSError:
                        break


class UdpListener(ClientTransport):
    """A STUN/TURN UDP socket. With UDP GRO on, a client that sends with GSO (the overlay
    agent does) hands over a whole run of ChannelData frames per receive call; the
    frames are then walked inside the buffer, one `segment` apart."""

    __slots__ = ("sock", "shell", "v6", "gro")

    def __init__(self, sock: socket.socket, shell: "TurnServer", gro: bool = False) -> None:
        local = sock.getsockname()[:2]
        super().__init__(local, stream=False, name="udp")
        self.sock = sock
        self.shell = shell
        self.v6 = sock.family == socket.AF_INET6
        self.gro = gro

    def send(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            pass  # UDP: a full buffer or an unreachable client loses this datagram only

    def readable(self) -> None:
        # The client->peer hot path. Its receive loop has a twin in
        # TurnServer._relay_readable (peer->client); they stay separate, with
        # every lookup hoisted into locals, because a shared helper would cost a
        # call and attribute loads per packet on the path that sets the relay's
        # packet rate.
        sock = self.sock
        shell = self.shell
        core = shell.core
        buf = shell.buf
        mv = shell.mv
        bufs = shell.bufs
        allocs = self.allocs
        v6 = self.v6
        gro = self.gro
        rate = core.s.bandwidth
        out = shell.to_peers
        add = out.add
        now = time.time()
        pkts = nbytes = 0
        try:
            for _ in range(BATCH):
                try:
                    if gro:
                        n, anc, _flags, addr = sock.recvmsg_into(bufs, GRO_ANCILLARY)
                        seg = int.from_bytes(anc[0][2][:4], "little") if anc else n
                    else:
                        n, addr = sock.recvfrom_into(buf)
                        seg = n
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue  # e.g. ICMP port unreachable reported on the socket
                if v6:
                    addr = addr[:2]
                if seg <= 0:
                    seg = n
                off = 0
                while off < n:  # one pass without GRO; one per coalesced datagram with it
                    end = off + seg
                    if end > n:
                        end = n
                    b0 = buf[off]
                    if 0x40 <= b0 <= 0x7F and end - off >= 4:
                        # ChannelData: the relay hot path, checked inline (see TurnCore.channel_target).
                        alloc = allocs.get(addr)
                        if alloc is not None:
                            ch = alloc.channels.get((b0 << 8) | buf[off + 1])
                            if ch is not None and ch.until >= now:
                                length = (buf[off + 2] << 8) | buf[off + 3]
                                if length + 4 <= end - off and (
                                        not rate or core.take_tokens(alloc, length, now, rate)):
                                    add(ch, alloc.relay, ch.peer, mv[off + 4 : off + 4 + length])
                                    pkts += 1
                                    nbytes += length
                    else:
                        out.flush()  # keep order with whatever the slow path sends
                        shell.slow_path(bytes(mv[off:end]), self, addr, now)
                    off = end
        finally:
            out.flush()
            if pkts:
                core.stats.pkts_out += pkts
                core.stats.bytes_out += nbytes


class StreamConnection(ClientTransport, asyncio.Protocol):
    """One TCP or TLS client connection; frames are STUN messages or padded ChannelData."""

    __slots__ = ("shell", "transport", "buffer", "peer")

    def __init__(self, shell: "TurnServer", name: str) -> None:
        super().__init__(("", 0), stream=True, name=name)
        self.shell = shell
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.peer: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = tuple(transport.get_extra_info("sockname")[:2])  # type: ignore[assignment]
        self.peer = tuple(transport.get_extra_info("peername")[:2])  # type: ignore[assignment]
        self.shell.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shell.connections.discard(self)
        self.shell.core.transport_closed(self)

    def send(self, data: bytes, addr: Address) -> None:
        tr = self.transport
        if tr is not None and not tr.is_closing():
            if tr.get_write_buffer_size() > MAX_STREAM_BUFFER:
                return  # a client that does not read loses relayed data, not server memory
            tr.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        shell = self.shell
        now = time.time()
        pos = 0
        try:
            while True:
                size = m.stream_frame_length(bytes(buf[pos : pos + 4]))
                if size is None or pos + size > len(buf):
                    break
                frame = bytes(buf[pos : pos + size])
                pos += size
                shell.slow_path(frame, self, self.peer, now)
        except StunError as exc:
            shell.core.on_log("stream_garbage", client=self.peer, error=str(exc))
            del buf[:]
            if self.transport is not None:
                self.transport.close()
            return
        del buf[:pos]


@dataclass
class RelayAddresses:
    ipv4: str | None
    ipv6: str | None


class TurnServer:
    """Owns the sockets; implements the core's `RelayPorts`."""

    def __init__(self, core: TurnCore, relay: RelayAddresses, fd_limit: int = 1 << 30, gro: bool = True) -> None:
        self.core = core
        self.fd_limit = fd_limit
        self.gro = gro and _kernel_has_udp_gro()
        self.relay_ips = relay
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.bufs = [self.buf]
        # Peer -> client buffer: 4 bytes of headroom for the ChannelData header.
        self.rbuf = bytearray(BUF_SIZE)
        self.rmv = memoryview(self.rbuf)
        self.rpayload = self.rmv[4:]
        self.rpayload_bufs = [self.rpayload]
        self.to_peers = Coalescer()
        self.to_clients = Coalescer()
        self.udp: dict[Address, UdpListener] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[StreamConnection] = set()
        self._timer: asyncio.Task | None = None
        core.ports = self

    # -- listeners ------------------------------------------------------------------------
    def listen_udp(self, ip: str, port: int) -> Address:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.bind((ip, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        gro = False
        if self.gro:
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                gro = True
            except OSError:
                pass  # older kernel: one datagram per receive
        listener = UdpListener(sock, self, gro)
        self.udp[listener.local] = listener
        self.loop.add_reader(sock.fileno(), listener.readable)
        return listener.local

    async def listen_stream(self, ip: str, port: int, tls: ssl.SSLContext | None = None) -> Address:
        name = "tls" if tls else "tcp"
        server = await self.loop.create_server(
            lambda: StreamConnection(self, name), ip, port, ssl=tls, reuse_address=True,
        )
        self.servers.append(server)
        return tuple(server.sockets[0].getsockname()[:2])  # type: ignore[return-value]

    def start(self) -> None:
        self._timer = asyncio.create_task(self._run_timer())

    async def aclose(self) -> None:
        if self._timer:
            self._timer.cancel()
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport:
                conn.transport.abort()
        for alloc in list(self.core.allocations):
            self.core._delete(alloc)
        for listener in self.udp.values():
            self.loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        self.udp.clear()

    async def _run_timer(self) -> None:
        while True:
            now = time.time()
            deadline = self.core.next_deadline()
            delay = 1.0 if deadline is None else min(1.0, max(0.05, deadline - now))
            await asyncio.sleep(delay)
            self.core.handle_timer(time.time())

    # -- output ---------------------------------------------------------------------------
    def slow_path(self, data: bytes, transport: ClientTransport, client: Address, now: float) -> None:
        """Everything but ChannelData: through the core. A bug there costs one message, not the server."""
        try:
            outs = self.core.handle_client(data, transport, client, now)
        except Exception as exc:  # noqa: BLE001 - logged as one line, no traceback (no frame locals)
            self.core.on_log("internal_error", level="error", error=f"{type(exc).__name__}: {exc}"[:200])
            return
        self.dispatch(outs)

    def dispatch(self, outs: list[Out]) -> None:
        for via, data, dest in outs:
            if isinstance(via, ClientTransport):
                via.send(data, dest)  # type: ignore[attr-defined]
            elif isinstance(via, tuple):
                listener = self.udp.get(via)
                if listener is not None:
                    listener.send(data, dest)
            else:
                try:
                    via.sendto(data, dest)  # type: ignore[attr-defined]
                except OSError:
                    pass

    # -- RelayPorts -------------------------------------------------------------------------
    def _bind(self, af: int, ip: str, port: int) -> socket.socket | None:
        try:
            sock = socket.socket(af, socket.SOCK_DGRAM)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return None
            raise
        try:
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sock.fileno() >= self.fd_limit - FD_RESERVE:
                raise OSError(errno.EMFILE, "descriptor reserve reached")
            sock.bind((ip, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        if self.gro:
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
            except OSError:
                sock.close()
                return None
        return sock

    def open(self, family: int, alloc: Allocation, even: bool = False,
             reserve: bool = False) -> tuple[object, Address, object | None] | None:
        ip = self.relay_ips.ipv6 if family == m.FAMILY_IPV6 else self.relay_ips.ipv4
        if ip is None:
            return None
        af = socket.AF_INET6 if family == m.FAMILY_IPV6 else socket.AF_INET
        spare = None
        for _ in range(32 if even else 1):
            sock = self._bind(af, ip, 0)
            if sock is None:
                return None
            port = sock.getsockname()[1]
            if not even or (port % 2 == 0 and port < 65535):
                if not reserve:
                    break
                spare = self._bind(af, ip, port + 1)
                if spare is not None:
                    break
            sock.close()
        else:
            return None
        self.adopt(sock, alloc)
        return sock, tuple(sock.getsockname()[:2]), spare  # type: ignore[return-value]

    def adopt(self, reserved: object, alloc: Allocation) -> Address:
        sock: socket.socket = reserved  # type: ignore[assignment]
        self.loop.add_reader(sock.fileno(), self._relay_readable, alloc)
        return tuple(sock.getsockname()[:2])  # type: ignore[return-value]

    def close_relay(self, handle: object) -> None:
        sock: socket.socket = handle  # type: ignore[assignment]
        try:
            self.loop.remove_reader(sock.fileno())
        except (ValueError, OSError):
            pass
        sock.close()

    def close(self, handle: object) -> None:  # type: ignore[override]
        # RelayPorts.close; the server-wide shutdown is `aclose`.
        self.close_relay(handle)

    def _relay_readable(self, alloc: Allocation) -> None:
        sock: socket.socket = alloc.relay  # type: ignore[assignment]
        core = self.core
        rbuf = self.rbuf
        rmv = self.rmv
        payload = self.rpayload
        pbufs = self.rpayload_bufs
        transport = alloc.transport
        client = alloc.client
        peer_channels = alloc.peer_channels
        v6 = alloc.family == m.FAMILY_IPV6
        stream = transport.stream
        gro = self.gro
        rate = core.s.bandwidth
        out = self.to_clients
        now = time.time()
        pkts = nbytes = 0
        try:
            for _ in range(BATCH):
                try:
                    if gro:
                        n, anc, _flags, peer = sock.recvmsg_into(pbufs, GRO_ANCILLARY)
                        seg = int.from_bytes(anc[0][2][:4], "little") if anc else n
                    else:
                        n, peer = sock.recvfrom_into(payload)
                        seg = n
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    if sock.fileno() < 0:
                        return
                    continue
                if v6:
                    peer = peer[:2]
                if seg <= 0:
                    seg = n
                ch = peer_channels.get(peer)  # GRO only ever merges datagrams of one peer
                if ch is None or ch.until < now:
                    # No live channel: permission check and Data indication on the slow path.
                    out.flush()
                    for off in range(0, max(n, 1), seg):
                        self.dispatch(core.handle_peer(alloc, bytes(payload[off : min(off + seg, n)]), peer, now))
                    continue
                if n <= seg:  # one datagram (always, without GRO): no segment walk
                    if not rate or core.take_tokens(alloc, n, now, rate):
                        _pack_into("!I", rbuf, 0, ch.header | n)
                        if stream:
                            transport.send(bytes(rmv[: 4 + n]) + b"\0" * (-n % 4), client)  # type: ignore[attr-defined]
                        else:
                            out.add(ch, transport.sock, client, rmv[: 4 + n])  # type: ignore[attr-defined]
                        pkts += 1
                        nbytes += n
                    continue
                for off in range(0, n, seg):
                    end = off + seg
                    if end > n:
                        end = n
                    size = end - off
                    if not rate or core.take_tokens(alloc, size, now, rate):
                        # The header goes into the 4 bytes before this payload: the headroom for
                        # the first one, the already-copied tail of the previous one after that.
                        _pack_into("!I", rbuf, off, ch.header | size)
                        if stream:
                            transport.send(bytes(rmv[off : off + 4 + size]) + b"\0" * (-size % 4), client)  # type: ignore[attr-defined]
                        else:
                            out.add(ch, transport.sock, client, rmv[off : off + 4 + size])  # type: ignore[attr-defined]
                        pkts += 1
                        nbytes += size
        finally:
            out.flush()
            if pkts:
                core.stats.pkts_in += pkts
                core.stats.bytes_in += nbytes
