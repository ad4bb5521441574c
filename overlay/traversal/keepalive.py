"""Automatic NAT keepalives: measure how long the NAT (or stateful firewall) in front of
us keeps an idle UDP mapping, and keep every path through it warm that often, and no
more.

The asyncio shell around nat_lifetime.py, owned by the rendezvous session:

- reads what gathering found (host addresses, the server-reflexive address each
  STUN server saw): behind a NAT in a family when a server saw us from an address
  we do not have;
- per address family with a STUN answer, measures the mapping lifetime against
  that STUN server from throwaway sockets (LifetimeProbe), at start, every
  REMEASURE_EVERY and once the addresses settle after a change (another network).
  Without a NAT too: a stateful firewall forgets idle flows the same way (the
  lab's IPv6 firewall does), and only this measurement tells;
- gives each peer whose active path needs it an automatic keepalive at that
  family's interval (`device.set_auto_keepalive`): paths that leave through our
  forgetful NAT or firewall (not to a peer on our own LAN), and paths to a peer's
  server- or peer-reflexive address (through the peer's NAT). The device sends one
  only when nothing else went to that endpoint for a whole interval, so a busy
  tunnel costs nothing extra;
- lowers the TURN allocations' Binding-indication keepalive to the same interval
  when our NAT forgets faster than that (the standby relay path must still let the
  server's packets in when it is needed).

`summary()` is what `overlay status --json` shows as rendezvous.nat_keepalive.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any

import structlog

from overlay.wireguard.endpoints import KIND_PRFLX, KIND_SRFLX, RelayEndpoint

from .nat_lifetime import MEASURED, KeepalivePolicy, LifetimeProbe
from .stun_probe import family_of
from .tasks import BackgroundTasks
from .turn_client import KEEPALIVE_INTERVAL as TURN_KEEPALIVE_INTERVAL

log = structlog.get_logger("overlay.traversal.keepalive")

TICK = 1.0  # seconds between looks at the gathered addresses and the peers' paths
RECV_BURST = 16
# After the addresses change, wait this long for them to settle (a move arrives as a
# burst of changes, and the gatherer's next STUN answers) before measuring again.
NETWORK_SETTLE = 2.0
RETRY_AFTER_ERROR = 60.0  # the probe sockets could not be opened
# A peer address this close to one of ours is on our LAN: no NAT on the way.
SAME_LAN_PREFIX = {4: 24, 6: 64}
FAMILIES = (4, 6)


def _same_lan(ip: str, ours: frozenset[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    net = ipaddress.ip_network(f"{addr}/{SAME_LAN_PREFIX[addr.version]}", strict=False)
    for mine in ours:
        try:
            if ipaddress.ip_address(mine) in net:
                return True
        except ValueError:
            continue
    return False


class NatKeepalive:
    def __init__(self, agent, gatherer) -> None:
        self.agent = agent
        self.gatherer = gatherer
        self.policies = {f: KeepalivePolicy() for f in FAMILIES}
        self.host_ips: frozenset[str] = frozenset()
        self._network: dict[int, tuple] = {}  # family -> (host IPs, mapped IPs) last seen
        self._measuring: dict[int, asyncio.Task] = {}
        self._tasks = BackgroundTasks("nat keepalive")
        self._applied: dict[bytes, float] = {}  # peer key -> interval given to the device

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.spawn(self._loop())

    def close(self) -> None:
        self._tasks.cancel_all()
        self._measuring.clear()
        device = self.agent.device
        for key in self._applied:
            peer = device.peers.get(key)
            if peer is not None:
                device.set_auto_keepalive(peer, 0)
        self._applied.clear()

    async def _loop(self) -> None:
        while True:
            try:
                self.tick(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - keepalives must not stop for a bug in one look
                log.error("keepalive tick failed", error=repr(exc))
            await asyncio.sleep(TICK)

    def tick(self, now: float) -> None:
        self._look_at_network(now)
        for family, policy in self.policies.items():
            if policy.due(now) and policy.server is not None:
                policy.started(now)
                self._measuring[family] = self._tasks.spawn(self._measure(family, policy.server))
        self.apply()

    # -- the network ------------------------------------------------------------------------------
    def _look_at_network(self, now: float) -> None:
        g = self.gatherer
        self.host_ips = frozenset(c.ip for c in getattr(g, "host", []))
        prober = getattr(g, "prober", None)
        results = list(prober.results.values()) if prober is not None else []
        for family, policy in self.policies.items():
            answered = [r for r in results if r.family == family and r.mapped is not None]
            if not answered:
                continue  # no answer (yet, or this round is under way): keep what we knew
            host = frozenset(ip for ip in self.host_ips if family_of(ip) == family)
            network = (host, frozenset(r.mapped[0] for r in answered))
            last = self._network.get(family)
            if last is not None and network != last:
                log.info("addresses changed; measuring the NAT mapping lifetime again", family=family)
                self._abort(family)
                policy.network_changed(now, NETWORK_SETTLE)
            self._network[family] = network
            # Behind a NAT when a server saw us from an address we do not have.
            behind = [r for r in answered if r.mapped[0] not in host]
            best = min(behind or answered, key=lambda r: r.rtt if r.rtt is not None else 1e9)
            policy.set_network(bool(behind), best.server)

    def _abort(self, family: int) -> None:
        task = self._measuring.pop(family, None)
        if task is not None and not task.done():
            task.cancel()

    # -- measuring ----------------------------------------------------------------------------------
    async def _measure(self, family: int, server: tuple[str, int]) -> None:
        policy = self.policies[family]
        loop = asyncio.get_running_loop()
        probe = LifetimeProbe(server)
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        socks: dict[object, socket.socket] = {}
        wake = asyncio.Event()

        def readable(sock_id: object, sock: socket.socket) -> None:
            for _ in range(RECV_BURST):
                try:
                    data, addr = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # e.g. an ICMP error about an earlier request
                probe.receive(sock_id, data, addr, time.monotonic())
            wake.set()

        def close(sock_id: object) -> None:
            sock = socks.pop(sock_id, None)
            if sock is not None:
                try:
                    loop.remove_reader(sock.fileno())
                finally:
                    sock.close()

        def flush() -> None:
            for sock_id, data, dest in probe.datagrams_to_send():
                sock = socks.get(sock_id)
                if sock is None:
                    continue
                try:
                    sock.sendto(data, dest)
                except OSError:
                    pass  # counts as lost: the probe retransmits, or calls the rung dead
            for sock_id in probe.finished_sockets():
                close(sock_id)

        log.info("measuring the NAT mapping lifetime", server=f"{server[0]}:{server[1]}")
        try:
            for sock_id in probe.sockets():
                sock = socket.socket(af, socket.SOCK_DGRAM)
                socks[sock_id] = sock
                sock.setblocking(False)
                if af == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if af == socket.AF_INET6 else "0.0.0.0", 0))
                loop.add_reader(sock.fileno(), readable, sock_id, sock)
            probe.start(time.monotonic())
            flush()
            while not probe.done:
                deadline = probe.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
                wake.clear()
                probe.handle_timers(time.monotonic())
                flush()
                if policy.progress(probe.confirmed_lifetime()):
                    self.apply()  # a longer lifetime confirmed: fewer keepalives already
        except OSError as exc:
            log.info("cannot measure the NAT mapping lifetime", error=str(exc))
            policy.aborted(time.monotonic(), RETRY_AFTER_ERROR)
            return
        finally:
            for sock_id in list(socks):
                close(sock_id)
            if self._measuring.get(family) is asyncio.current_task():
                del self._measuring[family]
        assert probe.result is not None
        res = probe.result
        policy.finished(res, time.monotonic())
        interval, reason = policy.state()
        log.info("NAT mapping lifetime", family=family, result=res.kind, lifetime=res.lifetime,
                 dead_at=res.dead_at, detail=res.detail, keepalive_interval=round(interval, 2),
                 reason=reason)
        self.apply()

    # -- applying -------------------------------------------------------------------------------------
    def keepalive_for(self, peer) -> float:
        """The automatic keepalive interval the peer's active path needs (0: none).

        Through our TURN allocation: none here (the TURN client keeps that mapping).
        To a peer's server- or peer-reflexive address: its NAT is on the way. Otherwise
        when our own NAT or firewall forgets idle mappings, unless the peer's address
        is on our LAN."""
        ep = peer.active_endpoint
        if ep is None or isinstance(ep, RelayEndpoint) or not isinstance(ep, tuple):
            return 0.0
        family = family_of(ep[0])
        policy = self.policies[family]
        kind = peer.endpoint_set.kind_of(ep)
        if kind in (KIND_SRFLX, KIND_PRFLX):
            return policy.interval
        if policy.forgets and not _same_lan(ep[0], self.host_ips):
            return policy.interval
        return 0.0

    def apply(self) -> None:
        device = self.agent.device
        changed = False
        for key, peer in list(device.peers.items()):
            want = self.keepalive_for(peer)
            if peer.auto_keepalive != want:
                device.set_auto_keepalive(peer, want)
                changed = True
            self._applied[key] = want
        for key in [k for k in self._applied if k not in device.peers]:
            del self._applied[key]
        self._tune_turn_keepalives()
        if changed:
            self.agent.send_device_output([])  # re-arms the agent's timer at the new deadlines

    def _tune_turn_keepalives(self) -> None:
        """A NAT that forgets faster than the TURN client's Binding indications would
        shut the standby relay path; send them at our interval then."""
        relay = getattr(self.gatherer, "relay", None)
        for alloc in list(getattr(relay, "allocations", {}).values()):
            turn = getattr(alloc, "turn", None)
            if turn is None or turn.keepalive is None:
                continue  # over TCP/TLS: the stream holds its own mapping
            policy = self.policies.get(family_of(turn.server[0]))
            res = policy.result if policy is not None else None
            if res is None or res.kind != MEASURED or not policy.forgets:
                continue
            want = min(TURN_KEEPALIVE_INTERVAL, policy.interval)
            if turn.keepalive != want:
                turn.keepalive = want

    # -- status ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per family: the interval, why, the measured lifetime; and how many peers get keepalives."""
        used = [v for v in self._applied.values() if v]
        return {
            "interval": min(used) if used else None,
            "peers_kept_alive": len(used),
            **{f"ipv{f}": p.summary() for f, p in self.policies.items()},
        }

