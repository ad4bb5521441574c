"""The built-in NAT lab: an emulated internet of namespaces with real NAT behaviours.

    from overlay.lab import Lab
    with Lab("ovlab") as lab:
        relay = lab.add_relay()
        nat1 = lab.add_nat("nat1", "port-restricted", udp_timeout=30)
        h1 = lab.add_host("h1", nat1)
        h1.ns.run("ping", "-c1", relay.ipv4)
"""

from .natrules import NAT_TYPES, NatBehaviour, NatConfigError
from .netns import Namespace, NetnsError, sweep
from .topology import Host, Lab, LabError, Nat, Relay

__all__ = [
    "NAT_TYPES", "Host", "Lab", "LabError", "Namespace", "Nat", "NatBehaviour", "NatConfigError",
    "NetnsError", "Relay", "sweep",
]
