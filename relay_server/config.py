"""overlay-relay configuration: a TOML file (stdlib tomllib) overridden by command-line flags.

Errors name the file and, where it can be found, the line: `relay.toml:7: turn.port must be
an integer 0-65535`. Example file:

    data_dir = "/var/lib/overlay-relay"
    log_format = "json"            # or "console"

    [turn]
    listen = ["203.0.113.10", "2001:db8::10"]   # STUN/TURN on UDP+TCP `port`, TLS on `tls_port`
    port = 3478
    tls_port = 5349                # -1 disables TLS
    alternate_listen = ["203.0.113.11"]  # RFC 5780: second IP, paired by position with `listen`
    alternate_port = 3479          # RFC 5780: second port (0 = off)
    advertise = {}                 # local IP -> public IP when behind a 1:1 NAT
    relay_ipv4 = "203.0.113.10"    # where relayed addresses are opened (default: first listen IP)
    relay_ipv6 = "2001:db8::10"
    realm = "overlay"
    secret = "..."                 # TURN REST shared secret (default: generated in data_dir)
    users = { alice = "password" } # optional static long-term users
    tls_cert = "cert.pem"          # default: a self-signed certificate generated in data_dir
    tls_key = "key.pem"
    allow_loopback_peers = false
    max_allocations_per_user = 100
    bandwidth = 0                  # bytes/s per allocation, 0 = unlimited
    gro = true                     # UDP GRO on the STUN/TURN UDP sockets

    [rendezvous]
    listen = "0.0.0.0"
    port = 8080
    turn_urls = ["turn:relay.example.org:3478?transport=udp"]  # default: derived from turn.listen
    credential_ttl = 86400
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration problem, already phrased as `file:line: what is wrong`."""


@dataclass
class TurnSection:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0"])
    port: int = 3478
    tls_port: int = 5349
    alternate_listen: list[str] = field(default_factory=list)
    alternate_port: int = 0
    advertise: dict[str, str] = field(default_factory=dict)
    relay_ipv4: str | None = None
    relay_ipv6: str | None = None
    realm: str = "overlay"
    secret: str | None = field(default=None, repr=False)
    users: dict[str, str] = field(default_factory=dict, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_loopback_peers: bool = False
    max_allocations_per_user: int = 100
    bandwidth: int = 0
    gro: bool = True  # UDP GRO on the listeners (clients sending with GSO cost one receive per run)
    default_lifetime: int = 600
    max_lifetime: int = 3600


@dataclass
class RendezvousSection:
    listen: str = "0.0.0.0"
    port: int = 8080
    turn_urls: list[str] = field(default_factory=list)
    credential_ttl: int = 86400
    # Unauthenticated requests (WebSocket opens, joins, login challenges) per source IP.
    rate_per_minute: int = 60
    rate_burst: int = 20


@dataclass
class RelayConfig:
    data_dir: str = "/var/lib/overlay-relay"
    log_format: str = "console"
    log_level: str = "info"
    turn: TurnSection = field(default_factory=TurnSection)
    rendezvous: RendezvousSection = field(default_factory=RendezvousSection)


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line number of `key` (inside `[section]` when given)."""
    current = None
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        head = re.match(r"^\[([^\]]+)\]", stripped)
        if head:
            current = head.group(1).strip()
            continue
        if re.match(rf"^{re.escape(key)}\s*=", stripped) and current == section:
            return no
    return None


def _check_type(name: str, value: Any, default: Any, annotation: str) -> Any:
    if "list[str]" in annotation:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings")
        return value
    if "dict[str, str]" in annotation:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{name} must be a table of strings")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer")
        return value
    if "str" in annotation:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        return value
    return value


def _apply(target: Any, table: dict[str, Any], prefix: str, text: str, path: str) -> None:
    known = {f.name: f for f in fields(target)}
    section = prefix.rstrip(".") or None
    for key, value in table.items():
        where = f"{path}:{_line_of(text, section, key) or '?'}"
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}: unknown setting {prefix}{key}")
        if isinstance(getattr(target, key), (TurnSection, RendezvousSection)):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            _apply(getattr(target, key), value, f"{key}.", text, path)
            continue
        try:
            setattr(target, key, _check_type(prefix + key, value, getattr(target, key), str(f.type)))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load(path: str | None) -> RelayConfig:
    cfg = RelayConfig()
    if path is None:
        return cfg
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"{path}:{line.group(1) if line else '?'}: {exc}") from None
    _apply(cfg, data, "", text, path)
    validate(cfg, path, text)
    return cfg


def validate(cfg: RelayConfig, path: str = "<flags>", text: str = "") -> None:
    def fail(section: str | None, key: str, what: str) -> None:
        line = _line_of(text, section, key) if text else None
        raise ConfigError(f"{path}:{line or '?'}: {what}" if text else f"{path}: {what}")

    t, r = cfg.turn, cfg.rendezvous
    for section, key, value, low in (
        ("turn", "port", t.port, 0), ("turn", "tls_port", t.tls_port, -1), ("turn", "alternate_port", t.alternate_port, 0),
        ("rendezvous", "port", r.port, 0),
    ):
        if not low <= value <= 65535:
            fail(section, key, f"{section}.{key} must be {low}-65535, got {value}")
    for key, values in (("listen", t.listen), ("alternate_listen", t.alternate_listen)):
        for v in values:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                fail("turn", key, f"turn.{key}: {v!r} is not an IP address")
    if not t.listen:
        fail("turn", "listen", "turn.listen needs at least one address")
    if len(t.alternate_listen) > len(t.listen):
        fail("turn", "alternate_listen", "turn.alternate_listen has more entries than turn.listen")
    for local, pub in t.advertise.items():
        for v in (local, pub):
            try:
                ipaddress.ip_address(v)
            except ValueError:
                fail("turn", "advertise", f"turn.advertise: {v!r} is not an IP address")
    for key in ("relay_ipv4", "relay_ipv6"):
        v = getattr(t, key)
        if v is not None:
            try:
                ip = ipaddress.ip_address(v)
            except ValueError:
                fail("turn", key, f"turn.{key}: {v!r} is not an IP address")
            if ip.version != (4 if key == "relay_ipv4" else 6):
                fail("turn", key, f"turn.{key}: {v} is not an IPv{4 if key == 'relay_ipv4' else 6} address")
    if t.max_lifetime < t.default_lifetime or t.default_lifetime <= 0:
        fail("turn", "max_lifetime", "turn.max_lifetime must be >= turn.default_lifetime > 0")
    if t.max_allocations_per_user < 1:
        fail("turn", "max_allocations_per_user", "turn.max_allocations_per_user must be >= 1")
    if t.bandwidth < 0:
        fail("turn", "bandwidth", "turn.bandwidth must be >= 0")
    if (t.tls_cert is None) != (t.tls_key is None):
        fail("turn", "tls_cert", "turn.tls_cert and turn.tls_key must be given together")
    if cfg.log_format not in ("console", "json"):
        fail(None, "log_format", f"log_format must be \"console\" or \"json\", got {cfg.log_format!r}")
    try:
        ipaddress.ip_address(r.listen)
    except ValueError:
        fail("rendezvous", "listen", f"rendezvous.listen: {r.listen!r} is not an IP address")
    if r.rate_per_minute < 1 or r.rate_burst < 1:
        fail("rendezvous", "rate_per_minute", "rendezvous rate limits must be >= 1")
