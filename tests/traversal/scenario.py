"""Real `overlay-relay` and `overlay` processes on the NAT lab, driven the way a user would.

    scenario = Scenario(lab, workdir, ifprefix="t1234tr")
    scenario.start_relay()                           # overlay-relay serve in the relay namespace
    token = scenario.token("net1", uses=2)           # overlay-relay token create
    a = scenario.join(h1, token, "alice")            # overlay join URL --token T --name alice FILE (in h1)
    b = scenario.join(h2, token, "bob")
    scenario.up(a); scenario.up(b)                   # overlay up FILE (in h1 / h2), waits for its UAPI socket
    scenario.wait_ping(a, b)                          # ping b's overlay address from a
    scenario.wait_path(a, b, "direct")                # overlay status --json: this peer's "path"
    scenario.transfer(a, b, 2_000_000)                # TCP through the tunnel, checksums compared
    pinger = scenario.start_pinger(a, b, 0.2)         # ping -i 0.2 in the background
    scenario.record_paths([(a, b), (b, a)], 30)       # (time, path, endpoint) samples of each side
    scenario.close()                                 # every process stopped, sockets and files removed

Names: the agents' UAPI sockets go to a directory of this scenario (not the
shared /var/run/wireguard), and every interface name still starts with
`ifprefix` (the test session's namespace prefix) so that two runs on one
machine never meet. Logs of every process stay in `workdir` and are quoted in
failure messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay import control, keys
from overlay.config import load_config
from overlay.lab import Host, Lab, Namespace
from overlay.lab.processes import stop_process

PYTHON = sys.executable
OVERLAY = [PYTHON, "-m", "overlay.cli"]
RELAY = [PYTHON, "-m", "relay_server.cli"]
TRANSFER = str(Path(__file__).resolve().parents[1] / "netns" / "transfer.py")
STUN_PORT = 3478
ALT_PORT = 3479
HTTP_PORT = 8080
IFNAMSIZ = 15


class ScenarioError(AssertionError):
    """Something a user would have noticed went wrong; the message carries the logs."""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class RelayServer:
    """One `overlay-relay serve` in the lab's relay namespace."""

    ns: Namespace
    data_dir: Path
    http_url: str
    secret: str
    proc: subprocess.Popen
    log: Path
    addresses: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # The operator commands only touch the SQLite database; the running server notices.
        return subprocess.run(RELAY + list(args) + ["--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=30)

    def token(self, network: str, uses: int = 2) -> str:
        out = self.cli("token", "create", "--network", network, "--uses", str(uses))
        if out.returncode != 0:
            raise ScenarioError(f"token create failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Node:
    """One member: its config file, its host and, while up, its `overlay up` process."""

    name: str
    host: Host
    ifname: str
    config: Path
    log: Path
    public_key: str = ""
    overlay_ipv4: str = ""
    overlay_ipv6: str = ""
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # time.monotonic() of the `overlay up` launch

    def load(self) -> None:
        config = load_config(str(self.config))
        self.public_key = keys.encode(keys.public_key(config.private_key))
        for address in config.addresses:
            if address.version == 4 and not self.overlay_ipv4:
                self.overlay_ipv4 = str(address.ip)
            elif address.version == 6 and not self.overlay_ipv6:
                self.overlay_ipv6 = str(address.ip)

    def overlay_ip(self, family: int) -> str:
        return self.overlay_ipv4 if family == 4 else self.overlay_ipv6


class Scenario:
    def __init__(self, lab: Lab, workdir: Path, ifprefix: str):
        if len(ifprefix) > IFNAMSIZ - 3:
            raise ValueError(f"interface prefix {ifprefix!r} leaves no room for a counter")
        self.lab = lab
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ifprefix = ifprefix
        self.socket_dir = workdir / "uapi"
        self.socket_dir.mkdir(exist_ok=True)
        self.relay: RelayServer | None = None
        self.nodes: list[Node] = []
        self.extra_processes: list[subprocess.Popen] = []
        self._count = 0

    # -- relay ---------------------------------------------------------------------------------

    def start_relay(self, *, http_family: int = 4, port: int = STUN_PORT, secret: str = "lab-secret",
                    turn_urls: list[str] | None = None, timeout: float = 20.0) -> RelayServer:
        """`overlay-relay serve` on the relay's public addresses (both families), with the
        RFC 5780 alternate address and port, its rendezvous on `http_family`'s address."""
        relay = self.lab.relay
        assert relay is not None, "the lab needs a relay (lab.add_relay())"
        data_dir = self.workdir / "relay-data"
        ready = self.workdir / "relay-ready.json"
        log = self.workdir / "relay.log"
        http_ip = relay.ipv4 if http_family == 4 else relay.ipv6
        argv = RELAY + [
            "serve", "--data-dir", str(data_dir),
            "--listen", relay.ipv4, "--listen", relay.ipv6,
            "--alternate-listen", relay.ipv4_alt, "--alternate-listen", relay.ipv6_alt,
            "--port", str(port), "--alternate-port", str(port + 1), "--tls-port", "-1",
            "--http-listen", http_ip, "--http-port", str(HTTP_PORT),
            "--secret", secret, "--ready-file", str(ready), "--log-format", "json",
            # Every node of a lab run logs in from few addresses: the limit has its own test.
            "--rate-per-minute", "100000", "--rate-burst", "10000",
        ]
        for url in turn_urls or []:
            argv += ["--turn-url", url]
        with open(log, "ab") as f:
            proc = relay.ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
        host = http_ip if http_family == 4 else f"[{http_ip}]"
        self.relay = RelayServer(relay.ns, data_dir, f"http://{host}:{HTTP_PORT}", secret, proc, log)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise ScenarioError(f"overlay-relay exited {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise ScenarioError(f"overlay-relay not ready after {timeout} s:\n{_tail(log)}")
            time.sleep(0.05)
        self.relay.addresses = json.loads(ready.read_text())
        return self.relay

    def token(self, network: str, uses: int = 2) -> str:
        assert self.relay is not None
        return self.relay.token(network, uses)

    def start_coturn(self, secret: str = "lab-secret", port: int = STUN_PORT, timeout: float = 10.0) -> subprocess.Popen:
        """coturn's `turnserver` on the relay host as the TURN server, sharing the
        rendezvous' TURN REST secret (bring your own TURN)."""
        relay = self.lab.relay
        assert relay is not None
        log = self.workdir / "turnserver.log"
        argv = [
            "turnserver", "-n", "--use-auth-secret", f"--static-auth-secret={secret}", "--realm=overlay",
            "-L", relay.ipv4, "-L", relay.ipv6, "-p", str(port),
            "--no-tls", "--no-dtls", "--no-cli", "-m", "1", "--no-multicast-peers", "-v",  # -v: log each allocation
            "--log-file", "stdout", "--simple-log",
            "--pidfile", str(self.workdir / "turnserver.pid"), "--userdb", str(self.workdir / "turndb"),
        ]
        with open(log, "ab") as f:
            proc = relay.ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
        self.extra_processes.append(proc)
        wanted = {f"{relay.ipv4}:{port}", f"[{relay.ipv6}]:{port}"}
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ScenarioError(f"turnserver exited {proc.returncode}:\n{_tail(log)}")
            out = relay.ns.run("ss", "-Hlnu", check=False).stdout
            if wanted <= {line.split()[3] for line in out.splitlines() if len(line.split()) > 3}:
                return proc
            if time.monotonic() > deadline:
                raise ScenarioError(f"turnserver not listening on {sorted(wanted)} after {timeout} s:\n{_tail(log)}")
            time.sleep(0.1)

    # -- nodes ---------------------------------------------------------------------------------

    def new_node(self, host: Host, name: str) -> Node:
        self._count += 1
        ifname = f"{self.ifprefix}{self._count}"
        if len(ifname) > IFNAMSIZ:
            raise ValueError(f"interface name {ifname!r} is longer than {IFNAMSIZ}")
        node = Node(name, host, ifname, self.workdir / f"{ifname}.conf", self.workdir / f"{ifname}.log")
        self.nodes.append(node)
        return node

    def run_join(self, host: Host, token: str, name: str, url: str | None = None,
                 node: Node | None = None) -> tuple[Node, subprocess.CompletedProcess[str]]:
        """`overlay join` inside `host`; returns the node and the finished process."""
        assert url is not None or self.relay is not None
        node = node or self.new_node(host, name)
        proc = host.ns.run(*OVERLAY, "join", url or self.relay.http_url, "--token", token,  # type: ignore[union-attr]
                           "--name", name, str(node.config), check=False, timeout=60)
        return node, proc

    def join(self, host: Host, token: str, name: str) -> Node:
        node, proc = self.run_join(host, token, name)
        if proc.returncode != 0:
            raise ScenarioError(f"overlay join for {name} in {host.name} failed: {proc.stderr.strip()}")
        node.load()
        return node

    def up(self, node: Node, wait: bool = True, timeout: float = 20.0, extra: list[str] | None = None) -> Node:
        """`overlay up FILE` inside the node's host, in the background."""
        argv = OVERLAY + ["up", str(node.config), "--interface", node.ifname,
                          "--socket-dir", str(self.socket_dir), "--log-level", "debug", *(extra or [])]
        with open(node.log, "ab") as f:
            node.started_at = time.monotonic()
            node.proc = node.host.ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
        if wait:
            self.wait_up(node, timeout)
        return node

    def wait_up(self, node: Node, timeout: float = 20.0) -> dict[str, Any]:
        """Until the agent answers on its UAPI socket."""
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise ScenarioError(f"overlay up for {node.name} exited {node.proc.returncode}:\n{_tail(node.log)}")
            try:
                return self.status(node)
            except control.UapiClientError:
                pass
            if time.monotonic() > deadline:
                raise ScenarioError(f"overlay up for {node.name} not answering after {timeout} s:\n{_tail(node.log)}")
            time.sleep(0.05)

    def stop(self, node: Node) -> None:
        stop_process(node.proc)
        node.proc = None
        try:
            os.unlink(control.socket_path(node.ifname, str(self.socket_dir)))
        except FileNotFoundError:
            pass

    def log_tail(self, node: Node, lines: int = 25) -> str:
        return _tail(node.log, lines)

    # -- status --------------------------------------------------------------------------------

    def status(self, node: Node) -> dict[str, Any]:
        """The document `overlay status --json IFNAME` prints (same query, no extra process)."""
        return control.query_status(node.ifname, str(self.socket_dir), timeout=2.0)

    def status_cli(self, node: Node) -> dict[str, Any]:
        """`overlay status --json` as a separate process, exactly as a user runs it."""
        out = node.host.ns.run(*OVERLAY, "status", node.ifname, "--json", "--socket-dir", str(self.socket_dir))
        return json.loads(out.stdout)

    def peer_status(self, node: Node, other: Node) -> dict[str, Any] | None:
        for peer in self.status(node).get("peers", []):
            if peer.get("public_key") == other.public_key:
                return peer
        return None

    def wait_peer(self, node: Node, other: Node, predicate: Callable[[dict[str, Any]], bool],
                  timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            try:
                last = self.peer_status(node, other)
            except control.UapiClientError:
                last = None
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"{node.name}: peer {other.name} never {what} within {timeout} s; last status entry:\n"
                    f"{json.dumps(last, indent=1)}\n--- {node.name} log:\n{self.log_tail(node)}")
            time.sleep(0.05)

    def wait_path(self, node: Node, other: Node, path: str, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_peer(node, other, lambda p: p.get("path") == path, timeout, f"reached path {path!r}")

    # -- traffic -------------------------------------------------------------------------------

    def ping_once(self, src: Node, dst: Node, family: int = 4, wait: float = 1.0) -> bool:
        cmd = ["ping", "-n", "-c", "1", "-W", f"{wait:g}", dst.overlay_ip(family)]
        if family == 6:
            cmd.insert(1, "-6")
        return src.host.ns.run(*cmd, check=False, timeout=wait + 10).returncode == 0

    def wait_ping(self, src: Node, dst: Node, family: int = 4, timeout: float = 20.0) -> float:
        """Seconds until the first echo reply from dst's overlay address."""
        start = time.monotonic()
        while True:
            if self.ping_once(src, dst, family, wait=0.5):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise ScenarioError(
                    f"no ping reply {src.name} -> {dst.name} ({dst.overlay_ip(family)}) within {timeout} s\n"
                    f"--- {src.name} log:\n{self.log_tail(src)}\n--- {dst.name} log:\n{self.log_tail(dst)}")

    def transfer(self, src: Node, dst: Node, size: int, family: int = 4, port: int = 5555,
                 timeout: float = 90.0) -> float:
        """One TCP connection src -> dst over the overlay; asserts every byte arrived intact.
        Returns the seconds it took."""
        addr = dst.overlay_ip(family)
        server = dst.host.ns.popen([PYTHON, TRANSFER, "serve", addr, str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.extra_processes.append(server)
        try:
            assert server.stdout is not None
            line = server.stdout.readline().strip()  # "listening"
            if line != "listening":
                raise ScenarioError(f"transfer server on {addr} did not start: {server.stderr.read()}")  # type: ignore[union-attr]
            start = time.monotonic()
            try:
                sent = src.host.ns.run(PYTHON, TRANSFER, "send", addr, str(port), str(size), check=False,
                                       timeout=timeout)
                took = time.monotonic() - start
                received, err = server.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                # What the agents saw during the stall, for whoever reads the failure.
                raise ScenarioError(f"transfer {src.name} -> {dst.name} ({size} bytes) not done after {timeout} s\n"
                                    f"{self._stall_report(src, dst)}") from exc
        finally:
            stop_process(server)
            self.extra_processes.remove(server)
        if sent.returncode != 0:
            raise ScenarioError(f"transfer {src.name} -> {dst.name} failed: {sent.stderr.strip()[-500:]}")
        if sent.stdout.split() != received.split() or int(sent.stdout.split()[0]) != size:
            raise ScenarioError(f"transfer corrupted: sent {sent.stdout.strip()!r}, received {received.strip()!r} {err}")
        return took

    def start_pinger(self, src: Node, dst: Node, interval: float = 0.2, family: int = 4) -> subprocess.Popen:
        """`ping -i INTERVAL` src -> dst's overlay address in the background: steady traffic, so
        the agents see a busy session. Stop it with stop_pinger (close() also does)."""
        cmd = ["ping", "-n", "-i", f"{interval:g}", "-W", "2", dst.overlay_ip(family)]
        if family == 6:
            cmd.insert(1, "-6")
        proc = src.host.ns.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.extra_processes.append(proc)
        return proc

    def stop_pinger(self, proc: subprocess.Popen) -> tuple[int, int]:
        """(echo requests sent, replies received) of a pinger, which is stopped."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc in self.extra_processes:
            self.extra_processes.remove(proc)
        for line in (out or "").splitlines():
            if "packets transmitted" in line:
                parts = line.split()
                return int(parts[0]), int(parts[3])
        return 0, 0

    def record_paths(self, pairs: list[tuple[Node, Node]], seconds: float,
                     interval: float = 0.25) -> dict[str, list[tuple[float, str | None, str | None]]]:
        """Poll `overlay status` for `seconds`: per (node, peer), every (time, path, endpoint)
        sample, keyed by node name. A poll that fails is recorded as (time, None, None)."""
        samples: dict[str, list[tuple[float, str | None, str | None]]] = {n.name: [] for n, _ in pairs}
        end = time.monotonic() + seconds
        while True:
            for node, other in pairs:
                try:
                    entry = self.peer_status(node, other) or {}
                except (control.UapiClientError, OSError):
                    entry = {}
                samples[node.name].append((time.monotonic(), entry.get("path"), entry.get("endpoint")))
            if time.monotonic() >= end:
                return samples
            time.sleep(interval)

    def log_offset(self, node: Node) -> int:
        """The size of the node's log now: log_lines(node, since=...) reads from here."""
        try:
            return node.log.stat().st_size
        except FileNotFoundError:
            return 0

    def log_lines(self, node: Node, needle: str, since: int = 0) -> list[str]:
        """Lines of the node's agent log after byte `since` that contain `needle`."""
        try:
            with open(node.log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if needle in line]

    def _stall_report(self, a: Node, b: Node) -> str:
        parts = []
        for me, other in ((a, b), (b, a)):
            try:
                entry = json.dumps(self.peer_status(me, other), indent=1)
            except (control.UapiClientError, OSError) as exc:
                entry = f"(no status: {exc})"
            parts.append(f"--- {me.name} status of {other.name}:\n{entry}\n--- {me.name} log:\n{self.log_tail(me, 40)}")
        return "\n".join(parts)

    # -- cleanup -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this scenario started; safe to call twice and after failures."""
        for proc in list(self.extra_processes):
            stop_process(proc)
        self.extra_processes.clear()
        for node in self.nodes:
            self.stop(node)
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
