"""Turn the current network namespace into one of the lab's NAT routers.

For Docker users (docker-compose.yml runs this in the router containers, which
need NET_ADMIN): the interfaces are found by the addresses Docker gave them,
and the same nftables rules the lab uses are loaded. The conntrack timeouts
and forwarding switches are set by compose `sysctls:` (a container cannot
write /proc/sys itself).

    python -m overlay.lab.router --public-ipv4 203.0.113.101 --lan-ipv4 10.1.0.0/24 --type port-restricted
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import subprocess
import sys

from . import addressing as ad
from .natrules import IPV6_MODES, NAT_TYPES, NatBehaviour, NatConfigError, RouterAddresses, render_router_rules


def _interfaces() -> list[dict]:
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _find_interface(links: list[dict], match) -> str | None:
    for link in links:
        for a in link.get("addr_info", []):
            if match(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")):
                return link["ifname"]
    return None


def build_rules(args: argparse.Namespace, links: list[dict]) -> str:
    public = ipaddress.ip_address(args.public_ipv4)
    lan = ipaddress.ip_network(args.lan_ipv4)
    wan_if = _find_interface(links, lambda i: i.ip == public)
    lan_if = _find_interface(links, lambda i: i.ip in lan)
    if wan_if is None:
        raise NatConfigError(f"no interface has the public address {public}")
    if lan_if is None:
        raise NatConfigError(f"no interface has an address in the LAN {lan}")
    behaviour = NatBehaviour.of(args.type, hairpin=args.hairpin, udp_timeout=args.udp_timeout, ipv6=args.ipv6)
    addrs = RouterAddresses(
        wan_if=wan_if, lan_if=lan_if, public_ipv4=str(public), public_ipv6=args.public_ipv6,
        lan_ipv4=str(lan), lan_ipv6=args.lan_ipv6,
        relay_ipv4=tuple(args.relay_ipv4 or ad.RELAY_V4), relay_ipv6=tuple(args.relay_ipv6 or ad.RELAY_V6),
    )
    return render_router_rules(behaviour, addrs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overlay.lab.router", description=__doc__.splitlines()[0])
    p.add_argument("--public-ipv4", required=True)
    p.add_argument("--lan-ipv4", required=True, help="the LAN network, e.g. 10.1.0.0/24")
    p.add_argument("--public-ipv6", default="2001:db8:1::101")
    p.add_argument("--lan-ipv6", default="2001:db8:100::/64")
    p.add_argument("--type", choices=list(NAT_TYPES), default="port-restricted")
    p.add_argument("--hairpin", action="store_true")
    p.add_argument("--udp-timeout", type=int, default=30, help="give the conntrack sysctls the same value")
    p.add_argument("--ipv6", choices=IPV6_MODES, default="firewall")
    p.add_argument("--relay-ipv4", action="append", help="relay addresses a udp-blocked NAT still lets TCP reach")
    p.add_argument("--relay-ipv6", action="append")
    p.add_argument("--print", action="store_true", help="print the ruleset instead of loading it")
    p.add_argument("--wait", action="store_true", help="stay in the foreground afterwards (container main process)")
    args = p.parse_args(argv)
    try:
        rules = build_rules(args, _interfaces())
    except (NatConfigError, ValueError) as e:
        print(f"overlay-lab router: error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(rules)
        return 0
    proc = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"overlay-lab router: nft refused the rules: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"router ready: {args.type} NAT, public {args.public_ipv4}, LAN {args.lan_ipv4}", flush=True)
    if args.wait:
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
