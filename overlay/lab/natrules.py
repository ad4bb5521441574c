"""NAT behaviours (RFC 4787 terms) and the nftables rulesets that produce them.

Pure text generation, no I/O: the lab loads what `render_router_rules` returns
into a router namespace. Stock nftables has no "full cone" target, so the cone
behaviours are built from three dynamic nft containers the router fills as
outbound packets leave (each entry lives `udp_timeout` seconds after the last
*outbound* packet, as RFC 4787 REQ-6 asks):

- `mapping_out` (internal endpoint -> external endpoint): a later flow from the
  same internal endpoint is forced onto the same external port, which is what
  makes the mapping endpoint-independent even when the kernel would pick
  another port;
- `mapping_in` (external port -> internal endpoint): unsolicited packets to a
  live mapping are DNATed through it, which is how endpoint-independent and
  address-dependent filtering let strangers in;
- `contacted` (internal endpoint, remote address): the remote addresses an
  internal endpoint has sent to, for address-dependent filtering.

Address-and-port-dependent filtering needs none of them: conntrack alone only
lets replies in. Unsolicited WAN packets are dropped in the router's input
chain, before conntrack confirms them, so that they never leave an
`[UNREPLIED]` entry that would steal the host's port.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

EIM = "endpoint-independent"
APDM = "address-and-port-dependent"
EIF = "endpoint-independent"
ADF = "address-dependent"
APDF = "address-and-port-dependent"

MAPPINGS = (EIM, APDM)
FILTERINGS = (EIF, ADF, APDF)
IPV6_MODES = ("firewall", "open", "nat66", "broken")

# The usual names of the classic NAT types, mapped onto RFC 4787 behaviours.
NAT_TYPES: dict[str, dict[str, object]] = {
    "full-cone": {"mapping": EIM, "filtering": EIF, "udp_blocked": False},
    "restricted": {"mapping": EIM, "filtering": ADF, "udp_blocked": False},
    "port-restricted": {"mapping": EIM, "filtering": APDF, "udp_blocked": False},
    "symmetric": {"mapping": APDM, "filtering": APDF, "udp_blocked": False},
    "udp-blocked": {"mapping": EIM, "filtering": APDF, "udp_blocked": True},
}

_ALIASES = {
    "eim": EIM,
    "independent": EIM,
    "endpoint-independent": EIM,
    "eif": EIF,
    "adm": "address-dependent",
    "adf": ADF,
    "address": ADF,
    "address-dependent": ADF,
    "apdm": APDM,
    "apdf": APDF,
    "port": APDF,
    "address-and-port-dependent": APDF,
}


class NatConfigError(ValueError):
    """A NAT behaviour was asked for that the lab does not know."""


@dataclass(frozen=True)
class NatBehaviour:
    mapping: str = EIM
    filtering: str = APDF
    hairpin: bool = False
    udp_timeout: int = 30  # seconds a UDP mapping outlives its last outbound packet
    udp_blocked: bool = False  # drop all UDP (and everything but TCP to the relay)
    ipv6: str = "firewall"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mapping", _canonical(self.mapping, "mapping", MAPPINGS))
        object.__setattr__(self, "filtering", _canonical(self.filtering, "filtering", FILTERINGS))
        if self.ipv6 not in IPV6_MODES:
            raise NatConfigError(f"ipv6 mode {self.ipv6!r} unknown; choose one of {', '.join(IPV6_MODES)}")
        if not isinstance(self.udp_timeout, int) or isinstance(self.udp_timeout, bool) or not 1 <= self.udp_timeout <= 86400:
            raise NatConfigError(f"udp_timeout must be whole seconds in 1..86400, got {self.udp_timeout!r}")
        for flag in ("hairpin", "udp_blocked"):
            if not isinstance(getattr(self, flag), bool):
                raise NatConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")

    @classmethod
    def of(cls, nat_type: str | None = None, **changes: object) -> NatBehaviour:
        """A behaviour from a classic type name ("full-cone", ...) plus explicit fields."""
        base: dict[str, object] = {}
        if nat_type is not None:
            if nat_type not in NAT_TYPES:
                raise NatConfigError(f"NAT type {nat_type!r} unknown; choose one of {', '.join(NAT_TYPES)}")
            base.update(NAT_TYPES[nat_type])
        unknown = set(changes) - set(cls.__dataclass_fields__)
        if unknown:
            raise NatConfigError(f"unknown NAT setting(s): {', '.join(sorted(unknown))}")
        base.update({k: v for k, v in changes.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]

    def with_changes(self, nat_type: str | None = None, **changes: object) -> NatBehaviour:
        fields = asdict(self)
        if nat_type is not None:
            if nat_type not in NAT_TYPES:
                raise NatConfigError(f"NAT type {nat_type!r} unknown; choose one of {', '.join(NAT_TYPES)}")
            fields.update(NAT_TYPES[nat_type])
        unknown = set(changes) - set(fields)
        if unknown:
            raise NatConfigError(f"unknown NAT setting(s): {', '.join(sorted(unknown))}")
        fields.update({k: v for k, v in changes.items() if v is not None})
        return replace(self, **fields)

    @property
    def type_name(self) -> str:
        """The classic name of this behaviour, or its RFC 4787 description."""
        if self.udp_blocked:
            return "udp-blocked"
        for name, spec in NAT_TYPES.items():
            if spec["mapping"] == self.mapping and spec["filtering"] == self.filtering and not spec["udp_blocked"]:
                return name
        return f"{self.mapping} mapping, {self.filtering} filtering"


def _canonical(value: object, what: str, allowed: tuple[str, ...]) -> str:
    name = _ALIASES.get(str(value).lower(), str(value).lower())
    if name not in allowed:
        raise NatConfigError(f"{what} {value!r} not supported; choose one of {', '.join(allowed)}")
    return name


@dataclass(frozen=True)
class RouterAddresses:
    """What the rules need to know about one router."""

    wan_if: str
    lan_if: str
    public_ipv4: str
    public_ipv6: str
    lan_ipv4: str  # network, e.g. 10.1.0.0/24
    lan_ipv6: str  # network, e.g. 2001:db8:100::/64
    relay_ipv4: tuple[str, ...]
    relay_ipv6: tuple[str, ...]


IPV4_TABLE = "lab_nat4"
IPV6_TABLE = "lab_nat6"


def render_router_rules(b: NatBehaviour, a: RouterAddresses) -> str:
    """The complete nft script for one router, replacing what it had before."""
    return (
        # Declaring then deleting makes the script idempotent and atomic.
        f"table ip {IPV4_TABLE}\ndelete table ip {IPV4_TABLE}\n"
        f"table ip6 {IPV6_TABLE}\ndelete table ip6 {IPV6_TABLE}\n"
        + _render_ipv4(b, a)
        + _render_ipv6(b, a)
    )


def _render_ipv4(b: NatBehaviour, a: RouterAddresses) -> str:
    wan, lan, pub, net = f'"{a.wan_if}"', f'"{a.lan_if}"', a.public_ipv4, a.lan_ipv4
    t = b.udp_timeout
    cone = b.filtering != APDF or b.hairpin
    relay = "{ " + ", ".join(a.relay_ipv4) + " }"
    lines = [f"table ip {IPV4_TABLE} {{"]
    lines += [
        f"  map mapping_out {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; flags timeout; timeout {t}s; }}",
        f"  map mapping_in {{ type inet_service : ipv4_addr . inet_service; flags timeout; timeout {t}s; }}",
        f"  set contacted {{ type ipv4_addr . inet_service . ipv4_addr; flags timeout; timeout {t}s; }}",
    ]

    pre = []
    if cone and b.filtering != APDF and not b.udp_blocked:
        pre.append(f"    iifname {wan} ip daddr {pub} ct state new dnat ip to udp dport map @mapping_in")
    if b.hairpin:
        pre.append(f"    iifname {lan} ip daddr {pub} ct state new dnat ip to udp dport map @mapping_in")
    lines += ["  chain prerouting_nat {", "    type nat hook prerouting priority dstnat; policy accept;", *pre, "  }"]

    post = []
    if b.mapping == EIM:
        post.append(f"    oifname {wan} ip saddr {net} snat ip to ip saddr . udp sport map @mapping_out")
        post.append(f"    oifname {wan} ip saddr {net} snat ip to {pub}")
    else:
        post.append(f"    oifname {wan} ip saddr {net} snat ip to {pub} fully-random")
    if b.hairpin:
        # The target host must see the sender's public mapping, not its LAN address.
        post.append(f"    oifname {lan} ip saddr {net} ct status dnat snat ip to ip saddr . udp sport map @mapping_out")
        post.append(f"    oifname {lan} ip saddr {net} ct status dnat snat ip to {pub}")
    lines += ["  chain postrouting_nat {", "    type nat hook postrouting priority srcnat; policy accept;", *post, "  }"]

    # After SNAT: the packet carries its external port; conntrack knows the internal one.
    record = [
        f"    oifname {wan} ct direction original update @mapping_in {{ udp sport : ct original ip saddr . ct original proto-src }}"
        f" update @mapping_out {{ ct original ip saddr . ct original proto-src : ip saddr . udp sport }}",
        f"    oifname {wan} ct direction reply update @mapping_in {{ udp sport : ct reply ip saddr . ct reply proto-src }}"
        f" update @mapping_out {{ ct reply ip saddr . ct reply proto-src : ip saddr . udp sport }}",
    ]
    lines += ["  chain record_mappings {", "    type filter hook postrouting priority srcnat + 10; policy accept;", *record, "  }"]

    fwd = ["    ct state established,related accept"]
    if b.udp_blocked:
        fwd.append(f"    iifname {lan} oifname {wan} ip daddr {relay} meta l4proto tcp accept")
    else:
        fwd.append(f"    iifname {lan} oifname {wan} update @contacted {{ ip saddr . udp sport . ip daddr }} accept")
        fwd.append(f"    iifname {lan} oifname {wan} accept")
        if b.filtering == EIF:
            fwd.append(f"    iifname {wan} oifname {lan} ct status dnat accept")
        elif b.filtering == ADF:
            fwd.append(f"    iifname {wan} oifname {lan} ct status dnat ip daddr . udp dport . ip saddr @contacted accept")
    if b.hairpin:
        fwd.append(f"    iifname {lan} oifname {lan} ct status dnat accept")
    lines += ["  chain forward_filter {", "    type filter hook forward priority filter; policy drop;", *fwd, "  }"]

    inp = [
        f"    iifname {wan} ct state established,related accept",
        f"    iifname {wan} icmp type echo-request accept",
        f"    iifname {wan} drop",
        # Hairpin off (or no live mapping): the router's public address is a dead end from inside.
        f"    iifname {lan} ip daddr {pub} drop",
    ]
    lines += ["  chain input_filter {", "    type filter hook input priority filter; policy accept;", *inp, "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_ipv6(b: NatBehaviour, a: RouterAddresses) -> str:
    wan, lan = f'"{a.wan_if}"', f'"{a.lan_if}"'
    relay = "{ " + ", ".join(a.relay_ipv6) + " }"
    lines = [f"table ip6 {IPV6_TABLE} {{"]
    fwd: list[str] = []
    if b.ipv6 == "broken":
        pass  # addresses stay, every forwarded packet is dropped
    elif b.ipv6 == "open":
        fwd.append("    accept")
    else:
        fwd.append("    ct state established,related accept")
        if b.udp_blocked:
            fwd.append(f"    iifname {lan} oifname {wan} ip6 daddr {relay} meta l4proto tcp accept")
        else:
            fwd.append(f"    iifname {lan} oifname {wan} accept")
    lines += ["  chain forward_filter {", "    type filter hook forward priority filter; policy drop;", *fwd, "  }"]
    if b.ipv6 == "nat66":
        random = " fully-random" if b.mapping == APDM else ""
        lines += [
            "  chain postrouting_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname {wan} ip6 saddr {a.lan_ipv6} snat ip6 to {a.public_ipv6}{random}",
            "  }",
        ]
    inp = [
        # Neighbour discovery must keep working on the WAN side.
        f"    iifname {wan} meta l4proto ipv6-icmp accept",
        f"    iifname {wan} ct state established,related accept",
        f"    iifname {wan} drop",
    ]
    lines += ["  chain input_filter {", "    type filter hook input priority filter; policy accept;", *inp, "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"
