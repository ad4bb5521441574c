"""Rendezvous: who is in each network and where its members can be reached.

Wire protocol (version 1): one WebSocket at `GET /v1/ws`, JSON objects in text
frames, each with a "type". Keys are WireGuard public keys in standard base64.

1. Server -> node, at once:
       {"type": "challenge", "version": 1, "challenge": B64(32 random bytes), "server_key": B64(X25519 public)}
2. Node -> server, within 10 s:
       {"type": "hello", "public_key": B64, "proof": B64, "name": "laptop", "token": "<join token>" | absent}
   proof = HMAC-SHA256(SHA-256("overlay-rendezvous login v1" || X25519(node_priv, server_key)),
                       challenge || node public key || server_key)     (see overlay/rendezvous/proof.py)
   With "token", the node also joins the token's network (one use of the token; joining
   a network it is already in spends nothing). Without it, the key must already be a member.
3. Server -> node:
       {"type": "welcome", "public_key": B64, "server_proof": B64, "memberships": [MEMBERSHIP...], "turn": TURN}
   server_proof = HMAC-SHA256(same key as the node's proof,
                              challenge || node public key || server_key || "overlay-rendezvous server v1")
   Only the holder of the server's private key can compute it, so a node that pinned
   server_key (trust on first use, `[Rendezvous] ServerKey`) detects an impostor even
   over plain http; clients refuse a welcome without a valid server_proof. Every frame from
   the welcome on also carries "mac": HMAC-SHA256(SHA-256("overlay-rendezvous frames v1" ||
   shared || challenge), sequence number as 8 bytes big endian || the frame as JSON with sorted
   keys and no spaces, without "mac"); the welcome is number 0. A node drops the connection
   on a frame whose mac does not check, so a man in the middle can neither pose as the
   server nor inject frames into a real session. (Both added to version 1: older clients
   ignore the extra fields.)
       MEMBERSHIP = {"network", "name", "ipv4", "ipv6", "ipv4_prefix", "ipv6_prefix"}
   then, per network, {"type": "peers", "network": NAME, "peers": [PEER...]}
       PEER = {"public_key", "name", "ipv4", "ipv6", "candidates": [CANDIDATE...],
               "online": bool, "last_seen": unix seconds | null}
   or {"type": "error", "code": CODE, "message": text} and the socket closes (code 4001..4003).
4. After the welcome, node -> server:
       {"type": "candidates", "candidates": [CANDIDATE...]}     CANDIDATE = {"type": "host"|"srflx"|"relay"|"prflx",
                                                               "ip": IP, "port": 1-65535, ...extra scalar fields}
       {"type": "connect", "network": NAME, "peer": B64, "id": any}  -> both sides get
             {"type": "connect", "network": NAME, "peer": PEER (the other side), "initiator": B64, "id": any}
             at the same moment (the hole-punching trigger); an offline peer gives error "peer_offline".
       {"type": "turn"}                                        -> {"type": "turn", **TURN}
       {"type": "join", "token": "..."}                        -> {"type": "joined", "membership": MEMBERSHIP}
                                                                  + {"type": "peers", ...} for that network
       {"type": "ping"}                                        -> {"type": "pong"}
   TURN = {"username": "<expiry>:<id>", "password": B64, "expires": unix, "ttl": s, "urls": ["turn:..."]}
   (TURN REST credentials; they work on any TURN server sharing the secret, e.g. coturn's use-auth-secret.)
5. Server -> node, any time after the welcome:
       {"type": "peer", "network": NAME, "peer": PEER}                     a member joined, changed or came/went online
       {"type": "peer_removed", "network": NAME, "public_key": B64}       an operator removed a member
       {"type": "removed", "network": NAME}                               this node was removed from NAME;
                                                                          with no membership left the socket closes (4004)
       {"type": "error", "code": "bad_request" | "peer_offline" | "not_member" | "join_refused", "message": text}
   A member only ever hears about networks it belongs to. Malformed frames get a
   "bad_request" error; after 20 of them the socket is closed.

Error codes at login: "rate_limited" (4003, too many unauthenticated attempts from the source
IP), "auth_failed" (4001, bad proof or unknown key), "join_refused" (4002, token invalid,
revoked, expired or used up).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

from overlay.rendezvous import proof
from overlay.stun.credentials import make_rest_credentials

from .ratelimit import RateLimiter
from .store import JoinError, Node, Store

HELLO_TIMEOUT = 10.0
MAX_MESSAGE = 64 * 1024
MAX_CANDIDATES = 32
MAX_BAD_MESSAGES = 20
CANDIDATE_TYPES = {"host", "srflx", "relay", "prflx"}


class BadRequest(Exception):
    pass


@dataclass
class RendezvousSettings:
    server_private: bytes = field(repr=False)
    turn_secret: str = field(repr=False)
    turn_urls: list[str] = field(default_factory=list)
    credential_ttl: int = 86400
    rate_per_minute: int = 60
    rate_burst: int = 20
    poll_interval: float = 0.5


@dataclass(eq=False)
class Session:
    public_key: str
    name: str
    ws: web.WebSocketResponse
    memberships: dict[int, Node] = field(default_factory=dict)  # network id -> own node row
    source: str = "?"
    bad: int = 0
    # Per-login key for the "mac" on every frame from the welcome on (see proof.py),
    # and the sequence number of the next frame; the lock keeps numbers in wire order.
    frame_key: bytes | None = field(default=None, repr=False)
    sent: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def send(self, obj: dict[str, Any]) -> None:
        async with self.lock:
            if self.ws.closed:
                return
            if self.frame_key is not None:
                obj = {**obj, "mac": proof.frame_mac(self.frame_key, self.sent, obj)}
                self.sent += 1
            try:
                await self.ws.send_str(json.dumps(obj))
            except (ConnectionError, RuntimeError):
                pass


def _b64decode(value: Any, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise BadRequest(f"{what} must be {length} bytes")
    return raw


def validate_candidates(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise BadRequest(f"candidates must be a list of at most {MAX_CANDIDATES}")
    out = []
    for i, c in enumerate(value):
        if not isinstance(c, dict):
            raise BadRequest(f"candidate {i} is not an object")
        if c.get("type") not in CANDIDATE_TYPES:
            raise BadRequest(f"candidate {i}: type must be one of {sorted(CANDIDATE_TYPES)}")
        try:
            ip = ipaddress.ip_address(c.get("ip"))
        except ValueError:
            raise BadRequest(f"candidate {i}: ip is not an IP address") from None
        port = c.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise BadRequest(f"candidate {i}: port must be 1-65535")
        extra = {k: v for k, v in c.items() if k not in ("type", "ip", "port")}
        if len(extra) > 8 or any(not isinstance(v, (str, int, float, bool)) or len(str(v)) > 256 for v in extra.values()):
            raise BadRequest(f"candidate {i}: extra fields must be at most 8 short scalars")
        out.append({"type": c["type"], "ip": str(ip), "port": port, **extra})
    return out


def membership_json(node: Node, store: Store) -> dict[str, Any]:
    net = store.network(node.network)
    return {
        "network": node.network, "name": node.name, "ipv4": node.ipv4, "ipv6": node.ipv6,
        "ipv4_prefix": net.ipv4_prefix if net else None, "ipv6_prefix": net.ipv6_prefix if net else None,
    }


class Rendezvous:
    def __init__(self, store: Store, settings: RendezvousSettings, log: Callable[..., None]) -> None:
        self.store = store
        self.s = settings
        self.log = log
        self.server_public = proof.public_key(settings.server_private)
        self.sessions: dict[str, Session] = {}
        self.candidates: dict[str, list[dict[str, Any]]] = {}
        self.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
        self.auth_failures = 0
        self.joins = 0
        self._data_version = store.data_version()
        self._members: dict[int, Node] = {n.id: n for n in store.nodes()}
        self._poller: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._poller = asyncio.create_task(self._watch_store())

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        for s in list(self.sessions.values()):
            await s.ws.close(code=1001, message=b"server shutting down")

    def online_count(self) -> int:
        return len(self.sessions)

    # -- peers ----------------------------------------------------------------------------------
    def peer_json(self, node: Node) -> dict[str, Any]:
        online = node.public_key in self.sessions
        return {
            "public_key": node.public_key, "name": node.name, "ipv4": node.ipv4, "ipv6": node.ipv6,
            "candidates": self.candidates.get(node.public_key, []) if online else [],
            "online": online, "last_seen": time.time() if online else node.last_seen,
        }

    async def _broadcast_self(self, public_key: str, network_ids: list[int] | None = None) -> None:
        """Tell every co-member the current entry of `public_key`."""
        for node in self.store.memberships(public_key):
            if network_ids is not None and node.network_id not in network_ids:
                continue
            msg = {"type": "peer", "network": node.network, "peer": self.peer_json(node)}
            for other in self.sessions.values():
                if other.public_key != public_key and node.network_id in other.memberships:
                    await other.send(msg)

    async def _send_peers(self, session: Session, node: Node) -> None:
        peers = [self.peer_json(n) for n in self.store.network_nodes(node.network_id) if n.public_key != session.public_key]
        await session.send({"type": "peers", "network": node.network, "peers": peers})

    def turn_credentials(self, session: Session) -> dict[str, Any]:
        raw = base64.b64decode(session.public_key)
        creds = make_rest_credentials(self.s.turn_secret, raw.hex()[:16], self.s.credential_ttl, urls=tuple(self.s.turn_urls))
        return {"username": creds.username, "password": creds.password, "expires": creds.expires,
                "ttl": self.s.credential_ttl, "urls": list(creds.urls)}

    # -- WebSocket handler -----------------------------------------------------------------------
    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        ip = request.remote or "?"
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        if not self.limiter.allow(ip, time.monotonic()):
            await ws.send_str(json.dumps({"type": "error", "code": "rate_limited", "message": "too many attempts, slow down"}))
            await ws.close(code=4003, message=b"rate limited")
            self.log("rendezvous_rate_limited", source=ip)
            return ws
        challenge = os.urandom(proof.CHALLENGE_LEN)
        await ws.send_str(json.dumps({
            "type": "challenge", "version": 1,
            "challenge": base64.b64encode(challenge).decode(),
            "server_key": base64.b64encode(self.server_public).decode(),
        }))
        session = await self._login(ws, ip, challenge)
        if session is None:
            return ws
        try:
            await self._serve(session)
        finally:
            if self.sessions.get(session.public_key) is session:
                del self.sessions[session.public_key]
                self.candidates.pop(session.public_key, None)  # stale once the node is gone
                self.store.touch([n.id for n in session.memberships.values()], time.time())
                await self._broadcast_self(session.public_key)
                self.log("node_offline", node=session.public_key)
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str, close_code: int) -> None:
        await ws.send_str(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.close(code=close_code, message=code.encode())

    async def _login(self, ws: web.WebSocketResponse, ip: str, challenge: bytes) -> Session | None:
        try:
            msg = await ws.receive(timeout=HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            await self._refuse(ws, "bad_request", "no hello within 10 s", 4000)
            return None
        if msg.type != WSMsgType.TEXT:
            if not ws.closed:
                await self._refuse(ws, "bad_request", "expected a JSON hello in a text frame", 4000)
            return None
        try:
            hello = json.loads(msg.data)
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                raise BadRequest("first message must be a hello")
            node_pub = _b64decode(hello.get("public_key"), "public_key", 32)
            node_proof = _b64decode(hello.get("proof"), "proof", 32)
            name = hello.get("name") or ""
            if not isinstance(name, str) or len(name) > 64:
                raise BadRequest("name must be a string of at most 64 characters")
            token = hello.get("token")
            if token is not None and not isinstance(token, str):
                raise BadRequest("token must be a string")
        except (ValueError, BadRequest) as exc:
            await self._refuse(ws, "bad_request", str(exc), 4000)
            return None
        if not proof.verify(self.s.server_private, challenge, node_pub, node_proof):
            self.auth_failures += 1
            self.log("rendezvous_auth_failed", source=ip, reason="bad proof")
            await self._refuse(ws, "auth_failed", "key proof failed", 4001)
            return None
        key_text = base64.b64encode(node_pub).decode()
        name = name or key_text[:8]
        if token is not None:
            try:
                node = self.store.join(token, key_text, name, time.time())
            except JoinError as exc:
                self.auth_failures += 1
                self.log("rendezvous_join_refused", source=ip, reason=str(exc))
                await self._refuse(ws, "join_refused", str(exc), 4002)
                return None
            self.joins += 1
            self._members[node.id] = node
            self.log("node_joined", node=key_text, network=node.network, ipv4=node.ipv4)
        memberships = self.store.memberships(key_text)
        if not memberships:
            self.auth_failures += 1
            self.log("rendezvous_auth_failed", source=ip, reason="unknown key")
            await self._refuse(ws, "auth_failed", "this key is not a member of any network; join with a token", 4001)
            return None
        old = self.sessions.get(key_text)
        session = Session(key_text, name, ws, {n.network_id: n for n in memberships}, source=ip,
                          frame_key=proof.frame_key(self.s.server_private, node_pub, challenge))
        self.sessions[key_text] = session
        if old is not None:
            await old.ws.close(code=4005, message=b"replaced by a newer login")
        self.store.touch([n.id for n in memberships], time.time())
        self.log("node_online", node=key_text, source=ip, networks=[n.network for n in memberships])
        # verify() above succeeded, so node_pub gives a usable shared secret.
        server_proof = proof.server_answer(self.s.server_private, challenge, node_pub) or b""
        await session.send({
            "type": "welcome", "public_key": key_text,
            "server_proof": base64.b64encode(server_proof).decode(),
            "memberships": [membership_json(n, self.store) for n in memberships],
            "turn": self.turn_credentials(session),
        })
        for node in memberships:
            await self._send_peers(session, node)
        await self._broadcast_self(key_text)
        return session

    async def _serve(self, session: Session) -> None:
        ws = session.ws
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    obj = json.loads(msg.data)
                    if not isinstance(obj, dict):
                        raise BadRequest("message must be a JSON object")
                    await self._dispatch(session, obj)
                except (ValueError, BadRequest) as exc:
                    session.bad += 1
                    await session.send({"type": "error", "code": "bad_request", "message": str(exc)[:200]})
            elif msg.type == WSMsgType.BINARY:
                session.bad += 1
                await session.send({"type": "error", "code": "bad_request", "message": "binary frames are not used"})
            elif msg.type == WSMsgType.ERROR:
                break
            if session.bad >= MAX_BAD_MESSAGES:
                await ws.close(code=4000, message=b"too many bad messages")
                break

    async def _dispatch(self, session: Session, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "candidates":
            self.candidates[session.public_key] = validate_candidates(obj.get("candidates"))
            await self._broadcast_self(session.public_key)
        elif kind == "connect":
            await self._connect(session, obj)
        elif kind == "turn":
            await session.send({"type": "turn", **self.turn_credentials(session)})
        elif kind == "join":
            await self._join_more(session, obj)
        elif kind == "ping":
            await session.send({"type": "pong"})
        else:
            raise BadRequest(f"unknown message type {kind!r}")

    async def _connect(self, session: Session, obj: dict[str, Any]) -> None:
        network, peer_key = obj.get("network"), obj.get("peer")
        if not isinstance(network, str) or not isinstance(peer_key, str):
            raise BadRequest("connect needs network and peer")
        mine = next((n for n in session.memberships.values() if n.network == network), None)
        if mine is None:
            await session.send({"type": "error", "code": "not_member", "message": f"not a member of {network}"})
            return
        other = self.sessions.get(peer_key)
        theirs = other.memberships.get(mine.network_id) if other else None
        if other is None or theirs is None:
            # Same answer whether the key is unknown or offline: nothing leaks about other networks.
            await session.send({"type": "error", "code": "peer_offline", "message": "peer is not online in this network"})
            return
        request_id = obj.get("id")
        await asyncio.gather(
            session.send({"type": "connect", "network": network, "peer": self.peer_json(theirs),
                          "initiator": session.public_key, "id": request_id}),
            other.send({"type": "connect", "network": network, "peer": self.peer_json(mine),
                        "initiator": session.public_key, "id": request_id}),
        )

    async def _join_more(self, session: Session, obj: dict[str, Any]) -> None:
        token = obj.get("token")
        if not isinstance(token, str):
            raise BadRequest("join needs a token")
        if not self.limiter.allow(session.source, time.monotonic()):
            await session.send({"type": "error", "code": "rate_limited", "message": "too many attempts"})
            return
        try:
            node = self.store.join(token, session.public_key, session.name, time.time())
        except JoinError as exc:
            self.auth_failures += 1
            await session.send({"type": "error", "code": "join_refused", "message": str(exc)})
            return
        session.memberships[node.network_id] = node
        self._members[node.id] = node
        await session.send({"type": "joined", "membership": membership_json(node, self.store)})
        await self._send_peers(session, node)
        await self._broadcast_self(session.public_key, [node.network_id])

    # -- operator changes made in the database by another process -------------------------------
    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.s.poll_interval)
            try:
                version = self.store.data_version()
                if version != self._data_version:
                    self._data_version = version
                    await self._reconcile()
            except Exception as exc:  # keep watching; a locked database is retried next round
                self.log("store_watch_error", error=str(exc))

    async def _reconcile(self) -> None:
        current = {n.id: n for n in self.store.nodes()}
        removed = [n for nid, n in self._members.items() if nid not in current]
        self._members = current
        for node in removed:
            self.log("node_removed", node=node.public_key, network=node.network)
            own = self.sessions.get(node.public_key)
            if own is not None and node.network_id in own.memberships:
                del own.memberships[node.network_id]
                await own.send({"type": "removed", "network": node.network})
                if not own.memberships:
                    await own.ws.close(code=4004, message=b"removed by the operator")
            note = {"type": "peer_removed", "network": node.network, "public_key": node.public_key}
            for other in list(self.sessions.values()):
                if other.public_key != node.public_key and node.network_id in other.memberships:
                    await other.send(note)
