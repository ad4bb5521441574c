"""Staying connected: what a TCP stream inside the tunnel notices when the network changes under it.

    sudo .venv/bin/python bench/failover.py [--rounds 3] [--idle-seconds 60] [--hold 8] [--rate-mbit 20]

On the NAT lab (real `overlay-relay` and `overlay` processes, nftables NATs), in
one run, the overlay against a stock wireguard-go pair with static endpoints
(each configured with the other's NAT public address and port; it has no relay,
so when the direct path dies it simply stays on it):

- pause, path dies:  a 20 Mbit/s TCP stream alice -> bob on one connection runs
                     while the direct path between the two NATs is blackholed for
                     `--hold` seconds (the relay stays reachable); the longest gap
                     between two arrivals at the receiver (overlay.lab.pausemeter)
                     that overlaps the cut;
- on the relay:      seconds from the cut until `overlay status` shows path relay
                     on both sides;
- back to direct:    seconds from the restore until both show path direct again
                     (wireguard-go: until the stream's data flows again);
- pause, return:     the longest gap overlapping the return to direct;
- pause, host moves: the same stream while alice moves to a third NAT (new address,
                     new public address), gap overlapping the move;
- idle bytes/min:    nothing sent inside the tunnel for `--idle-seconds` (after a
                     settling pause): bytes per minute on one node's uplink for its
                     one peer, counted on the emulated internet's bridge, peer to
                     peer (keepalives, probes) and to the relay (TURN refreshes,
                     rendezvous; mean of the two nodes).

Medians and maxima over `--rounds`. The overlay runs on `--nat` NATs (default
port-restricted); wireguard-go on `--wg-nat` (default full-cone: a static
endpoint only works where a stranger's packet gets in, and a move only where the
far NAT accepts the new address). Targets from the issue: pause < 1 s when the
direct path dies, back to direct < 5 s, pause < 2 s when a host moves. Not a
test: the figures depend on the machine and what else runs on it. Everything
(namespaces with prefix `ovfobench`, processes) is removed at the end, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overlay import control, keys  # noqa: E402
from overlay.lab import Host, Lab, Nat, sweep  # noqa: E402
from overlay.lab.pausemeter import PAUSE_FLOOR, Stream, StreamError, StreamResult  # noqa: E402
from tests.traversal.pathmeter import PathMeter  # noqa: E402
from overlay.lab.processes import stop_process  # noqa: E402
from tests.traversal.scenario import Scenario, ScenarioError  # noqa: E402

PREFIX = "ovfobench"
IFPREFIX = "ovfb"
WG_TUN = {"a": "10.200.0.1", "b": "10.200.0.2"}
WG_PORT = 51900
WG_KEEPALIVE = 25
NAN = float("nan")
BROKE = float("inf")  # the stream died: no pause length to report
WARMUP = 3.0  # seconds of stream before each event
AFTER = 3.0  # seconds of stream after the path settled again
SETTLE_IDLE = 150.0  # probes back off and the NAT lifetime measurement ends: measure the steady state

OVERLAY = "overlay"
WG = "wireguard-go"

# (key, label, target text): the table's rows, in order
ROWS = [
    ("pause_cut", "longest TCP pause, direct path dies (s)", "< 1"),
    ("to_relay", "time until on the relay (s)", ""),
    ("back_direct", "back to direct after restore (s)", "< 5"),
    ("pause_return", "longest TCP pause, return to direct (s)", ""),
    ("pause_move", "longest TCP pause, host moves NAT (s)", "< 2"),
    ("idle_p2p", "idle bytes/min per peer, peer to peer", ""),
    ("idle_relay", "idle bytes/min per peer, to the relay", ""),
]


class BenchError(RuntimeError):
    pass


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, impl: str, key: str, value: float) -> None:
        self.values.setdefault(impl, {}).setdefault(key, []).append(value)

    def note(self, impl: str, text: str) -> None:
        line = f"{impl}: {text.splitlines()[0][:160]}"
        self.notes.append(line)
        print(f"  ! {line}", file=sys.stderr, flush=True)


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# -- the lab -------------------------------------------------------------------------------


@dataclass
class Topo:
    lab: Lab
    nats: tuple[Nat, Nat, Nat]  # alice's, bob's, and the one alice moves to
    alice: Host
    bob: Host

    def set_nats(self, nat_type: str) -> None:
        for nat in self.nats:
            self.lab.set_nat(nat, nat_type, ipv6="nat66")

    def home(self) -> None:
        if self.alice.nat is not self.nats[0]:
            self.lab.move(self.alice, self.nats[0])


def build(lab: Lab) -> Topo:
    lab.add_relay()
    nats = (lab.add_nat("na", "port-restricted", ipv6="nat66"), lab.add_nat("nb", "port-restricted", ipv6="nat66"),
            lab.add_nat("nc", "port-restricted", ipv6="nat66"))
    return Topo(lab, nats, lab.add_host("ha", nats[0]), lab.add_host("hb", nats[1]))


# -- one tunnel under test ---------------------------------------------------------------------


class Tunnel:
    """What the measurements need from either implementation."""

    name: str
    address_of_bob: str

    def wait_direct(self, timeout: float) -> float:
        raise NotImplementedError

    def wait_relay(self, timeout: float) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 50 ms; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


class OverlayTunnel(Tunnel):
    name = OVERLAY

    def __init__(self, sc: Scenario, topo: Topo, network: str):
        self.sc = sc
        token = sc.token(network, uses=2)
        self.a = sc.join(topo.alice, token, "alice")
        self.b = sc.join(topo.bob, token, "bob")
        # Info, not the scenario's debug: logging must not eat the CPU the stream needs.
        sc.up(self.a, extra=["--log-level", "info"])
        sc.up(self.b, extra=["--log-level", "info"])
        self.address_of_bob = self.b.overlay_ipv4
        sc.wait_ping(self.a, self.b, timeout=30)

    def _both(self, path: str) -> bool:
        try:
            pa, pb = self.sc.peer_status(self.a, self.b), self.sc.peer_status(self.b, self.a)
        except control.UapiClientError:
            return False
        return bool(pa and pb and pa.get("path") == path and pb.get("path") == path)

    def wait_direct(self, timeout: float) -> float:
        return wait_until(lambda: self._both("direct"), timeout, "direct path on both sides")

    def wait_relay(self, timeout: float) -> float:
        return wait_until(lambda: self._both("relay"), timeout, "relay path on both sides")

    def stop(self) -> None:
        self.sc.stop(self.a)
        self.sc.stop(self.b)


class WireguardGoPair(Tunnel):
    """Two stock wireguard-go peers, each with the other's NAT public address as its static endpoint."""

    name = WG

    def __init__(self, topo: Topo, workdir: Path):
        self.procs: list[subprocess.Popen] = []
        self.ifnames: list[str] = []
        self.address_of_bob = WG_TUN["b"]
        ids = {side: keys.generate_private_key() for side in "ab"}
        sides = (("a", topo.alice, topo.nats[1]), ("b", topo.bob, topo.nats[0]))
        try:
            for side, host, far_nat in sides:
                other = "b" if side == "a" else "a"
                ifname = f"{IFPREFIX}wg{side}"
                self.ifnames.append(ifname)
                self.procs.append(host.ns.popen(["wireguard-go", "-f", ifname], env=dict(os.environ, LOG_LEVEL="error"),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_until(lambda i=ifname: os.path.exists(control.socket_path(i)), 10, f"{ifname}'s UAPI socket")
                conf = workdir / f"{ifname}.wg"
                fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"[Interface]\nPrivateKey = {keys.encode(ids[side])}\nListenPort = {WG_PORT}\n"
                            f"[Peer]\nPublicKey = {keys.encode(keys.public_key(ids[other]))}\n"
                            f"AllowedIPs = {WG_TUN[other]}/32\nEndpoint = {far_nat.public_ipv4}:{WG_PORT}\n"
                            f"PersistentKeepalive = {WG_KEEPALIVE}\n")
                host.ns.run("wg", "setconf", ifname, str(conf))
                host.ns.run("ip", "addr", "add", f"{WG_TUN[side]}/24", "dev", ifname)
                host.ns.run("ip", "link", "set", ifname, "mtu", "1420", "up")
            wait_until(lambda: topo.alice.ns.run("ping", "-c1", "-W1", WG_TUN["b"], check=False).returncode == 0,
                       20, "wireguard-go peers reaching each other")
        except BaseException:
            self.stop()
            raise

    def wait_direct(self, timeout: float) -> float:
        return time.monotonic()  # static endpoints: it never leaves them

    def wait_relay(self, timeout: float) -> float:
        raise BenchError("wireguard-go has no relay")

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        for ifname in self.ifnames:
            try:
                os.unlink(control.socket_path(ifname))
            except FileNotFoundError:
                pass


# -- the measurements ----------------------------------------------------------------------------


def pause_around(result: StreamResult, start: float, end: float) -> float:
    """Longest gap overlapping [start, end]; the pacing gap (tiny) when none was listed."""
    if not result.intact:
        return BROKE
    hit = result.longest_within(start, end)
    return hit[1] if hit else 0.0


def stream_for(topo: Topo, tunnel: Tunnel, port: int, rate_mbit: float) -> Stream:
    return Stream(topo.alice.ns, topo.bob.ns, tunnel.address_of_bob, port, rate_mbit=rate_mbit,
                  max_seconds=600).start()


def measure_cut(topo: Topo, tunnel: Tunnel, res: Results, port: int, hold: float, rate_mbit: float) -> None:
    lab, (na, nb, _) = topo.lab, topo.nats
    tunnel.wait_direct(30)
    stream = stream_for(topo, tunnel, port, rate_mbit)
    cut_at = restored_at = None
    try:
        time.sleep(WARMUP)
        cut_at = time.monotonic()
        lab.blackhole(na, nb)
        if tunnel.name == OVERLAY:
            try:
                res.add(tunnel.name, "to_relay", tunnel.wait_relay(hold + 20) - cut_at)
            except BenchError as e:
                res.note(tunnel.name, str(e))
                res.add(tunnel.name, "to_relay", NAN)
        time.sleep(max(0.0, cut_at + hold - time.monotonic()))
        restored_at = time.monotonic()
        lab.unblackhole(na, nb)
        back_at = NAN
        if tunnel.name == OVERLAY:
            try:
                back_at = tunnel.wait_direct(30)
            except BenchError as e:
                res.note(tunnel.name, str(e))
        time.sleep(AFTER if tunnel.name == OVERLAY else hold + AFTER)  # a static tunnel waits out TCP's backoff
        result = stream.stop()
    except (StreamError, BenchError, ScenarioError) as e:
        stream.kill()
        res.note(tunnel.name, f"cut round: {e}")
        for key in ("pause_cut", "back_direct", "pause_return"):
            res.add(tunnel.name, key, BROKE if isinstance(e, StreamError) else NAN)
        return
    finally:
        if cut_at is not None and restored_at is None:
            lab.unblackhole(na, nb)
    if not result.intact:
        res.note(tunnel.name, f"cut round: stream broke ({result.error or 'checksum mismatch'})")
    res.add(tunnel.name, "pause_cut", pause_around(result, cut_at, restored_at))
    if tunnel.name == OVERLAY:
        res.add(tunnel.name, "back_direct", back_at - restored_at)
        res.add(tunnel.name, "pause_return", pause_around(result, restored_at, back_at + 0.5)
                if back_at == back_at else NAN)
    else:
        resumed = result.first_arrival_after(restored_at)
        res.add(tunnel.name, "back_direct", (resumed - restored_at) if resumed is not None else 0.0)
        res.add(tunnel.name, "pause_return", NAN)
    progress(f"{tunnel.name}: cut: longest pause {pause_around(result, cut_at, restored_at):.2f} s, "
             f"{result.received_bytes / 1e6:.1f} MB {'intact' if result.intact else 'BROKEN'}")


def measure_move(topo: Topo, tunnel: Tunnel, res: Results, port: int, hold: float, rate_mbit: float) -> None:
    tunnel.wait_direct(30)
    stream = stream_for(topo, tunnel, port, rate_mbit)
    try:
        time.sleep(WARMUP)
        moved_at = time.monotonic()
        topo.lab.move(topo.alice, topo.nats[2])
        time.sleep(hold)
        result = stream.stop()
    except (StreamError, BenchError, ScenarioError) as e:
        stream.kill()
        res.note(tunnel.name, f"move round: {e}")
        res.add(tunnel.name, "pause_move", BROKE if isinstance(e, StreamError) else NAN)
        return
    finally:
        topo.home()
    if not result.intact:
        res.note(tunnel.name, f"move round: stream broke ({result.error or 'checksum mismatch'})")
    pause = pause_around(result, moved_at, moved_at + hold)
    res.add(tunnel.name, "pause_move", pause)
    progress(f"{tunnel.name}: move: longest pause {pause:.2f} s, "
             f"{result.received_bytes / 1e6:.1f} MB {'intact' if result.intact else 'BROKEN'}")
    # Moving home is a move too: let the tunnel settle before the next round.
    try:
        tunnel.wait_direct(30)
        wait_until(lambda: topo.alice.ns.run("ping", "-c1", "-W1", tunnel.address_of_bob,
                                             check=False).returncode == 0, 30, "a ping after moving home")
    except BenchError as e:
        res.note(tunnel.name, f"after moving home: {e}")


def measure_idle(topo: Topo, tunnel: Tunnel, res: Results, seconds: float, settle: float) -> None:
    meter = PathMeter(topo.lab, topo.nats[0], topo.nats[1], "idle")
    try:
        time.sleep(settle)
        before = meter.read()
        time.sleep(seconds)
        moved = meter.read() - before
    finally:
        meter.remove()
    minutes = seconds / 60
    # Everything between the two NATs crosses each node's uplink; the relay's share is per node.
    res.add(tunnel.name, "idle_p2p", moved.direct / minutes)
    res.add(tunnel.name, "idle_relay", moved.via_relay / 2 / minutes)
    progress(f"{tunnel.name}: idle {seconds:g} s: {moved.direct} B peer to peer, {moved.via_relay} B with the relay")


def run_rounds(topo: Topo, tunnel: Tunnel, res: Results, args: argparse.Namespace, port: int) -> None:
    for n in range(args.rounds):
        measure_cut(topo, tunnel, res, port + 2 * n, args.hold, args.rate_mbit)
        measure_move(topo, tunnel, res, port + 2 * n + 1, args.hold, args.rate_mbit)
    if args.idle_seconds > 0:
        measure_idle(topo, tunnel, res, args.idle_seconds, args.settle_seconds)


# -- the table -----------------------------------------------------------------------------------


def summarize(values: list[float], seconds: bool) -> tuple[str, str]:
    """(median, max) as table cells; a stream that died counts as the worst value."""
    if not values:
        return "-", "-"
    finite = [v for v in values if v == v and v != BROKE]
    broke = [v for v in values if v == BROKE]
    if not finite and not broke:
        return "-", "-"

    def cell(v: float) -> str:
        if v == BROKE:
            return "broke"
        if seconds:
            # No gap reached the pausemeter's floor: the stream never visibly stopped.
            return f"<{PAUSE_FLOOR:g}" if v == 0 else f"{v:.2f}"
        return f"{v:.0f}"

    return cell(statistics.median(finite + broke)), cell(max(finite + broke))


def print_table(res: Results, args: argparse.Namespace, workdir: Path) -> None:
    impls = [OVERLAY, WG]
    head = f"{'':44}" + "".join(f"{i:>22}" for i in impls) + f"{'target':>9}"
    sub = f"{'':44}" + "".join(f"{'median':>12}{'max':>10}" for _ in impls)
    print(head)
    print(sub)
    for key, label, target in ROWS:
        cells = ""
        for impl in impls:
            vals = res.values.get(impl, {}).get(key, [])
            if impl == WG and key in ("to_relay", "pause_return", "idle_relay"):
                cells += f"{'n/a':>12}{'':>10}"
                continue
            med, big = summarize(vals, seconds=label.endswith("(s)"))
            cells += f"{med:>12}{big:>10}"
        print(f"{label:<44}{cells}{target:>9}")
    print(f"({args.rounds} round(s); stream {args.rate_mbit:g} Mbit/s TCP on one connection; blackhole {args.hold:g} s; "
          f"overlay on {args.nat} NATs, wireguard-go on {args.wg_nat} NATs with static endpoints and "
          f"PersistentKeepalive {WG_KEEPALIVE}; wireguard-go's 'back to direct' is when the stream's data flowed again "
          f"after the restore, and after a move it sends nothing until its next handshake (~15 s, then TCP's "
          f"backoff); idle over {args.idle_seconds:g} s after {args.settle_seconds:g} s settling; "
          f"'broke' = the stream died; logs in {workdir})")
    for note in res.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each event (default 3; 0: idle only)")
    p.add_argument("--idle-seconds", type=float, default=60.0, help="idle period measured (default 60; 0: none)")
    p.add_argument("--settle-seconds", type=float, default=SETTLE_IDLE,
                   help=f"quiet time before the idle measurement (default {SETTLE_IDLE:g})")
    p.add_argument("--hold", type=float, default=8.0, help="seconds the direct path stays blackholed (default 8)")
    p.add_argument("--rate-mbit", type=float, default=20.0, help="stream rate (default 20 Mbit/s)")
    p.add_argument("--nat", default="port-restricted", help="NAT type for the overlay (default port-restricted)")
    p.add_argument("--wg-nat", default="full-cone", help="NAT type for wireguard-go (default full-cone)")
    p.add_argument("--only", choices=[OVERLAY, WG], help="measure one implementation")
    args = p.parse_args(argv)
    if args.rounds < 0 or args.idle_seconds < 0 or args.settle_seconds < 0 or args.hold <= 0:
        p.error("--rounds, --idle-seconds and --settle-seconds must be 0 or more, --hold positive")
    if args.rounds == 0 and args.idle_seconds == 0:
        p.error("nothing to measure: --rounds and --idle-seconds are both 0")
    if os.geteuid() != 0:
        print("failover bench: needs root (network namespaces, nftables, TUN)", file=sys.stderr)
        return 2
    for tool in ("wireguard-go", "wg", "nft", "conntrack"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    sweep(f"{PREFIX}-")
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    res = Results()
    lab = Lab(PREFIX)
    sc: Scenario | None = None
    tunnel: Tunnel | None = None
    try:
        topo = build(lab)
        sc = Scenario(lab, workdir, IFPREFIX)
        sc.start_relay()
        if args.only in (None, OVERLAY):
            topo.set_nats(args.nat)
            tunnel = OverlayTunnel(sc, topo, "failover")
            run_rounds(topo, tunnel, res, args, 5701)
            tunnel.stop()
            tunnel = None
        if args.only in (None, WG):
            topo.set_nats(args.wg_nat)
            tunnel = WireguardGoPair(topo, workdir)
            run_rounds(topo, tunnel, res, args, 5801)
            tunnel.stop()
            tunnel = None
    except (ScenarioError, BenchError, StreamError) as e:
        res.note("bench", f"stopped early: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if tunnel is not None:
            tunnel.stop()
        if sc is not None:
            sc.close()
        lab.teardown()
    print_table(res, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
