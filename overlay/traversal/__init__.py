"""NAT traversal building blocks for the agent: STUN gathering, TURN allocations, candidates.

Everything protocol-shaped here is sans-I/O (fed bytes, a source and `now`; asked for
what to send and when to wake up). The agent's tunnel socket carries these messages
alongside WireGuard; `demux.classify` tells them apart by their first bytes.
"""
