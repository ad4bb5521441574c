"""What `overlay netcheck` concludes from its measurements, and how it says it.

Plain functions over the results of `netcheck_probe.FamilyCheck` (UDP, one per
address family) and of the TCP checks: no sockets, no clock. `build_report` makes
the JSON document; `format_report` renders it for a person.

The mapping verdict follows RFC 5780 section 4.3: the relay answers from a second
IP address and port (OTHER-ADDRESS), and the mapped address it reports back for
each of them tells how the NAT chose the mapping:

- endpoint-independent: one public address for every destination. Hole punching
  works (the address published through the rendezvous is the one peers see);
- address-dependent / address-and-port-dependent: a new public address per
  destination address (or address and port). Peers see another address than the
  one STUN reported, so direct paths rarely open and the relay carries the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from overlay.netcheck_probe import FamilyResult, MappingTest
from overlay.stun.message import Address

ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
VARIES = "varies by destination"  # dependent, but which kind could not be told
UNKNOWN = "unknown"
# From the most permissive to the most restrictive: with several relays, the worst counts.
_RANK = {ENDPOINT_INDEPENDENT: 0, ADDRESS_DEPENDENT: 1, VARIES: 2, ADDRESS_AND_PORT_DEPENDENT: 3}

MAPPING_MEANING = {
    ENDPOINT_INDEPENDENT: "the same public address for every destination; hole punching can work",
    ADDRESS_DEPENDENT: "a new public address per destination address; direct paths rarely open",
    ADDRESS_AND_PORT_DEPENDENT: "a new public address per destination address and port (symmetric NAT); "
                                "direct paths rarely open",
    VARIES: "the public address changes with the destination; direct paths rarely open",
}


@dataclass
class TcpResult:
    """STUN over TCP to one relay: the fallback when UDP is blocked."""

    server: Address
    ok: bool
    rtt: float | None = None
    mapped: Address | None = None
    error: str | None = None


def fmt_addr(addr: Address | None) -> str | None:
    if addr is None:
        return None
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def classify_test(primary: Address | None, test: MappingTest) -> str:
    """The mapping behaviour one RFC 5780 test shows (UNKNOWN when too little answered)."""
    if primary is None:
        return UNKNOWN
    second, third = test.same_port_other_ip, test.other_ip_other_port
    if second is not None:
        if second == primary:
            return ENDPOINT_INDEPENDENT
        if third is None:
            return VARIES
        return ADDRESS_DEPENDENT if third == second else ADDRESS_AND_PORT_DEPENDENT
    if third is not None:
        return ENDPOINT_INDEPENDENT if third == primary else VARIES
    return UNKNOWN


def classify_mapping(result: FamilyResult) -> str:
    """One verdict for the family: the RFC 5780 tests first; without any (no relay
    offers a second address), the mapped addresses of different relays compared."""
    mapped = {a.server: a.mapped for a in result.servers}
    verdicts = [v for v in (classify_test(mapped.get(t.server), t) for t in result.mapping_tests) if v != UNKNOWN]
    if verdicts:
        return max(verdicts, key=_RANK.__getitem__)
    seen = {a.mapped for a in result.servers if a.mapped is not None}
    answered_ips = {a.server[0] for a in result.servers if a.mapped is not None}
    if len(answered_ips) < 2:
        return UNKNOWN
    return ENDPOINT_INDEPENDENT if len(seen) == 1 else VARIES


def varies_by_destination(mapping: str) -> bool | None:
    if mapping == UNKNOWN:
        return None
    return mapping != ENDPOINT_INDEPENDENT


def family_report(result: FamilyResult | None, local_ip: str | None, wait: float) -> dict[str, Any]:
    """The JSON section of one family."""
    if result is None or not result.servers:
        return {"tested": False, "udp": None, "error": "no relay address of this family", "local_ip": local_ip,
                "srflx": [], "behind_nat": None, "mapping": UNKNOWN, "mapping_varies_by_destination": None,
                "hairpinning": None}
    srflx = list(dict.fromkeys(a.mapped for a in result.servers if a.mapped is not None))
    udp = bool(srflx)
    error = None
    if not udp:
        errors = [a.error for a in result.servers if a.error and a.error != "timeout"]
        error = result.send_error or (errors[0] if errors else
                                      f"no answer from {len(result.servers)} relay address(es) within {wait:g} s")
    behind_nat = None
    if srflx and local_ip is not None:
        # The relay saw another address than the one we send from: a NAT rewrote it.
        behind_nat = any(ip != local_ip for ip, _ in srflx)
    mapping = classify_mapping(result) if udp else UNKNOWN
    return {
        "tested": True,
        "udp": udp,
        "error": error,
        "local_ip": local_ip,
        "srflx": [fmt_addr(a) for a in srflx],
        "behind_nat": behind_nat,
        "mapping": mapping,
        "mapping_varies_by_destination": varies_by_destination(mapping),
        "hairpinning": result.hairpin if behind_nat is not False else None,
    }


def build_report(families: dict[int, FamilyResult | None], tcp: list[TcpResult],
                 local_ips: dict[int, str | None], wait: float = 3.0,
                 sources: list[str] | None = None) -> dict[str, Any]:
    """The whole netcheck document (what `--json` prints)."""
    tcp_by_server = {t.server: t for t in tcp}
    relays: list[dict[str, Any]] = []
    servers_seen: set[Address] = set()
    for family in (4, 6):
        result = families.get(family)
        for ans in result.servers if result is not None else []:
            servers_seen.add(ans.server)
            t = tcp_by_server.get(ans.server)
            relays.append({
                "server": fmt_addr(ans.server),
                "family": family,
                "udp": ans.mapped is not None,
                "udp_rtt_ms": _ms(min(ans.rtts)) if ans.rtts and ans.mapped is not None else None,
                "udp_error": None if ans.mapped is not None else (result.send_error or ans.error or "no answer"),
                "srflx": fmt_addr(ans.mapped),
                "other_address": fmt_addr(ans.other_address),
                "tcp": None if t is None else t.ok,
                "tcp_rtt_ms": None if t is None else _ms(t.rtt),
                "tcp_error": None if t is None else t.error,
            })
    for t in tcp:  # relays only checked over TCP (none here today, but keep them visible)
        if t.server not in servers_seen:
            relays.append({"server": fmt_addr(t.server), "family": 6 if ":" in t.server[0] else 4,
                           "udp": None, "udp_rtt_ms": None, "udp_error": None, "srflx": None,
                           "other_address": None, "tcp": t.ok, "tcp_rtt_ms": _ms(t.rtt), "tcp_error": t.error})
    v4 = family_report(families.get(4), local_ips.get(4), wait)
    v6 = family_report(families.get(6), local_ips.get(6), wait)
    timed = [r for r in relays if r["udp_rtt_ms"] is not None]
    closest = min(timed, key=lambda r: r["udp_rtt_ms"])["server"] if timed else None
    return {
        "sources": sources or [],
        "udp": bool(v4["udp"] or v6["udp"]),
        "ipv4": v4,
        "ipv6": v6,
        "relays": relays,
        "closest_relay": closest,
        "tcp_fallback": None if not tcp else any(t.ok for t in tcp),
    }


def _yes_no(value: bool | None, none: str = "not tested") -> str:
    return none if value is None else ("yes" if value else "no")


def _rtt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def format_report(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if report.get("sources"):
        lines.append(f"relays from: {', '.join(report['sources'])}")
    for name, key in (("IPv4", "ipv4"), ("IPv6", "ipv6")):
        fam = report[key]
        if not fam["tested"]:
            lines.append(f"UDP {name}: not tested ({fam['error']})")
            continue
        if not fam["udp"]:
            lines.append(f"UDP {name}: no ({fam['error']})")
            continue
        lines.append(f"UDP {name}: yes")
        public = ", ".join(fam["srflx"])
        if fam["behind_nat"] is True:
            lines.append(f"  public address: {public} (behind a NAT; local {fam['local_ip']})")
        elif fam["behind_nat"] is False:
            lines.append(f"  public address: {public} (no NAT)")
        else:
            lines.append(f"  public address: {public}")
        mapping = fam["mapping"]
        if mapping == UNKNOWN:
            lines.append("  mapping: unknown (the relay offers no second address and only one relay answered)")
        else:
            lines.append(f"  mapping: {mapping} ({MAPPING_MEANING[mapping]})")
        if fam["behind_nat"] is not False:
            lines.append(f"  hairpinning: {_yes_no(fam['hairpinning'])}")
    lines.append("relays:")
    if not report["relays"]:
        lines.append("  (none)")
    width = max((len(r["server"]) for r in report["relays"]), default=0)
    for r in report["relays"]:
        udp = _rtt(r["udp_rtt_ms"]) if r["udp"] else f"failed ({r['udp_error']})" if r["udp"] is False else "-"
        tcp = "not tested" if r["tcp"] is None else _rtt(r["tcp_rtt_ms"]) if r["tcp"] else f"failed ({r['tcp_error']})"
        mark = "  (closest)" if r["server"] == report["closest_relay"] else ""
        lines.append(f"  {r['server']:<{width}}  UDP {udp}  TCP {tcp}{mark}")
    lines.append(f"TCP fallback: {_yes_no(report['tcp_fallback'])}")
    return "\n".join(lines)
