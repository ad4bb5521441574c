"""Counting which way a lab's traffic really went: bytes between two NATs, and
bytes between each NAT and the relay, measured on the internet bridge.

The agent's own status says "direct" or "relay"; this is the independent check
a user would make with a packet counter: during a transfer of N bytes, a direct
path moves at least N bytes NAT to NAT, a relayed one moves them through the
relay's port and (almost) nothing NAT to NAT.

    meter = PathMeter(lab, nat1, nat2, "m1")
    before = meter.read()
    ... transfer ...
    moved = meter.read() - before     # Traffic(direct=..., via_relay=...)
    meter.remove()

ImpairedDirectPath puts loss, delay and jitter on the NAT-to-NAT path alone,
leaving both NATs' paths to the relay clean.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass

from overlay.lab import Lab, Nat


@dataclass(frozen=True)
class Traffic:
    direct: int  # bytes NAT1 <-> NAT2
    via_relay: int  # bytes NAT1 <-> relay plus NAT2 <-> relay

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.direct - other.direct, self.via_relay - other.via_relay)


class PathMeter:
    def __init__(self, lab: Lab, a: Nat, b: Nat, tag: str):
        assert lab.internet is not None and lab.relay is not None
        self.ns = lab.internet
        self.table = f"ovtr_meter_{tag}"
        relay = lab.relay.bridge_port
        self.groups = {
            "direct": [(a.bridge_port, b.bridge_port), (b.bridge_port, a.bridge_port)],
            "via_relay": [(p, relay) for p in (a.bridge_port, b.bridge_port)]
            + [(relay, p) for p in (a.bridge_port, b.bridge_port)],
        }
        counters, rules = [], []
        for group, pairs in self.groups.items():
            for i, (src, dst) in enumerate(pairs):
                name = f"{group}_{i}"
                counters.append(f"  counter {name} {{ }}")
                rules.append(f'    iifname "{src}" oifname "{dst}" counter name "{name}"')
        # After the lab's fault table (priority filter): dropped frames are not counted.
        self.ns.nft(
            f"table bridge {self.table}\ndelete table bridge {self.table}\n"
            f"table bridge {self.table} {{\n" + "\n".join(counters) + "\n"
            "  chain forward {\n    type filter hook forward priority 100; policy accept;\n"
            + "\n".join(rules) + "\n  }\n}\n"
        )

    def read(self) -> Traffic:
        out = self.ns.run("nft", "-j", "list", "counters", "table", "bridge", self.table).stdout
        by_name = {}
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                by_name[item["counter"]["name"]] = item["counter"]["bytes"]
        totals = {g: sum(by_name.get(f"{g}_{i}", 0) for i in range(len(p))) for g, p in self.groups.items()}
        return Traffic(totals["direct"], totals["via_relay"])

    def remove(self) -> None:
        self.ns.run("nft", "delete", "table", "bridge", self.table, check=False)


class ImpairedDirectPath:
    """Loss, delay and jitter on the direct path between two NATs only; their paths to the
    relay stay clean (the lab's own `netem` impairs a node's whole uplink, relay traffic too).

    Frames from one NAT addressed to the other's MAC are taken off the internet bridge at
    the NAT's port (netdev ingress, `fwd`), run through the lab's userspace link emulator
    (`overlay.lab.linkem`, the same loss/delay/jitter semantics as the lab's netem) on a
    veth pair of their own, and handed to the other NAT's port. ARP broadcasts and every
    frame to or from the relay keep going through the bridge untouched.

    Frames taken this way skip the bridge, so PathMeter does not count them and a lab
    blackhole does not apply to them; `frames()` counts them instead.

        imp = ImpairedDirectPath(lab, nat1, nat2, "i3", loss=25)
        ... traffic ...
        imp.frames()          # {"a_to_b": n, "b_to_a": m}: the direct path was really used
        imp.remove()
    """

    def __init__(self, lab: Lab, a: Nat, b: Nat, tag: str, loss: float = 0.0, delay_ms: float = 0.0,
                 jitter_ms: float = 0.0):
        assert lab.internet is not None
        self.ns = lab.internet
        self.table = f"ovtr_direct_{tag}"
        # Veth ends in the internet namespace: j* take frames in and out, k* are the emulator's.
        self.ja, self.ka, self.jb, self.kb = (f"dq{tag}{x}" for x in ("ja", "ka", "jb", "kb"))
        if len(self.ka) > 15:
            raise ValueError(f"tag {tag!r} is too long for interface names")
        self.proc = None
        profile = f"{loss},{delay_ms},{jitter_ms}"
        mac_a, mac_b = _wan_mac(a), _wan_mac(b)
        try:
            self.ns.run("ip", "link", "add", self.ja, "type", "veth", "peer", "name", self.ka)
            self.ns.run("ip", "link", "add", self.jb, "type", "veth", "peer", "name", self.kb)
            for dev in (self.ja, self.ka, self.jb, self.kb):
                # No addresses, no IPv6 chatter of their own: only the NATs' frames cross them.
                self.ns.run("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
                self.ns.run("ip", "link", "set", dev, "up", "promisc", "on")
            # Frames a sends enter the emulator at ka ("egress" profile) and leave at kb.
            self.proc = self.ns.popen([sys.executable, "-m", "overlay.lab.linkem", self.ka, self.kb,
                                       "--egress", profile, "--ingress", profile],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], 10)
            if not ready or self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the link emulator for the direct path did not start")
            pa, pb = a.bridge_port, b.bridge_port
            self.ns.nft(
                f"table netdev {self.table}\ndelete table netdev {self.table}\n"
                f"table netdev {self.table} {{\n"
                + _fwd_chain("a_out", pa, f"ether daddr {mac_b} counter name a_to_b", self.ja)
                + _fwd_chain("b_out", pb, f"ether daddr {mac_a} counter name b_to_a", self.jb)
                + _fwd_chain("to_b", self.jb, "", pb)
                + _fwd_chain("to_a", self.ja, "", pa)
                + "  counter a_to_b { }\n  counter b_to_a { }\n}\n"
            )
        except BaseException:
            self.remove()
            raise

    def frames(self) -> dict[str, int]:
        """Frames each way that entered the emulator (before its losses)."""
        out = self.ns.run("nft", "-j", "list", "counters", "table", "netdev", self.table).stdout
        return {item["counter"]["name"]: item["counter"]["packets"]
                for item in json.loads(out)["nftables"] if "counter" in item}

    def remove(self) -> None:
        self.ns.run("nft", "delete", "table", "netdev", self.table, check=False)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for dev in (self.ja, self.jb):  # deleting one end of a veth deletes its peer
            self.ns.run("ip", "link", "del", dev, check=False)


def _fwd_chain(name: str, device: str, match: str, to: str) -> str:
    return (f"  chain {name} {{\n    type filter hook ingress device \"{device}\" priority -10; policy accept;\n"
            f"    {match} fwd to \"{to}\"\n  }}\n")


def _wan_mac(nat: Nat) -> str:
    return json.loads(nat.ns.run("ip", "-j", "link", "show", "dev", "wan").stdout)[0]["address"]
