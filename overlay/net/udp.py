"""The agent's UDP sockets: one per address family on one port, with GSO/GRO.

Receiving drains the socket in a loop (`recvmsg_into` into a reused buffer,
UDP_GRO so one call can return many coalesced datagrams); sending groups
equal-sized datagrams to one destination into a single `sendmsg` with
UDP_SEGMENT. Both cut the per-datagram Python overhead that dominates here.

ICMP errors (port/host unreachable from the path or the peer's host) are asked
for with IP_RECVERR / IPV6_RECVERR and read from the socket's error queue only
when the kernel says one is pending: a receive or a send on the socket then
fails once with the error's errno. They are collected in `icmp_errors` for the
agent, which moves peers off a destination that answers with them.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
RECV_BUFFER = 65536 + 4096
SOCKET_BUFFER = 4 << 20

_H = struct.Struct("=H")
_I = struct.Struct("=i")

# Errors that mean "this destination cannot be reached from here" (fail over).
UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL,
                                errno.EAFNOSUPPORT, errno.EINVAL, errno.EPERM,
                                errno.ECONNREFUSED, errno.EACCES})

# The error queue (linux/errqueue.h, linux/in.h, linux/in6.h).
IP_RECVERR = 11
IPV6_RECVERR = 25
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
_ERRQUEUE_ANC = 512
ERRQUEUE_READS = 64  # per collection: a flood of ICMP errors must not hold the loop
# What a pending ICMP error makes the next recv or send on the socket fail with
# (icmp_err_convert / icmpv6_err_convert); the datagram was not sent then.
ICMP_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED,
                         errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EACCES,
                         errno.EPROTO, errno.EOPNOTSUPP})


@dataclass(frozen=True)
class IcmpError:
    """An ICMP error the kernel matched to a datagram we sent."""

    destination: tuple[str, int]  # where that datagram was going
    errno: int
    origin: int  # SO_EE_ORIGIN_ICMP or SO_EE_ORIGIN_ICMP6
    icmp_type: int
    icmp_code: int
    offender: str | None  # the address that sent the ICMP (a router, or the host itself)

    @property
    def unreachable(self) -> bool:
        """Destination unreachable (any code but "fragmentation needed", which is a
        path MTU matter, not a dead path)."""
        if self.origin == SO_EE_ORIGIN_ICMP:
            return self.icmp_type == 3 and self.icmp_code != 4
        return self.origin == SO_EE_ORIGIN_ICMP6 and self.icmp_type == 1


def enable_icmp_errors(sock: socket.socket) -> bool:
    """Ask the kernel to report ICMP errors for this unconnected socket (off by default)."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        return True
    except OSError:
        return False


def _offender(raw: bytes) -> str | None:
    """SO_EE_OFFENDER: the sockaddr that follows sock_extended_err."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw, 0)[0]
    try:
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[4:8])
        if family == socket.AF_INET6 and len(raw) >= 24:
            return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    except (OSError, ValueError):
        pass
    return None


def parse_error_message(ancdata: list, addr) -> IcmpError | None:
    """One error-queue message (ancillary data, original destination) -> IcmpError,
    or None when it is not an ICMP error (e.g. a local one)."""
    for level, typ, data in ancdata:
        if not ((level == socket.IPPROTO_IP and typ == IP_RECVERR)
                or (level == socket.IPPROTO_IPV6 and typ == IPV6_RECVERR)):
            continue
        if len(data) < _EXTENDED_ERR.size:
            return None
        ee_errno, origin, icmp_type, icmp_code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(data, 0)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            return None
        if not addr or len(addr) < 2:
            return None
        return IcmpError((str(addr[0]), int(addr[1])), ee_errno, origin, icmp_type, icmp_code,
                         _offender(bytes(data[_EXTENDED_ERR.size:])))
    return None


def read_errors(sock: socket.socket, limit: int = ERRQUEUE_READS) -> list[IcmpError]:
    """Empty the socket's error queue (up to `limit` messages), returning the ICMP errors."""
    out: list[IcmpError] = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, addr = sock.recvmsg(1, _ERRQUEUE_ANC, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        err = parse_error_message(ancdata, addr)
        if err is not None:
            out.append(err)
    return out


def _tune(sock: socket.socket) -> bool:
    """Non-blocking, big buffers, GRO if the kernel has it. Returns whether GRO is on."""
    sock.setblocking(False)
    # The *FORCE variants pass net.core.[rw]mem_max (root only); bursts of
    # GSO/GRO batches overflow the default ~200 KiB buffers and TCP inside the
    # tunnel then sees losses.
    for force, opt in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


def bind_pair(port: int | None) -> tuple[socket.socket | None, socket.socket | None, int]:
    """Bind an IPv4 socket and an IPv6-only socket on the same port (0/None = any free one)."""
    want = port or 0
    for _attempt in range(20):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s4.bind(("0.0.0.0", want))
        except OSError:
            s4.close()
            if want:
                raise
            continue
        bound = s4.getsockname()[1]
        s6: socket.socket | None = None
        try:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.bind(("::", bound))
        except OSError as exc:
            if s6 is not None:
                s6.close()
            s6 = None
            if exc.errno == errno.EADDRINUSE and not want:
                s4.close()
                continue  # the free v4 port is taken on v6: pick another
            if exc.errno == errno.EADDRINUSE:
                s4.close()
                raise
            # No IPv6 in this namespace/kernel: carry on with IPv4 only.
        return s4, s6, bound
    raise OSError(errno.EADDRINUSE, "no port free on both IPv4 and IPv6")


class UdpSockets:
    def __init__(self, s4: socket.socket | None, s6: socket.socket | None, port: int):
        self.s4 = s4
        self.s6 = s6
        self.port = port
        self.gro = {s: _tune(s) for s in (s4, s6) if s is not None}
        self.gso = True
        self.send_drops = 0  # datagrams dropped because the socket buffer was full
        # ICMP errors read from the sockets' error queues, for the agent to take.
        self.icmp_errors: list[IcmpError] = []
        self.icmp = {s: enable_icmp_errors(s) for s in self.sockets()}
        self._pollers = {}
        for s in self.sockets():
            poller = select.poll()
            poller.register(s.fileno(), select.POLLIN)
            self._pollers[s] = poller.poll
        self._anc = socket.CMSG_SPACE(4)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.s4, self.s6) if s is not None]

    def close(self) -> None:
        for s in self.sockets():
            s.close()
        self.s4 = self.s6 = None

    def drain(self, sock: socket.socket, max_calls: int,
              wireguard: list[tuple[bytes, tuple]], others: list[tuple[bytes, tuple]]) -> None:
        """Read what is queued (up to `max_calls` syscalls), sorting datagrams by
        their first bytes: WireGuard (type 1-4, then three zero bytes) into
        `wireguard`, anything else (STUN, TURN ChannelData, ...) into `others`.

        `recvmsg` returns a new bytes object per call, sized to what arrived, so
        GRO segments can be handed on as zero-copy memoryviews of it. (Reading
        into a fresh `bytearray(RECV_BUFFER)` per call instead cost a 68 KiB
        zero-fill per call, also for the final call that finds the socket empty:
        a large part of a lone packet's time, i.e. of ping latency.)
        """
        anc = self._anc
        v6 = sock.family == socket.AF_INET6
        recvmsg = sock.recvmsg
        wg_append = wireguard.append
        for i in range(max_calls):
            if i == 1 and not self._pollers[sock](0):
                # Nothing more queued (a lone packet, e.g. a ping): poll() says so
                # more cheaply than the failing recvmsg that would end the loop
                # (an EAGAIN OSError costs several microseconds).
                break
            try:
                buf, ancdata, _flags, addr = recvmsg(RECV_BUFFER, anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An ICMP error is pending (the call reported it instead of data):
                # take it from the error queue, then go on reading.
                self.collect_errors(sock)
                continue
            n = len(buf)
            if not n:
                continue
            if v6:
                addr = (addr[0], addr[1])
            seg = n
            if ancdata:
                for level, typ, data in ancdata:
                    if level == SOL_UDP and typ == UDP_GRO:
                        seg = _I.unpack(data[:4])[0] if len(data) >= 4 else _H.unpack(data[:2])[0]
            if seg >= n:  # one datagram (no GRO batch): no views needed
                if n >= 4 and 1 <= buf[0] <= 4 and not (buf[1] or buf[2] or buf[3]):
                    wg_append((buf, addr))
                else:
                    others.append((buf, addr))
                continue
            view = memoryview(buf)
            for off in range(0, n, seg or n or 1):
                end = off + seg if off + seg < n else n
                if end - off >= 4 and 1 <= buf[off] <= 4 and not (
                        buf[off + 1] or buf[off + 2] or buf[off + 3]):
                    wg_append((view[off:end], addr))
                else:
                    others.append((bytes(view[off:end]), addr))

    def collect_errors(self, sock: socket.socket) -> None:
        """Move what the socket's error queue holds into `icmp_errors`. Cheap when the
        queue is empty (one failing syscall); the agent calls it only when a read found
        nothing or failed, since an unread queue keeps the socket flagged (EPOLLERR)."""
        if self.icmp.get(sock):
            self.icmp_errors.extend(read_errors(sock))

    def send_batch(self, items: list[tuple[bytes, tuple]],
                   on_error: Callable[[tuple, int], None]) -> None:
        """Send (payload, (ip, port)) pairs, coalescing runs for UDP GSO."""
        i = 0
        count = len(items)
        while i < count:
            payload, ep = items[i]
            size = len(payload)
            j = i + 1
            total = size
            if self.gso:
                # A GSO run: same destination, same size, last one may be shorter.
                while j < count and j - i < GSO_MAX_SEGMENTS:
                    p2, e2 = items[j]
                    l2 = len(p2)
                    if e2 != ep or l2 > size or total + l2 > GSO_MAX_BYTES:
                        break
                    total += l2
                    j += 1
                    if l2 < size:
                        break
            self._send_run(items, i, j, size, ep, on_error)
            i = j

    def _send_run(self, items, i, j, size, ep, on_error) -> None:
        host = ep[0]
        if ":" in host:
            sock, addr = self.s6, (host, ep[1], 0, 0)
        else:
            sock, addr = self.s4, ep
        if sock is None:
            on_error(ep, errno.EAFNOSUPPORT)
            return
        err = self._send_once(sock, items, i, j, size, addr)
        if err in ICMP_ERRNOS and self.icmp.get(sock):
            # Perhaps an ICMP error about an earlier datagram (to any destination),
            # which the kernel reports on this send instead of sending it: if the
            # error queue holds one, this destination is innocent; send again.
            before = len(self.icmp_errors)
            self.collect_errors(sock)
            if len(self.icmp_errors) > before:
                err = self._send_once(sock, items, i, j, size, addr)
        if err is None:
            return
        if err == errno.EIO and j - i > 1:
            # GSO not possible on this path (e.g. no checksum offload): send singly.
            self.gso = False
            for k in range(i, j):
                self._send_run(items, k, k + 1, len(items[k][0]), ep, on_error)
            return
        on_error(ep, err)

    def _send_once(self, sock, items, i, j, size, addr) -> int | None:
        """None when sent (or dropped for a full buffer), else the errno."""
        try:
            if j - i == 1:
                sock.sendto(items[i][0], addr)
            else:
                sock.sendmsg([p for p, _ in items[i:j]],
                             [(SOL_UDP, UDP_SEGMENT, _H.pack(size))], 0, addr)
        except (BlockingIOError, InterruptedError):
            self.send_drops += j - i  # socket buffer full: dropped, as a router would
        except OSError as exc:
            return exc.errno or 0
        return None
