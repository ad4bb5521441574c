"""The lab's nodes (relay, NAT routers, hosts) and the small `ip`/`sysctl` helpers that build them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from . import addressing as ad
from .natrules import NatBehaviour, RouterAddresses
from .netns import Namespace, NetnsError


class LabError(RuntimeError):
    """A lab operation was asked for that cannot be done; nothing was changed."""


@dataclass
class Relay:
    ns: Namespace
    ipv4: str = ad.RELAY_V4[0]
    ipv4_alt: str = ad.RELAY_V4[1]
    ipv6: str = ad.RELAY_V6[0]
    ipv6_alt: str = ad.RELAY_V6[1]
    bridge_port: str = "prelay"
    name: str = "relay"

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.ipv4, self.ipv4_alt, self.ipv6, self.ipv6_alt)


@dataclass
class Nat:
    name: str
    index: int
    ns: Namespace
    behaviour: NatBehaviour

    @property
    def public_ipv4(self) -> str:
        return ad.nat_public_v4(self.index)

    @property
    def public_ipv6(self) -> str:
        return ad.nat_public_v6(self.index)

    @property
    def public_ip(self) -> str:
        return self.public_ipv4

    @property
    def lan_ipv4(self) -> str:
        return ad.lan_v4_net(self.index)

    @property
    def lan_ipv6(self) -> str:
        return ad.lan_v6_net(self.index)

    @property
    def bridge_port(self) -> str:
        return f"p{self.index}"

    def addresses(self) -> RouterAddresses:
        return RouterAddresses(
            wan_if="wan",
            lan_if="lan",
            public_ipv4=self.public_ipv4,
            public_ipv6=self.public_ipv6,
            lan_ipv4=self.lan_ipv4,
            lan_ipv6=self.lan_ipv6,
            relay_ipv4=ad.RELAY_V4,
            relay_ipv6=ad.RELAY_V6,
        )


@dataclass
class Host:
    name: str
    index: int
    ns: Namespace
    nat: Nat
    slot: int  # position on its NAT's LAN; picks the addresses

    @property
    def ipv4(self) -> str:
        return ad.host_v4(self.nat.index, self.slot)

    @property
    def ipv6(self) -> str:
        return ad.host_v6(self.nat.index, self.slot)

    @property
    def lan_port(self) -> str:
        """The router-side end of this host's veth (it travels with the host on a move)."""
        return f"h{self.index}"

    def run(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.ns.run(*args, **kw)

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen:
        return self.ns.popen(args, **kw)


def ip_batch(ns: Namespace | None, commands: list[str]) -> None:
    """Run several `ip` commands in one process (much faster than one each)."""
    argv = ["ip", *(["-n", ns.name] if ns else []), "-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        where = ns.name if ns else "root"
        raise NetnsError(f"[{where}] ip -batch failed: {(proc.stderr or proc.stdout).strip()}")


def sysctls(ns: Namespace, values: dict[str, str | int]) -> None:
    ns.run("sysctl", "-qw", *(f"{k}={v}" for k, v in values.items()))


def link_exists(ns: Namespace, dev: str) -> bool:
    return ns.run("ip", "link", "show", "dev", dev, check=False).returncode == 0
