"""The WireGuard cross-platform userspace API (UAPI): the protocol codec.

The stock `wg` tool talks to userspace implementations through
`/var/run/wireguard/IFACE.sock` with a line protocol: a request is
`get=1\\n\\n` or `set=1\\n` followed by `key=value` lines and an empty line;
every answer ends with `errno=N\\n\\n` (0 = success). Keys travel as lower-case
hex. This module is the codec: requests parsed and validated into a plan,
the plan applied to a Device, the device's state formatted. The socket that
carries it (server and client) is `overlay.control`.

Extension: `overlay status` needs more than `get` reports (every endpoint of a
peer and which one is active). It sends `overlay_status=1\\n\\n` on the same
socket — a request `wg` never sends — and gets one `json=...` line back before
the usual `errno=` (`status_dict` below is that document).

`set` is validated as a whole before anything is applied: a bad request
changes nothing and is answered `errno=22` (EINVAL).
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import time
from dataclasses import dataclass, field
from typing import Any

from overlay import keys, path_report
from overlay.wireguard import paths
from overlay.config import Endpoint, IPNetwork, format_endpoint, parse_cidr

STATUS_OP = "overlay_status=1"


class UapiError(Exception):
    """A request the device refuses; `errno` is what the client is told."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


def _invalid(message: str) -> UapiError:
    return UapiError(errno_mod.EINVAL, message)


# ---------------------------------------------------------------------------
# set: parse + validate into a plan, apply later
# ---------------------------------------------------------------------------


@dataclass
class PeerChange:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None
    preshared_key_set: bool = False
    # Each `endpoint=` line adds one; `wg` sends one, but several give a
    # multi-endpoint peer. None = no endpoint line (keep the current ones).
    endpoints: list[Endpoint] | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[IPNetwork] = field(default_factory=list)

    def __repr__(self) -> str:  # no key material in logs
        return f"PeerChange({keys.fingerprint(self.public_key)}, remove={self.remove})"


@dataclass
class SetRequest:
    private_key: bytes | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerChange] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"SetRequest(private_key={'set' if self.private_key else 'unchanged'}, "
            f"listen_port={self.listen_port}, replace_peers={self.replace_peers}, peers={self.peers})"
        )


def _hex_key(value: str, what: str) -> bytes:
    try:
        return keys.decode_hex(value)
    except keys.InvalidKey as e:
        raise _invalid(f"{what}: {e}") from None


def _uint(value: str, what: str, high: int) -> int:
    if not value.isdigit() or not value.isascii():
        raise _invalid(f"{what}: {value!r} is not a number")
    n = int(value)
    if n > high:
        raise _invalid(f"{what}: {n} is larger than {high}")
    return n


def _true(value: str, what: str) -> bool:
    if value != "true":
        raise _invalid(f"{what} only takes 'true', got {value!r}")
    return True


def parse_uapi_endpoint(value: str) -> Endpoint:
    """`1.2.3.4:5` or `[2001:db8::1]:5` (numeric only, as `wg` sends it)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep:
        raise _invalid(f"endpoint {value!r}: expected ip:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _invalid(f"endpoint {value!r}: {host!r} is not an IP address") from None
    if (ip.version == 6) != value.startswith("["):
        raise _invalid(f"endpoint {value!r}: IPv6 goes in brackets, IPv4 does not")
    p = _uint(port, "endpoint port", 65535)
    if p == 0:
        raise _invalid(f"endpoint {value!r}: port 0")
    return (str(ip), p)


def parse_set(lines: list[str]) -> SetRequest:
    """Validate the body of a `set=1` request (the lines after it) into a plan."""
    req = SetRequest()
    peer: PeerChange | None = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise _invalid("a line without '='")  # not echoed: it could hold key material
        if key == "public_key":
            peer = PeerChange(public_key=_hex_key(value, "public_key"))
            req.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                k = _hex_key(value, "private_key")
                if keys.is_zero(k):
                    raise _invalid("private_key: removing the private key is not supported")
                req.private_key = k
            elif key == "listen_port":
                req.listen_port = _uint(value, "listen_port", 65535)
            elif key == "fwmark":
                req.fwmark = _uint(value, "fwmark", 0xFFFFFFFF)
            elif key == "replace_peers":
                req.replace_peers = _true(value, key)
            else:
                raise _invalid(f"unknown device key {key!r}")
        elif key == "remove":
            peer.remove = _true(value, key)
        elif key == "update_only":
            peer.update_only = _true(value, key)
        elif key == "preshared_key":
            psk = _hex_key(value, "preshared_key")
            peer.preshared_key = None if keys.is_zero(psk) else psk  # zero = no PSK
            peer.preshared_key_set = True
        elif key == "endpoint":
            ep = parse_uapi_endpoint(value)
            if peer.endpoints is None:
                peer.endpoints = []
            if ep not in peer.endpoints:
                peer.endpoints.append(ep)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = _uint(value, key, 65535)
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _true(value, key)
        elif key == "allowed_ip":
            try:
                peer.allowed_ips.append(parse_cidr(value))
            except ValueError as e:
                raise _invalid(f"allowed_ip: {e}") from None
        elif key == "protocol_version":
            if value != "1":
                raise _invalid(f"protocol_version {value!r} is not supported (only 1)")
        else:
            raise _invalid(f"unknown peer key {key!r}")
    return req


def check_against_device(req: SetRequest, device: Any) -> None:
    """Checks that need the device's state (done before applying anything)."""
    private = req.private_key if req.private_key is not None else device.private_key
    own_public = keys.public_key(private) if private and not keys.is_zero(private) else None
    for change in req.peers:
        if not change.remove and own_public is not None and keys.keys_equal(change.public_key, own_public):
            raise _invalid("a peer cannot have the interface's own public key")


async def apply_set(agent: Any, req: SetRequest, now: float) -> None:
    """Apply a validated plan. The listen port goes first: it is the one step
    that can still fail (port in use), and then nothing else has changed."""
    device = agent.device
    if req.listen_port is not None and req.listen_port != agent.listen_port:
        try:
            await agent.set_listen_port(req.listen_port)
        except OSError as e:
            code = e.errno or errno_mod.EIO
            raise UapiError(code, f"listen_port {req.listen_port}: {e.strerror or e}") from None
    if req.private_key is not None:
        device.set_private_key(req.private_key, now)
    if req.replace_peers:
        device.remove_all_peers(now)
    for change in req.peers:
        exists = change.public_key in device.peers
        if change.remove:
            if exists:
                device.remove_peer(change.public_key, now)
            continue
        if change.update_only and not exists:
            continue
        kwargs: dict[str, Any] = {
            "endpoints": change.endpoints,
            "persistent_keepalive": change.persistent_keepalive,
            "replace_allowed_ips": change.replace_allowed_ips,
            "allowed_ips": list(change.allowed_ips)
            if (change.allowed_ips or change.replace_allowed_ips)
            else None,
        }
        if change.preshared_key_set:
            kwargs["preshared_key"] = change.preshared_key
        device.set_peer(change.public_key, now, **kwargs)
    agent.changed()


# ---------------------------------------------------------------------------
# get and the JSON status
# ---------------------------------------------------------------------------


def _direct(ep: Any) -> Endpoint | None:
    """A direct (ip, port) endpoint, or None for endpoint kinds UAPI cannot show."""
    if isinstance(ep, tuple) and len(ep) == 2 and isinstance(ep[0], str):
        return ep
    return None


def _shown_endpoint(peer: Any) -> Endpoint | None:
    """The endpoint `wg show` displays: the active one, else the first known."""
    for ep in [peer.active_endpoint, *peer.endpoints]:
        d = _direct(ep) if ep is not None else None
        if d is not None:
            return d
    return None


def _wall(agent: Any, t: float | None) -> float | None:
    return None if t is None else agent.monotonic_to_wall(t)


def format_get(agent: Any) -> str:
    device = agent.device
    out: list[str] = []
    if device.private_key and not keys.is_zero(device.private_key):
        out.append(f"private_key={keys.encode_hex(device.private_key)}")
    out.append(f"listen_port={agent.listen_port}")
    for peer in list(device.peers.values()):
        out.append(f"public_key={keys.encode_hex(peer.public_key)}")
        out.append(f"preshared_key={keys.encode_hex(peer.preshared_key or bytes(32))}")
        out.append("protocol_version=1")
        ep = _shown_endpoint(peer)
        if ep is not None:
            out.append(f"endpoint={format_endpoint(ep)}")
        wall = _wall(agent, peer.last_handshake)
        if wall is None:
            sec, nsec = 0, 0
        else:
            sec = int(wall)
            nsec = int(round((wall - sec) * 1e9))
            if nsec >= 1_000_000_000:
                sec, nsec = sec + 1, 0
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={nsec}")
        out.append(f"tx_bytes={peer.tx_bytes}")
        out.append(f"rx_bytes={peer.rx_bytes}")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        for net in peer.allowed_ips:
            out.append(f"allowed_ip={net}")
    return "".join(line + "\n" for line in out)


def status_dict(agent: Any) -> dict[str, Any]:
    """Everything `overlay status` shows; keys are base64 as `wg show` prints them."""
    device = agent.device
    traversal = getattr(agent, "traversal", None)
    now = time.monotonic()
    peers = []
    for peer in list(device.peers.values()):
        info = traversal.peer_info(peer.public_key) if traversal is not None else None
        listed = peer.endpoints
        if peer.active_endpoint is not None and peer.active_endpoint not in listed:
            listed = [peer.active_endpoint, *listed]
        peers.append(
            {
                "public_key": keys.encode(peer.public_key),
                "name": info[0] if info else None,
                "overlay_ips": info[1] if info else [str(n.network_address) for n in peer.allowed_ips
                                                     if n.prefixlen == n.max_prefixlen],
                "preshared_key": peer.preshared_key is not None,
                # The active path: "relay" when it goes through a TURN relay (ours or the peer's).
                "path": paths.path_of(peer),
                "endpoint": None if peer.active_endpoint is None else path_report.describe(peer.active_endpoint),
                # Round trip, loss, since when and why (path_report.py).
                **path_report.active_path(peer, agent.monotonic_to_wall),
                "endpoints": [
                    {
                        "endpoint": path_report.describe(e),
                        "kind": path_report.kind_of(peer, e),
                        "state": paths.endpoint_state(peer, e, now),
                        **path_report.endpoint_stats(peer, e),  # rtt_ms, loss, probes, lossy
                    }
                    for e in listed
                ],
                "configured_endpoints": [path_report.describe(e) for e in peer.configured_endpoints],
                "learned_endpoints": [path_report.describe(e) for e in peer.learned_endpoints],
                "active_endpoint": None
                if peer.active_endpoint is None
                else path_report.describe(peer.active_endpoint),
                "latest_handshake": _wall(agent, peer.last_handshake),
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "persistent_keepalive": peer.persistent_keepalive,
                "allowed_ips": [str(n) for n in peer.allowed_ips],
            }
        )
    has_key = device.private_key and not keys.is_zero(device.private_key)
    return {
        "interface": agent.ifname,
        "public_key": keys.encode(device.public_key) if has_key else None,
        "listen_port": agent.listen_port,
        "pid": os.getpid(),
        "peers": peers,
        # With a [Rendezvous] section: the connection, our published candidates, relays.
        "rendezvous": traversal.summary() if traversal is not None else None,
    }
