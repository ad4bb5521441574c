"""`overlay-lab`: build, inspect, fault and tear down the NAT lab from a shell.

    overlay-lab up [--nat nat1=port-restricted] [--host h1=nat1] ...
    overlay-lab status
    overlay-lab exec h1 -- ping 203.0.113.10
    overlay-lab set-nat nat1 symmetric --udp-timeout 30
    overlay-lab blackhole nat1 nat2 / unblackhole nat1 nat2
    overlay-lab netem nat1 --loss 5 --delay 50 --jitter 10 [--one-way]
    overlay-lab relay-offline / relay-online
    overlay-lab move h1 nat2
    overlay-lab down            (also sweeps whatever a crashed run left)
    overlay-lab demo ...        (the guided demo, see overlay.lab.demo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import state
from .natrules import IPV6_MODES, NAT_TYPES, NatConfigError
from .netns import Namespace, NetnsError, list_namespaces, sweep
from .topology import Lab, LabError

DEFAULT_PREFIX = "ovlab"


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "yes", "true", "1"):
        return True
    if text.lower() in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _nat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mapping", help="endpoint-independent or address-and-port-dependent")
    p.add_argument("--filtering", help="endpoint-independent, address-dependent or address-and-port-dependent")
    p.add_argument("--hairpin", type=_on_off, help="on or off")
    p.add_argument("--udp-timeout", type=int, help="seconds a UDP mapping outlives its last outbound packet")
    p.add_argument("--udp-blocked", type=_on_off, help="on: drop UDP, allow only TCP to the relay")
    p.add_argument("--ipv6", choices=IPV6_MODES, help="IPv6 through the router (default firewall)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlay-lab", description="An emulated internet with NAT routers, in namespaces.")
    p.add_argument("--prefix", default=os.environ.get("OVERLAY_LAB_PREFIX", DEFAULT_PREFIX),
                   help=f"namespace name prefix (default {DEFAULT_PREFIX}, or $OVERLAY_LAB_PREFIX)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="build the lab (default: relay, nat1+nat2 port-restricted, h1, h2)")
    up.add_argument("--nat", action="append", type=_pair, default=[], metavar="NAME=TYPE",
                    help=f"a NAT router; TYPE is one of {', '.join(NAT_TYPES)} (repeatable)")
    up.add_argument("--host", action="append", type=_pair, default=[], metavar="NAME=NAT", help="a host (repeatable)")
    up.add_argument("--no-relay", action="store_true", help="leave out the relay host")
    up.add_argument("--udp-timeout", type=int, help="UDP mapping timeout for every NAT")
    up.add_argument("--hairpin", type=_on_off, help="hairpinning for every NAT")

    down = sub.add_parser("down", help="tear the lab down and sweep every namespace starting with the prefix")
    down.set_defaults()
    st = sub.add_parser("status", help="show the lab")
    st.add_argument("--json", action="store_true")

    ex = sub.add_parser("exec", help="run a command in a lab node: overlay-lab exec h1 -- ping 203.0.113.10")
    ex.add_argument("node", help="host, NAT, 'relay' or 'inet'")
    ex.add_argument("argv", nargs=argparse.REMAINDER)

    sn = sub.add_parser("set-nat", help="change a NAT's behaviour live (flushes its conntrack)")
    sn.add_argument("nat")
    sn.add_argument("type", nargs="?", choices=list(NAT_TYPES))
    _nat_options(sn)

    for name, help_ in (("blackhole", "drop everything between two NATs (relay stays reachable)"),
                        ("unblackhole", "undo blackhole")):
        bh = sub.add_parser(name, help=help_)
        bh.add_argument("a")
        bh.add_argument("b")

    ne = sub.add_parser("netem", help="loss/delay/jitter on a node's uplink (no options: clear)")
    ne.add_argument("node")
    ne.add_argument("--loss", type=float, default=0, help="percent")
    ne.add_argument("--delay", type=float, default=0, help="milliseconds")
    ne.add_argument("--jitter", type=float, default=0, help="milliseconds")
    ne.add_argument("--one-way", action="store_true", help="only the node's outgoing packets")

    sub.add_parser("relay-offline", help="cut the relay off the internet")
    sub.add_parser("relay-online", help="put the relay back")
    mv = sub.add_parser("move", help="move a host to another NAT (same NAT: new address)")
    mv.add_argument("host")
    mv.add_argument("nat")

    demo = sub.add_parser("demo", help="run the guided demo", add_help=False)
    demo.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def _attach(prefix: str) -> Lab:
    saved = state.load(prefix)
    if saved is None:
        raise LabError(f"no lab with prefix {prefix!r} is up (start one with `overlay-lab --prefix {prefix} up`)")
    return Lab.attach(saved)


def _mutate(prefix: str, change: Callable[[Lab], Any]) -> None:
    with state.locked(prefix):
        lab = _attach(prefix)
        try:
            change(lab)
        finally:
            state.save(prefix, lab.describe())


def cmd_up(args: argparse.Namespace) -> int:
    nats = args.nat or [("nat1", "port-restricted"), ("nat2", "port-restricted")]
    hosts = args.host or ([("h1", "nat1"), ("h2", "nat2")] if not args.nat else [])
    known = {n for n, _ in nats}
    for host, nat in hosts:
        if nat not in known:
            raise LabError(f"--host {host}={nat}: no --nat named {nat!r}")
    with state.locked(args.prefix):
        if state.load(args.prefix) is not None and Namespace(f"{args.prefix}-inet").exists:
            raise LabError(f"lab {args.prefix!r} is already up (`overlay-lab --prefix {args.prefix} down` first)")
        lab = Lab(args.prefix)
        try:
            if not args.no_relay:
                lab.add_relay()
            for name, nat_type in nats:
                lab.add_nat(name, nat_type, udp_timeout=args.udp_timeout, hairpin=args.hairpin)
            for host, nat in hosts:
                lab.add_host(host, nat)
        except BaseException:
            lab.teardown()  # never leave half a lab behind
            raise
        state.save(args.prefix, lab.describe())
    _print_status(lab.describe())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    with state.locked(args.prefix):
        before = list_namespaces(args.prefix)
        saved = state.load(args.prefix)
        if saved is not None:
            try:
                Lab.attach(saved).teardown()
            except LabError:
                pass  # half gone already; the sweep below removes the rest
        sweep(args.prefix)
        state.forget(args.prefix)
        removed = [n for n in before if n not in list_namespaces(args.prefix)]
    print(f"removed {len(removed)} namespace(s)" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def _print_status(s: dict[str, Any]) -> None:
    print(f"lab {s['prefix']}: internet 203.0.113.0/24, 2001:db8:1::/64")
    if s["relay"]:
        print("  relay      203.0.113.10 203.0.113.11 2001:db8:1::10 2001:db8:1::11"
              + ("   [OFFLINE]" if s["relay_offline"] else ""))
    for n in s["nats"]:
        b = n["behaviour"]
        kind = "udp-blocked" if b["udp_blocked"] else f"{b['mapping']} mapping, {b['filtering']} filtering"
        imp = s["impairments"].get(n["name"])
        print(f"  {n['name']:<10} {n['public_ipv4']} {n['public_ipv6']}  {kind}; hairpin "
              f"{'on' if b['hairpin'] else 'off'}; udp timeout {b['udp_timeout']}s; ipv6 {b['ipv6']}"
              + (f"; netem {imp}" if imp else ""))
    for h in s["hosts"]:
        imp = s["impairments"].get(h["name"])
        print(f"  {h['name']:<10} {h['ipv4']} {h['ipv6']}  behind {h['nat']}" + (f"; netem {imp}" if imp else ""))
    for a, b in s["blackholed"]:
        print(f"  blackholed: bridge ports {a} <-> {b}")


def cmd_status(args: argparse.Namespace) -> int:
    saved = state.load(args.prefix)
    if saved is None:
        raise LabError(f"no lab with prefix {args.prefix!r} is up")
    missing = [ns.name for ns in Lab.attach(saved).namespaces() if not ns.exists]
    if args.json:
        print(json.dumps({**saved, "missing_namespaces": missing}, indent=1))
    else:
        _print_status(saved)
        if missing:
            print(f"  WARNING: namespaces missing: {' '.join(missing)}")
    return 1 if missing else 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("exec needs a command: overlay-lab exec NODE -- COMMAND ...")
    lab = _attach(args.prefix)
    ns = lab.internet if args.node == "inet" else lab.node(args.node).ns
    assert ns is not None
    sys.stdout.flush()
    os.execvp("ip", ns.argv(argv))
    return 127  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from . import demo  # written separately; may not be there yet
    except ImportError as e:
        print(f"overlay-lab: the demo is not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(demo.main(args.argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # everything after it belongs to the demo, options included
        return cmd_demo(argparse.Namespace(argv=argv[1:]))
    args = build_parser().parse_args(argv)
    p = args.prefix
    simple: dict[str, Callable[[Lab], Any]] = {
        "blackhole": lambda lab: lab.blackhole(args.a, args.b),
        "unblackhole": lambda lab: lab.unblackhole(args.a, args.b),
        "relay-offline": lambda lab: lab.relay_offline(),
        "relay-online": lambda lab: lab.relay_online(),
        "move": lambda lab: lab.move(args.host, args.nat),
        "netem": lambda lab: lab.netem(args.node, loss=args.loss, delay_ms=args.delay,
                                       jitter_ms=args.jitter, both_directions=not args.one_way),
        "set-nat": lambda lab: lab.set_nat(args.nat, args.type, mapping=args.mapping, filtering=args.filtering,
                                           hairpin=args.hairpin, udp_timeout=args.udp_timeout,
                                           udp_blocked=args.udp_blocked, ipv6=args.ipv6),
    }
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "exec": cmd_exec, "demo": cmd_demo}
    try:
        if os.geteuid() != 0 and args.command not in ("demo",):
            raise LabError("the lab needs root (network namespaces and nftables)")
        if args.command in simple:
            _mutate(p, simple[args.command])
            if args.command == "move":
                host = state.load(p)
                moved = next(h for h in (host or {}).get("hosts", []) if h["name"] == args.host)
                print(f"{args.host} is now {moved['ipv4']} {moved['ipv6']} behind {moved['nat']}")
            return 0
        return commands[args.command](args)
    except (LabError, NatConfigError, NetnsError, ValueError) as e:
        print(f"overlay-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
