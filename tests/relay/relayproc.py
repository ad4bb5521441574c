"""Runs a real `overlay-relay serve` subprocess on loopback for the relay tests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RELAY = [sys.executable, "-m", "relay_server.cli"]


def free_port(ip: str = "127.0.0.1", pair: bool = False) -> int:
    """A port free for both UDP and TCP on `ip` (and port+1 too when `pair`)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(200):
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.bind((ip, 0))
            port = u.getsockname()[1]
        if port > 65000:
            continue
        ok = True
        for p in ([port, port + 1] if pair else [port]):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(family, kind)
                try:
                    s.bind((ip, p))
                except OSError:
                    ok = False
                finally:
                    s.close()
        if ok:
            return port
    raise RuntimeError("no free port")


class Relay:
    def __init__(self, data_dir: Path, *, secret: str = "test-secret", alternate: bool = False,
                 ipv6: bool = True, extra: list[str] | None = None, port: int | None = None,
                 http_port: int = 0) -> None:
        self.data_dir = data_dir
        self.secret = secret
        self.port = port or free_port(pair=alternate)
        self.alt_port = self.port + 1 if alternate else 0
        self.tls_port = free_port()
        self.ready_file = data_dir / "ready.json"
        self.args = ["serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1",
                     "--port", str(self.port), "--tls-port", str(self.tls_port),
                     "--http-listen", "127.0.0.1", "--http-port", str(http_port), "--secret", secret,
                     "--allow-loopback-peers", "--ready-file", str(self.ready_file), "--log-format", "json"]
        if ipv6:
            self.args[5:5] = ["--listen", "::1"]
        if alternate:
            self.args += ["--alternate-listen", "127.0.0.2", "--alternate-port", str(self.alt_port)]
        self.args += extra or []
        self.proc: subprocess.Popen | None = None
        self.addresses: dict = {}
        self.log_path = data_dir / "relay.log"

    def start(self, timeout: float = 15.0) -> "Relay":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.ready_file.exists():
            self.ready_file.unlink()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(RELAY + self.args, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("relay did not start in time")
            time.sleep(0.05)
        self.addresses = json.loads(self.ready_file.read_text())
        return self

    @property
    def http_url(self) -> str:
        return "http://" + self.addresses["http"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(RELAY + list(args) + ["--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=30)

    def token(self, network: str, *extra: str) -> str:
        out = self.cli("token", "create", "--network", network, *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
