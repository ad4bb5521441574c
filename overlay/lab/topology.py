"""The lab: an emulated internet of namespaces with NAT routers, hosts and a relay.

    relay ── br0 (internet namespace) ── wan [NAT router] lan ── eth0 [host]
                                      └─ wan [NAT router] lan ── eth0 [host]

Every namespace is named `<prefix>-<role>`; nothing is created in the root
namespace, veth pairs are made directly inside the namespaces (`ip -n`), and
`teardown()` (or leaving the `with` block) deletes it all. `sweep(prefix)`
removes what a crashed run left behind.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from . import addressing as ad
from .faults import Impairment, render_path_faults
from .natrules import NatBehaviour, render_router_rules
from .netns import Namespace, sweep
from .nodes import Host, LabError, Nat, Relay, ip_batch, link_exists, sysctls
from .splice import splice, unsplice

__all__ = ["Host", "Lab", "LabError", "Nat", "Relay"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
_RESERVED = {"inet", "relay"}


# Addresses must be usable at once (no duplicate address detection) and the
# bridge must not feed frames into the IP hooks of the namespace it lives in.
_COMMON_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv6.conf.all.disable_ipv6": 0,
}
_BRIDGE_SYSCTLS = {
    "net.bridge.bridge-nf-call-iptables": 0,
    "net.bridge.bridge-nf-call-ip6tables": 0,
    "net.bridge.bridge-nf-call-arptables": 0,
}


class Lab:
    """An emulated internet; use as a context manager so it is always torn down."""

    def __init__(self, prefix: str = "ovlab"):
        if not _PREFIX_RE.match(prefix):
            raise LabError(f"lab prefix {prefix!r} must be letters, digits, '_', '.', '-' (at most 41)")
        self.prefix = prefix
        self.internet: Namespace | None = None
        self.relay: Relay | None = None
        self.nats: dict[str, Nat] = {}
        self.hosts: dict[str, Host] = {}
        self._blackholed: set[tuple[str, str]] = set()  # pairs of bridge port names
        self._relay_offline = False
        self._impairments: dict[str, tuple[Impairment, bool]] = {}
        self._next_nat = 1
        self._next_host = 1
        # Userspace link emulators by node name: (pid, Popen if this process started it).
        self._splices: dict[str, tuple[int, subprocess.Popen | None]] = {}
        self._netem_kernel: bool | None = None

    # -- context manager -------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def ns_name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    # -- building ----------------------------------------------------------

    def _ensure_internet(self) -> Namespace:
        if self.internet is not None:
            return self.internet
        ns = Namespace(self.ns_name("inet"))
        if ns.exists:
            raise LabError(f"namespace {ns.name} already exists: run `overlay-lab down --prefix {self.prefix}` first")
        ns.create()
        self.internet = ns
        sysctls(ns, {**_COMMON_SYSCTLS, **_BRIDGE_SYSCTLS})
        ip_batch(ns, ["link add br0 address 02:00:00:00:00:fe type bridge mcast_snooping 0", "link set br0 up"])
        self._apply_path_faults()
        return ns

    def _new_namespace(self, role: str) -> Namespace:
        ns = Namespace(self.ns_name(role))
        if ns.exists:
            raise LabError(f"namespace {ns.name} already exists")
        ns.create()
        return ns

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.match(name) or name in _RESERVED:
            raise LabError(f"node name {name!r} must be lower-case letters, digits or '_' (max 20), not inet/relay")
        if name in self.nats or name in self.hosts:
            raise LabError(f"a node named {name!r} already exists in this lab")

    def add_relay(self) -> Relay:
        """The relay host on the internet: two IPv4 and two IPv6 addresses (RFC 5780 needs two)."""
        if self.relay is not None:
            raise LabError("this lab already has a relay")
        inet = self._ensure_internet()
        ns = self._new_namespace("relay")
        try:
            sysctls(ns, _COMMON_SYSCTLS)
            relay = Relay(ns)
            ip_batch(inet, [f"link add {relay.bridge_port} type veth peer name eth0 netns {ns.name}",
                             f"link set {relay.bridge_port} master br0 up"])
            cmds = [f"addr add {a}/24 dev eth0" for a in ad.RELAY_V4]
            cmds += [f"addr add {a}/64 dev eth0 nodad" for a in ad.RELAY_V6]
            cmds.append("link set eth0 up")
            cmds += [f"route add {n.lan_ipv6} via {n.public_ipv6}" for n in self.nats.values()]
            ip_batch(ns, cmds)
        except Exception:
            ns.delete()
            if link_exists(inet, "prelay"):
                ip_batch(inet, ["link del prelay"])
            raise
        self.relay = relay
        return relay

    def add_nat(self, name: str, nat_type: str | None = None, *, mapping: str | None = None,
                filtering: str | None = None, hairpin: bool | None = None, udp_timeout: int | None = None,
                udp_blocked: bool | None = None, ipv6: str | None = None) -> Nat:
        """A NAT router on the internet with an empty LAN; `nat_type` is e.g. "port-restricted"."""
        self._check_name(name)
        behaviour = NatBehaviour.of(nat_type, mapping=mapping, filtering=filtering, hairpin=hairpin,
                                    udp_timeout=udp_timeout, udp_blocked=udp_blocked, ipv6=ipv6)
        if self._next_nat > ad.MAX_NATS:
            raise LabError(f"a lab holds at most {ad.MAX_NATS} NATs")
        inet = self._ensure_internet()
        ns = self._new_namespace(name)
        nat = Nat(name, self._next_nat, ns, behaviour)
        try:
            sysctls(ns, {
                **_COMMON_SYSCTLS, **_BRIDGE_SYSCTLS,
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv4.conf.all.send_redirects": 0,
                **_timeoutsysctls(behaviour.udp_timeout),
            })
            ip_batch(inet, [f"link add {nat.bridge_port} type veth peer name wan netns {ns.name}",
                             f"link set {nat.bridge_port} master br0 up"])
            cmds = [
                f"addr add {nat.public_ipv4}/24 dev wan",
                f"addr add {nat.public_ipv6}/64 dev wan nodad",
                "link set wan up",
                # A fixed MAC: a bridge otherwise takes its lowest port's, and changes it as ports come and go.
                f"link add lan address 02:00:00:00:{nat.index:02x}:01 type bridge mcast_snooping 0",
                f"addr add {ad.lan_v4_gateway(nat.index)}/24 dev lan",
                f"addr add {ad.lan_v6_gateway(nat.index)}/64 dev lan nodad",
                "link set lan up",
            ]
            # IPv6 is routed, not translated: every node on the internet needs a route to each LAN.
            cmds += [f"route add {o.lan_ipv6} via {o.public_ipv6}" for o in self.nats.values()]
            ip_batch(ns, cmds)
            ns.nft(render_router_rules(behaviour, nat.addresses()))
            for other in [*(o.ns for o in self.nats.values()), *([self.relay.ns] if self.relay else [])]:
                ip_batch(other, [f"route add {nat.lan_ipv6} via {nat.public_ipv6}"])
        except Exception:
            self._remove_nat_links(nat)
            ns.delete()
            raise
        self._next_nat += 1
        self.nats[name] = nat
        return nat

    def _remove_nat_links(self, nat: Nat) -> None:
        if self.internet and link_exists(self.internet, nat.bridge_port):
            ip_batch(self.internet, [f"link del {nat.bridge_port}"])
        for other in [*(o.ns for o in self.nats.values() if o is not nat), *([self.relay.ns] if self.relay else [])]:
            other.run("ip", "-6", "route", "del", nat.lan_ipv6, check=False)

    def add_host(self, name: str, nat: Nat | str) -> Host:
        """A host on `nat`'s LAN with IPv4 and IPv6 addresses and default routes through it."""
        self._check_name(name)
        nat = self._nat(nat)
        ns = self._new_namespace(name)
        host = Host(name, self._next_host, ns, nat, self._free_slot(nat))
        try:
            sysctls(ns, _COMMON_SYSCTLS)
            ip_batch(nat.ns, [f"link add {host.lan_port} type veth peer name eth0 netns {ns.name}",
                               f"link set {host.lan_port} master lan up"])
            ip_batch(ns, ["link set eth0 up", *self._host_address_commands(host)])
        except Exception:
            ns.delete()
            raise
        self._next_host += 1
        self.hosts[name] = host
        return host

    def _free_slot(self, nat: Nat, avoid: int | None = None) -> int:
        used = {h.slot for h in self.hosts.values() if h.nat is nat}
        if avoid is not None:
            used.add(avoid)
        for slot in range(ad.MAX_HOSTS_PER_LAN):
            if slot not in used:
                return slot
        raise LabError(f"the LAN of {nat.name} is full")

    @staticmethod
    def _host_address_commands(host: Host) -> list[str]:
        return [
            f"addr add {host.ipv4}/24 dev eth0",
            f"addr add {host.ipv6}/64 dev eth0 nodad",
            f"route replace default via {ad.lan_v4_gateway(host.nat.index)}",
            f"route replace ::/0 via {ad.lan_v6_gateway(host.nat.index)}",
        ]

    # -- lookups -----------------------------------------------------------

    def _nat(self, nat: Nat | str) -> Nat:
        name = nat.name if isinstance(nat, Nat) else nat
        if name not in self.nats:
            raise LabError(f"no NAT named {name!r} in this lab (have: {', '.join(self.nats) or 'none'})")
        return self.nats[name]

    def _host(self, host: Host | str) -> Host:
        name = host.name if isinstance(host, Host) else host
        if name not in self.hosts:
            raise LabError(f"no host named {name!r} in this lab (have: {', '.join(self.hosts) or 'none'})")
        return self.hosts[name]

    def node(self, name: str) -> Nat | Host | Relay:
        if name == "relay" and self.relay:
            return self.relay
        if name in self.nats:
            return self.nats[name]
        if name in self.hosts:
            return self.hosts[name]
        raise LabError(f"no node named {name!r} in this lab")

    def namespaces(self) -> list[Namespace]:
        """Hosts first, then routers, relay, internet: the order teardown uses."""
        out = [h.ns for h in self.hosts.values()] + [n.ns for n in self.nats.values()]
        out += [self.relay.ns] if self.relay else []
        out += [Namespace(self.ns_name(f"le-{name}")) for name in self._splices]
        out += [self.internet] if self.internet else []
        return out

    # -- changing NATs -----------------------------------------------------

    def set_nat(self, nat: Nat | str, nat_type: str | None = None, **changes: Any) -> Nat:
        """Change a NAT's behaviour live: new rules, new timeouts, conntrack flushed."""
        nat = self._nat(nat)
        behaviour = nat.behaviour.with_changes(nat_type, **changes)  # validates before touching anything
        sysctls(nat.ns, _timeoutsysctls(behaviour.udp_timeout))
        nat.ns.nft(render_router_rules(behaviour, nat.addresses()))
        # Existing flows keep their old translation until conntrack forgets them.
        for family in ("ipv4", "ipv6"):
            nat.ns.run("conntrack", "-F", "-f", family, check=False)
        nat.behaviour = behaviour
        return nat

    # -- faults --------------------------------------------------------------

    def _bridge_port(self, node: Nat | Relay | str) -> str:
        if isinstance(node, str):
            node = self.node(node)  # type: ignore[assignment]
        if isinstance(node, (Nat, Relay)):
            return node.bridge_port
        raise LabError(f"{node.name} is not on the internet segment: blackhole its NAT instead")

    def blackhole(self, a: Nat | Relay | str, b: Nat | Relay | str) -> None:
        """Drop everything between two NATs (or a NAT and the relay); other paths stay up."""
        pa, pb = self._bridge_port(a), self._bridge_port(b)
        if pa == pb:
            raise LabError("blackhole needs two different nodes")
        self._blackholed.add((min(pa, pb), max(pa, pb)))
        self._apply_path_faults()

    def unblackhole(self, a: Nat | Relay | str, b: Nat | Relay | str) -> None:
        pa, pb = self._bridge_port(a), self._bridge_port(b)
        self._blackholed.discard((min(pa, pb), max(pa, pb)))
        self._apply_path_faults()

    def relay_offline(self) -> None:
        """Cut the relay off the internet (its processes keep running, its packets vanish)."""
        if self.relay is None:
            raise LabError("this lab has no relay")
        self._relay_offline = True
        self._apply_path_faults()

    def relay_online(self) -> None:
        if self.relay is None:
            raise LabError("this lab has no relay")
        self._relay_offline = False
        self._apply_path_faults()

    def _apply_path_faults(self) -> None:
        if self.internet is None:
            return
        offline = ["prelay"] if self._relay_offline else []
        self.internet.nft(render_path_faults(self._blackholed, offline))

    def _links_of(self, node: Nat | Host | Relay) -> tuple[tuple[Namespace, str], tuple[Namespace, str]]:
        """(this side's interface, far side's interface) of a node's uplink."""
        if isinstance(node, Nat):
            assert self.internet is not None
            return (node.ns, "wan"), (self.internet, node.bridge_port)
        if isinstance(node, Relay):
            assert self.internet is not None
            return (node.ns, "eth0"), (self.internet, node.bridge_port)
        return (node.ns, "eth0"), (node.nat.ns, node.lan_port)

    def netem(self, node: Nat | Host | Relay | str, loss: float = 0, delay_ms: float = 0,
              jitter_ms: float = 0, both_directions: bool = True) -> None:
        """Impair a node's uplink (loss %, delay, jitter); all zero clears it.

        One direction means the node's outgoing packets only; both directions
        applies the same impairment to what it receives.
        """
        if isinstance(node, str):
            node = self.node(node)
        imp = Impairment(float(loss), float(delay_ms), float(jitter_ms))
        self._apply_impairment(node, imp, both_directions)
        self._impairments[node.name] = (imp, both_directions)
        if imp.clean:
            del self._impairments[node.name]

    def _apply_impairment(self, node: Nat | Host | Relay, imp: Impairment, both: bool) -> None:
        if self._kernel_has_netem():
            near, far = self._links_of(node)
            for (ns, dev), wanted in ((near, True), (far, both)):
                args = imp.tc_args(dev) if wanted else Impairment().tc_args(dev)
                proc = ns.run("tc", *args, check=False)
                if proc.returncode != 0 and args[1] != "del":
                    raise LabError(f"tc on {ns.name}/{dev} failed: {proc.stderr.strip()}")
            return
        self._unsplice(node)
        if not imp.clean:
            self._splice(node, imp, Impairment() if not both else imp)

    def _kernel_has_netem(self) -> bool:
        if self._netem_kernel is None:
            assert self.internet is not None
            probe = self.internet.run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms", check=False)
            self._netem_kernel = probe.returncode == 0
            if self._netem_kernel:
                self.internet.run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return self._netem_kernel

    def _bridge_side(self, node: Nat | Host | Relay) -> tuple[Namespace, str, str]:
        """(namespace, port name, bridge) of the bridge port that leads to `node`."""
        if isinstance(node, Host):
            return node.nat.ns, node.lan_port, "lan"
        assert self.internet is not None
        return self.internet, node.bridge_port, "br0"

    def _splice(self, node: Nat | Host | Relay, egress: Impairment, ingress: Impairment) -> None:
        """Put the userspace link emulator between `node` and its bridge (no sch_netem here)."""
        ns, port, bridge = self._bridge_side(node)
        em = self._new_namespace(f"le-{node.name}")
        self._splices[node.name] = (0, None)  # from here on, _unsplice can undo a partial splice
        try:
            proc = splice(ns, em, port, bridge, egress, ingress)
        except Exception:
            self._unsplice(node)
            raise
        self._splices[node.name] = (proc.pid, proc)

    def _unsplice(self, node: Nat | Host | Relay) -> None:
        if node.name not in self._splices:
            return
        _, proc = self._splices.pop(node.name)
        ns, port, bridge = self._bridge_side(node)
        unsplice(ns, Namespace(self.ns_name(f"le-{node.name}")), port, bridge, proc)

    # -- mobility ------------------------------------------------------------

    def move(self, host: Host | str, nat: Nat | str) -> Host:
        """Move a running host to another NAT's LAN: same namespace and processes, new addresses."""
        host, nat = self._host(host), self._nat(nat)
        if host.nat is nat:
            return self.readdress(host)
        slot = self._free_slot(nat)
        old = host.nat
        self._unsplice(host)  # the emulator runs in the old router; it is set up again below
        # The router-side end of the veth moves; the host keeps its eth0 (and its sockets).
        ip_batch(old.ns, [f"link set {host.lan_port} netns {nat.ns.name}"])
        ip_batch(nat.ns, [f"link set {host.lan_port} master lan up"])
        host.nat, host.slot = nat, slot
        ip_batch(host.ns, ["addr flush dev eth0 scope global", *self._host_address_commands(host)])
        if host.name in self._impairments:  # moving a link between namespaces drops its qdiscs
            self._apply_impairment(host, *self._impairments[host.name])
        return host

    def readdress(self, host: Host | str) -> Host:
        """Give a host a new address on its current LAN (a DHCP renumbering)."""
        host = self._host(host)
        host.slot = self._free_slot(host.nat, avoid=host.slot)
        ip_batch(host.ns, ["addr flush dev eth0 scope global", *self._host_address_commands(host)])
        return host

    # -- teardown ------------------------------------------------------------

    def teardown(self) -> None:
        """Delete every namespace of this lab (and kill what runs in them)."""
        for ns in self.namespaces():
            ns.delete()
        sweep(f"{self.prefix}-")
        for _, proc in self._splices.values():
            if proc is not None:
                proc.wait(5)  # killed with its namespace; reap it
        self.hosts.clear()
        self.nats.clear()
        self.relay = None
        self.internet = None
        self._blackholed.clear()
        self._impairments.clear()
        self._splices.clear()  # their processes died with the namespaces
        self._relay_offline = False

    # -- state for the CLI -----------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Everything needed to re-attach to this lab from another process (JSON-able)."""
        return {
            "prefix": self.prefix,
            "relay": self.relay is not None,
            "relay_offline": self._relay_offline,
            "nats": [
                {"name": n.name, "index": n.index, "public_ipv4": n.public_ipv4, "public_ipv6": n.public_ipv6,
                 "behaviour": _behaviour_dict(n.behaviour)}
                for n in self.nats.values()
            ],
            "hosts": [
                {"name": h.name, "index": h.index, "nat": h.nat.name, "slot": h.slot, "ipv4": h.ipv4, "ipv6": h.ipv6}
                for h in self.hosts.values()
            ],
            "blackholed": sorted(list(p) for p in self._blackholed),
            "impairments": {k: {"loss": i.loss, "delay_ms": i.delay_ms, "jitter_ms": i.jitter_ms, "both": both}
                            for k, (i, both) in self._impairments.items()},
            "splices": {k: pid for k, (pid, _) in self._splices.items()},
            "netem_kernel": self._netem_kernel,
            "next_nat": self._next_nat,
            "next_host": self._next_host,
        }

    @classmethod
    def attach(cls, state: dict[str, Any]) -> Lab:
        """A Lab object for namespaces an earlier process built (see `describe`)."""
        lab = cls(state["prefix"])
        lab.internet = Namespace(lab.ns_name("inet"))
        if not lab.internet.exists:
            raise LabError(f"lab {lab.prefix!r} is not up (no namespace {lab.internet.name})")
        if state["relay"]:
            lab.relay = Relay(Namespace(lab.ns_name("relay")))
        for n in state["nats"]:
            lab.nats[n["name"]] = Nat(n["name"], n["index"], Namespace(lab.ns_name(n["name"])),
                                      NatBehaviour(**n["behaviour"]))
        for h in state["hosts"]:
            lab.hosts[h["name"]] = Host(h["name"], h["index"], Namespace(lab.ns_name(h["name"])),
                                        lab.nats[h["nat"]], h["slot"])
        lab._blackholed = {tuple(p) for p in state["blackholed"]}  # type: ignore[misc]
        lab._relay_offline = state["relay_offline"]
        lab._impairments = {k: (Impairment(v["loss"], v["delay_ms"], v["jitter_ms"]), v["both"])
                            for k, v in state["impairments"].items()}
        lab._splices = {k: (pid, None) for k, pid in state.get("splices", {}).items()}
        lab._netem_kernel = state.get("netem_kernel")
        lab._next_nat, lab._next_host = state["next_nat"], state["next_host"]
        return lab


def _behaviour_dict(b: NatBehaviour) -> dict[str, Any]:
    return {"mapping": b.mapping, "filtering": b.filtering, "hairpin": b.hairpin,
            "udp_timeout": b.udp_timeout, "udp_blocked": b.udp_blocked, "ipv6": b.ipv6}


def _timeoutsysctls(seconds: int) -> dict[str, int]:
    # Both: a flow that has seen replies moves to the "stream" timeout.
    return {
        "net.netfilter.nf_conntrack_udp_timeout": seconds,
        "net.netfilter.nf_conntrack_udp_timeout_stream": seconds,
    }
