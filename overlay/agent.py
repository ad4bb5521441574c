"""The asyncio shell around the sans-I/O Device: TUN, UDP sockets, timers, routes.

The hot path avoids asyncio's per-packet machinery: the TUN fd and the sockets
are watched with `add_reader`, each readiness callback drains a burst (TUN
reads, `recvmsg_into` with UDP GRO), hands the whole burst to the core, and
sends the result with UDP GSO. Timers are one `call_later` handle re-armed at
the core's next deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import select
import time
from collections.abc import Callable

import structlog

from .config import InterfaceConfig
from .net import netlink
from .net import offload
from .net.tun import open_tun
from .net.udp import UdpSockets, bind_pair
from .wireguard import paths
from .wireguard.device import Device
from .wireguard.endpoints import Endpoint, direct_endpoint, normalize

log = structlog.get_logger("overlay.agent")

DEFAULT_MTU = 1420
TUN_BURST = 128  # packets read from the TUN per readiness callback
UDP_BURST = 64  # recvmsg calls per readiness callback (each may carry a GRO batch)
# ICMP errors about one endpoint acted on at most this often: a peer's host that
# rejects every datagram must not turn each of them into a path change.
ICMP_HOLD = 0.5
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _literal_endpoints(specs) -> list[Endpoint]:
    out: list[Endpoint] = []
    for spec in specs:
        try:
            out.append(direct_endpoint(spec.host, spec.port))
        except ValueError:
            log.warning("endpoint is not an IP literal; it needs resolving", host=spec.host)
    return out


class Agent:
    def __init__(self, config: InterfaceConfig, ifname: str, *,
                 resolved_endpoints: dict[bytes, list[Endpoint]] | None = None,
                 happy_eyeballs_delay: float = 0.010, tun_offload: bool = True):
        self.config = config
        self.ifname = ifname
        self.mtu = config.mtu or DEFAULT_MTU
        now = time.monotonic()
        self.device = Device(config.private_key, mtu=self.mtu,
                             happy_eyeballs_delay=happy_eyeballs_delay,
                             wall_clock=self.monotonic_to_wall, now=now)
        for pc in config.peers:
            if resolved_endpoints is not None:
                endpoints = list(resolved_endpoints.get(pc.public_key, []))
            else:
                endpoints = _literal_endpoints(pc.endpoints)
            self.device.set_peer(pc.public_key, now, preshared_key=pc.preshared_key,
                                 endpoints=endpoints, allowed_ips=list(pc.allowed_ips),
                                 persistent_keepalive=pc.persistent_keepalive)
        self.listen_port: int = config.listen_port or 0
        # virtio-net headers on the TUN, so bursts can be written as one GSO packet.
        self.tun_offload = tun_offload
        self.other_datagram_handler: Callable[[bytes, tuple], None] | None = None
        # Sender for endpoint kinds other than direct (ip, port) tuples (e.g. TURN relays).
        self.endpoint_sender: Callable[[bytes, Endpoint], None] | None = None
        # Told about every ICMP unreachable error (the traversal gatherer: one of its TURN
        # servers, or the relayed address of a peer on the same relay, may have gone away).
        self.unreachable_handler: Callable[[tuple], None] | None = None
        # Preferred source address per routed network (rendezvous peers: our overlay
        # address of the same network, whatever other addresses the interface has).
        self.route_sources: dict[IPNetwork, str] = {}
        self._tun_fd: int | None = None
        self._tun_poll: Callable[[int], list] = lambda _timeout: [(0, 0)]
        self._ifindex: int | None = None
        self._udp: UdpSockets | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._routes: set[IPNetwork] = set()
        self._route_lock = asyncio.Lock()
        self._route_tasks: set[asyncio.Task] = set()
        self._running = False
        self._icmp_acted: dict[Endpoint, float] = {}  # endpoint -> last ICMP error acted on

    def __repr__(self) -> str:
        return f"Agent({self.ifname!r}, port={self.listen_port})"

    @staticmethod
    def monotonic_to_wall(t: float) -> float:
        return t + (time.time() - time.monotonic())

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        try:
            self._tun_fd, self.ifname = open_tun(self.ifname, vnet_hdr=self.tun_offload)
            poller = select.poll()
            poller.register(self._tun_fd, select.POLLIN)
            self._tun_poll = poller.poll
            self._ifindex = await netlink.configure_link(
                self.ifname, list(self.config.addresses), self.mtu)
            s4, s6, port = bind_pair(self.listen_port or None)
            self._udp = UdpSockets(s4, s6, port)
            self.listen_port = port
            self._running = True
            self._loop.add_reader(self._tun_fd, self._on_tun_readable)
            self._watch_sockets()
            await self._sync_routes()
        except BaseException:
            await self.stop()
            raise
        log.info("agent started", ifname=self.ifname, port=self.listen_port,
                 peers=len(self.device.peers))
        self._flush_timers()

    async def stop(self) -> None:
        self._running = False
        loop = self._loop
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        for task in list(self._route_tasks):
            task.cancel()
        if self._udp is not None:
            if loop is not None:
                for s in self._udp.sockets():
                    loop.remove_reader(s.fileno())
            self._udp.close()
            self._udp = None
        if self._tun_fd is not None:
            if loop is not None:
                loop.remove_reader(self._tun_fd)
            # Closing the fd deletes the interface; its addresses and routes go with it.
            os.close(self._tun_fd)
            self._tun_fd = None
            self._routes = set()

    async def set_listen_port(self, port: int) -> None:
        """Rebind both sockets to `port` (0 = any); the old ones stay if binding fails."""
        if self._udp is None:
            self.listen_port = port
            return
        if port and port == self.listen_port:
            return
        s4, s6, bound = bind_pair(port or None)
        old = self._udp
        for s in old.sockets():
            self._loop.remove_reader(s.fileno())
        old.close()
        self._udp = UdpSockets(s4, s6, bound)
        self.listen_port = bound
        self._watch_sockets()

    def changed(self) -> None:
        """Call after mutating `device` (UAPI set): routes, timers and pending output."""
        if not self._running:
            return
        task = asyncio.ensure_future(self._sync_routes())
        self._route_tasks.add(task)
        task.add_done_callback(self._route_task_done)
        self._flush_timers()

    def _route_task_done(self, task: asyncio.Task) -> None:
        self._route_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("route sync failed", error=str(task.exception()))

    async def _sync_routes(self) -> None:
        async with self._route_lock:
            if self._ifindex is None or self._tun_fd is None:
                return
            desired: set[IPNetwork] = set()
            for peer in self.device.peers.values():
                for net in peer.allowed_ips:
                    if net.prefixlen == 0:
                        # A default route through the tunnel would also capture the
                        # tunnel's own datagrams; that needs policy routing (wg-quick's
                        # fwmark table), which this agent does not set up.
                        log.warning("not routing a default route through the tunnel",
                                    network=str(net))
                        continue
                    desired.add(net)
            try:
                self._routes = await netlink.sync_routes(self._ifindex, desired, self._routes,
                                                         self.route_sources)
            except netlink.RouteSyncError as exc:
                self._routes = exc.installed
                log.error("route sync incomplete", error=str(exc))

    def _watch_sockets(self) -> None:
        assert self._udp is not None and self._loop is not None
        for s in self._udp.sockets():
            self._loop.add_reader(s.fileno(), self._on_socket_readable, s)

    # ----------------------------------------------------------------- sending
    def send_datagram(self, data: bytes, addr) -> None:
        """Send a non-WireGuard datagram (STUN, TURN) from the tunnel's socket."""
        self._send([(data, normalize(tuple(addr)))], report_failures=False)

    def _send(self, items: list[tuple[bytes, Endpoint]], *, report_failures: bool = True,
              depth: int = 0) -> None:
        udp = self._udp
        if udp is None or not items:
            return
        direct = items
        # Split only when the batch holds other endpoint kinds (relays): with a
        # relay configured (endpoint_sender set), direct bursts used to be
        # filtered item by item anyway.
        if any(type(e) is not tuple for _, e in items):
            direct = [it for it in items if type(it[1]) is tuple]
            for data, ep in items:
                if type(ep) is not tuple and self.endpoint_sender is not None:
                    self.endpoint_sender(data, ep)
        failures: list[tuple[Endpoint, int]] = []
        udp.send_batch(direct, lambda ep, err: failures.append((ep, err)))
        if udp.icmp_errors:
            self._on_icmp_errors(depth)
        if failures and report_failures and depth < 3:
            now = time.monotonic()
            seen = set()
            more: list[tuple[bytes, Endpoint]] = []
            for ep, err in failures:
                if ep in seen:
                    continue
                seen.add(ep)
                log.info("send failed, switching endpoint", endpoint=str(ep), errno=err)
                more.extend(self.device.send_failed(ep, err, now))
            self._send(more, depth=depth + 1)
            self._schedule()

    def _on_icmp_errors(self, depth: int = 0) -> None:
        """Destination-unreachable errors about a peer's endpoint: leave it at once,
        as after a failed send, instead of waiting for the path to look silent."""
        udp = self._udp
        if udp is None:
            return
        errors, udp.icmp_errors = udp.icmp_errors, []
        now = time.monotonic()
        known: set | None = None
        more: list[tuple[bytes, Endpoint]] = []
        for err in errors:
            if not err.unreachable:
                continue
            try:
                ep = direct_endpoint(*err.destination)
            except ValueError:
                continue
            if self.unreachable_handler is not None:
                try:
                    self.unreachable_handler(err.destination)  # a TURN server of ours (or on its host)?
                except Exception as exc:  # a plugin bug must not stop the tunnel
                    log.error("unreachable handler failed", error=repr(exc))
            last = self._icmp_acted.get(ep)
            if last is not None and now - last < ICMP_HOLD:
                continue
            if known is None:
                known = {e for p in self.device.peers.values() for e in p.endpoint_set.all()}
            if ep not in known:
                continue  # a STUN/TURN server or a stranger: not a path of ours
            if len(self._icmp_acted) > 256:
                self._icmp_acted = {e: t for e, t in self._icmp_acted.items() if now - t < ICMP_HOLD}
            self._icmp_acted[ep] = now
            log.info("ICMP error, leaving endpoint", endpoint=str(ep), errno=err.errno,
                     icmp_type=err.icmp_type, icmp_code=err.icmp_code, offender=err.offender)
            more.extend(self.device.send_failed(ep, err.errno, now, paths.REASON_ICMP))
        if more and depth < 3:
            self._send(more, depth=depth + 1)
        self._schedule()

    # ----------------------------------------------------------------- timers
    def _schedule(self) -> None:
        deadline = self.device.next_deadline()
        if deadline is None or self._loop is None:
            return
        # Re-arm only if the new deadline is earlier: a timer firing too early
        # just finds nothing due and re-arms, which is cheaper than re-arming
        # on every burst (deadlines move forward with every packet).
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._flush_timers()

    def _flush_timers(self) -> None:
        if not self._running:
            return
        out = self.device.handle_timers(time.monotonic())
        if out:
            self._send(out)
        self._schedule()

    # ------------------------------------------------------------- data path
    def _on_tun_readable(self) -> None:
        fd = self._tun_fd
        if fd is None:
            return
        read = os.read
        tun_poll = self._tun_poll
        packets: list[bytes] = []
        vnet = self.tun_offload
        for i in range(TUN_BURST):
            try:
                data = read(fd, 65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("TUN read failed", error=exc.strerror)
                break
            if vnet:
                if data[0] or data[1]:
                    data = self._unusual_vnet_packet(data)
                    if data is None:
                        continue
                else:
                    data = data[offload.VNET_HDR_LEN:]  # a copy is cheaper than a memoryview here
            packets.append(data)
            if not i and not tun_poll(0):
                # A lone packet (a ping): asking poll() is cheaper than the failing
                # read that would end the drain loop (an EAGAIN OSError costs
                # several microseconds, most of it formatting the error message).
                break
        if packets:
            out = self.device.tun_packets(packets, time.monotonic())
            if out:
                self._send(out)
            self._schedule()

    @staticmethod
    def _unusual_vnet_packet(data: bytes) -> bytes | None:
        """A TUN read whose virtio-net header asks for work (we do not enable
        TSO, so only a partial checksum is expected): finish it or drop."""
        flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset = \
            offload._VNET.unpack_from(data, 0)
        if gso_type != offload.VIRTIO_NET_HDR_GSO_NONE:
            return None
        pkt = bytearray(data[offload.VNET_HDR_LEN:])
        if flags & offload.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            offload.complete_checksum(pkt, csum_start, csum_offset)
        return bytes(pkt)

    def _on_socket_readable(self, sock) -> None:
        udp = self._udp
        if udp is None:
            return
        items: list[tuple[bytes, tuple]] = []
        others: list[tuple[bytes, tuple]] = []
        udp.drain(sock, UDP_BURST, items, others)
        if not items and not others:
            # Woken with nothing to read: an unread ICMP error would keep the socket
            # flagged (EPOLLERR) and this callback spinning.
            udp.collect_errors(sock)
        if udp.icmp_errors:
            self._on_icmp_errors()
        if items:
            packets, out = self.device.datagrams(items, time.monotonic())
            fd = self._tun_fd
            if fd is not None and packets:
                write = os.write
                if self.tun_offload:
                    packets = offload.coalesce(packets)
                for pkt in packets:
                    try:
                        write(fd, pkt)
                    except (BlockingIOError, InterruptedError):
                        pass  # TUN queue full: drop, as the kernel would
                    except OSError as exc:
                        log.debug("TUN write failed", error=exc.strerror)
            if out:
                self._send(out)
            self._schedule()
        if others:
            handler = self.other_datagram_handler
            if handler is not None:
                for data, addr in others:
                    try:
                        handler(data, addr)
                    except Exception as exc:  # a plugin bug must not stop the tunnel
                        log.error("datagram handler failed", error=repr(exc))

    # ------------------------------------------------- hooks for traversal
    def receive_datagrams(self, items: list[tuple[bytes, Endpoint]]) -> None:
        """WireGuard datagrams that arrived another way than the UDP sockets (e.g.
        unwrapped from a TURN allocation, with a RelayEndpoint as source)."""
        if not self._running or not items:
            return
        packets, out = self.device.datagrams(items, time.monotonic())
        fd = self._tun_fd
        if fd is not None and packets:
            if self.tun_offload:
                packets = offload.coalesce(packets)
            for pkt in packets:
                try:
                    os.write(fd, pkt)
                except OSError:
                    pass  # TUN queue full or gone: drop, as the kernel would
        if out:
            self._send(out)
        self._schedule()

    def send_device_output(self, items: list[tuple[bytes, Endpoint]]) -> None:
        """Send what a direct call into `device` returned (probes, punches) and re-arm timers."""
        if not self._running:
            return
        if items:
            self._send(items)
        self._schedule()

    async def add_addresses(self, addresses: list) -> None:
        """Put more addresses on the TUN (e.g. the ones a rendezvous assigned)."""
        if self._tun_fd is None:
            return
        await netlink.configure_link(self.ifname, list(addresses), self.mtu)
