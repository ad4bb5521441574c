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
"""

from __future__ import annotations

import json
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
