"""`overlay-relay` command line: serve, and operator commands on the data directory's SQLite.

    overlay-relay serve [--config FILE] [--data-dir DIR] [--listen IP ...] [--port N] ...
    overlay-relay token create --network NAME [--uses N|unlimited] [--expires 24h|never]
    overlay-relay token list | token revoke ID
    overlay-relay node list [--network NAME] | node remove --network NAME KEY_OR_NAME
    overlay-relay network list
    overlay-relay credentials [--name NAME] [--ttl SECONDS]     (TURN REST credentials from the secret)
    overlay-relay server-key      (the rendezvous public key to hand out: `overlay join --server-key`)

Operator commands work while the server runs (SQLite WAL); the server picks changes up.
Every failure is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
import time
from typing import Any

from . import config as config_mod
from .config import ConfigError, RelayConfig
from .datadir import DB_NAME, DataDirError, prepare, server_key, turn_secret
from .store import Store, StoreError


def parse_duration(text: str) -> float | None:
    """'24h', '30m', '7d', '90s', '3600' -> seconds; 'never' -> None."""
    if text in ("never", "none", "0"):
        return None
    match = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 90s, 30m, 24h, 7d, never)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(int(match.group(1)) * unit)


def parse_uses(text: str) -> int | None:
    if text in ("unlimited", "inf"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--uses must be a number or 'unlimited', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--uses must be at least 1")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML configuration file")
    p.add_argument("--data-dir", help="data directory (database, secrets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlay-relay", description="STUN + TURN relay + rendezvous server")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    _common(s)
    s.add_argument("--listen", action="append", help="STUN/TURN listen IP (repeatable)")
    s.add_argument("--port", type=int, help="STUN/TURN UDP+TCP port (default 3478, 0 = ephemeral)")
    s.add_argument("--tls-port", type=int, help="TURN TLS port (default 5349, -1 = off)")
    s.add_argument("--alternate-listen", action="append", help="RFC 5780 second IP (repeatable, paired with --listen)")
    s.add_argument("--alternate-port", type=int, help="RFC 5780 second port")
    s.add_argument("--advertise", action="append", metavar="LOCAL=PUBLIC", help="public IP for a local IP")
    s.add_argument("--relay-ipv4", help="IPv4 address relayed sockets bind to")
    s.add_argument("--relay-ipv6", help="IPv6 address relayed sockets bind to")
    s.add_argument("--realm")
    s.add_argument("--secret", help="TURN REST shared secret (default: generated in the data directory)")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--allow-loopback-peers", action="store_true", default=None,
                   help="allow relaying to loopback and the server's own addresses (tests only)")
    s.add_argument("--max-allocations-per-user", type=int)
    s.add_argument("--bandwidth", type=int, help="bytes/s per allocation (0 = unlimited)")
    s.add_argument("--no-gro", dest="gro", action="store_false", default=None,
                   help="do not enable UDP GRO on the STUN/TURN UDP sockets")
    s.add_argument("--http-listen", help="rendezvous HTTP listen IP")
    s.add_argument("--http-port", type=int, help="rendezvous HTTP port (default 8080, 0 = ephemeral)")
    s.add_argument("--turn-url", action="append", help="TURN URL handed to members (repeatable; bring your own TURN)")
    s.add_argument("--credential-ttl", type=int)
    s.add_argument("--rate-per-minute", type=int, help="unauthenticated rendezvous attempts per source IP per minute")
    s.add_argument("--rate-burst", type=int)
    s.add_argument("--log-format", choices=["console", "json"])
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--ready-file", help="write the bound addresses as JSON here once listening")

    t = sub.add_parser("token", help="join tokens").add_subparsers(dest="action", required=True)
    tc = t.add_parser("create", help="create a join token (printed once)")
    _common(tc)
    tc.add_argument("--network", required=True)
    tc.add_argument("--uses", type=parse_uses, default=1, help="how many nodes may join with it (default 1)")
    tc.add_argument("--expires", type=parse_duration, default=86400.0, help="validity (default 24h)")
    tl = t.add_parser("list")
    _common(tl)
    tr = t.add_parser("revoke")
    _common(tr)
    tr.add_argument("id")

    n = sub.add_parser("node", help="members").add_subparsers(dest="action", required=True)
    nl = n.add_parser("list")
    _common(nl)
    nl.add_argument("--network")
    nr = n.add_parser("remove")
    _common(nr)
    nr.add_argument("--network", required=True, help="network name, or '*' for every network")
    nr.add_argument("who", help="public key (base64) or node name")

    w = sub.add_parser("network", help="networks").add_subparsers(dest="action", required=True)
    _common(w.add_parser("list"))

    c = sub.add_parser("credentials", help="print TURN REST credentials derived from the shared secret")
    _common(c)
    c.add_argument("--name", default="operator")
    c.add_argument("--ttl", type=int, default=86400)

    k = sub.add_parser("server-key", help="print the rendezvous server's public key (members pin it)")
    _common(k)
    return parser


def server_public_key(cfg: RelayConfig) -> str:
    """Base64 of the rendezvous X25519 public key; the private key is created on first use,
    so an operator can hand the key out before the first start."""
    from overlay.rendezvous.proof import public_key

    datadir = prepare(cfg.data_dir)
    try:
        private = server_key(datadir)
    except ValueError:  # not base64 at all
        raise DataDirError(f"{datadir / 'server_key'}: not a 32-byte base64 key") from None
    return base64.b64encode(public_key(private)).decode()


def load_config(args: argparse.Namespace) -> RelayConfig:
    cfg = config_mod.load(args.config)
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.command != "serve":
        return cfg
    t, r = cfg.turn, cfg.rendezvous
    simple = {
        "port": (t, "port"), "tls_port": (t, "tls_port"), "alternate_port": (t, "alternate_port"),
        "relay_ipv4": (t, "relay_ipv4"), "relay_ipv6": (t, "relay_ipv6"), "realm": (t, "realm"),
        "secret": (t, "secret"), "tls_cert": (t, "tls_cert"), "tls_key": (t, "tls_key"),
        "allow_loopback_peers": (t, "allow_loopback_peers"), "max_allocations_per_user": (t, "max_allocations_per_user"),
        "bandwidth": (t, "bandwidth"), "gro": (t, "gro"), "http_listen": (r, "listen"), "http_port": (r, "port"),
        "credential_ttl": (r, "credential_ttl"), "rate_per_minute": (r, "rate_per_minute"),
        "rate_burst": (r, "rate_burst"), "log_format": (cfg, "log_format"), "log_level": (cfg, "log_level"),
        "listen": (t, "listen"), "alternate_listen": (t, "alternate_listen"), "turn_url": (r, "turn_urls"),
    }
    for arg, (obj, attr) in simple.items():
        value = getattr(args, arg)
        if value is not None:
            setattr(obj, attr, value)
    for item in args.advertise or []:
        local, sep, public = item.partition("=")
        if not sep:
            raise ConfigError(f"--advertise {item!r}: expected LOCAL=PUBLIC")
        t.advertise[local] = public
    config_mod.validate(cfg, "command line")
    return cfg


def _open_store(cfg: RelayConfig) -> Store:
    return Store(prepare(cfg.data_dir) / DB_NAME)


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _table(rows: list[list[Any]], head: list[str]) -> None:
    cells = [head] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def run_operator(args: argparse.Namespace, cfg: RelayConfig) -> int:
    if args.command == "server-key":
        print(server_public_key(cfg))
        return 0
    if args.command == "credentials":
        from overlay.stun.credentials import make_rest_credentials
        secret = cfg.turn.secret or turn_secret(prepare(cfg.data_dir))
        creds = make_rest_credentials(secret, args.name, args.ttl)
        print(json.dumps({"username": creds.username, "password": creds.password, "expires": creds.expires}))
        return 0
    store = _open_store(cfg)
    try:
        if args.command == "token" and args.action == "create":
            expires = None if args.expires is None else time.time() + args.expires
            token, token_id = store.create_token(args.network, args.uses, expires)
            print(token)
            print(f"token {token_id} for network {args.network}: uses {args.uses or 'unlimited'}, "
                  f"expires {_when(expires)} (shown once; only a hash is stored)", file=sys.stderr)
        elif args.command == "token" and args.action == "list":
            _table([[k.id, k.network, "unlimited" if k.uses_left is None else k.uses_left, _when(k.expires),
                     "yes" if k.revoked else "no"] for k in store.tokens()],
                   ["ID", "NETWORK", "USES_LEFT", "EXPIRES", "REVOKED"])
        elif args.command == "token" and args.action == "revoke":
            store.revoke_token(args.id)
            print(f"token {args.id} revoked")
        elif args.command == "node" and args.action == "list":
            _table([[n.network, n.name, n.public_key, n.ipv4, n.ipv6, _when(n.last_seen)] for n in store.nodes(args.network)],
                   ["NETWORK", "NAME", "PUBLIC_KEY", "IPV4", "IPV6", "LAST_SEEN"])
        elif args.command == "node" and args.action == "remove":
            for n in store.remove_node(args.network, args.who):
                print(f"removed {n.name} ({n.public_key}) from {n.network}")
        elif args.command == "network":
            _table([[w.name, w.ipv4_prefix, w.ipv6_prefix] for w in store.networks()], ["NETWORK", "IPV4", "IPV6"])
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        if args.command != "serve":
            return run_operator(args, cfg)
        from . import logs
        from .app import StartupError, serve

        logs.configure(cfg.log_format, cfg.log_level)
        # Public: operators hand it out so members can pin it (`overlay join --server-key`).
        logs.event_logger()("rendezvous_server_key", server_key=server_public_key(cfg))

        def ready(addresses: dict[str, Any]) -> None:
            if args.ready_file:
                with open(args.ready_file + ".tmp", "w") as f:
                    json.dump(addresses, f)
                import os
                os.replace(args.ready_file + ".tmp", args.ready_file)

        try:
            asyncio.run(serve(cfg, ready))
        except StartupError as exc:
            print(f"overlay-relay: {exc}", file=sys.stderr)
            return 1
        return 0
    except (ConfigError, DataDirError, StoreError) as exc:
        print(f"overlay-relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
