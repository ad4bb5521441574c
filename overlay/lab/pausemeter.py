"""A paced TCP stream on one connection that records when its data arrives, to measure pauses.

What a user of a tunnel notices when a path dies is not the failover itself but
the stall of the connections inside it: TCP stops delivering until the tunnel
carries packets again and TCP's retransmission timer fires. This module measures
exactly that, on the receiving side: every `recv()` is timestamped, and every
gap between two arrivals is a pause.

    python -m overlay.lab.pausemeter receive ADDR PORT
        accept one connection, print JSON lines: listening, progress (every 0.5 s),
        and a final `done` with bytes, sha256 and the pauses (monotonic clock)
    python -m overlay.lab.pausemeter send ADDR PORT --rate-mbit 20 --seconds 20 [--bytes N] [--until-eof]
        send random bytes at that rate on one connection, never reconnecting; with
        --bytes also stop once N bytes went out, with --until-eof as soon as stdin
        is closed; print a `done` line

Both sides use CLOCK_MONOTONIC, which every network namespace of a machine
shares, so the times they report compare directly with `time.monotonic()` of
the process that drives the lab (the moment it cut a path, say).

From Python:

    stream = Stream(alice.ns, bob.ns, "100.64.0.2", rate_mbit=20, max_seconds=60).start()
    ... stream.received_bytes ...
    result = stream.stop()         # StreamResult: intact, longest, pauses, mbit ...

or, for a transfer of a fixed size that runs its course (`intact` then also
means every one of those bytes went out):

    stream = Stream(..., rate_mbit=20, max_seconds=120, size=60_000_000).start()
    result = stream.wait(timeout=150)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .netns import Namespace

# Gaps shorter than this are the stream's own pacing, not a pause worth listing.
PAUSE_FLOOR = 0.05
MAX_LISTED_PAUSES = 50
PROGRESS_EVERY = 0.5
CHUNK = 16384
IO_TIMEOUT = 60.0  # a stall longer than this is a broken connection, not a pause


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# -- the two ends (run inside namespaces) -----------------------------------------------------


def receive(addr: str, port: int, accept_timeout: float) -> int:
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    srv.settimeout(accept_timeout)
    _emit(event="listening")
    digest = hashlib.sha256()
    received = 0
    first = last = None
    pauses: list[tuple[float, float]] = []
    longest = (0.0, 0.0)
    error = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(IO_TIMEOUT)
        _emit(event="connected", t=time.monotonic())
        next_progress = time.monotonic() + PROGRESS_EVERY
        while True:
            chunk = conn.recv(65536)
            now = time.monotonic()
            if not chunk:
                break
            if last is not None:
                gap = now - last
                if gap > longest[1]:
                    longest = (last, gap)
                if gap >= PAUSE_FLOOR:
                    pauses.append((last, gap))
            else:
                first = now
            last = now
            received += len(chunk)
            digest.update(chunk)
            if now >= next_progress:
                _emit(event="progress", t=now, bytes=received)
                next_progress = now + PROGRESS_EVERY
        conn.close()  # tells the sender everything arrived
    except OSError as e:  # a reset, or a stall past IO_TIMEOUT
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    listed = sorted(sorted(pauses, key=lambda p: -p[1])[:MAX_LISTED_PAUSES])
    _emit(event="done", bytes=received, sha256=digest.hexdigest(), first=first, last=last,
          longest=list(longest) if last is not None else None, pauses=[list(p) for p in listed], error=error)
    return 0 if error is None else 1


def send(addr: str, port: int, rate_bytes: float, seconds: float, until_eof: bool,
         size: int | None = None) -> int:
    stop = threading.Event()
    if until_eof:
        def watch_stdin() -> None:
            sys.stdin.buffer.read()  # returns at EOF: whoever drives us closed the pipe or died
            stop.set()
        threading.Thread(target=watch_stdin, daemon=True).start()
    # One block of random bytes, sent over and over from a moving offset: the
    # checksum covers the stream as it went, and random data cannot be compressed away.
    pool = os.urandom(1 << 20)
    digest = hashlib.sha256()
    sent = 0
    error = None
    conn = None
    started = ended = None
    deadline = time.monotonic() + 30
    while conn is None:
        c = socket.socket(_family(addr), socket.SOCK_STREAM)
        c.settimeout(IO_TIMEOUT)
        try:
            c.connect((addr, port))
            conn = c
        except OSError as e:
            c.close()
            if time.monotonic() > deadline or stop.is_set():
                _emit(event="done", bytes=0, sha256=digest.hexdigest(), error=f"connect: {e}")
                return 1
            time.sleep(0.2)
    try:
        started = time.monotonic()
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= seconds or (size is not None and sent >= size):
                break
            # Paced on an absolute schedule: after a stall the backlog goes out at
            # once, as an application's queued writes would.
            ahead = sent / rate_bytes - elapsed
            if ahead > 0:
                stop.wait(min(ahead, 0.05))
                continue
            offset = sent % (len(pool) - CHUNK)
            data = pool[offset:offset + (CHUNK if size is None else min(CHUNK, size - sent))]
            conn.sendall(data)
            digest.update(data)
            sent += len(data)
        ended = time.monotonic()
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # returns when the receiver closed: every byte arrived
    except OSError as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        conn.close()
    _emit(event="done", bytes=sent, sha256=digest.hexdigest(), started=started, ended=ended, error=error)
    return 0 if error is None else 1


# -- driving both ends from the lab ---------------------------------------------------------


class StreamError(RuntimeError):
    """The stream could not be started, or one of its ends vanished without a result."""


@dataclass
class StreamResult:
    sent_bytes: int
    received_bytes: int
    sent_sha256: str
    received_sha256: str
    started: float | None  # monotonic time of the first byte sent
    ended: float | None  # monotonic time the sender stopped writing
    longest: tuple[float, float] | None  # (start, seconds) of the longest gap between two arrivals
    pauses: list[tuple[float, float]] = field(default_factory=list)  # every gap >= PAUSE_FLOOR, by start
    error: str | None = None
    size: int | None = None  # the bytes the sender was to send, when the stream had a fixed size

    def problems(self) -> list[str]:
        """What a user would call a broken transfer, in words; empty when it is `intact`."""
        out = [self.error] if self.error else []
        if self.sent_bytes == 0:
            out.append("nothing was sent")
        elif self.received_bytes != self.sent_bytes:
            out.append(f"received {self.received_bytes} of the {self.sent_bytes} bytes sent")
        elif self.received_sha256 != self.sent_sha256:
            out.append("checksums differ")
        if self.size is not None and self.sent_bytes != self.size:
            out.append(f"sent {self.sent_bytes} of the {self.size} bytes it was to send")
        return out

    @property
    def intact(self) -> bool:
        """The one connection carried every byte (all `size` of them, if set), unchanged, without a reset."""
        return not self.problems()

    @property
    def seconds(self) -> float:
        return (self.ended - self.started) if self.started is not None and self.ended is not None else 0.0

    @property
    def mbit(self) -> float:
        return self.received_bytes * 8 / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def longest_seconds(self) -> float:
        return self.longest[1] if self.longest else float("nan")

    def longest_within(self, start: float, end: float) -> tuple[float, float] | None:
        """The longest listed pause overlapping [start, end] (an event's window)."""
        hits = [p for p in self.pauses if p[0] <= end and p[0] + p[1] >= start]
        return max(hits, key=lambda p: p[1]) if hits else None

    def describe_pauses(self, since: float, at_least: float = PAUSE_FLOOR) -> str:
        """The listed pauses of `at_least` seconds as "start:length", start relative to `since`
        (a time.monotonic(), the moment something was cut, say)."""
        return ", ".join(f"{start - since:+.2f}s:{length:.2f}s" for start, length in self.pauses
                         if length >= at_least) or "none"

    def first_arrival_after(self, t: float) -> float | None:
        """When data arrived again after `t`, if `t` falls inside a listed pause (else None)."""
        for start, length in self.pauses:
            if start <= t <= start + length:
                return start + length
        return None


class Stream:
    """One paced TCP stream from `sender` to `receiver` (namespaces), recording arrivals.
    With `size`, the sender also stops after that many bytes (whichever of that and
    `max_seconds` comes first)."""

    def __init__(self, sender: Namespace, receiver: Namespace, addr: str, port: int = 5701,
                 rate_mbit: float = 20.0, max_seconds: float = 60.0, python: str = sys.executable,
                 size: int | None = None):
        self.sender_ns, self.receiver_ns = sender, receiver
        self.addr, self.port = addr, port
        self.rate_mbit, self.max_seconds, self.size = rate_mbit, max_seconds, size
        self.python = python
        self.received_bytes = 0
        self.last_progress: float | None = None
        self._receiver: subprocess.Popen | None = None
        self._sender: subprocess.Popen | None = None
        self._receiver_done: dict | None = None
        self._reader: threading.Thread | None = None

    def _argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "overlay.lab.pausemeter", *args]

    def start(self, timeout: float = 15.0) -> Stream:
        self._receiver = self.receiver_ns.popen(
            self._argv("receive", self.addr, str(self.port)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._receiver.stdout is not None
        first = self._receiver.stdout.readline()  # blocks until bound or dead
        if not first.strip() or json.loads(first).get("event") != "listening":
            err = self._receiver.stderr.read() if self._receiver.stderr else ""  # type: ignore[union-attr]
            self.kill()
            raise StreamError(f"stream receiver on {self.addr}:{self.port} did not start: {err.strip()[-400:]}")
        self._reader = threading.Thread(target=self._read_receiver, daemon=True)
        self._reader.start()
        self._sender = self.sender_ns.popen(
            self._argv("send", self.addr, str(self.port), "--rate-mbit", str(self.rate_mbit),
                       "--seconds", str(self.max_seconds), "--until-eof",
                       *(["--bytes", str(self.size)] if self.size is not None else [])),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while self.received_bytes == 0:
            if self._sender.poll() is not None or self._receiver_done is not None:
                raise StreamError(f"stream {self.addr}:{self.port} ended before any data arrived: "
                                  f"{self._sender_result()}")
            if time.monotonic() > deadline:
                raise StreamError(f"no stream data arrived at {self.addr}:{self.port} within {timeout:g} s")
            time.sleep(0.05)
        return self

    def _read_receiver(self) -> None:
        assert self._receiver is not None and self._receiver.stdout is not None
        for line in self._receiver.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "progress":
                self.received_bytes, self.last_progress = msg["bytes"], msg["t"]
            elif msg.get("event") == "done":
                self.received_bytes = msg["bytes"]
                self._receiver_done = msg

    def _sender_result(self) -> dict:
        assert self._sender is not None
        try:
            out, err = self._sender.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return {"error": "sender did not finish"}
        for line in reversed(out.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return {"error": f"sender printed no result: {err.strip()[-300:]}"}

    def running(self) -> bool:
        """The sender is still sending (it has not finished or died)."""
        return self._sender is not None and self._sender.poll() is None

    def wait(self, timeout: float) -> StreamResult:
        """Let the sender run its course (`size` or `max_seconds`), then as `stop`. Raises
        StreamError, with both ends stopped, when it is not done within `timeout`."""
        assert self._sender is not None
        deadline = time.monotonic() + timeout
        try:
            self._sender.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise StreamError(f"stream to {self.addr}:{self.port} not finished {timeout:g} s after waiting began")
        return self.stop(timeout=max(5.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 90.0) -> StreamResult:
        """Tell the sender to finish, wait for both ends, and compare what went with what came."""
        assert self._sender is not None and self._receiver is not None
        try:
            try:
                # communicate() closes the sender's stdin: the EOF it waits for.
                out, err = self._sender.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise StreamError(f"stream sender to {self.addr}:{self.port} still running after {timeout:g} s")
            self._receiver.wait(timeout=timeout)
            if self._reader is not None:
                self._reader.join(5)
        finally:
            self.kill()
        sent = next((json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{")), None)
        got = self._receiver_done
        if sent is None or got is None:
            raise StreamError(f"stream ended without a result (sender: {err.strip()[-300:] or 'nothing'})")
        longest = tuple(got["longest"]) if got.get("longest") else None
        return StreamResult(
            sent_bytes=sent["bytes"], received_bytes=got["bytes"], sent_sha256=sent["sha256"],
            received_sha256=got["sha256"], started=sent.get("started"), ended=sent.get("ended"),
            longest=longest, pauses=[(p[0], p[1]) for p in got["pauses"]],  # type: ignore[arg-type]
            error=sent.get("error") or got.get("error"), size=self.size)

    def kill(self) -> None:
        """Stop both ends now (cleanup path; safe to call twice)."""
        for proc in (self._sender, self._receiver):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overlay.lab.pausemeter", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("receive", help="accept one connection and time every arrival")
    r.add_argument("addr")
    r.add_argument("port", type=int)
    r.add_argument("--accept-timeout", type=float, default=60.0)
    s = sub.add_parser("send", help="send a paced stream on one connection")
    s.add_argument("addr")
    s.add_argument("port", type=int)
    s.add_argument("--rate-mbit", type=float, default=20.0)
    s.add_argument("--seconds", type=float, default=20.0, help="longest it runs")
    s.add_argument("--bytes", type=int, dest="size", help="also stop once this many bytes went out")
    s.add_argument("--until-eof", action="store_true", help="also stop when stdin is closed")
    args = p.parse_args(argv)
    if args.command == "send" and (args.rate_mbit <= 0 or args.seconds <= 0
                                   or (args.size is not None and args.size <= 0)):
        p.error("--rate-mbit, --seconds and --bytes must be positive")
    try:
        if args.command == "receive":
            return receive(args.addr, args.port, args.accept_timeout)
        return send(args.addr, args.port, args.rate_mbit * 1e6 / 8, args.seconds, args.until_eof, args.size)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
