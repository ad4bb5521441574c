"""NAT traversal building blocks for the agent: STUN gathering, TURN allocations, candidates.

Everything protocol-shaped here is sans-I/O (fed bytes, a source and `now`; asked for
what to send and when to wake up). The agent's tunnel socket carries these messages
alongside WireGuard:

- `demux.classify(data)`: "stun" / "channel_data" / "wireguard" / "other" by first bytes.
- `stun_probe.StunProber`: Binding transactions to STUN servers -> server-reflexive
  addresses, round trips, RFC 5780 observations for netcheck.
- `turn_client.TurnClient`: one TURN allocation (UDP, or TCP/TLS with `stream=True`
  and `stream.StreamFramer`); `wrap`/`unwrap` for peer data.
- `candidates`: the `Candidate` model (rendezvous dicts), host candidates from
  interface addresses, rtnetlink change events for re-gathering.
- `udp_shell`: small asyncio drivers (`TraversalSocket`, `TurnStream`) for tests and tools.

Routing rule for a datagram from address A on the tunnel socket: STUN -> offer it to the
prober first (it only takes its own transaction ids); then, if A is a TURN server, STUN
or ChannelData goes to that server's `TurnClient.unwrap`; everything else is WireGuard's.
"""
