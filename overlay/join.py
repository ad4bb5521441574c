"""`overlay join URL --token TOKEN [--name NAME] FILE`: become a member of a network.

Joining spends one use of a token the relay's operator handed out, so the order
of the steps matters: everything that can fail locally (a bad argument, an
unreadable or conflicting FILE, a directory we cannot write to) is checked
*before* the token is sent, and FILE is replaced in a single rename after the
relay has answered. A failed join leaves FILE exactly as it was.

The written file is an ordinary config: `[Interface]` with the private key and
the overlay addresses the relay assigned, `[Rendezvous]` with the URL, the
node name and the server's key. The token is not written: it is spent, and from
now on the key alone logs in.

The server key is pinned like an SSH host key: `--server-key` (what
`overlay-relay server-key` printed) checks it before the token is sent, and
otherwise the key the server proved at this join is written as `ServerKey`, so
every later login by `overlay up` refuses an impostor. Re-joining a file that
already pins a key for the same URL checks against that key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass

import aiohttp

from overlay import keys
from overlay.config import (
    ConfigError,
    InterfaceConfig,
    IPInterface,
    RendezvousConfig,
    load_config,
    parse_node_name,
    parse_rendezvous_url,
    parse_server_key,
    parse_token,
    render_config,
)
from overlay.rendezvous import Membership, RendezvousClient, RendezvousError

DEFAULT_TIMEOUT = 15.0  # seconds for the whole exchange with the relay


class JoinError(Exception):
    """A join that did not happen; the message is one line for the user."""


@dataclass
class JoinResult:
    path: str
    public_key: str  # base64; safe to print
    name: str
    memberships: list[Membership]
    addresses: list[IPInterface]
    key_reused: bool
    server_key: str | None = None  # base64 of the pinned rendezvous key; public


def same_rendezvous(a: str, b: str) -> bool:
    """Whether two URLs name the same rendezvous (http and ws are the same endpoint to the client)."""
    return _canonical_url(a) == _canonical_url(b)


def _canonical_url(url: str) -> tuple[str, str, int | None, str]:
    parts = urllib.parse.urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    port = parts.port or (443 if scheme == "wss" else 80)
    path = parts.path.rstrip("/")
    if path.endswith("/v1/ws"):
        path = path[: -len("/v1/ws")]
    return scheme, (parts.hostname or "").lower(), port, path


def membership_addresses(mship: Membership) -> list[IPInterface]:
    """The node's overlay addresses with the network's prefix lengths.

    With the network's prefix (e.g. 100.64.0.3/24) the kernel routes the whole
    overlay network into the tunnel: a packet for a member the agent has not
    heard of yet goes to the agent (which can drop it or ask the rendezvous)
    rather than out of the default route onto the physical network. Without a
    prefix from the relay, a host address (/32, /128) is the safe choice.
    """
    out: list[IPInterface] = []
    for ip, prefix, host_len in ((mship.ipv4, mship.ipv4_prefix, 32), (mship.ipv6, mship.ipv6_prefix, 128)):
        if not ip:
            continue
        address = ipaddress.ip_address(ip)
        length = host_len
        if prefix:
            network = ipaddress.ip_network(prefix, strict=False)
            if address in network:
                length = network.prefixlen
        out.append(ipaddress.ip_interface(f"{address}/{length}"))
    return out


def _load_existing(path: str, url: str, force: bool) -> InterfaceConfig | None:
    if not os.path.exists(path):
        return None
    try:
        config = load_config(path)
    except ConfigError as e:
        raise JoinError(f"{e} (fix or remove {path} first; its key would be lost)") from None
    old = config.rendezvous
    if old is not None and not same_rendezvous(old.url, url) and not force:
        raise JoinError(
            f"{path} already belongs to the rendezvous at {old.url}; "
            f"use --force to join {url} with the same key instead"
        )
    return config


def _new_config(existing: InterfaceConfig | None, private_key: bytes, path: str, url: str, name: str,
                memberships: list[Membership], server_key: bytes | None) -> InterfaceConfig:
    overlay_addresses = [a for m in memberships for a in membership_addresses(m)]
    rendezvous = RendezvousConfig(url=url, token=None, name=name, server_key=server_key)
    if existing is None:
        return InterfaceConfig(private_key=private_key, addresses=overlay_addresses, source=path,
                               rendezvous=rendezvous)
    # An address inside one of the overlay networks is an earlier assignment
    # from this rendezvous and is replaced; any other address is the user's own
    # (e.g. for static peers) and stays.
    kept = [a for a in existing.addresses
            if not any(a.version == o.version and a.ip in o.network for o in overlay_addresses)]
    # The user's own addresses stay first: the first address of a family is the
    # kernel's default source on the interface, and a setup that worked before
    # the join must keep working after it.
    existing.addresses = kept + overlay_addresses
    existing.rendezvous = rendezvous
    return existing


class _PendingFile:
    """A temp file beside the target: created before the token is spent (so an
    unwritable directory fails early), renamed over the target at the end."""

    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise JoinError(f"cannot write in {directory}: {e.strerror or e}") from None
        os.close(fd)  # mkstemp creates it 0600 already
        self.path = path

    def commit(self, text: str) -> None:
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, text.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise JoinError(f"joined, but cannot write {self.path}: {e.strerror or e}") from None

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _describe_refusal(e: RendezvousError, url: str) -> str:
    if e.code == "join_refused":
        return f"join refused by {url}: {e.message or 'token not accepted'} (ask the operator for a new token)"
    if e.code == "rate_limited":
        return f"{url} is rate limiting this address: too many attempts; wait a minute and try again"
    if e.code == "auth_failed":
        return f"{url} refused this key: {e.message}"
    if e.code == "server_key_mismatch":
        return f"{e.message} (the token was not sent)"
    if e.code == "server_auth_failed":
        return f"{url}: {e.message}"
    if e.code == "closed":
        return f"{url} closed the connection before answering: is it an overlay-relay rendezvous?"
    return f"unexpected answer from {url}: {e.code}: {e.message}"


async def _register(url: str, private_key: bytes, name: str, token: str, timeout: float,
                    server_key: bytes | None) -> tuple[list[Membership], bytes | None]:
    """The memberships after joining, and the server key the relay proved."""
    client = RendezvousClient(url, private_key, name=name, server_key=server_key)
    try:
        await asyncio.wait_for(client.connect(token=token, timeout=timeout), timeout)
        return sorted(client.memberships.values(), key=lambda m: m.network), client.server_key
    except RendezvousError as e:
        raise JoinError(_describe_refusal(e, url)) from None
    except aiohttp.WSServerHandshakeError as e:
        raise JoinError(f"{url} is not an overlay rendezvous (HTTP {e.status} on {client.url})") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise JoinError(f"cannot reach the rendezvous at {url}: no answer within {timeout:g} s") from None
    except aiohttp.ClientConnectorError as e:
        raise JoinError(f"cannot reach the rendezvous at {url}: {e.os_error.strerror or e.os_error}") from None
    except (aiohttp.ClientError, OSError) as e:
        raise JoinError(f"cannot reach the rendezvous at {url}: {e}") from None
    except (ValueError, KeyError) as e:  # a reply that is not the protocol
        raise JoinError(f"unexpected answer from {url}: {type(e).__name__}") from None
    finally:
        await client.close()


async def join(url: str, token: str, path: str, name: str | None = None, force: bool = False,
               timeout: float = DEFAULT_TIMEOUT, server_key: str | None = None) -> JoinResult:
    """Join the network `token` belongs to and write the config to `path`.

    `server_key` (base64) pins the relay's rendezvous key up front: a relay
    announcing another key is refused before the token is sent.
    Raises JoinError (path untouched) on any failure.
    """
    try:
        url = parse_rendezvous_url(url)
        token = parse_token(token.strip())
        name = parse_node_name(name if name is not None else socket.gethostname())
    except ValueError as e:
        raise JoinError(str(e)) from None
    try:
        pinned = parse_server_key(server_key) if server_key is not None else None
    except ValueError as e:
        raise JoinError(f"--server-key: {e}") from None
    existing = _load_existing(path, url, force)
    if pinned is None and existing is not None and existing.rendezvous is not None \
            and same_rendezvous(existing.rendezvous.url, url):
        pinned = existing.rendezvous.server_key  # keep trusting what this file trusted
    private_key = existing.private_key if existing is not None else keys.generate_private_key()
    pending = _PendingFile(path)
    try:
        memberships, proven_key = await _register(url, private_key, name, token, timeout, pinned)
        if not memberships:
            raise JoinError(f"{url} accepted the token but reported no network membership")
        config = _new_config(existing, private_key, path, url, name, memberships, proven_key)
        pending.commit(render_config(config))
    finally:
        pending.discard()
    return JoinResult(
        path=path,
        public_key=keys.encode(keys.public_key(private_key)),
        name=name,
        memberships=memberships,
        addresses=config.addresses,
        key_reused=existing is not None,
        server_key=keys.encode(proven_key) if proven_key is not None else None,
    )
