"""Agent configuration: the wg-quick file format plus multi-endpoint peers.

The types below are what the rest of the agent consumes; the parser that fills
them from a file lives further down.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay import keys
from overlay.traversal.relay_choice import parse_turn_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class EndpointSpec:
    """One `host:port` item of an `Endpoint =` line, before name resolution.

    `host` is an IP literal or a hostname; a hostname stands for all of its A
    and AAAA records and is re-resolved while the agent runs.
    """

    host: str
    port: int


@dataclass
class PeerConfig:
    public_key: bytes  # 32 raw bytes
    # repr=False: a config printed into a log or a test failure must not show key material.
    preshared_key: bytes | None = field(default=None, repr=False)  # 32 raw bytes
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoints: list[EndpointSpec] = field(default_factory=list)
    persistent_keepalive: int = 0  # seconds, 0 = off


@dataclass
class RendezvousConfig:
    """The `[Rendezvous]` section: which relay tells this node about its network.

    `token` is only needed for the first join (it is spent then); `name` is how
    the node appears to others, None meaning "use the host name". `server_key`
    (`ServerKey`, written by `overlay join`) is the rendezvous server's X25519
    public key, pinned like an SSH host key: a server announcing another key is
    refused. Without it (a hand-written config) the agent trusts the key it sees
    at the first login and logs it so the user can pin it.
    """

    url: str
    # repr=False: a join token is a secret until it is spent.
    token: str | None = field(default=None, repr=False)
    name: str | None = None
    server_key: bytes | None = None  # 32 raw bytes; public, safe to show


@dataclass
class InterfaceConfig:
    private_key: bytes = field(repr=False)  # 32 raw bytes
    listen_port: int | None = None  # None = pick a free port
    addresses: list[IPInterface] = field(default_factory=list)
    mtu: int | None = None  # None = default (1420)
    peers: list[PeerConfig] = field(default_factory=list)
    source: str = "<memory>"  # file path, for messages
    # With a rendezvous, addresses and peers may also come from the relay.
    rendezvous: RendezvousConfig | None = None
    # `Relay =` lines ([Interface] or [Rendezvous]): TURN servers used next to the ones
    # the rendezvous hands out, with the same (TURN REST) credentials; the agent
    # allocates on the closest and fails over between them.
    relays: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The parser.
#
# Compatible with what `wg setconf` and `wg-quick` accept: sections and keys
# are case-insensitive, `#` starts a comment, list values are comma-separated
# and may repeat over several lines. wg-quick keys that describe host setup we
# do not do (DNS, Table, hooks, SaveConfig, FwMark) are accepted and ignored so
# an existing file works unchanged. Anything else unknown is an error: a typo
# in a key name must not silently drop a setting.
# ---------------------------------------------------------------------------

Endpoint = tuple[str, int]  # (ip literal, port); IPv6 without brackets

IGNORED_INTERFACE_KEYS = frozenset(
    {"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"}
)
MIN_MTU_IPV4 = 576
MIN_MTU_IPV6 = 1280
MAX_MTU = 65535

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
RENDEZVOUS_SCHEMES = ("http", "https", "ws", "wss")
MAX_NODE_NAME = 64  # what the relay accepts
# Printable, no spaces: a token is pasted from a terminal, so stray whitespace or
# control characters mean a copy/paste accident, better reported than sent.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,512}$")


class ConfigError(ValueError):
    """A configuration problem, rendered as `file:line: what is wrong`."""

    def __init__(self, source: str, line: int | None, message: str):
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


def _parse_key(value: str, what: str) -> bytes:
    try:
        return keys.decode(value)
    except keys.InvalidKey as e:
        raise ValueError(f"bad {what}: {e}") from None


def _parse_int(value: str, what: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"bad {what} {value!r}: not a number")
    n = int(value)
    if not low <= n <= high:
        raise ValueError(f"bad {what} {n}: must be {low}..{high}")
    return n


def parse_port(value: str, *, allow_zero: bool) -> int:
    return _parse_int(value, "port", 0 if allow_zero else 1, 65535)


def _parse_address(item: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(item)
    except ValueError:
        raise ValueError(f"bad address {item!r}: expected IP or IP/prefix") from None


def parse_cidr(item: str) -> IPNetwork:
    """One AllowedIPs entry. Host bits are masked off, as the kernel does for wg."""
    try:
        if "/" not in item:
            ipaddress.ip_address(item)  # a bare address means a single host
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR {item!r}: expected IP/prefix") from None


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_HOSTNAME_LABEL.match(label) for label in labels)


def parse_endpoint(item: str) -> EndpointSpec:
    """`host:port`, `[v6]:port` or `v4:port` -> EndpointSpec (host not resolved)."""
    item = item.strip()
    if item.startswith("["):
        close = item.find("]")
        if close < 0 or item[close + 1 : close + 2] != ":":
            raise ValueError(f"bad endpoint {item!r}: expected [IPv6]:port")
        host, port_text = item[1:close], item[close + 2 :]
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad endpoint {item!r}: {host!r} in brackets is not IPv6") from None
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad endpoint {item!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"bad endpoint {item!r}: an IPv6 endpoint needs brackets, [address]:port")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _valid_hostname(host):
                raise ValueError(f"bad endpoint {item!r}: {host!r} is not an IP or hostname") from None
    try:
        port = parse_port(port_text, allow_zero=False)
    except ValueError as e:
        raise ValueError(f"bad endpoint {item!r}: {e}") from None
    return EndpointSpec(host, port)


def parse_rendezvous_url(value: str) -> str:
    """An http/https/ws/wss URL with a host; returned unchanged (the client adds /v1/ws)."""
    value = value.strip()
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"bad URL {value!r}: {e}") from None
    if url.scheme.lower() not in RENDEZVOUS_SCHEMES:
        raise ValueError(f"bad URL {value!r}: scheme must be one of {', '.join(RENDEZVOUS_SCHEMES)}")
    if not url.hostname:
        raise ValueError(f"bad URL {value!r}: no host")
    if any(c.isspace() for c in value):
        raise ValueError(f"bad URL {value!r}: contains whitespace")
    return value


def parse_token(value: str) -> str:
    if not _TOKEN_RE.match(value):
        raise ValueError("bad token: expected the printable text `overlay-relay token create` printed")
    return value


def parse_server_key(value: str) -> bytes:
    """A rendezvous server key as `overlay-relay server-key` prints it (base64, 32 bytes)."""
    return _parse_key(value.strip(), "server key")


def parse_node_name(value: str) -> str:
    if not value or len(value) > MAX_NODE_NAME or not value.isprintable():
        raise ValueError(f"bad name {value!r}: 1-{MAX_NODE_NAME} printable characters")
    return value


def parse_relay_url(value: str) -> str:
    """`turn:host[:port][?transport=udp|tcp]` or `turns:host[:port]`; returned unchanged."""
    parsed = parse_turn_url(value)
    if parsed is None or parsed[0] == "stun":
        raise ValueError(f"bad relay {value!r}: expected turn:HOST[:PORT][?transport=udp|tcp] "
                         "or turns:HOST[:PORT]")
    return value


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.section: str | None = None
        self.interface_line: int | None = None
        self.private_key: bytes | None = None
        self.private_key_line = 0
        self.listen_port: int | None = None
        self.addresses: list[IPInterface] = []
        self.mtu: int | None = None
        self.mtu_line = 0
        self.peers: list[PeerConfig] = []
        self.peer_lines: list[int] = []  # line of each peer's [Peer] header
        self.peer_key_lines: list[int | None] = []  # line of each peer's PublicKey
        self.rendezvous_line: int | None = None
        self.rendezvous: dict[str, str] = {}  # lower-case key -> value
        self.rendezvous_key_lines: dict[str, int] = {}
        self.rendezvous_server_key: bytes | None = None
        self.relays: list[str] = []

    def error(self, line: int | None, message: str) -> ConfigError:
        return ConfigError(self.source, line, message)

    def feed(self, lineno: int, raw: str) -> None:
        text = raw.split("#", 1)[0].strip()
        if not text:
            return
        if text.startswith("["):
            if not text.endswith("]"):
                raise self.error(lineno, f"bad section header {text!r}")
            name = text[1:-1].strip().lower()
            if name == "interface":
                if self.interface_line is not None:
                    raise self.error(
                        lineno, f"second [Interface] section (first at line {self.interface_line})"
                    )
                self.interface_line = lineno
            elif name == "peer":
                self.peers.append(PeerConfig(public_key=b""))
                self.peer_lines.append(lineno)
                self.peer_key_lines.append(None)
            elif name == "rendezvous":
                if self.rendezvous_line is not None:
                    raise self.error(
                        lineno, f"second [Rendezvous] section (first at line {self.rendezvous_line})"
                    )
                self.rendezvous_line = lineno
            else:
                raise self.error(lineno, f"unknown section [{text[1:-1].strip()}]")
            self.section = name
            return
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise self.error(lineno, f"expected 'Key = Value', got {text!r}")
        if self.section is None:
            raise self.error(lineno, f"{key} outside of a section; add [Interface] or [Peer] first")
        try:
            if self.section == "interface":
                self.interface_key(lineno, key, value)
            elif self.section == "rendezvous":
                self.rendezvous_key(lineno, key, value)
            else:
                self.peer_key(lineno, key, value)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise self.error(lineno, f"{key}: {e}") from None

    def interface_key(self, lineno: int, key: str, value: str) -> None:
        k = key.lower()
        if k == "privatekey":
            if self.private_key is not None:
                raise self.error(
                    lineno, f"second PrivateKey (first at line {self.private_key_line})"
                )
            self.private_key = _parse_key(value, "private key")
            self.private_key_line = lineno
        elif k == "listenport":
            self.listen_port = parse_port(value, allow_zero=True)
        elif k == "address":
            self.addresses.extend(_parse_address(item) for item in _split_list(value))
        elif k == "mtu":
            self.mtu = _parse_int(value, "MTU", MIN_MTU_IPV4, MAX_MTU)
            self.mtu_line = lineno
        elif k == "relay":
            self.add_relays(value)
        elif k in IGNORED_INTERFACE_KEYS:
            pass  # host setup done by wg-quick; not ours to do
        else:
            raise self.error(lineno, f"unknown key {key!r} in [Interface]")

    def rendezvous_key(self, lineno: int, key: str, value: str) -> None:
        k = key.lower()
        if k == "relay":  # several allowed, like Address
            self.add_relays(value)
            return
        parsers = {"url": parse_rendezvous_url, "token": parse_token, "name": parse_node_name}
        if k not in parsers and k != "serverkey":
            raise self.error(lineno, f"unknown key {key!r} in [Rendezvous] (known: URL, Token, Name, ServerKey, Relay)")
        if k in self.rendezvous_key_lines:
            raise self.error(lineno, f"second {key} in [Rendezvous] (first at line {self.rendezvous_key_lines[k]})")
        if k == "serverkey":
            self.rendezvous_server_key = parse_server_key(value)
        else:
            self.rendezvous[k] = parsers[k](value)
        self.rendezvous_key_lines[k] = lineno

    def add_relays(self, value: str) -> None:
        items = _split_list(value)
        if not items:
            raise ValueError("empty relay")
        for item in items:
            url = parse_relay_url(item)
            if url not in self.relays:
                self.relays.append(url)

    def peer_key(self, lineno: int, key: str, value: str) -> None:
        peer = self.peers[-1]
        k = key.lower()
        if k == "publickey":
            if self.peer_key_lines[-1] is not None:
                raise self.error(
                    lineno,
                    f"second PublicKey in one [Peer] section (first at line "
                    f"{self.peer_key_lines[-1]}); missing a [Peer] header?",
                )
            peer.public_key = _parse_key(value, "public key")
            self.peer_key_lines[-1] = lineno
            for other, other_line in zip(self.peers[:-1], self.peer_key_lines[:-1]):
                if keys.keys_equal(other.public_key, peer.public_key):
                    raise self.error(
                        lineno, f"duplicate peer: this PublicKey is already used at line {other_line}"
                    )
        elif k == "presharedkey":
            peer.preshared_key = _parse_key(value, "preshared key")
        elif k == "allowedips":
            peer.allowed_ips.extend(parse_cidr(item) for item in _split_list(value))
        elif k == "endpoint":
            items = _split_list(value)
            if not items:
                raise ValueError("empty endpoint")
            peer.endpoints.extend(parse_endpoint(item) for item in items)
        elif k == "persistentkeepalive":
            peer.persistent_keepalive = (
                0 if value.lower() == "off" else _parse_int(value, "keepalive", 0, 65535)
            )
        else:
            raise self.error(lineno, f"unknown key {key!r} in [Peer]")

    def finish(self) -> InterfaceConfig:
        if self.interface_line is None:
            raise self.error(None, "no [Interface] section")
        if self.private_key is None:
            raise self.error(self.interface_line, "[Interface] has no PrivateKey")
        own_public = keys.public_key(self.private_key)
        for peer, header_line, key_line in zip(self.peers, self.peer_lines, self.peer_key_lines):
            if key_line is None:
                raise self.error(header_line, "[Peer] has no PublicKey")
            if keys.keys_equal(peer.public_key, own_public):
                raise self.error(key_line, "peer PublicKey is this interface's own public key")
        if self.mtu is not None and self.mtu < MIN_MTU_IPV6:
            if any(a.version == 6 for a in self.addresses):
                raise self.error(
                    self.mtu_line, f"MTU {self.mtu} is below {MIN_MTU_IPV6}, the IPv6 minimum"
                )
        rendezvous = None
        if self.rendezvous_line is not None:
            if "url" not in self.rendezvous:
                raise self.error(self.rendezvous_line, "[Rendezvous] has no URL")
            rendezvous = RendezvousConfig(
                url=self.rendezvous["url"],
                token=self.rendezvous.get("token"),
                name=self.rendezvous.get("name"),
                server_key=self.rendezvous_server_key,
            )
        return InterfaceConfig(
            private_key=self.private_key,
            listen_port=self.listen_port,
            addresses=self.addresses,
            mtu=self.mtu,
            peers=self.peers,
            source=self.source,
            rendezvous=rendezvous,
            relays=self.relays,
        )


def parse_config(text: str, source: str = "<memory>") -> InterfaceConfig:
    """Parse wg-quick style text; raises ConfigError naming `source:line`."""
    parser = _Parser(source)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        parser.feed(lineno, raw)
    return parser.finish()


def load_config(path: str) -> InterfaceConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, line, "not valid UTF-8 text") from None
    return parse_config(text, source=path)


def format_endpoint(ep: Endpoint | EndpointSpec) -> str:
    host, port = (ep.host, ep.port) if isinstance(ep, EndpointSpec) else ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(config: InterfaceConfig) -> str:
    """Write a config back in the file format (used by the demo and tests)."""
    lines = ["[Interface]", f"PrivateKey = {keys.encode(config.private_key)}"]
    if config.listen_port is not None:
        lines.append(f"ListenPort = {config.listen_port}")
    if config.addresses:
        lines.append("Address = " + ", ".join(str(a) for a in config.addresses))
    if config.mtu is not None:
        lines.append(f"MTU = {config.mtu}")
    lines += [f"Relay = {url}" for url in config.relays]
    if config.rendezvous is not None:
        lines += ["", "[Rendezvous]", f"URL = {config.rendezvous.url}"]
        if config.rendezvous.name is not None:
            lines.append(f"Name = {config.rendezvous.name}")
        if config.rendezvous.token is not None:
            lines.append(f"Token = {config.rendezvous.token}")
        if config.rendezvous.server_key is not None:
            lines.append(f"ServerKey = {keys.encode(config.rendezvous.server_key)}")
    for peer in config.peers:
        lines += ["", "[Peer]", f"PublicKey = {keys.encode(peer.public_key)}"]
        if peer.preshared_key is not None:
            lines.append(f"PresharedKey = {keys.encode(peer.preshared_key)}")
        if peer.allowed_ips:
            lines.append("AllowedIPs = " + ", ".join(str(n) for n in peer.allowed_ips))
        if peer.endpoints:
            lines.append("Endpoint = " + ", ".join(format_endpoint(e) for e in peer.endpoints))
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Endpoint resolution: a hostname stands for all of its A and AAAA records.
# ---------------------------------------------------------------------------

Resolver = Callable[..., list]


def resolve_endpoint_spec(spec: EndpointSpec, resolve: Resolver = socket.getaddrinfo) -> list[Endpoint]:
    """All (ip, port) a spec stands for; raises OSError if a hostname fails."""
    try:
        ip = ipaddress.ip_address(spec.host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return [(spec.host if "%" in spec.host else str(ip), spec.port)]
    out: list[Endpoint] = []
    for family, _type, _proto, _name, sockaddr in resolve(
        spec.host, spec.port, type=socket.SOCK_DGRAM
    ):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ep = (str(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])), spec.port)
        if ep not in out:
            out.append(ep)
    return out


def resolve_endpoints_detailed(
    peer: PeerConfig, resolve: Resolver = socket.getaddrinfo
) -> tuple[list[Endpoint], list[tuple[EndpointSpec, str]]]:
    """Resolve every Endpoint of a peer: (endpoints, [(spec, why it failed)])."""
    endpoints: list[Endpoint] = []
    failures: list[tuple[EndpointSpec, str]] = []
    for spec in peer.endpoints:
        try:
            found = resolve_endpoint_spec(spec, resolve)
        except (OSError, UnicodeError) as e:
            failures.append((spec, getattr(e, "strerror", None) or str(e)))
            continue
        if not found:
            failures.append((spec, "no A or AAAA record"))
        for ep in found:
            if ep not in endpoints:
                endpoints.append(ep)
    return endpoints, failures


def resolve_endpoints(peer: PeerConfig, resolve: Resolver = socket.getaddrinfo) -> list[Endpoint]:
    """All (ip, port) the peer's Endpoint entries stand for, in file order.

    A hostname that does not resolve contributes nothing here; callers that
    must report it use `resolve_endpoints_detailed`.
    """
    return resolve_endpoints_detailed(peer, resolve)[0]


def has_hostnames(peer: PeerConfig) -> bool:
    for spec in peer.endpoints:
        try:
            ipaddress.ip_address(spec.host.split("%", 1)[0])
        except ValueError:
            return True
    return False
