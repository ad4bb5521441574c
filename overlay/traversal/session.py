"""The rendezvous session inside `overlay up`.

- logs in (joining with the config's token the first time) and stays connected,
  reconnecting with backoff (`RendezvousClient.keep_connected`);
- puts the overlay addresses the rendezvous assigned on the TUN when the config
  has none;
- turns the peer map into device peers: AllowedIPs = the peer's overlay /32 and
  /128 (routes follow), endpoints = its candidates (kinds kept for status), an
  automatic persistent keepalive so NAT mappings hold; `peer_removed` removes it.
  Static `[Peer]` sections stay as configured next to these;
- publishes our candidates (gatherer.py) whenever they change;
- hole punching: when the device starts a handshake for a rendezvous peer with no
  session, asks the rendezvous to `connect`; on a `connect` event both sides send
  to every endpoint of the other at once (paths.punch);
- while a peer's active path is a relay, probes its direct endpoints (timing in
  path_keeper.py) so the path moves to a direct endpoint as soon as one answers;
  a direct path that went silent fails over to whatever answers first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import structlog

from overlay.rendezvous.client import RendezvousClient, RendezvousError
from overlay.wireguard import paths
from overlay.wireguard.endpoints import (
    KIND_RELAY,
    Endpoint,
    RelayEndpoint,
    direct_endpoint,
)
from overlay.wireguard.peer import Peer

from .candidates import Candidate, parse_candidates
from .gatherer import Gatherer
from .path_keeper import TICK as PROBE_TICK
from .path_keeper import PathKeeper
from .keepalive import NatKeepalive
from .tasks import BackgroundTasks

log = structlog.get_logger("overlay.traversal.session")

AUTO_KEEPALIVE = 25  # seconds, for rendezvous peers without a configured keepalive
CONNECT_MIN_INTERVAL = 3.0  # per peer, between our `connect` requests
# A new handshake with a session whose peer was heard within this many seconds is a
# rekey, not a lost path: no hole punching needed.
SILENT_BEFORE_CONNECT = 10.0
# Seconds after a connect event when both sides send again: the first packets may
# reach the other NAT before its own outbound packets opened it, and a handshake
# in flight is only retransmitted by WireGuard after 5 s.
PUNCH_REPEATS = (0.1, 0.3, 0.7, 1.5, 2.5, 3.5, 4.5)
TURN_REFRESH_MARGIN = 600  # seconds before the TURN credentials expire


def candidate_endpoints(cands: list[Candidate], own_relay_servers: list[tuple[str, int]],
                        udp_blocked: bool) -> list[tuple[Endpoint, str]]:
    """A peer's candidates as (endpoint, kind) pairs, in the order they are tried.

    Every candidate is sent to straight from our socket (the peer's relayed address
    reaches it through ITS allocation). When our own UDP is blocked, the only way
    out is our TCP/TLS allocation: then the peer's relayed and server-reflexive
    addresses are also reached through it.
    """
    order = {"host": 0, "srflx": 1, "prflx": 2, "relay": 3}
    out: list[tuple[Endpoint, str]] = []
    for cand in sorted(cands, key=lambda c: order.get(c.kind, 9)):
        out.append((direct_endpoint(cand.ip, cand.port), cand.kind))
    if udp_blocked:
        for server in own_relay_servers:
            fam = 6 if ":" in server[0] else 4
            for cand in cands:
                # A relay does not relay to its own addresses (403), so a peer's
                # allocation on the same server is not reachable through ours.
                if cand.kind in ("relay", "srflx") and cand.family == fam and cand.ip != server[0]:
                    out.append((RelayEndpoint(server, direct_endpoint(cand.ip, cand.port)), KIND_RELAY))
    return out


class _PeerInfo:
    __slots__ = (
        "candidates",
        "key_b64",
        "last_connect",
        "name",
        "networks",
        "overlay_ips",
    )

    def __init__(self, key_b64: str):
        self.key_b64 = key_b64
        self.name = ""
        self.overlay_ips: list[str] = []
        self.networks: set[str] = set()
        self.candidates: list[Candidate] = []
        self.last_connect = -1e18


class RendezvousSession:
    def __init__(self, agent, url: str, token: str | None = None, name: str | None = None,
                 server_key: bytes | None = None):
        self.agent = agent
        self.url = url
        self.token = token
        if server_key is None:
            # `[Rendezvous] ServerKey` pins the server like an SSH host key. A config
            # without it (hand-written with a Token) trusts the first key the server
            # proves, keeps it for every reconnect of this run, and logs it to be pinned.
            rendezvous_config = getattr(agent.config, "rendezvous", None)
            server_key = getattr(rendezvous_config, "server_key", None)
        self.pinned_server_key = server_key is not None
        self.client = RendezvousClient(url, agent.device.private_key, name=name or socket.gethostname(),
                                       server_key=server_key)
        self.client.on_event = self._on_event
        self.peers: dict[bytes, _PeerInfo] = {}
        self.keeper = PathKeeper()
        self.static_keys = {pc.public_key for pc in agent.config.peers}
        self.static_keepalive = {pc.public_key: pc.persistent_keepalive for pc in agent.config.peers}
        self.gatherer = Gatherer(agent, self._publish, lambda: self.client.turn,
                                 urlsplit(url).hostname, on_relay_ready=self._relay_ready,
                                 extra_relays=list(agent.config.relays))
        self.gatherer.on_addresses = self._check_rendezvous_address
        self.nat_keepalive = NatKeepalive(agent, self.gatherer)  # automatic keepalives through NATs
        self.connected = asyncio.Event()
        self.error: str | None = None
        self.assigned_addresses: list = []
        self._tasks = BackgroundTasks("rendezvous")
        self._punching = False
        self._refreshing_turn = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.agent.traversal = self
        self.agent.device.on_new_handshake = self._on_new_handshake
        self.gatherer.start()
        self.nat_keepalive.start()
        self._tasks.spawn(self._run())
        self._tasks.spawn(self._probe_loop())

    async def close(self) -> None:
        self._tasks.cancel_all()
        self.nat_keepalive.close()
        self.gatherer.close()
        if self.agent.device.on_new_handshake == self._on_new_handshake:
            self.agent.device.on_new_handshake = None
        await self.client.close()

    async def _run(self) -> None:
        watcher = self._tasks.spawn(self._on_connected_loop())
        token = self.token
        try:
            while True:
                try:
                    await self.client.keep_connected(token=token, connected=self.connected)
                    log.warning("removed from every network by the operator; no rendezvous peers left")
                    return
                except RendezvousError as exc:
                    if exc.code == "join_refused" and token is not None:
                        # A Token line left in the config after joining: the token may be
                        # spent or expired by now, while the key is a member already.
                        log.info("join token refused; logging in with the key alone", error=str(exc))
                        token = None
                        continue
                    self.error = str(exc)
                    if exc.code in ("server_key_mismatch", "server_auth_failed"):
                        # Tunnels already up stay up; no peer map is taken from this server.
                        log.error(exc.message, url=self.url)
                    else:
                        log.error("rendezvous refused this node", url=self.url, error=str(exc))
                    return
        finally:
            watcher.cancel()

    async def _on_connected_loop(self) -> None:
        while True:
            await self.connected.wait()
            log.info("rendezvous connected", url=self.url, networks=sorted(self.client.memberships))
            if not self.pinned_server_key and self.client.server_key is not None:
                self.pinned_server_key = True  # the client keeps it from now on; say it once
                log.warning("rendezvous server key not pinned; trusting it on first use. "
                            "Add it to the [Rendezvous] section to refuse impostors",
                            url=self.url, server_key=base64.b64encode(self.client.server_key).decode())
            await self._apply_memberships()
            for network in list(self.client.peers):
                self._sync_network(network)
            # Reconnected: the relay process may have restarted and lost our allocation;
            # ask it now (437 -> allocate again) rather than at the next liveness check.
            self.gatherer.check_relays()
            self.gatherer.regather()
            while self.connected.is_set():
                await asyncio.sleep(0.2)

    async def _apply_memberships(self) -> None:
        if self.agent.config.addresses or self.assigned_addresses:
            return
        wanted = []
        for m in self.client.memberships.values():
            for ip, prefix in ((m.ipv4, m.ipv4_prefix), (m.ipv6, m.ipv6_prefix)):
                if not ip:
                    continue
                plen = ipaddress.ip_network(prefix, strict=False).prefixlen if prefix else None
                wanted.append(ipaddress.ip_interface(f"{ip}/{plen}" if plen else ip))
        if wanted:
            try:
                await self.agent.add_addresses(wanted)
                self.assigned_addresses = wanted
                self.agent.extra_overlay_ips = [str(w.ip) for w in wanted]
                log.info("overlay addresses assigned", addresses=[str(w) for w in wanted])
            except Exception as exc:  # noqa: BLE001
                log.error("cannot add overlay addresses", error=str(exc))

    # -- the peer map -------------------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        network = event.get("network")
        try:
            if kind in ("peers", "peer") and network:
                self._sync_network(network)
            elif kind == "peer_removed" and network:
                self._drop(network, event.get("public_key"))
            elif kind == "removed" and network:
                for key in [k for k, info in self.peers.items() if network in info.networks]:
                    self._drop(network, self.peers[key].key_b64)
            elif kind == "connect" and network:
                self._sync_network(network)
                peer = event.get("peer") or {}
                self._punch(peer.get("public_key"))
                # Both sides send at once, but the first packets may reach the other
                # NAT before its own outbound packets opened it: send again shortly.
                loop = asyncio.get_running_loop()
                for delay in PUNCH_REPEATS:
                    loop.call_later(delay, self._punch, peer.get("public_key"), False)
            elif kind == "error" and event.get("code") == "server_auth_failed":
                # Raised by the client itself: a frame failed its MAC and was not applied.
                log.error("rendezvous frame failed authentication; dropped, reconnecting", url=self.url)
            elif kind == "error":
                log.info("rendezvous error", code=event.get("code"), message=event.get("message"))
        except Exception as exc:  # noqa: BLE001 - a bad push must not stop the session
            log.error("cannot apply rendezvous event", type=kind, error=repr(exc))

    @staticmethod
    def _key(key_b64: Any) -> bytes | None:
        try:
            key = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, TypeError, ValueError):
            return None
        return key if len(key) == 32 else None

    def _sync_network(self, network: str) -> None:
        members = self.client.peers.get(network, {})
        now = time.monotonic()
        present: set[bytes] = set()
        changed = False
        repunch: list[str] = []  # peers with new candidates and no session yet
        for key_b64, rp in members.items():
            key = self._key(key_b64)
            if key is None or key == self.agent.device.public_key:
                continue
            present.add(key)
            info = self.peers.get(key)
            if info is None:
                info = self.peers[key] = _PeerInfo(key_b64)
            info.networks.add(network)
            info.name = rp.name
            ips = [ip for ip in (rp.ipv4, rp.ipv6) if ip]
            nets = []
            for ip in ips:
                try:
                    nets.append(ipaddress.ip_network(ip))
                except ValueError:
                    continue
            cands = parse_candidates(rp.candidates)
            peer = self.agent.device.peers.get(key)
            new_peer = peer is None
            if new_peer or ips != info.overlay_ips:
                keepalive = self.static_keepalive.get(key) or AUTO_KEEPALIVE
                peer = self.agent.device.set_peer(key, now, allowed_ips=nets,
                                                  replace_allowed_ips=key not in self.static_keys,
                                                  persistent_keepalive=keepalive)
                changed = True
            info.overlay_ips = ips
            peer.crossing_tiebreak = True
            self._route_sources(network, nets)
            if new_peer or cands != info.candidates:
                before = set(peer.endpoint_set.all())
                info.candidates = cands
                self._set_endpoints(peer, info)
                changed = True
                if not new_peer:
                    repunch.append(key_b64)
                    self._probe_new_endpoints(peer, before, now)
        for key, info in list(self.peers.items()):
            if network in info.networks and key not in present:
                self._drop(network, info.key_b64, sync=False)
                changed = True
        self._permit_all()
        if changed:
            self.agent.changed()
        for key_b64 in repunch:
            self._punch_if_waiting(key_b64)

    def _probe_new_endpoints(self, peer: Peer, before: set, now: float) -> None:
        """The peer published new candidates while we have a session: probe them at once.
        After its relay restarted (or it moved to another relay) the relayed address we
        send to is gone; the first pong from its new one takes over (paths.handle_control)
        instead of waiting for the path keeper's next round."""
        added = [e for e in peer.endpoint_set.all() if e not in before]
        if added and self.agent.device._usable_send_keypair(peer, now) is not None:
            out = self.agent.device.probe(peer, added, now)
            if out:
                self.agent.send_device_output(out)

    def _punch_if_waiting(self, key_b64: str) -> None:
        """New endpoints for a peer we have no session with yet: try them at once. (If
        the peer sits behind a UDP-blocked NAT, its relayed address only lets us in
        after we sent to it: waiting for its initiation would wait for nothing.)"""
        key = self._key(key_b64)
        peer = self.agent.device.peers.get(key) if key else None
        if peer is None or not peer.endpoints:
            return
        if self.agent.device._usable_send_keypair(peer, time.monotonic()) is not None:
            return
        self._punch(key_b64, first=False)

    def _route_sources(self, network: str, nets: list) -> None:
        """Routes to a peer's overlay addresses prefer our own overlay address of that
        network as source (the interface may have other addresses, e.g. from [Interface])."""
        mine = self.client.memberships.get(network)
        if mine is None:
            return
        on_link = {str(a.ip) for a in self.agent.config.addresses} | {str(a.ip) for a in self.assigned_addresses}
        for net in nets:
            ip = mine.ipv4 if net.version == 4 else mine.ipv6
            if ip and ip in on_link:  # a source not (yet) on the interface makes the route fail
                self.agent.route_sources[net] = ip

    def _set_endpoints(self, peer: Peer, info: _PeerInfo) -> None:
        allocs = self.gatherer.relay.ready()
        udp_blocked = bool(allocs) and all(a.transport != "udp" for a in allocs)
        servers = [a.server for a in allocs if a.transport != "udp"]
        peer.endpoint_set.set_candidates(candidate_endpoints(info.candidates, servers, udp_blocked))

    def _drop(self, network: str, key_b64: Any, sync: bool = True) -> None:
        key = self._key(key_b64)
        info = self.peers.get(key) if key else None
        if info is None or key is None:
            return
        info.networks.discard(network)
        if info.networks:
            return
        del self.peers[key]
        self.keeper.forget(key)
        for ip in info.overlay_ips:
            self.agent.route_sources.pop(ipaddress.ip_network(ip), None)
        if key in self.static_keys:
            peer = self.agent.device.peers.get(key)
            if peer is not None:
                peer.endpoint_set.set_candidates([])
        else:
            self.agent.device.remove_peer(key, time.monotonic())
            log.info("peer removed", name=info.name)
        if sync:
            self.agent.changed()

    def _permit_all(self) -> None:
        addrs = []
        for info in self.peers.values():
            for cand in info.candidates:
                if cand.address not in addrs:
                    addrs.append(cand.address)
        self.gatherer.relay.permit(addrs)

    def _relay_ready(self) -> None:
        # Our allocation changed: relayed endpoints (UDP blocked) and permissions follow.
        for key, info in self.peers.items():
            peer = self.agent.device.peers.get(key)
            if peer is not None:
                self._set_endpoints(peer, info)
        self._permit_all()
        for info in list(self.peers.values()):
            self._punch_if_waiting(info.key_b64)

    def _check_rendezvous_address(self, addrs: list[str]) -> None:
        """After a network change the WebSocket may sit on an address this host no longer
        has; it would take the heartbeat (tens of seconds) to notice, and until then
        our new candidates go nowhere. Close it: keep_connected reconnects at once and
        publishes the candidates again."""
        ws = getattr(self.client, "_ws", None)  # the client offers no accessor for this
        if ws is None or ws.closed:
            return
        local = ws.get_extra_info("sockname")
        if local and str(local[0]).removeprefix("::ffff:") not in addrs:
            log.info("rendezvous connection lost its local address; reconnecting", address=str(local[0]))
            self._tasks.spawn(self.client.reconnect_now())

    def _publish(self, cands: list[Candidate]) -> None:
        # New candidates follow an address or route change: every path may differ now.
        self.keeper.network_changed(time.monotonic())
        log.info("candidates", candidates=[f"{c.kind} {c.ip}:{c.port}" for c in cands])
        self._tasks.spawn(self._publish_async([c.to_dict() for c in cands]))

    async def _publish_async(self, cands: list[dict]) -> None:
        try:
            await self.client.publish_candidates(cands)
        except RendezvousError:
            pass  # not connected: keep_connected publishes the last list after reconnecting

    # -- hole punching ------------------------------------------------------------------------------
    def _on_new_handshake(self, peer: Peer) -> None:
        info = self.peers.get(peer.public_key)
        if info is None or self._punching or not self.client.connected:
            return
        now = time.monotonic()
        heard = max(peer.endpoint_set.heard.values(), default=None)
        if peer.current is not None and heard is not None and now - heard < SILENT_BEFORE_CONNECT:
            return  # a rekey of a working session, not a new connection
        if now - info.last_connect < CONNECT_MIN_INTERVAL:
            return
        info.last_connect = now
        network = next(iter(info.networks))
        self._tasks.spawn(self._request_connect(network, info.key_b64))

    async def _request_connect(self, network: str, key_b64: str) -> None:
        try:
            await self.client.request_connect(network, key_b64)
        except RendezvousError:
            pass

    def _punch(self, key_b64: Any, first: bool = True) -> None:
        key = self._key(key_b64)
        peer = self.agent.device.peers.get(key) if key else None
        info = self.peers.get(key) if key else None
        if peer is None or info is None:
            return
        now = time.monotonic()
        if not first and paths.path_of(peer) == paths.PATH_DIRECT \
                and self.agent.device._usable_send_keypair(peer, now) is not None:
            return  # already through
        info.last_connect = now  # the connect we asked for (or the peer did) is this one
        self.keeper.reset(key, now)
        self._punching = True
        try:
            out = paths.punch(self.agent.device, peer, now)
        finally:
            self._punching = False
        log.debug("punching", peer=info.name, datagrams=len(out))
        self.agent.send_device_output(out)

    # -- relay -> direct ----------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        last_turn_check = 0.0
        while True:
            await asyncio.sleep(PROBE_TICK)
            now = time.monotonic()
            out, changes = self.keeper.tick(self.agent.device, list(self.peers), now)
            if out:
                self.agent.send_device_output(out)
            for change in changes:
                info = self.peers.get(change.key)
                if info is not None:
                    log.info("path changed", peer=info.name, path=change.path,
                             endpoint=str(change.endpoint), reason=change.reason)
            if now - last_turn_check > 30:
                last_turn_check = now
                self._maybe_refresh_turn()

    def _maybe_refresh_turn(self) -> None:
        creds = self.client.turn
        if creds is None or self._refreshing_turn or not self.client.connected:
            return
        if creds.expires - time.time() < TURN_REFRESH_MARGIN:
            self._tasks.spawn(self._refresh_turn())

    async def _refresh_turn(self) -> None:
        self._refreshing_turn = True
        try:
            await self.client.refresh_turn()
        except (TimeoutError, RendezvousError):
            pass
        finally:
            self._refreshing_turn = False

    # -- status ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The node's side of traversal for `overlay status --json`."""
        return {
            "url": self.url,
            "connected": self.client.connected,
            "error": self.error,
            "server_key": base64.b64encode(self.client.server_key).decode() if self.client.server_key else None,
            "addresses": [str(a) for a in self.assigned_addresses],
            "candidates": [c.to_dict() for c in self.gatherer.candidates],
            "relays": [{"server": f"{a.server[0]}:{a.server[1]}", "transport": a.transport,
                        "state": a.turn.state,
                        # the allocation whose relayed address we publish (others are being
                        # made, or retired after a move to a closer relay)
                        "active": a in self.gatherer.active_allocations(),
                        "relayed": None if a.turn.relayed_address is None
                        else f"{a.turn.relayed_address[0]}:{a.turn.relayed_address[1]}"}
                       for a in self.gatherer.relay.allocations.values()],
            # NAT mapping lifetime and the automatic keepalive interval it gives (keepalive.py)
            "nat_keepalive": self.nat_keepalive.summary(),
        }

    def peer_info(self, key: bytes) -> tuple[str, list[str]] | None:
        info = self.peers.get(key)
        return (info.name, list(info.overlay_ips)) if info is not None else None
