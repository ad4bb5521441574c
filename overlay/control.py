"""The agent's control socket: `/var/run/wireguard/IFACE.sock`.

The server speaks the WireGuard UAPI (`overlay.uapi` is the codec) so the
stock `wg show/showconf/set/setconf` work against a running agent, plus two
extension requests the stock `wg` never sends:

- `overlay_status=1`, answered with a JSON document that `overlay status` prints
  (all endpoints of each peer, which one is active, round trips and loss);
- `overlay_ping=1` with `public_key=HEX` and `timeout_ms=N` lines: one in-session
  probe to that peer on its active path, answered when its pong arrives (which
  endpoint answered, the round trip) or when the timeout passes (`overlay ping`).

A wireguard-go socket does not know these requests and closes the connection;
the client then reports "not an overlay agent".

The socket is created 0600 in a directory created 0700 (if we create it),
as wireguard-go does. The directory is one for the whole machine, shared by
all network namespaces, so interface names must be unique machine-wide.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import json
import os
import socket
import stat
import time
from typing import Any

import structlog

from overlay import keys, path_report
from overlay.wireguard import paths
from overlay.uapi import (
    STATUS_OP,
    UapiError,
    apply_set,
    check_against_device,
    format_get,
    parse_set,
    status_dict,
)

log = structlog.get_logger("overlay.control")

SOCKET_DIR = "/var/run/wireguard"
MAX_REQUEST_LINES = 100_000  # far beyond any real config; bounds memory per request
MAX_LINE = 4096
PING_OP = "overlay_ping=1"
PING_TIMEOUT_MAX_MS = 60_000


class UapiInUse(Exception):
    """Another live process already serves this interface's socket."""


def socket_path(ifname: str, socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"{ifname}.sock")


def socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_socket(path: str) -> socket.socket:
    """Bind the UAPI socket 0600 (directory 0700 if we create it).

    A socket file left by a crashed process (nobody accepts on it) is replaced;
    a live one means the interface name is taken, which is an error.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UapiInUse(f"{path} exists and is not a socket")
        if socket_is_live(path):
            raise UapiInUse(f"{path} is served by a running process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is created 0600, never wider
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class UapiServer:
    def __init__(self, agent: Any, ifname: str, socket_dir: str = SOCKET_DIR):
        self.agent = agent
        self.path = socket_path(ifname, socket_dir)
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._lock = asyncio.Lock()
        self._clients: set[asyncio.Task] = set()
        # Called with the public keys whose endpoints a `set` replaced, so the
        # CLI stops re-resolving their hostnames over what the user set.
        self.on_endpoints_set: Any = None

    async def start(self) -> None:
        sock = bind_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_LINE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await self._server.wait_closed()
            self._server = None
        # Remove the socket only if it is still ours (not a successor's).
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                op = await self._readline(reader)
                if op is None:
                    return
                if op == "get=1":
                    if await self._readline(reader) != "":
                        return  # malformed: wireguard-go also just hangs up
                    async with self._lock:
                        body = format_get(self.agent)
                    writer.write((body + "errno=0\n\n").encode())
                elif op == "set=1":
                    lines = await self._read_body(reader)
                    if lines is None:
                        return
                    code = await self._set(lines)
                    writer.write(f"errno={code}\n\n".encode())
                elif op == STATUS_OP:
                    if await self._readline(reader) != "":
                        return
                    doc = json.dumps(status_dict(self.agent), separators=(",", ":"))
                    writer.write(f"json={doc}\nerrno=0\n\n".encode())
                elif op == PING_OP:
                    lines = await self._read_body(reader)
                    if lines is None:
                        return
                    code, answer = await self._ping(lines)
                    body = f"json={json.dumps(answer, separators=(',', ':'))}\n" if answer is not None else ""
                    writer.write(f"{body}errno={code}\n\n".encode())
                else:
                    log.warning("uapi_unknown_operation")
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    @staticmethod
    async def _readline(reader: asyncio.StreamReader) -> str | None:
        raw = await reader.readline()
        if not raw:
            return None
        return raw.decode("utf-8", errors="replace").rstrip("\n")

    async def _read_body(self, reader: asyncio.StreamReader) -> list[str] | None:
        lines: list[str] = []
        while True:
            line = await self._readline(reader)
            if line is None:
                return None  # connection ended mid-request: apply nothing
            if line == "":
                return lines
            if len(lines) >= MAX_REQUEST_LINES:
                return None
            lines.append(line)

    async def _ping(self, lines: list[str]) -> tuple[int, dict[str, Any] | None]:
        """One probe on the peer's active path; the answer once its pong came back or
        the timeout passed. The lock is not held while waiting: a ping must never
        hold up `wg set`."""
        fields = dict(line.partition("=")[::2] for line in lines)
        try:
            key = keys.decode_hex(fields.get("public_key", ""))
            timeout_ms = int(fields.get("timeout_ms", "1000"))
        except (keys.InvalidKey, ValueError):
            return errno_mod.EINVAL, None
        if not 0 < timeout_ms <= PING_TIMEOUT_MAX_MS:
            return errno_mod.EINVAL, None
        peer = self.agent.device.peers.get(key)
        if peer is None:
            return errno_mod.ENOENT, None
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        def on_pong(source: Any, rtt: float) -> None:
            if not answered.done():
                answered.set_result((source, rtt))

        active = peer.active_endpoint
        async with self._lock:
            try:
                out = paths.ping(self.agent.device, peer, _now(self.agent), on_pong)
                self.agent.send_device_output(out)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the socket
                log.error("uapi_ping_failed", error=type(e).__name__, reason=str(e))
                return errno_mod.EIO, None
        if not out:
            # No active endpoint or no session yet: nothing can carry a probe.
            reason = "no endpoint" if active is None else "no session"
            return 0, {"reply": False, "reason": reason, "sent_to": None}
        sent_to = path_report.describe(active)
        try:
            source, rtt = await asyncio.wait_for(answered, timeout_ms / 1000)
        except (TimeoutError, asyncio.TimeoutError):
            return 0, {"reply": False, "reason": "timeout", "sent_to": sent_to,
                       "sent_path": paths.path_kind(peer, active)}
        return 0, {
            "reply": True,
            "sent_to": sent_to,
            "endpoint": path_report.describe(source),
            "path": paths.path_kind(peer, source),
            "kind": path_report.kind_of(peer, source),
            "rtt_ms": round(rtt * 1000, 3),
        }

    async def _set(self, lines: list[str]) -> int:
        async with self._lock:
            try:
                req = parse_set(lines)
                check_against_device(req, self.agent.device)
                await apply_set(self.agent, req, _now(self.agent))
            except UapiError as e:
                log.warning("uapi_set_refused", errno=e.errno, reason=str(e))
                return e.errno
            except Exception as e:  # noqa: BLE001 - a bug must not kill the socket
                log.error("uapi_set_failed", error=type(e).__name__, reason=str(e))
                return errno_mod.EIO
        changed = [c.public_key for c in req.peers if c.endpoints is not None]
        if changed and self.on_endpoints_set is not None:
            self.on_endpoints_set(changed)
        log.info("uapi_set_applied", request=repr(req))
        return 0


def _now(agent: Any) -> float:
    now = getattr(agent, "now", None)
    return now() if callable(now) else time.monotonic()


# ---------------------------------------------------------------------------
# Client (for `overlay status`)
# ---------------------------------------------------------------------------


class UapiClientError(Exception):
    pass


def request(path: str, text: str, timeout: float = 5.0) -> list[str]:
    """Send one request; return the answer's lines up to (not incl.) `errno=`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise UapiClientError(f"cannot connect to {path}: {e.strerror or e}") from None
        s.sendall(text.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            try:
                chunk = s.recv(65536)
            except OSError as e:
                raise UapiClientError(f"{path}: {e.strerror or e}") from None
            if not chunk:
                raise UapiClientError(f"{path}: connection closed without an answer")
            buf += chunk
    lines = buf.decode("utf-8", errors="replace").split("\n")[:-2]
    if not lines or not lines[-1].startswith("errno="):
        raise UapiClientError(f"{path}: answer without errno")
    code = lines[-1].partition("=")[2]
    if code != "0":
        raise UapiClientError(f"{path}: errno={code} ({os.strerror(int(code)) if code.isdigit() else '?'})")
    return lines[:-1]


def _extension_request(ifname: str, socket_dir: str, text: str, timeout: float, what: str) -> dict[str, Any]:
    """One request of ours (`what`: status, ping) and the JSON document it answers with."""
    path = socket_path(ifname, socket_dir)
    try:
        lines = request(path, text, timeout)
    except UapiClientError as e:
        if "closed without an answer" in str(e):
            raise UapiClientError(f"{ifname}: not an overlay agent (no {what} extension)") from None
        if f"errno={errno_mod.ENOENT}" in str(e):
            raise UapiClientError(f"{ifname}: the agent has no such peer") from None
        raise
    for line in lines:
        if line.startswith("json="):
            return json.loads(line[5:])
    raise UapiClientError(f"{path}: {what} answer without json")


def query_status(ifname: str, socket_dir: str = SOCKET_DIR, timeout: float = 5.0) -> dict[str, Any]:
    return _extension_request(ifname, socket_dir, STATUS_OP + "\n\n", timeout, "status")


def ping_once(ifname: str, public_key: bytes, timeout: float = 1.0,
              socket_dir: str = SOCKET_DIR) -> dict[str, Any]:
    """One `overlay_ping` exchange: the agent's answer (reply or not, path, round trip)."""
    text = f"{PING_OP}\npublic_key={keys.encode_hex(public_key)}\ntimeout_ms={max(1, round(timeout * 1000))}\n\n"
    # The socket waits a little longer than the agent does, so its timeout answer wins.
    return _extension_request(ifname, socket_dir, text, timeout + 5.0, "ping")


def list_interfaces(socket_dir: str = SOCKET_DIR) -> list[str]:
    try:
        names = os.listdir(socket_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if name.endswith(".sock") and stat.S_ISSOCK(os.lstat(os.path.join(socket_dir, name)).st_mode):
            out.append(name[: -len(".sock")])
    return out
