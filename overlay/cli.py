"""`overlay` command line: genkey, pubkey, join, up, status, ping, netcheck.

User errors (bad config, busy port, missing /dev/net/tun, unknown interface)
are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import stat
import sys
import time
from itertools import count
from pathlib import Path
from typing import Any

import structlog

from overlay import control, keys
from overlay.status_render import format_status  # noqa: F401 - also the module's public API
from overlay.config import (
    ConfigError,
    Endpoint,
    InterfaceConfig,
    has_hostnames,
    load_config,
    resolve_endpoints_detailed,
)

PROG = "overlay"
# What wg-quick accepts as an interface name; 15 = IFNAMSIZ - 1 on Linux.
IFNAME_RE = re.compile(r"^[a-zA-Z0-9_=+.-]{1,15}$")
DEFAULT_RESOLVE_INTERVAL = 60.0

log = structlog.get_logger("overlay.cli")


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def validate_ifname(name: str) -> str:
    if not IFNAME_RE.match(name) or name in (".", ".."):
        raise UserError(
            f"{name!r} is not a valid interface name (1-15 characters of a-z A-Z 0-9 _ = + . -); "
            "the interface is named after the config file"
        )
    return name


def setup_logging(level: str = "info", fmt: str = "kv") -> None:
    """Structured logs to stderr. Exceptions are rendered without frame locals
    so key material held in local variables can never reach a log."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (aioice, pyroute2, asyncio) go to stderr too.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


# ---------------------------------------------------------------------------
# genkey / pubkey
# ---------------------------------------------------------------------------


def cmd_genkey(args: argparse.Namespace) -> int:
    # Like `wg genkey`: a private key redirected into a file others can read is
    # worth a warning (the usual fix is `umask 077`).
    try:
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            print(f"{PROG}: warning: writing a private key to a file readable by others; "
                  "consider `umask 077` first", file=sys.stderr)
    except (OSError, ValueError):
        pass
    print(keys.encode(keys.generate_private_key()))
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    try:
        private = keys.decode(sys.stdin.read())
    except keys.InvalidKey as e:
        raise UserError(f"pubkey: invalid private key on stdin: {e}") from None
    print(keys.encode(keys.public_key(private)))
    return 0


# ---------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------


def resolve_all(config: InterfaceConfig) -> dict[bytes, list[Endpoint]]:
    """Resolve every peer's endpoints for start-up.

    A peer whose every endpoint fails is an error (as with `wg`); a hostname
    failing next to other working endpoints is only a warning, it is retried.
    """
    resolved: dict[bytes, list[Endpoint]] = {}
    for peer in config.peers:
        endpoints, failures = resolve_endpoints_detailed(peer)
        for spec, why in failures:
            if not endpoints:
                raise UserError(
                    f"{config.source}: peer {keys.encode(peer.public_key)}: cannot resolve "
                    f"endpoint {spec.host}: {why}"
                )
            log.warning("endpoint_unresolved", peer=keys.fingerprint(peer.public_key), host=spec.host, reason=why)
        resolved[peer.public_key] = endpoints
    return resolved


class Reresolver:
    """Re-resolves hostname endpoints periodically so DNS changes take effect."""

    def __init__(self, agent: Any, config: InterfaceConfig, interval: float):
        self.agent = agent
        self.peers = [p for p in config.peers if has_hostnames(p)]
        self.interval = interval
        self.overridden: set[bytes] = set()  # endpoints set by hand over UAPI win

    def endpoints_set_by_user(self, public_keys: list[bytes]) -> None:
        self.overridden.update(public_keys)

    async def run(self) -> None:
        if not self.peers:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            for peer_cfg in self.peers:
                if peer_cfg.public_key in self.overridden:
                    continue
                endpoints, failures = await loop.run_in_executor(None, resolve_endpoints_detailed, peer_cfg)
                peer = self.agent.device.peers.get(peer_cfg.public_key)
                if peer is None or not endpoints or peer_cfg.public_key in self.overridden:
                    continue
                if list(peer.configured_endpoints) != endpoints:
                    log.info(
                        "endpoints_reresolved",
                        peer=keys.fingerprint(peer_cfg.public_key),
                        endpoints=[f"{h}:{p}" for h, p in endpoints],
                    )
                    self.agent.device.set_peer(peer_cfg.public_key, time.monotonic(), endpoints=endpoints)
                    self.agent.changed()


def _describe_startup_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, (OSError, ValueError, RuntimeError, control.UapiInUse)):
        return str(e) or type(e).__name__
    # Something unexpected (a library's own error type): name it so it can be looked up.
    return f"{type(e).__name__}: {e}"


async def run_up(config: InterfaceConfig, ifname: str, socket_dir: str, resolve_interval: float,
                 metrics_listen: tuple[str, int] | None = None) -> int:
    from overlay.agent import Agent  # imported late: genkey/pubkey need no network stack

    # Refuse early, before creating anything, if the name is already served.
    path = control.socket_path(ifname, socket_dir)
    if Path(path).exists() and control.socket_is_live(path):
        raise UserError(f"interface {ifname} is already up ({path} is served by a running process)")
    resolved = resolve_all(config)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    try:
        agent = Agent(config, ifname, resolved_endpoints=resolved)
    except (ValueError, OSError) as e:
        raise UserError(f"up {ifname}: {_describe_startup_error(e)}") from None
    server = control.UapiServer(agent, ifname, socket_dir)
    reresolver = Reresolver(agent, config, resolve_interval)
    server.on_endpoints_set = reresolver.endpoints_set_by_user
    started = False
    task: asyncio.Task | None = None
    session = None  # the rendezvous session, with a [Rendezvous] section
    metrics = None
    try:
        try:
            await agent.start()
            started = True
            await server.start()
        except Exception as e:  # noqa: BLE001 - any start-up failure is one line, not a traceback
            raise UserError(f"up {ifname}: {_describe_startup_error(e)}") from None
        if metrics_listen is not None:
            from overlay.metrics import MetricsServer

            metrics = MetricsServer(agent, *metrics_listen)
            try:
                await metrics.start()
            except OSError as e:
                metrics = None
                raise UserError(f"up {ifname}: --metrics {metrics_listen[0]}:{metrics_listen[1]}: "
                                f"{_describe_startup_error(e)}") from None
        log.info(
            "interface_up",
            interface=ifname,
            public_key=keys.encode(agent.device.public_key),
            listen_port=agent.listen_port,
            peers=len(config.peers),
            uapi=server.path,
        )
        task = asyncio.create_task(reresolver.run())
        rendezvous = getattr(config, "rendezvous", None)
        if rendezvous is not None:
            from overlay.traversal.session import RendezvousSession

            session = RendezvousSession(agent, rendezvous.url, token=rendezvous.token,
                                        name=rendezvous.name)
            session.start()
        await stop.wait()
        log.info("interface_stopping", interface=ifname)
    finally:
        if task is not None:
            task.cancel()
        if session is not None:
            await session.close()
        if metrics is not None:
            await metrics.close()
        await server.close()
        if started:
            await agent.stop()
        else:
            try:
                await agent.stop()  # a half-started agent releases what it took
            except Exception:  # noqa: BLE001
                pass
    log.info("interface_down", interface=ifname)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise UserError(str(e)) from None
    ifname = validate_ifname(args.interface or Path(args.config).stem)
    metrics_listen = None
    if args.metrics is not None:
        from overlay.metrics import parse_listen

        try:
            metrics_listen = parse_listen(args.metrics)
        except ValueError as e:
            raise UserError(f"up: --metrics {e}") from None
    # Logging is set up only once the agent is really going to run.
    setup_logging(args.log_level, args.log_format)
    return asyncio.run(run_up(config, ifname, args.socket_dir, args.resolve_interval, metrics_listen))


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    if args.interface:
        validate_ifname(args.interface)
        try:
            docs = [control.query_status(args.interface, args.socket_dir)]
        except control.UapiClientError as e:
            if "cannot connect" in str(e):
                raise UserError(f"status: no running interface {args.interface}") from None
            raise UserError(f"status: {e}") from None
    else:
        docs = []
        for name in control.list_interfaces(args.socket_dir):
            try:
                docs.append(control.query_status(name, args.socket_dir))
            except control.UapiClientError:
                continue  # stale socket, or a stock WireGuard implementation
    if args.json:
        print(json.dumps(docs[0] if args.interface else docs, indent=2))
    else:
        print("\n\n".join(format_status(d) for d in docs))
    return 0


# ---------------------------------------------------------------------------
# ping
# ---------------------------------------------------------------------------


def find_peer(docs: list[dict[str, Any]], query: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(interface document, peer entry) for a peer named by its name, one of its
    overlay addresses, its public key or a unique start of the key (4+ characters)."""
    exact: list[tuple[dict[str, Any], dict[str, Any]]] = []
    prefix: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for doc in docs:
        for peer in doc["peers"]:
            ips = set(peer.get("overlay_ips") or [])
            ips |= {net.split("/")[0] for net in peer.get("allowed_ips", []) if net.endswith(("/32", "/128"))}
            if query in (peer.get("name"), peer["public_key"]) or query in ips:
                exact.append((doc, peer))
            elif len(query) >= 4 and peer["public_key"].startswith(query):
                prefix.append((doc, peer))
    found = exact or prefix
    if not found:
        known = sorted({p.get("name") or p["public_key"][:8] for d in docs for p in d["peers"]})
        where = ", ".join(d["interface"] for d in docs) or "no running interface"
        raise UserError(f"ping: no peer {query!r} on {where}" + (f" (peers: {', '.join(known)})" if known else ""))
    if len(found) > 1:
        names = ", ".join(f"{p.get('name') or p['public_key'][:8]} on {d['interface']}" for d, p in found)
        raise UserError(f"ping: {query!r} matches several peers ({names}); name the interface or give the key")
    return found[0]


def _status_docs(interface: str | None, socket_dir: str, what: str) -> list[dict[str, Any]]:
    if interface:
        validate_ifname(interface)
        try:
            return [control.query_status(interface, socket_dir)]
        except control.UapiClientError as e:
            if "cannot connect" in str(e):
                raise UserError(f"{what}: no running interface {interface} (is `{PROG} up` running?)") from None
            raise UserError(f"{what}: {e}") from None
    docs = []
    for name in control.list_interfaces(socket_dir):
        try:
            docs.append(control.query_status(name, socket_dir))
        except control.UapiClientError:
            continue  # stale socket, or a stock WireGuard implementation
    return docs


def describe_pong(label: str, seq: int, answer: dict[str, Any], timeout: float) -> str:
    """One line per probe, like ping(8), naming the path that answered."""
    if answer.get("reply"):
        line = (f"reply from {label} over {answer['path']} {answer['endpoint']} ({answer['kind']}): "
                f"seq={seq} time={answer['rtt_ms']:.2f} ms")
        if answer.get("sent_to") and answer["sent_to"] != answer["endpoint"]:
            line += f" (sent to {answer['sent_to']})"
        return line
    if answer.get("reason") == "timeout":
        return (f"no reply from {label}: seq={seq} (sent over {answer.get('sent_path')} {answer.get('sent_to')}, "
                f"waited {timeout:g} s)")
    return f"cannot probe {label}: seq={seq}: {answer.get('reason')} (no handshake with it has completed yet)"


def ping_summary(label: str, sent: int, rtts: list[float]) -> str:
    lost = sent - len(rtts)
    loss = 100.0 * lost / sent if sent else 0.0
    text = f"--- {label}: {sent} probes sent, {len(rtts)} repl{'y' if len(rtts) == 1 else 'ies'}, {loss:.0f}% lost"
    if rtts:
        text += f"; rtt min/avg/max = {min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/{max(rtts):.2f} ms"
    return text


def cmd_ping(args: argparse.Namespace) -> int:
    if args.count < 0 or args.interval <= 0 or not 0 < args.timeout <= 60:
        raise UserError("ping: -c must be >= 0, -i > 0 and -W between 0 and 60 seconds")
    docs = _status_docs(args.interface, args.socket_dir, "ping")
    if not docs:
        raise UserError(f"ping: no running interface (is `{PROG} up` running?)")
    doc, peer = find_peer(docs, args.peer)
    ifname = doc["interface"]
    key = keys.decode(peer["public_key"])
    label = peer.get("name") or peer["public_key"][:8]
    ips = ", ".join(peer.get("overlay_ips") or [])
    print(f"PING {label}{f' ({ips})' if ips else ''} on {ifname}: in-session probes on the active path")
    sys.stdout.flush()
    sent = 0
    rtts: list[float] = []
    try:
        for seq in count(1):
            if args.count and seq > args.count:
                break
            if seq > 1:
                time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = time.monotonic() + args.interval
            try:
                answer = control.ping_once(ifname, key, args.timeout, args.socket_dir)
            except control.UapiClientError as e:
                if "cannot connect" in str(e):
                    raise UserError(f"ping: interface {ifname} is not running any more") from None
                raise UserError(f"ping: {e}") from None
            sent += 1
            if answer.get("reply"):
                rtts.append(float(answer["rtt_ms"]))
            print(describe_pong(label, seq, answer, args.timeout))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    print(ping_summary(label, sent, rtts))
    return 0 if rtts else 1


# ---------------------------------------------------------------------------
# netcheck
# ---------------------------------------------------------------------------


def _netcheck_relays(args: argparse.Namespace) -> tuple[list[tuple[str, int]], list[str]]:
    from overlay import netcheck

    relays: list[tuple[str, int]] = []
    sources: list[str] = []

    def add(found: list[tuple[str, int]], source: str) -> None:
        sources.append(source)
        relays.extend(r for r in found if r not in relays)

    try:
        for url in args.relay:
            add([netcheck.relay_from_url(url)], url)
        target = args.target
        if target and (os.path.isfile(target) or "/" in target or target.endswith(".conf")):
            try:
                config = load_config(target)
            except ConfigError as e:
                raise UserError(str(e)) from None
            urls = [config.rendezvous.url] if config.rendezvous is not None else []
            urls += [str(u) for u in getattr(config, "relays", None) or []]  # `Relay =` lines
            found = []
            for url in urls:
                try:
                    found.append(netcheck.relay_from_url(url))
                except netcheck.NetcheckError:
                    continue  # a turns: relay: TLS only, nothing to check over UDP
            if not found:
                raise UserError(f"netcheck: {target} names no relay (no [Rendezvous] section or Relay line); "
                                "use --relay URL")
            add(found, target)
        elif target or not relays:
            for doc in _status_docs(target, args.socket_dir, "netcheck"):
                found = netcheck.relays_from_status(doc)
                if found:
                    add(found, f"interface {doc['interface']}")
    except netcheck.NetcheckError as e:
        raise UserError(f"netcheck: {e}") from None
    if not relays:
        raise UserError("netcheck: no relay to check: give --relay URL, a config file, or a running interface "
                        "that has a [Rendezvous] section")
    return relays, sources


def cmd_netcheck(args: argparse.Namespace) -> int:
    from overlay import netcheck
    from overlay.netcheck_report import format_report

    if not 0 < args.timeout <= 60:
        raise UserError("netcheck: --timeout must be between 0 and 60 seconds")
    relays, sources = _netcheck_relays(args)
    try:
        servers = netcheck.resolve(relays)
    except netcheck.NetcheckError as e:
        raise UserError(f"netcheck: {e}") from None
    report = asyncio.run(netcheck.netcheck(servers, sources, wait=args.timeout))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    # Non-zero when no relay could be reached at all: the tunnel could not get out.
    return 0 if report["udp"] or report["tcp_fallback"] else 1


# ---------------------------------------------------------------------------
# join
# ---------------------------------------------------------------------------


def cmd_join(args: argparse.Namespace) -> int:
    from overlay import join  # imported late: aiohttp is only needed here

    try:
        result = asyncio.run(join.join(args.url, args.token, args.config, name=args.name, force=args.force,
                                       timeout=args.timeout, server_key=args.server_key))
    except join.JoinError as e:
        raise UserError(f"join: {e}") from None
    networks = ", ".join(m.network for m in result.memberships)
    addresses = ", ".join(str(a) for a in result.addresses)
    print(f"joined {networks} as {result.name} ({result.public_key}): {addresses}")
    if result.server_key is not None:
        print(f"rendezvous server key {result.server_key} (pinned in {result.path})")
    print(f"wrote {result.path}; start the tunnel with: {PROG} up {result.path}")
    return 0


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="WireGuard-compatible overlay tunnel agent")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("genkey", help="print a new private key (base64), like `wg genkey`")
    g.set_defaults(func=cmd_genkey)
    k = sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    k.set_defaults(func=cmd_pubkey)

    u = sub.add_parser("up", help="bring an interface up from a wg-quick style file (foreground)")
    u.add_argument("config", help="config file; the interface is named after its stem")
    u.add_argument("--interface", help="interface name (default: the file's stem)")
    u.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    u.add_argument("--log-format", default="kv", choices=["kv", "json"])
    u.add_argument("--resolve-interval", type=float, default=DEFAULT_RESOLVE_INTERVAL,
                   help="seconds between re-resolving hostname endpoints (default 60)")
    u.add_argument("--metrics", metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (ADDR defaults to 127.0.0.1)")
    u.add_argument("--socket-dir", default=control.SOCKET_DIR, help=argparse.SUPPRESS)
    u.set_defaults(func=cmd_up)

    j = sub.add_parser("join", help="join a network through a relay's rendezvous and write a config file")
    j.add_argument("url", help="the relay's rendezvous URL (http, https, ws or wss)")
    j.add_argument("config", help="config file to write (0600); an existing file's private key is kept")
    j.add_argument("--token", required=True, help="join token from `overlay-relay token create`")
    j.add_argument("--name", help="this node's name in the network (default: the host name)")
    j.add_argument("--force", action="store_true", help="re-join an existing file at a different rendezvous URL")
    j.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the relay (default 15)")
    j.add_argument("--server-key", metavar="B64",
                   help="the relay's rendezvous key (`overlay-relay server-key`); refuse to join if it differs")
    j.set_defaults(func=cmd_join)

    s = sub.add_parser("status", help="show running interfaces, their peers and endpoints")
    s.add_argument("interface", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--socket-dir", default=control.SOCKET_DIR, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_status)

    pg = sub.add_parser("ping", help="probe a peer inside the tunnel session; shows which path answers")
    pg.add_argument("peer", help="the peer's name, overlay IP address or public key")
    pg.add_argument("interface", nargs="?", help="interface (default: whichever running one has the peer)")
    pg.add_argument("-c", "--count", type=int, default=0, help="stop after N probes (default: until Ctrl-C)")
    pg.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between probes (default 1)")
    pg.add_argument("-W", "--timeout", type=float, default=1.0, help="seconds to wait for each reply (default 1)")
    pg.add_argument("--socket-dir", default=control.SOCKET_DIR, help=argparse.SUPPRESS)
    pg.set_defaults(func=cmd_ping)

    n = sub.add_parser("netcheck", help="check UDP/TCP reachability, NAT mapping and relay latency")
    n.add_argument("target", nargs="?",
                   help="a config file (its [Rendezvous] relay) or a running interface (the relays it uses)")
    n.add_argument("--relay", action="append", default=[], metavar="URL",
                   help="a relay to check: its rendezvous URL or a stun:/turn: URL (repeatable)")
    n.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each relay (default 3)")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    n.add_argument("--socket-dir", default=control.SOCKET_DIR, help=argparse.SUPPRESS)
    n.set_defaults(func=cmd_netcheck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
