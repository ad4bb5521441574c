"""Network namespaces as test hosts: create, run commands inside, tear down.

The lab, the tests and the benchmarks all build their hosts from this one
primitive. Every namespace the project creates carries a common prefix so that
a crashed run can be swept up later by `sweep(prefix)`; nothing here ever
touches the root namespace's links or addresses.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence

NETNS_DIR = "/var/run/netns"


class NetnsError(RuntimeError):
    """A command inside a namespace failed; the message carries its output."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_namespaces(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]


def kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    """SIGTERM every process in the namespace, then SIGKILL what is left."""
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def sweep(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with `prefix` (and its processes)."""
    removed = []
    for name in list_namespaces(prefix):
        kill_namespace_processes(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


class Namespace:
    """One network namespace used as a host or router."""

    def __init__(self, name: str):
        if len(name) > 200 or "/" in name:
            raise ValueError(f"bad namespace name {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def exists(self) -> bool:
        return os.path.exists(os.path.join(NETNS_DIR, self.name))

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        if self.exists:
            kill_namespace_processes(self.name)
            _ip("netns", "del", self.name, check=False)

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(args), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise NetnsError(
                f"[{self.name}] {shlex.join(args)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def popen(self, args: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(args), **kw)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (text) into this namespace atomically."""
        self.run("nft", "-f", "-", input=ruleset)
