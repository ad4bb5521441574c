"""The README demo: a direct path dies under a running TCP transfer, and the transfer does not notice.

    overlay-lab demo            (or python -m overlay.lab.demo)

Builds the NAT lab (an emulated internet in network namespaces: a relay host,
alice and bob each behind their own port-restricted NAT), starts a real
`overlay-relay serve` on the relay host, joins both hosts with a token, brings
up `overlay up` on both and waits for a direct path. Then a TCP stream runs from
alice to bob through the tunnel on one connection, the direct path between the
two NATs is blackholed (the relay stays reachable), the relay takes over,
the path comes back, the tunnel returns to direct, and a summary gives the
measured pauses against the targets. Everything it created (namespaces,
processes, sockets, files) is removed at the end, also on Ctrl-C or failure.

Exit status: 0 when the stream survived intact and every phase happened,
1 on a real failure (no direct path, no failover, a reset, a bad checksum),
130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from overlay import control, keys
from overlay.config import ConfigError, load_config
from overlay.lab.netns import NetnsError, sweep
from overlay.lab.nodes import Host, LabError
from overlay.lab.pausemeter import Stream, StreamError, StreamResult
from overlay.lab.processes import stop_process
from overlay.lab.topology import Lab

PREFIX = "ovdemo"
MAX_PREFIX = 9  # "<prefix>-alice" must fit in an interface name (15 characters)
OVERLAY = [sys.executable, "-m", "overlay.cli"]
RELAY = [sys.executable, "-m", "relay_server.cli"]
HTTP_PORT = 8080
STUN_PORT = 3478
STREAM_PORT = 5701
NETWORK = "demo"

TARGET_PAUSE = 1.0  # longest pause of the transfer when the direct path dies
TARGET_BACK = 5.0  # back to direct after the path is restored
POLL = 0.05
CONNECT_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0
RETURN_TIMEOUT = 30.0


class DemoFailure(Exception):
    """Something a user would call broken; the message says what and quotes the logs."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop, clean up, exit 130."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


def indent(text: str, by: str = "     ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class Agent:
    """One node of the demo: its host, config file, `overlay up` process and log."""

    name: str
    host: Host
    ifname: str
    config: Path
    log: Path
    proc: subprocess.Popen | None = None
    public_key: str = ""
    overlay_ipv4: str = ""

    def load(self) -> None:
        config = load_config(str(self.config))
        self.public_key = keys.encode(keys.public_key(config.private_key))
        self.overlay_ipv4 = next((str(a.ip) for a in config.addresses if a.version == 4), "")


class Demo:
    def __init__(self, prefix: str, hold: float, tail_seconds: float, rate_mbit: float):
        self.prefix = prefix
        self.hold = hold
        self.tail_seconds = tail_seconds
        self.rate_mbit = rate_mbit
        self.workdir = Path(tempfile.mkdtemp(prefix="overlay-demo-"))
        self.lab = Lab(prefix)
        self.relay_proc: subprocess.Popen | None = None
        self.agents: list[Agent] = []
        self.stream: Stream | None = None

    # -- the story --------------------------------------------------------------------------

    def run(self) -> int:
        lab = self.lab
        say("1. Building the lab: an emulated internet in network namespaces")
        relay = lab.add_relay()
        nat1 = lab.add_nat("nat1", "port-restricted")
        nat2 = lab.add_nat("nat2", "port-restricted")
        h_alice, h_bob = lab.add_host("alice", nat1), lab.add_host("bob", nat2)
        say(f"   relay host {relay.ipv4} on the internet (203.0.113.0/24)")
        say(f"   alice {h_alice.ipv4} behind nat1 ({nat1.public_ipv4}, port-restricted NAT)")
        say(f"   bob   {h_bob.ipv4} behind nat2 ({nat2.public_ipv4}, port-restricted NAT)")

        url = self.start_relay()
        say(f"2. overlay-relay serve running on the relay host: STUN/TURN on {relay.ipv4}:{STUN_PORT}, "
            f"rendezvous {url}")

        token = self.relay_cli("token", "create", "--network", NETWORK, "--uses", "2").strip()
        say(f"3. overlay-relay token create --network {NETWORK} --uses 2  ->  {token[:6]}... (a join token)")

        alice = self.join(h_alice, "alice", url, token)
        bob = self.join(h_bob, "bob", url, token)
        say(f"4. overlay join {url} --token ... --name alice|bob: "
            f"alice is {alice.overlay_ipv4}, bob is {bob.overlay_ipv4}")

        launched = time.monotonic()
        for agent in (alice, bob):
            self.up(agent)
        say(f"5. overlay up running on both hosts (interfaces {alice.ifname}, {bob.ifname})")

        self.wait_both(alice, bob, "direct", CONNECT_TIMEOUT, "a direct path between alice and bob")
        say(f"6. alice and bob connected directly, {time.monotonic() - launched:.1f} s after `overlay up`; "
            f"`overlay status {alice.ifname}` on alice:")
        say(indent(self.status_text(alice)))

        self.stream = Stream(h_alice.ns, h_bob.ns, bob.overlay_ipv4, STREAM_PORT, rate_mbit=self.rate_mbit,
                             max_seconds=600).start()
        say(f"7. TCP stream alice -> bob ({bob.overlay_ipv4}:{STREAM_PORT}) through the tunnel, "
            f"{self.rate_mbit:g} Mbit/s on one connection")
        time.sleep(4)
        say(f"   {megabytes(self.stream.received_bytes)} arrived so far")

        # Timed from the moment the cut is asked for: the rule takes effect somewhere
        # inside the call, and the figures must not flatter the agent by that much.
        cut_at, cut_wall = time.monotonic(), time.time()
        lab.blackhole(nat1, nat2)
        at_cut = self.stream.received_bytes
        say("8. Direct path cut: everything between nat1 and nat2 is dropped (the relay stays reachable)")
        took = self.wait_both(alice, bob, "relay", FAILOVER_TIMEOUT, "the relay taking over after the cut")
        relay_after = max(took.values()) - cut_at
        say(f"   relay took over after {relay_after:.2f} s "
            f"(alice {took['alice'] - cut_at:.2f} s, bob {took['bob'] - cut_at:.2f} s); alice's status:")
        say(indent(self.status_text(alice, only_paths=True)))
        for line in self.path_log(alice, cut_wall):
            say(f"   alice's log: {line}")
        # Hold the cut long enough to see the transfer carry on over the relay.
        hold_until = max(cut_at + self.hold, time.monotonic() + 3)
        over_relay_from = self.stream.received_bytes
        time.sleep(max(0.0, hold_until - time.monotonic()))
        since_cut = self.stream.received_bytes - at_cut
        since_relay = self.stream.received_bytes - over_relay_from
        if since_relay > 0:
            say(f"   the transfer is still running over the relay: {megabytes(since_cut)} arrived since the cut "
                f"({megabytes(since_relay)} since the relay took over)")
        else:
            say(f"   the transfer is STALLED: nothing arrived since the relay took over "
                f"({megabytes(since_cut)} since the cut)")

        restored_at, restored_wall = time.monotonic(), time.time()
        lab.unblackhole(nat1, nat2)
        say("9. Direct path restored")
        back = self.wait_both(alice, bob, "direct", RETURN_TIMEOUT, "the return to the direct path")
        back_after = max(back.values()) - restored_at
        say(f"   back to direct after {back_after:.2f} s "
            f"(alice {back['alice'] - restored_at:.2f} s, bob {back['bob'] - restored_at:.2f} s); alice's status:")
        say(indent(self.status_text(alice, only_paths=True)))
        for line in self.path_log(alice, restored_wall):
            say(f"   alice's log: {line}")
        time.sleep(self.tail_seconds)

        say("10. Stopping the stream and comparing what was sent with what arrived")
        result = self.stream.stop()
        self.stream = None
        return self.summary(result, cut_at, restored_at, relay_after, back_after)

    def summary(self, r: StreamResult, cut_at: float, restored_at: float, relay_after: float,
                back_after: float) -> int:
        rows: list[tuple[str, str, str]] = []  # label, what was measured, verdict against the target
        if r.intact:
            rows.append(("stream", f"{megabytes(r.received_bytes)} in {r.seconds:.1f} s on one TCP connection "
                                   f"({r.mbit:.1f} Mbit/s), no reset, checksum ok", ""))
        else:
            what = r.error or f"checksum MISMATCH (sent {r.sent_bytes} bytes, received {r.received_bytes})"
            rows.append(("stream", f"FAILED: {what}", ""))
        rows.append(("relay took over", f"{relay_after:.2f} s after the cut", ""))
        if r.longest is not None:
            start, length = r.longest
            rows.append(("longest pause", f"{length:.2f} s, starting {where(start, cut_at, restored_at)}",
                         verdict(length, TARGET_PAUSE)))
        else:
            rows.append(("longest pause", "(no data arrived)", ""))
        rows.append(("back to direct", f"{back_after:.2f} s after the path was restored",
                     verdict(back_after, TARGET_BACK)))
        say()
        say("Summary")
        width = max(len(text) for _, text, v in rows if v)
        for label, text, check in rows:
            say(f"  {label + ':':<17}{text.ljust(width) if check else text}{'   ' + check if check else ''}")
        return 0 if r.intact else 1

    # -- the pieces -------------------------------------------------------------------------

    def start_relay(self) -> str:
        relay = self.lab.relay
        assert relay is not None
        ready = self.workdir / "relay-ready.json"
        log = self.workdir / "relay.log"
        argv = RELAY + [
            "serve", "--data-dir", str(self.workdir / "relay-data"),
            "--listen", relay.ipv4, "--listen", relay.ipv6,
            "--alternate-listen", relay.ipv4_alt, "--alternate-listen", relay.ipv6_alt,
            "--port", str(STUN_PORT), "--alternate-port", str(STUN_PORT + 1), "--tls-port", "-1",
            "--http-listen", relay.ipv4, "--http-port", str(HTTP_PORT),
            "--ready-file", str(ready),
        ]
        with open(log, "ab") as f:
            self.relay_proc = relay.ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
        self.wait(lambda: ready.exists(), 20, "overlay-relay to start", self.relay_proc, log)
        return f"http://{relay.ipv4}:{HTTP_PORT}"

    def relay_cli(self, *args: str) -> str:
        proc = subprocess.run(RELAY + list(args) + ["--data-dir", str(self.workdir / "relay-data")],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise DemoFailure(f"overlay-relay {args[0]} {args[1]} failed: {proc.stderr.strip()}")
        return proc.stdout

    def join(self, host: Host, name: str, url: str, token: str) -> Agent:
        ifname = f"{self.prefix}-{name}"
        agent = Agent(name, host, ifname, self.workdir / f"{ifname}.conf", self.workdir / f"{ifname}.log")
        proc = host.ns.run(*OVERLAY, "join", url, "--token", token, "--name", name, str(agent.config),
                           check=False, timeout=60)
        if proc.returncode != 0:
            raise DemoFailure(f"overlay join on {name} failed: {proc.stderr.strip()}")
        agent.load()
        self.agents.append(agent)
        return agent

    def up(self, agent: Agent) -> None:
        with open(agent.log, "ab") as f:
            agent.proc = agent.host.ns.popen(OVERLAY + ["up", str(agent.config), "--log-format", "json"],
                                             stdout=f, stderr=subprocess.STDOUT)
        sock = control.socket_path(agent.ifname)
        self.wait(lambda: control.socket_is_live(sock), 20, f"overlay up on {agent.name}", agent.proc, agent.log)

    def wait(self, done: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None,
             log: Path) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if proc is not None and proc.poll() is not None:
                raise DemoFailure(f"{what}: the process exited with status {proc.returncode}:\n{indent(tail(log))}")
            if time.monotonic() > deadline:
                raise DemoFailure(f"timed out waiting {timeout:g} s for {what}:\n{indent(tail(log))}")
            time.sleep(POLL)

    def peer_path(self, agent: Agent, other: Agent) -> str | None:
        try:
            doc = control.query_status(agent.ifname, timeout=2.0)
        except control.UapiClientError:
            return None
        for peer in doc.get("peers", []):
            if peer.get("public_key") == other.public_key:
                return peer.get("path")
        return None

    def wait_both(self, a: Agent, b: Agent, path: str, timeout: float, what: str) -> dict[str, float]:
        """Poll both agents' status until each shows `path` for the other; when each got there."""
        reached: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(reached) < 2:
            for me, other in ((a, b), (b, a)):
                if me.name not in reached and self.peer_path(me, other) == path:
                    reached[me.name] = time.monotonic()
                if me.proc is not None and me.proc.poll() is not None:
                    raise DemoFailure(f"overlay up on {me.name} exited while waiting for {what}:\n"
                                      f"{indent(tail(me.log))}")
            if len(reached) == 2:
                break
            if time.monotonic() > deadline:
                missing = [n.name for n in (a, b) if n.name not in reached]
                raise DemoFailure(f"no {what} within {timeout:g} s (still waiting on {', '.join(missing)}):\n"
                                  + "\n".join(f"--- {n.name}:\n{indent(tail(n.log))}" for n in (a, b)))
            time.sleep(POLL)
        return reached

    def status_text(self, agent: Agent, only_paths: bool = False) -> str:
        """`overlay status IFNAME` as a user runs it on that host."""
        out = agent.host.ns.run(*OVERLAY, "status", agent.ifname, check=False).stdout
        if not only_paths:
            return out.rstrip()
        keep = [line for line in out.splitlines()
                if line.lstrip().startswith(("peer:", "name:", "path", "active", "since")) or "(active" in line]
        return "\n".join(keep) if keep else out.rstrip()

    @staticmethod
    def path_log(agent: Agent, since_wall: float) -> list[str]:
        """The agent's own account of its path changes since a moment (its structlog lines)."""
        lines = []
        try:
            text = agent.log.read_text(errors="replace")
        except FileNotFoundError:
            return lines
        for raw in text.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("event") not in ("path changed", "path"):
                continue
            if _iso_to_epoch(entry.get("timestamp")) < since_wall - 0.5:
                continue
            reason = f" ({entry['reason']})" if entry.get("reason") else ""
            lines.append(f"path changed to {entry.get('path')} via {_endpoint(entry.get('endpoint'))}{reason}")
        return lines[-3:]

    # -- cleanup ----------------------------------------------------------------------------

    def cleanup(self, keep_logs: bool) -> None:
        if self.stream is not None:
            self.stream.kill()
        for agent in self.agents:
            stop_process(agent.proc)
        stop_process(self.relay_proc)
        self.lab.teardown()
        for agent in self.agents:
            try:
                os.unlink(control.socket_path(agent.ifname))
            except FileNotFoundError:
                pass
        if keep_logs:
            say(f"Logs of the relay and both agents kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _endpoint(text: Any) -> str:
    """`host:port` for an endpoint a log line may carry as a Python tuple's repr."""
    m = re.fullmatch(r"\('([^']+)', (\d+)\)", str(text))
    if not m:
        return str(text)
    host, port = m.groups()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _iso_to_epoch(stamp: Any) -> float:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def where(t: float, cut_at: float, restored_at: float) -> str:
    """Where a moment lies relative to the cut and the restore, in words."""
    if t < cut_at:
        return f"{cut_at - t:.2f} s before the cut"
    if t < restored_at:
        return f"{t - cut_at:.2f} s after the cut"
    return f"{t - restored_at:.2f} s after the restore"


def verdict(value: float, target: float) -> str:
    return f"target < {target:g} s: {'met' if value < target else 'MISSED'}"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted()


def run_demo(args: argparse.Namespace) -> int:
    for leftover in sweep(f"{args.prefix}-"):
        say(f"(removed a leftover namespace {leftover})")
    demo = Demo(args.prefix, hold=args.hold, tail_seconds=args.tail, rate_mbit=args.rate_mbit)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    failed = True
    try:
        code = demo.run()
        failed = code != 0
        return code
    except (KeyboardInterrupt, Interrupted):
        failed = False  # nothing to investigate: the user stopped it
        say("\ninterrupted")
        return 130
    except (DemoFailure, StreamError, LabError, NetnsError, ConfigError, OSError,
            subprocess.SubprocessError) as e:
        print(f"demo failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C while tearing down must not leave namespaces behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.cleanup(keep_logs=failed)
            say("Torn down: agents and relay stopped, namespaces" + (" removed." if failed else " and files removed."))
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="overlay-lab demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--hold", type=float, default=8.0, help="seconds the direct path stays cut (default 8)")
    p.add_argument("--tail", type=float, default=3.0,
                   help="seconds the stream runs on after the return to direct (default 3)")
    p.add_argument("--rate-mbit", type=float, default=20.0, help="stream rate in Mbit/s (default 20)")
    p.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hold < 0 or args.tail < 0 or args.rate_mbit <= 0:
        p.error("--hold and --tail must not be negative, --rate-mbit must be positive")
    if not args.prefix or len(args.prefix) > MAX_PREFIX or not args.prefix.replace("_", "").isalnum():
        p.error(f"--prefix must be 1-{MAX_PREFIX} letters or digits")
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, nftables, TUN devices)", file=sys.stderr)
        return 1
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            print(f"demo: the tool {tool!r} is missing (run .ci/setup first)", file=sys.stderr)
            return 1
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
