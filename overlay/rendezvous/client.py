"""Client for the overlay-relay rendezvous (protocol: relay_server/rendezvous.py docstring).

    client = RendezvousClient("http://relay:8080", wireguard_private_key, name="laptop")
    await client.connect(token="abcd1234.xyz")     # first time: join; later: connect() alone
    client.memberships["office"].ipv4               # own overlay addresses
    client.peers["office"]                          # public key -> Peer
    await client.publish_candidates([{"type": "srflx", "ip": "198.51.100.7", "port": 51820}])
    await client.request_connect("office", peer_key)
    event = await client.next_event()              # {"type": "connect" | "peer" | "peer_removed" | ...}
    client.turn                                     # TurnCredentials (REST), with the TURN URLs
    client.server_key                               # the server's X25519 key, proven by its welcome

Server authentication works like SSH host keys: with `server_key=` (32 bytes,
e.g. `[Rendezvous] ServerKey` written by `overlay join`) a server announcing any
other key is refused ("server_key_mismatch"); without it, the first key whose
proof checks out is recorded and pinned for the rest of this client's life
(reconnects included). Either way the welcome must carry a valid server proof,
and every frame from the welcome on a valid MAC under the per-login frame key:
a frame that fails it (injected by a man in the middle) ends the connection.

The peer map is kept up to date from the server's pushes; every push is also
queued as an event so an agent can react (start hole punching on "connect").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from overlay.stun.credentials import TurnCredentials

from . import proof


# Reconnect backoff: 1 s doubling, capped low. A relay restart takes seconds, and while the
# rendezvous is away our new candidates (a new relayed address after that very restart)
# reach nobody; a reconnect attempt costs one TCP handshake.
RECONNECT_MIN = 1.0
RECONNECT_MAX = 4.0
RECONNECT_JITTER = 0.2


class RendezvousError(Exception):
    """The server refused something; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Membership:
    network: str
    name: str
    ipv4: str
    ipv6: str
    ipv4_prefix: str | None = None
    ipv6_prefix: str | None = None


@dataclass
class Peer:
    public_key: str
    name: str
    ipv4: str
    ipv6: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    online: bool = False
    last_seen: float | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Peer":
        return cls(obj["public_key"], obj.get("name", ""), obj.get("ipv4", ""), obj.get("ipv6", ""),
                   list(obj.get("candidates") or []), bool(obj.get("online")), obj.get("last_seen"))


def _text(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _b64field(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    try:
        return base64.b64decode(value if isinstance(value, str) else "?", validate=True)
    except (binascii.Error, ValueError):
        raise RendezvousError("protocol", f"the server's {name} is not base64") from None


def _forged_frame() -> RendezvousError:
    return RendezvousError("server_auth_failed",
                           "a rendezvous frame failed its authentication (altered or injected on the path)")


def _turn(obj: dict[str, Any]) -> TurnCredentials:
    return TurnCredentials(obj["username"], obj["password"], int(obj["expires"]), tuple(obj.get("urls") or ()))


class RendezvousClient:
    def __init__(self, url: str, private_key: bytes, name: str = "", heartbeat: float = 20.0,
                 server_key: bytes | None = None) -> None:
        if len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        if server_key is not None and len(server_key) != 32:
            raise ValueError("server key must be 32 bytes")
        base = url.rstrip("/")
        if base.startswith("http"):
            base = "ws" + base[4:]
        self.url = base if base.endswith("/v1/ws") else base + "/v1/ws"
        self._private = private_key
        self.public_key = base64.b64encode(proof.public_key(private_key)).decode()
        self.name = name
        self.heartbeat = heartbeat
        # The pinned key (given, or learned at the first proven login) and the one last proven.
        self.expected_server_key = server_key
        self.server_key: bytes | None = None
        self.memberships: dict[str, Membership] = {}
        self.peers: dict[str, dict[str, Peer]] = {}
        self.turn: TurnCredentials | None = None
        self.close_code: int | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reconnect_at_once = False  # the next reconnect skips the backoff (reconnect_now)
        self._reader: asyncio.Task | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._candidates: list[dict[str, Any]] | None = None
        self._frame_key: bytes | None = None
        self._received = 0  # sequence number of the next authenticated frame

    def __repr__(self) -> str:  # never show the private key
        return f"RendezvousClient({self.url!r}, public_key={self.public_key!r})"

    # -- connection ---------------------------------------------------------------------------
    async def connect(self, token: str | None = None, timeout: float = 10.0) -> None:
        """Open the WebSocket, prove the key (joining with `token` if given), load the peer map."""
        # Bounded connect, unbounded session: the WebSocket itself lives as long as it is healthy.
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout,
                                                                         sock_connect=timeout))
        try:
            self._ws = await self._http.ws_connect(self.url, heartbeat=self.heartbeat, timeout=aiohttp.ClientWSTimeout(ws_close=timeout))
            challenge = await self._receive_json(timeout)
            if challenge.get("type") == "error":
                raise RendezvousError(challenge.get("code", "error"), challenge.get("message", ""))
            if challenge.get("type") != "challenge":
                raise RendezvousError("protocol", f"expected a challenge, got {challenge.get('type')!r}")
            nonce = _b64field(challenge, "challenge")
            server_key = _b64field(challenge, "server_key")
            self._check_server_key(server_key)
            frame_key = proof.frame_key(self._private, server_key, nonce)
            if frame_key is None:
                raise RendezvousError("protocol", "the server's key is not a usable X25519 key")
            answer = proof.answer(self._private, nonce, server_key)
            hello: dict[str, Any] = {"type": "hello", "public_key": self.public_key,
                                     "proof": base64.b64encode(answer).decode(), "name": self.name}
            if token is not None:
                hello["token"] = token
            await self._ws.send_str(json.dumps(hello))
            welcome = await self._receive_json(timeout)
            if welcome.get("type") == "error":
                raise RendezvousError(welcome.get("code", "error"), welcome.get("message", ""))
            if welcome.get("type") != "welcome":
                raise RendezvousError("protocol", f"expected a welcome, got {welcome.get('type')!r}")
            self._frame_key, self._received = frame_key, 0
            server_proof = welcome.get("server_proof")
            try:
                server_proof_raw = base64.b64decode(server_proof, validate=True) if isinstance(server_proof, str) else b""
            except (binascii.Error, ValueError):
                server_proof_raw = b""
            if not proof.verify_server(self._private, nonce, server_key, server_proof_raw) \
                    or not self._authentic(welcome):
                raise RendezvousError("server_auth_failed",
                                      "the rendezvous could not prove it holds the private key of the server key "
                                      f"it announced ({_text(server_key)}): refusing its peers")
            self.server_key = server_key
            if self.expected_server_key is None:
                self.expected_server_key = server_key  # trust on first use
            for mship in welcome.get("memberships", []):
                self.memberships[mship["network"]] = Membership(**mship)
                self.peers.setdefault(mship["network"], {})
            self.turn = _turn(welcome["turn"])
            # The peer lists follow the welcome, one message per network.
            for _ in range(len(self.memberships)):
                frame = await self._receive_json(timeout)
                if not self._authentic(frame):
                    raise _forged_frame()
                self._apply(frame)
        except BaseException:
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read_loop())

    def _check_server_key(self, seen: bytes) -> None:
        if len(seen) != 32:
            raise RendezvousError("protocol", "server_key must be 32 bytes")
        pinned = self.expected_server_key
        if pinned is not None and not hmac.compare_digest(pinned, seen):
            raise RendezvousError(
                "server_key_mismatch",
                f"rendezvous server key changed: expected {_text(pinned)}, the server at {self.url} "
                f"announced {_text(seen)}; refusing (a man in the middle, or the relay's key was replaced: "
                "if the operator confirms the new key, update ServerKey in the config)")

    async def keep_connected(self, token: str | None = None, min_delay: float = RECONNECT_MIN,
                             max_delay: float = RECONNECT_MAX, connected: asyncio.Event | None = None) -> None:
        """Stay connected: reconnect with exponential backoff after any drop (server restart,
        network change) and publish the last candidates again. Returns when the operator
        removed this node from every network; raises on a refused key or token."""
        delay = min_delay
        while True:
            try:
                await self.connect(token=token)
                token = None  # joined; from now on the key alone logs in
                delay = min_delay
                if self._candidates is not None:
                    await self.publish_candidates(self._candidates)
                if connected is not None:
                    connected.set()
                if self._reader is not None:
                    await asyncio.shield(self._reader)
                if self.close_code == 4004:
                    return
            except RendezvousError as exc:
                if exc.code in ("auth_failed", "join_refused", "server_key_mismatch", "server_auth_failed"):
                    raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                pass
            finally:
                if connected is not None:
                    connected.clear()
            await self.close()
            if self._reconnect_at_once:
                # We dropped the connection ourselves (our address went away): the server
                # is fine, and our new candidates should reach the peers now.
                self._reconnect_at_once = False
                continue
            # Jittered, so the nodes of a restarted relay do not all come back in step.
            await asyncio.sleep(delay * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER))
            delay = min(max_delay, delay * 2)

    async def reconnect_now(self) -> None:
        """Drop the connection and connect again without the backoff (keep_connected)."""
        self._reconnect_at_once = True
        if self._ws is not None:
            await self._ws.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def _receive_json(self, timeout: float) -> dict[str, Any]:
        assert self._ws is not None
        msg = await self._ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            self.close_code = self._ws.close_code
            raise RendezvousError("closed", f"connection closed ({self._ws.close_code})")
        obj = json.loads(msg.data)
        if not isinstance(obj, dict):
            raise RendezvousError("protocol", "server sent a non-object")
        return obj

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    obj = json.loads(msg.data)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict) or not self._authentic(obj):
                    # Not from the server that proved its key: someone on the path is
                    # injecting frames. Nothing of it is applied; reconnect afresh.
                    self._emit({"type": "error", "code": "server_auth_failed", "message": _forged_frame().message})
                    await self._ws.close()
                    break
                self._apply(obj)
        finally:
            self.close_code = self._ws.close_code
            closed = {"type": "closed", "code": self.close_code}
            for futures in self._waiters.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(RendezvousError("closed", f"connection closed ({self.close_code})"))
            self._waiters.clear()
            self._emit(closed)

    # -- incoming -------------------------------------------------------------------------------
    def _authentic(self, obj: dict[str, Any]) -> bool:
        """Check (and strip) the frame's MAC; every frame from the welcome on has one."""
        if self._frame_key is None or not proof.verify_frame(self._frame_key, self._received, obj):
            return False
        self._received += 1
        return True

    def _apply(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        network = obj.get("network")
        if kind == "peers":
            self.peers[network] = {p["public_key"]: Peer.from_json(p) for p in obj.get("peers", [])}
        elif kind == "peer" or kind == "connect":
            peer = Peer.from_json(obj["peer"])
            if peer.public_key != self.public_key:
                self.peers.setdefault(network, {})[peer.public_key] = peer
        elif kind == "peer_removed":
            self.peers.get(network, {}).pop(obj.get("public_key"), None)
        elif kind == "removed":
            self.memberships.pop(network, None)
            self.peers.pop(network, None)
        elif kind == "joined":
            mship = Membership(**obj["membership"])
            self.memberships[mship.network] = mship
        elif kind == "turn":
            self.turn = _turn(obj)
        waiters = self._waiters.get(kind or "")
        if waiters:
            fut = waiters.pop(0)
            if not fut.done():
                fut.set_result(obj)
        if kind == "error":
            for key in ("turn", "joined"):
                for fut in self._waiters.pop(key, []):
                    if not fut.done():
                        fut.set_exception(RendezvousError(obj.get("code", "error"), obj.get("message", "")))
        self._emit(obj)

    def _emit(self, obj: dict[str, Any]) -> None:
        self.events.put_nowait(obj)
        if self.on_event is not None:
            self.on_event(obj)

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """Next queued event matching `predicate` (others are discarded)."""
        async def scan() -> dict[str, Any]:
            while True:
                event = await self.events.get()
                if predicate(event):
                    return event
        return await asyncio.wait_for(scan(), timeout)

    # -- requests -------------------------------------------------------------------------------
    async def send(self, obj: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            raise RendezvousError("closed", "not connected")
        await self._ws.send_str(json.dumps(obj))

    async def _request(self, obj: dict[str, Any], reply: str, timeout: float) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(reply, []).append(fut)
        await self.send(obj)
        return await asyncio.wait_for(fut, timeout)

    async def publish_candidates(self, candidates: list[dict[str, Any]]) -> None:
        self._candidates = list(candidates)  # re-published after a reconnect
        await self.send({"type": "candidates", "candidates": candidates})

    async def request_connect(self, network: str, peer_key: str, request_id: Any = None) -> None:
        await self.send({"type": "connect", "network": network, "peer": peer_key, "id": request_id})

    async def refresh_turn(self, timeout: float = 10.0) -> TurnCredentials:
        return _turn(await self._request({"type": "turn"}, "turn", timeout))

    async def join(self, token: str, timeout: float = 10.0) -> Membership:
        """Join one more network while connected."""
        obj = await self._request({"type": "join", "token": token}, "joined", timeout)
        return Membership(**obj["membership"])
