"""`overlay-relay serve`: wires config, data directory, TURN/STUN listeners and the rendezvous together."""

from __future__ import annotations

import asyncio
import errno
import resource
import signal
import socket
import ssl
import time
from typing import Any, Callable

from aiohttp import web

from .config import RelayConfig
from .datadir import DB_NAME, prepare, self_signed_certificate, server_key, turn_secret
from .logs import event_logger
from .metrics import make_registry, render
from .rendezvous import Rendezvous, RendezvousSettings
from .store import Store
from .turn_core import TurnCore, TurnSettings
from .turn_server import RelayAddresses, TurnServer


class StartupError(Exception):
    """A one-line reason the server cannot start."""


def raise_nofile_limit() -> int:
    """One relayed socket per allocation: take every file descriptor the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _default_source_ip(family: int) -> str | None:
    """The address this host would send from (no packet leaves: connect() on UDP only picks a route)."""
    probe = "192.0.2.1" if family == socket.AF_INET else "2001:db8::1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def default_turn_urls(cfg: RelayConfig, port: int, tls_port: int | None, relay: RelayAddresses) -> list[str]:
    urls = []
    for ip in cfg.turn.listen:
        if ip in ("0.0.0.0", "::"):
            ip = (relay.ipv4 if ip == "0.0.0.0" else relay.ipv6) or ""
            if not ip:
                continue
        host = _host(cfg.turn.advertise.get(ip, ip))
        urls += [f"stun:{host}:{port}", f"turn:{host}:{port}?transport=udp", f"turn:{host}:{port}?transport=tcp"]
        if tls_port:
            urls.append(f"turns:{host}:{tls_port}?transport=tcp")
    return urls


def _bind_error(what: str, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{what}: address already in use")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{what}: address not available on this host")
    if exc.errno == errno.EACCES:
        return StartupError(f"{what}: permission denied")
    return StartupError(f"{what}: {exc.strerror or exc}")


class RelayApp:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        self.log = event_logger()
        self.turn: TurnServer | None = None
        self.rendezvous: Rendezvous | None = None
        self.runner: web.AppRunner | None = None
        self.store: Store | None = None
        self.addresses: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.turn
        nofile = raise_nofile_limit()
        datadir = prepare(cfg.data_dir)
        secret = t.secret or turn_secret(datadir)
        try:
            self.store = Store(datadir / DB_NAME)
        except Exception as exc:
            raise StartupError(f"database {datadir / DB_NAME}: {exc}") from None
        listen_v4 = [ip for ip in t.listen if ":" not in ip]
        listen_v6 = [ip for ip in t.listen if ":" in ip]
        relay = RelayAddresses(
            t.relay_ipv4 or next((ip for ip in listen_v4 if ip != "0.0.0.0"), None),
            t.relay_ipv6 or next((ip for ip in listen_v6 if ip != "::"), None),
        )
        # Listening on a wildcard without a relay address: relay from the default route's address.
        if relay.ipv4 is None and "0.0.0.0" in listen_v4:
            relay.ipv4 = _default_source_ip(socket.AF_INET)
        if relay.ipv6 is None and "::" in listen_v6:
            relay.ipv6 = _default_source_ip(socket.AF_INET6)
        alt_ip: dict[str, str] = {}
        for primary, alternate in zip(t.listen, t.alternate_listen):
            alt_ip[primary], alt_ip[alternate] = alternate, primary
        settings = TurnSettings(
            realm=t.realm, default_lifetime=t.default_lifetime, max_lifetime=t.max_lifetime,
            max_allocations_per_user=t.max_allocations_per_user,
            bandwidth=t.bandwidth, allow_loopback_peers=t.allow_loopback_peers, shared_secret=secret,
            users=dict(t.users), own_ips=set(t.listen) | set(t.alternate_listen) | set(t.advertise.values()),
            alternate_ip=alt_ip, advertise=dict(t.advertise),
        )
        core = TurnCore(settings, ports=None)  # type: ignore[arg-type]
        core.on_log = lambda event, level="debug", **kw: self.log(event, level=level, **kw)
        self.turn = server = TurnServer(core, relay, fd_limit=nofile, gro=t.gro)

        # STUN/TURN listeners. Port 0 picks one free port on the first UDP socket and reuses it everywhere.
        port = t.port
        ips = list(t.listen) + list(t.alternate_listen)
        udp, tcp, tls_addrs = [], [], []
        try:
            for ip in ips:
                what = f"STUN/TURN UDP {_host(ip)}:{port}"
                bound = server.listen_udp(ip, port)
                port = bound[1]
                udp.append(bound)
                what = f"STUN/TURN TCP {_host(ip)}:{port}"
                tcp.append(await server.listen_stream(ip, port))
                if t.alternate_port:
                    what = f"RFC 5780 alternate port UDP {_host(ip)}:{t.alternate_port}"
                    udp.append(server.listen_udp(ip, t.alternate_port))
        except OSError as exc:
            raise _bind_error(what, exc) from None
        if t.alternate_port:
            settings.alternate_port = {port: t.alternate_port, t.alternate_port: port}
        tls_port = None
        if t.tls_port >= 0:
            cert, key = (t.tls_cert, t.tls_key) if t.tls_cert else self_signed_certificate(datadir, list(t.listen))
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(cert, key)  # type: ignore[arg-type]
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"TLS certificate {cert} / key {key}: {exc}") from None
            tls_port = t.tls_port
            for ip in t.listen:
                try:
                    bound = await server.listen_stream(ip, tls_port, tls=ctx)
                except OSError as exc:
                    raise _bind_error(f"TURN TLS {_host(ip)}:{tls_port}", exc) from None
                tls_port = bound[1]
                tls_addrs.append(bound)
        settings.own_endpoints = set(udp) | set(tcp) | set(tls_addrs)
        server.start()

        r = cfg.rendezvous
        self.rendezvous = rdv = Rendezvous(self.store, RendezvousSettings(
            server_private=server_key(datadir), turn_secret=secret,
            turn_urls=r.turn_urls or default_turn_urls(cfg, port, tls_port, relay), credential_ttl=r.credential_ttl,
            rate_per_minute=r.rate_per_minute, rate_burst=r.rate_burst,
        ), self.log)
        registry = make_registry(core, rdv)
        app = web.Application()
        app.router.add_get("/v1/ws", rdv.handle_ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", lambda request: web.Response(
            body=render(registry), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, r.listen, r.port)
        try:
            await site.start()
        except OSError as exc:
            raise _bind_error(f"rendezvous HTTP {_host(r.listen)}:{r.port}", exc) from None
        http_port = self.runner.addresses[0][1]
        rdv.start()
        self.addresses = {
            "udp": [f"{_host(a[0])}:{a[1]}" for a in udp], "tcp": [f"{_host(a[0])}:{a[1]}" for a in tcp],
            "tls": [f"{_host(a[0])}:{a[1]}" for a in tls_addrs], "http": f"{_host(r.listen)}:{http_port}",
            "relay_ipv4": relay.ipv4, "relay_ipv6": relay.ipv6, "nofile": nofile,
        }
        self.log("listening", **self.addresses)
        return self.addresses

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "allocations": len(self.turn.core.allocations) if self.turn else 0,
                                  "members_online": self.rendezvous.online_count() if self.rendezvous else 0,
                                  "time": time.time()})

    async def stop(self) -> None:
        if self.rendezvous:
            await self.rendezvous.stop()
        if self.runner:
            await self.runner.cleanup()
        if self.turn:
            await self.turn.aclose()
        if self.store:
            self.store.close()


async def serve(cfg: RelayConfig, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    app = RelayApp(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        addresses = await app.start()
        if on_ready:
            on_ready(addresses)
        await stop.wait()
        app.log("stopping")
    finally:
        await app.stop()
