"""The lab's fixed address plan (documentation ranges only, never routed outside).

    internet segment   203.0.113.0/24        2001:db8:1::/64
    relay              203.0.113.10, .11     2001:db8:1::10, 2001:db8:1::11
    NAT n (WAN)        203.0.113.(100+n)     2001:db8:1::(100+n)
    NAT n (LAN)        10.n.0.0/24, .1       2001:db8:n00::/64, ::1 (n in hex)
    host k on a LAN    10.n.0.(10+k)         2001:db8:n00::(10+k)

Interface names: each lives in its own namespace, so short fixed names are
reused everywhere (`br0`, `wan`, `lan`, `eth0`); the only names that must be
unique are the bridge ports in the internet namespace (`p<n>`, `prelay`) and
the host ports on a router's LAN bridge (`h<host index>`).
"""

from __future__ import annotations

MAX_NATS = 150  # keeps 203.0.113.(100+n) inside the /24
MAX_HOSTS_PER_LAN = 240

INTERNET_V4 = "203.0.113.0/24"
INTERNET_V6 = "2001:db8:1::/64"
RELAY_V4 = ("203.0.113.10", "203.0.113.11")
RELAY_V6 = ("2001:db8:1::10", "2001:db8:1::11")


def nat_public_v4(n: int) -> str:
    return f"203.0.113.{100 + n}"


def nat_public_v6(n: int) -> str:
    return f"2001:db8:1::{100 + n}"


def lan_v4_net(n: int) -> str:
    return f"10.{n}.0.0/24"


def lan_v6_net(n: int) -> str:
    return f"2001:db8:{n:x}00::/64"


def lan_v4_gateway(n: int) -> str:
    return f"10.{n}.0.1"


def lan_v6_gateway(n: int) -> str:
    return f"2001:db8:{n:x}00::1"


def host_v4(n: int, k: int) -> str:
    return f"10.{n}.0.{10 + k}"


def host_v6(n: int, k: int) -> str:
    return f"2001:db8:{n:x}00::{10 + k}"
