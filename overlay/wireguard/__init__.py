"""A WireGuard-compatible tunnel core (sans-I/O): handshake, sessions, timers,
cryptokey routing and multi-endpoint peers. See device.py for the entry point."""

from .device import UNCHANGED, Device
from .endpoints import Endpoint, direct_endpoint
from .peer import Peer

__all__ = ["UNCHANGED", "Device", "Endpoint", "Peer", "direct_endpoint"]
