"""A scriptable UDP endpoint run inside lab hosts, and its test-side handle.

Run as a script in a namespace it binds one UDP socket, reports every datagram
it receives as a JSON line on stdout and takes JSON commands on stdin:

    {"cmd": "send", "to": [ip, port], "data": "text"}
    {"cmd": "stun", "server": [ip, port], "id": n}  -> {"event": "mapped", "addr": [ip, port] | null, "id": n}
    {"cmd": "punch", "to": [ip, port], "duration": 3}
        both sides send "ping"s to each other's public mapping at once; each
        answers every ping with a "pong" to the source it actually sees and
        starts pinging that source too (a peer-reflexive address);
        -> {"event": "punch", "ok": <got a pong>, "pongs_from": [...], "pings_from": [...]}
    {"cmd": "tcp", "to": [ip, port]}             -> {"event": "tcp", "ok": bool, "error": str}
    {"cmd": "quit"}

Only the standard library is used, so the script runs anywhere. The STUN
binding request is the minimal RFC 8489 one (no attributes).
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

MAGIC = 0x2112A442


def stun_request(txid: bytes) -> bytes:
    return struct.pack("!HHI", 0x0001, 0, MAGIC) + txid


def stun_mapped_address(data: bytes, txid: bytes) -> tuple[str, int] | None:
    """The XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) of a binding success response."""
    if len(data) < 20:
        return None
    mtype, length, cookie = struct.unpack("!HHI", data[:8])
    if mtype != 0x0101 or cookie != MAGIC or data[8:20] != txid:
        return None
    pos, end, plain = 20, min(len(data), 20 + length), None
    while pos + 4 <= end:
        atype, alen = struct.unpack("!HH", data[pos:pos + 4])
        value = data[pos + 4:pos + 4 + alen]
        pos += 4 + (alen + 3) // 4 * 4
        if atype not in (0x0001, 0x0020) or len(value) < 8:
            continue
        family, port = value[1], struct.unpack("!H", value[2:4])[0]
        raw = value[4:8] if family == 1 else value[4:20]
        if atype == 0x0020:
            port ^= MAGIC >> 16
            mask = struct.pack("!I", MAGIC) + txid
            raw = bytes(b ^ mask[i] for i, b in enumerate(raw))
        addr = socket.inet_ntop(socket.AF_INET if family == 1 else socket.AF_INET6, raw)
        if atype == 0x0020:
            return addr, port
        plain = (addr, port)
    return plain


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _addr(a: Any) -> tuple[str, int]:
    return str(a[0]), int(a[1])


def _serve(bind: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    _emit({"event": "ready", "local": list(sock.getsockname()[:2])})
    stdin = sys.stdin.fileno()
    buf = b""
    stun: dict[str, Any] | None = None
    punch: dict[str, Any] | None = None
    while True:
        now = time.monotonic()
        deadlines = [d for d in (stun and stun["next"], punch and punch["next"]) if d]
        wait = max(0.0, min(deadlines) - now) if deadlines else 1.0
        readable, _, _ = select.select([sock, stdin], [], [], wait)
        now = time.monotonic()
        if sock in readable:
            try:
                data, src = sock.recvfrom(65535)
            except OSError as e:  # an ICMP error from an earlier send
                _emit({"event": "error", "error": str(e)})
                data, src = b"", None
            src = src and (src[0], src[1])
            if src and stun and (mapped := stun_mapped_address(data, stun["txid"])):
                _emit({"event": "mapped", "addr": list(mapped), "id": stun["id"]})
                stun = None
            elif src and punch and data.startswith(b"ping"):
                punch["pings_from"].add(src)
                punch["targets"].add(src)
                _send(sock, b"pong", src)
            elif src and punch and data.startswith(b"pong"):
                punch["pongs_from"].add(src)
            elif src:
                _emit({"event": "recv", "from": list(src), "data": data.decode(errors="replace")})
        if stdin in readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                kind = cmd["cmd"]
                if kind == "quit":
                    return
                if kind == "send":
                    _send(sock, cmd["data"].encode(), _addr(cmd["to"]))
                elif kind == "stun":
                    stun = {"txid": os.urandom(12), "server": _addr(cmd["server"]), "tries": 0, "next": now,
                            "id": cmd.get("id")}
                elif kind == "punch":
                    punch = {"targets": {_addr(cmd["to"])}, "end": now + float(cmd.get("duration", 3)),
                             "next": now, "pings_from": set(), "pongs_from": set(),
                             "interval": float(cmd.get("interval", 0.05))}
                elif kind == "tcp":
                    _emit(_tcp_check(_addr(cmd["to"])))
        if stun and now >= stun["next"]:
            if stun["tries"] >= 10:  # 3 s: generous on a loaded machine
                _emit({"event": "mapped", "addr": None, "id": stun["id"]})
                stun = None
            else:
                _send(sock, stun_request(stun["txid"]), stun["server"])
                stun["tries"] += 1
                stun["next"] = now + 0.3
        if punch and now >= punch["next"]:
            if now >= punch["end"]:
                _emit({"event": "punch", "ok": bool(punch["pongs_from"]),
                       "pongs_from": sorted(map(list, punch["pongs_from"])),
                       "pings_from": sorted(map(list, punch["pings_from"]))})
                punch = None
            else:
                for target in list(punch["targets"]):
                    _send(sock, b"ping", target)
                punch["next"] = now + punch["interval"]


def _send(sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
    try:
        sock.sendto(data, to)
    except OSError as e:  # unreachable network and the like: report, keep running
        _emit({"event": "error", "error": f"send to {to}: {e}"})


def _tcp_check(to: tuple[str, int]) -> dict[str, Any]:
    try:
        socket.create_connection(to, timeout=3).close()
        return {"event": "tcp", "ok": True, "error": ""}
    except OSError as e:
        return {"event": "tcp", "ok": False, "error": str(e)}


class UdpAgent:
    """Test-side handle on one agent process running in a namespace."""

    def __init__(self, ns: Any, port: int, bind: str = "0.0.0.0"):
        self.proc = ns.popen([sys.executable, __file__, bind, str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self._stun_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.wait("ready", timeout=15)
        if ready is None:
            self.close()
            raise RuntimeError(f"udp agent in {ns} did not start")
        self.local = tuple(ready["local"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put(json.loads(line))

    def command(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def send(self, to: tuple[str, int], data: str) -> None:
        self.command("send", to=list(to), data=data)

    def wait(self, event: str, timeout: float = 10, **match: Any) -> dict[str, Any] | None:
        """The first event of this kind (matching `match`) not consumed yet, or None."""
        for i, e in enumerate(self.history):
            if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                return self.history.pop(i)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                e = self._events.get(timeout=left)
            except queue.Empty:
                break
            if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                return e
            self.history.append(e)
        return None

    def received(self, data: str, timeout: float) -> dict[str, Any] | None:
        return self.wait("recv", timeout=timeout, data=data)

    def stun(self, server: tuple[str, int], timeout: float = 5) -> tuple[str, int] | None:
        self._stun_id += 1  # a late answer to an earlier query must not count for this one
        self.command("stun", server=list(server), id=self._stun_id)
        e = self.wait("mapped", timeout=timeout, id=self._stun_id)
        return tuple(e["addr"]) if e and e["addr"] else None  # type: ignore[return-value]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class AgentPool:
    """The UdpAgents one test starts (`pool(ns, port=None, bind=None)`), all closed by `close()`."""

    def __init__(self, ports, bind: str) -> None:
        self._ports = ports  # shared by a module's tests, so ports never repeat
        self._bind = bind
        self._started: list[UdpAgent] = []

    def __call__(self, ns, port: int | None = None, bind: str | None = None) -> UdpAgent:
        agent = UdpAgent(ns, port or next(self._ports), bind or self._bind)
        self._started.append(agent)
        return agent

    def close(self) -> None:
        for agent in self._started:
            agent.close()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
