"""SQLite store for the rendezvous: networks, join tokens (hashed) and nodes.

stdlib sqlite3 in WAL mode, so the operator CLI (`overlay-relay node remove`, ...)
can write while the server runs; the server notices through `data_version()`.
Address plan: network n (1-based) gets 100.64.0.0/10's n-th /24 and a random ULA
/64 (fdXX:XXXX:XXXX::/48, subnet 0); a node's host number is the same in both.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS networks (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    ipv4_prefix TEXT NOT NULL,
    ipv6_prefix TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    uses_left INTEGER,            -- NULL: unlimited
    expires REAL,                 -- NULL: never
    revoked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY,
    network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    public_key TEXT NOT NULL,
    name TEXT NOT NULL,
    host INTEGER NOT NULL,
    ipv4 TEXT NOT NULL,
    ipv6 TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL,
    UNIQUE (network_id, public_key),
    UNIQUE (network_id, host)
);
"""

IPV4_POOL = ipaddress.IPv4Network("100.64.0.0/10")
MAX_HOSTS = 254


class JoinError(Exception):
    """Why a join was refused (safe to show to the client)."""


class StoreError(Exception):
    """An operator request that cannot be done (unknown node, token, network)."""


@dataclass(frozen=True)
class Network:
    id: int
    name: str
    ipv4_prefix: str
    ipv6_prefix: str


@dataclass(frozen=True)
class Node:
    id: int
    network_id: int
    network: str
    public_key: str
    name: str
    ipv4: str
    ipv6: str
    created: float
    last_seen: float | None


@dataclass(frozen=True)
class TokenInfo:
    id: str
    network: str
    uses_left: int | None
    expires: float | None
    revoked: bool
    created: float


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes whenever another connection (the operator CLI) commits."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # -- networks --------------------------------------------------------------------------
    def network(self, name: str) -> Network | None:
        row = self.db.execute("SELECT * FROM networks WHERE name = ?", (name,)).fetchone()
        return None if row is None else Network(row["id"], row["name"], row["ipv4_prefix"], row["ipv6_prefix"])

    def ensure_network(self, name: str) -> Network:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise StoreError(f"network name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        existing = self.network(name)
        if existing:
            return existing
        self.db.execute("BEGIN IMMEDIATE")
        try:
            count = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM networks").fetchone()[0]
            index = count  # 0-based /24 index inside 100.64.0.0/10
            if index >= 2 ** (24 - 10):
                raise StoreError("no IPv4 prefixes left in 100.64.0.0/10")
            v4 = ipaddress.IPv4Network((int(IPV4_POOL.network_address) + index * 256, 24))
            global_id = secrets.token_bytes(5)
            v6 = ipaddress.IPv6Network((b"\xfd" + global_id + b"\0" * 10, 64))
            self.db.execute(
                "INSERT INTO networks (id, name, ipv4_prefix, ipv6_prefix, created) VALUES (?, ?, ?, ?, ?)",
                (index + 1, name, str(v4), str(v6), time.time()),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.network(name)  # type: ignore[return-value]

    def networks(self) -> list[Network]:
        rows = self.db.execute("SELECT * FROM networks ORDER BY id").fetchall()
        return [Network(r["id"], r["name"], r["ipv4_prefix"], r["ipv6_prefix"]) for r in rows]

    # -- tokens ------------------------------------------------------------------------------
    def create_token(self, network: str, uses: int | None = 1, expires: float | None = None) -> tuple[str, str]:
        """Returns (token text shown once, token id). Only a hash of the secret part is kept."""
        if uses is not None and uses < 1:
            raise StoreError("--uses must be at least 1")
        net = self.ensure_network(network)
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        self.db.execute(
            "INSERT INTO tokens (id, hash, network_id, uses_left, expires, created) VALUES (?, ?, ?, ?, ?, ?)",
            (token_id, _hash_secret(secret), net.id, uses, expires, time.time()),
        )
        return f"{token_id}.{secret}", token_id

    def tokens(self) -> list[TokenInfo]:
        rows = self.db.execute(
            "SELECT t.*, n.name AS network FROM tokens t JOIN networks n ON n.id = t.network_id ORDER BY t.created"
        ).fetchall()
        return [TokenInfo(r["id"], r["network"], r["uses_left"], r["expires"], bool(r["revoked"]), r["created"]) for r in rows]

    def revoke_token(self, token_id: str) -> None:
        cur = self.db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))
        if cur.rowcount == 0:
            raise StoreError(f"no token with id {token_id!r}")

    # -- nodes -------------------------------------------------------------------------------
    def join(self, token: str, public_key: str, name: str, now: float) -> Node:
        """Spend one use of `token` to make `public_key` a member of the token's network."""
        token_id, _, secret = token.partition(".")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            # Compare a hash even for an unknown id so timing does not reveal which ids exist.
            expected = row["hash"] if row is not None else "0" * 64
            if not hmac.compare_digest(_hash_secret(secret), expected) or row is None:
                raise JoinError("invalid token")
            if row["revoked"]:
                raise JoinError("token revoked")
            if row["expires"] is not None and row["expires"] < now:
                raise JoinError("token expired")
            existing = self.db.execute(
                "SELECT id FROM nodes WHERE network_id = ? AND public_key = ?", (row["network_id"], public_key)
            ).fetchone()
            if existing is None:
                if row["uses_left"] is not None and row["uses_left"] <= 0:
                    raise JoinError("token used up")
                used = {r[0] for r in self.db.execute("SELECT host FROM nodes WHERE network_id = ?", (row["network_id"],))}
                host = next((h for h in range(1, MAX_HOSTS + 1) if h not in used), None)
                if host is None:
                    raise JoinError("network full")
                net = self.db.execute("SELECT * FROM networks WHERE id = ?", (row["network_id"],)).fetchone()
                v4 = ipaddress.IPv4Network(net["ipv4_prefix"]).network_address + host
                v6 = ipaddress.IPv6Network(net["ipv6_prefix"]).network_address + host
                self.db.execute(
                    "INSERT INTO nodes (network_id, public_key, name, host, ipv4, ipv6, created, last_seen)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row["network_id"], public_key, name, host, str(v4), str(v6), now, now),
                )
                if row["uses_left"] is not None:
                    self.db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        node = self._node_where("n.network_id = ? AND n.public_key = ?", (row["network_id"], public_key))
        return node[0]

    _NODE_SELECT = "SELECT n.*, w.name AS network FROM nodes n JOIN networks w ON w.id = n.network_id"

    def _node_where(self, where: str, args: tuple) -> list[Node]:
        rows = self.db.execute(f"{self._NODE_SELECT} WHERE {where} ORDER BY n.network_id, n.host", args).fetchall()
        return [
            Node(r["id"], r["network_id"], r["network"], r["public_key"], r["name"], r["ipv4"], r["ipv6"],
                 r["created"], r["last_seen"])
            for r in rows
        ]

    def memberships(self, public_key: str) -> list[Node]:
        return self._node_where("n.public_key = ?", (public_key,))

    def network_nodes(self, network_id: int) -> list[Node]:
        return self._node_where("n.network_id = ?", (network_id,))

    def nodes(self, network: str | None = None) -> list[Node]:
        if network is None:
            return self._node_where("1", ())
        return self._node_where("w.name = ?", (network,))

    def all_node_ids(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT id FROM nodes")}

    def remove_node(self, network: str, who: str) -> list[Node]:
        """Remove the node named or keyed `who` from `network` (all networks when network is '*')."""
        if network == "*":
            victims = self._node_where("n.public_key = ? OR n.name = ?", (who, who))
        else:
            victims = self._node_where("w.name = ? AND (n.public_key = ? OR n.name = ?)", (network, who, who))
        if not victims:
            raise StoreError(f"no node {who!r} in network {network!r}")
        self.db.executemany("DELETE FROM nodes WHERE id = ?", [(v.id,) for v in victims])
        return victims

    def touch(self, node_ids: list[int], now: float) -> None:
        self.db.executemany("UPDATE nodes SET last_seen = ? WHERE id = ?", [(now, i) for i in node_ids])
