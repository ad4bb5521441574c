"""Faults the lab injects on demand, as text and argument lists (no I/O here).

Path faults live in one bridge-family nft table in the internet namespace:
frames between two NATs' bridge ports are dropped (a blackholed direct path
that leaves each NAT's path to the relay alone), and a relay taken offline is
all frames to or from its port dropped. The table is re-rendered from the
lab's state on every change, so applying it is atomic and idempotent.

Link impairments are tc netem qdiscs on an interface's egress when the kernel
has `sch_netem`; otherwise the lab splices the userspace emulator of
`linkem.py` into the link with the same loss/delay/jitter semantics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FAULTS_TABLE = "lab_faults"


def render_path_faults(blackholed: Iterable[tuple[str, str]], offline_ports: Iterable[str]) -> str:
    """nft script for the internet namespace: `blackholed` are pairs of bridge port names."""
    rules = []
    for a, b in sorted(blackholed):
        rules.append(f'    iifname "{a}" oifname "{b}" drop')
        rules.append(f'    iifname "{b}" oifname "{a}" drop')
    for port in sorted(offline_ports):
        rules.append(f'    iifname "{port}" drop')
        rules.append(f'    oifname "{port}" drop')
    return (
        f"table bridge {FAULTS_TABLE}\ndelete table bridge {FAULTS_TABLE}\n"
        f"table bridge {FAULTS_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        + "".join(r + "\n" for r in rules)
        + "  }\n}\n"
    )


@dataclass(frozen=True)
class Impairment:
    """Loss in percent, delay and jitter in milliseconds; all zero means a clean link."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.loss <= 100:
            raise ValueError(f"loss must be a percentage in 0..100, got {self.loss!r}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must not be negative")
        if self.jitter_ms and not self.delay_ms:
            raise ValueError("jitter_ms needs a delay_ms to vary around")

    @property
    def clean(self) -> bool:
        return not (self.loss or self.delay_ms or self.jitter_ms)

    def tc_args(self, dev: str) -> list[str]:
        """`tc` arguments installing this impairment on `dev` (or removing it when clean)."""
        if self.clean:
            return ["qdisc", "del", "dev", dev, "root"]
        args = ["qdisc", "replace", "dev", dev, "root", "netem"]
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms}ms"]
            if self.jitter_ms:
                args += [f"{self.jitter_ms}ms"]
        if self.loss:
            args += ["loss", f"{self.loss}%"]
        return args
