"""A rate-limited TCP stream through the tunnel that measures its own pauses.

Run inside the lab's namespaces (stdlib only, so the same file is the program):

    streams.py serve ADDR PORT              accept one connection; print "listening", then one JSON
                                            line: bytes, sha256, the receive-side gaps, any error
    streams.py send ADDR PORT RATE SECONDS  send random bytes at RATE bytes/s for SECONDS on one
                                            connection; print one JSON line: bytes, sha256, any error

A pause is the time between two consecutive reads that returned data on the
receiving side: what a user watching the transfer would see stall. Times are
CLOCK_MONOTONIC, which namespaces share, so the test can line a gap up with the
moment it cut or moved something. The sender never reconnects: a reset or a
timeout is reported as an error, not hidden by a retry.

From a test:

    stream = RateStream.start(src_node, dst_node, rate=2_500_000, seconds=25)
    ... break something ...
    result = stream.wait(timeout=120)   # StreamResult
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Gaps at least this long are listed one by one; shorter ones only count towards the longest.
REPORTED_GAP = 0.2
SOCKET_TIMEOUT = 60.0


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve(addr: str, port: int) -> int:
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("listening", flush=True)
    srv.settimeout(SOCKET_TIMEOUT)
    h = hashlib.sha256()
    n = 0
    first = last = None
    longest, longest_at = 0.0, None
    gaps: list[tuple[float, float]] = []
    error = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(SOCKET_TIMEOUT)
        while True:
            chunk = conn.recv(65536)
            now = time.monotonic()
            if not chunk:
                break
            if last is None:
                first = now
            else:
                gap = now - last
                if gap > longest:
                    longest, longest_at = gap, last
                if gap >= REPORTED_GAP:
                    gaps.append((round(last, 3), round(gap, 3)))
            last = now
            h.update(chunk)
            n += len(chunk)
    except OSError as exc:  # a reset or a 60 s stall: the user's transfer broke
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "first_at": first, "last_at": last,
                      "longest_gap": round(longest, 3), "longest_gap_at": longest_at, "gaps": gaps,
                      "error": error}), flush=True)
    return 1 if error else 0


def send(addr: str, port: int, rate: float, seconds: float) -> int:
    size = int(rate * seconds)
    h = hashlib.sha256()
    sent = 0
    error = None
    c = socket.socket(_family(addr), socket.SOCK_STREAM)
    try:
        c.settimeout(SOCKET_TIMEOUT)
        c.connect((addr, port))
        start = time.monotonic()
        block = 16384
        while sent < size:
            data = os.urandom(min(block, size - sent))
            c.sendall(data)
            h.update(data)
            sent += len(data)
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # the server closes once it has read everything
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        c.close()
    print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "error": error}), flush=True)
    return 1 if error else 0


# -- the test side ------------------------------------------------------------------------------


@dataclass
class StreamResult:
    sent: dict[str, Any]
    received: dict[str, Any]
    expected_bytes: int
    sender_log: str = ""
    receiver_log: str = ""

    @property
    def longest_gap(self) -> float:
        return float(self.received.get("longest_gap") or 0.0)

    @property
    def longest_gap_at(self) -> float | None:
        return self.received.get("longest_gap_at")

    @property
    def gaps(self) -> list[tuple[float, float]]:
        return [tuple(g) for g in self.received.get("gaps", [])]  # type: ignore[misc]

    def problems(self) -> list[str]:
        """Everything a user would call a broken transfer; empty when it went through intact."""
        out = []
        if self.sent.get("error"):
            out.append(f"sender: {self.sent['error']}")
        if self.received.get("error"):
            out.append(f"receiver: {self.received['error']}")
        if self.sent.get("bytes") != self.expected_bytes:
            out.append(f"sent {self.sent.get('bytes')} of {self.expected_bytes} bytes")
        if self.received.get("bytes") != self.sent.get("bytes"):
            out.append(f"received {self.received.get('bytes')} bytes, sent {self.sent.get('bytes')}")
        elif self.received.get("sha256") != self.sent.get("sha256"):
            out.append("checksums differ")
        return out

    def describe_gaps(self, since: float) -> str:
        """The reported gaps as "start+length" relative to `since` (a time.monotonic())."""
        return ", ".join(f"{at - since:+.2f}s:{gap:.2f}s" for at, gap in self.gaps) or "none"


@dataclass
class RateStream:
    """One connection src -> dst over the overlay, paced at `rate` bytes/s for `seconds`."""

    rate: float
    seconds: float
    server: subprocess.Popen
    sender: subprocess.Popen
    started_at: float
    extra: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, src: Any, dst: Any, rate: float, seconds: float, port: int = 5601,
              family: int = 4, processes: list[subprocess.Popen] | None = None) -> RateStream:
        """`src`/`dst` are scenario Nodes; both processes are added to `processes` (the scenario's
        extra_processes) so that a failing test still stops them."""
        addr = dst.overlay_ip(family)
        server = dst.host.ns.popen([sys.executable, __file__, "serve", addr, str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if processes is not None:
            processes.append(server)
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if line != "listening":
            server.kill()
            raise AssertionError(f"stream server on {addr} did not start: {line!r} {server.communicate()[1]}")
        sender = src.host.ns.popen([sys.executable, __file__, "send", addr, str(port), str(rate), str(seconds)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if processes is not None:
            processes.append(sender)
        return cls(rate, seconds, server, sender, time.monotonic(), processes or [])

    @property
    def expected_bytes(self) -> int:
        return int(self.rate * self.seconds)

    def running(self) -> bool:
        return self.sender.poll() is None

    def wait(self, timeout: float) -> StreamResult:
        """Both ends' reports; raises AssertionError when they are not done within `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            out_s, err_s = self.sender.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out_r, err_r = self.server.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"stream not finished {timeout:.0f} s after waiting began") from exc
        finally:
            for proc in (self.sender, self.server):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc in self.extra:
                    self.extra.remove(proc)
        return StreamResult(_last_json(out_s), _last_json(out_r), self.expected_bytes, err_s, err_r)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"no report (output {text[-300:]!r})"}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2], int(sys.argv[3])))
    sys.exit(send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])))
