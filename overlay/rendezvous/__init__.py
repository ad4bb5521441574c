"""Rendezvous client: join a network with a token, prove the WireGuard key, follow the peer map."""

from .client import Membership, Peer, RendezvousClient, RendezvousError

__all__ = ["Membership", "Peer", "RendezvousClient", "RendezvousError"]
