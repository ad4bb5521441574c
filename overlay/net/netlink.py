"""Interface addresses, MTU, link state and AllowedIPs routes through rtnetlink."""

from __future__ import annotations

import ipaddress

from pyroute2 import AsyncIPRoute

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Packets the kernel may queue for us while Python is busy with a burst; the
# default 500 overflows under bulk TCP and shows up as retransmissions.
TXQUEUELEN = 2000


async def link_index(ipr: AsyncIPRoute, ifname: str) -> int:
    found = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(f"interface {ifname} not found")
    return found[0]


async def configure_link(ifname: str, addresses: list[IPInterface], mtu: int) -> int:
    """Addresses, MTU and link up; returns the interface index."""
    async with AsyncIPRoute() as ipr:
        idx = await link_index(ipr, ifname)
        await ipr.link("set", index=idx, mtu=mtu, txqlen=TXQUEUELEN)
        for addr in addresses:
            # No duplicate address detection on a point-to-point tunnel (IFA_F_NODAD).
            kw = {"flags": 0x02} if addr.version == 6 else {}
            await ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen,
                           **kw)
        await ipr.link("set", index=idx, state="up")
        return idx


class RouteSyncError(OSError):
    """Some routes could not be added; `installed` is what is in place now."""

    def __init__(self, installed: set, failures: list[str]):
        super().__init__("cannot add routes: " + "; ".join(failures))
        self.installed = installed


async def sync_routes(ifindex: int, desired: set[IPNetwork], installed: set[IPNetwork],
                      sources: dict[IPNetwork, str] | None = None) -> set[IPNetwork]:
    """Make the routes through `ifindex` match `desired`; returns what is installed now.

    `sources` gives some routes a preferred source address: with several addresses on
    the interface the kernel would otherwise pick the first one, which the peer may
    not accept (its AllowedIPs for us hold only our overlay address)."""
    now_installed = set(installed)
    failures: list[str] = []
    async with AsyncIPRoute() as ipr:
        for net in sorted(installed - desired, key=str):
            try:
                await ipr.route("del", dst=str(net), oif=ifindex)
            except Exception:  # already gone (link down, address removed)
                pass
            now_installed.discard(net)
        for net in sorted(desired - installed, key=str):
            src = (sources or {}).get(net)
            try:
                if src:
                    await ipr.route("replace", dst=str(net), oif=ifindex, prefsrc=src)
                else:
                    await ipr.route("replace", dst=str(net), oif=ifindex)
            except Exception as exc:  # e.g. IPv6 disabled on the link: keep the others
                failures.append(f"{net}: {exc}")
                continue
            now_installed.add(net)
    if failures:
        raise RouteSyncError(now_installed, failures)
    return now_installed
