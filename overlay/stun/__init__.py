"""STUN/TURN for the relay and the agent, without I/O.

message      the wire codec (RFC 8489/8656/5780/3489): Message, parse, ChannelData, stream framing
client       request builders and answer readers (Binding, Allocate, CreatePermission, ChannelBind, ...)
credentials  TURN REST time-limited credentials (coturn's use-auth-secret scheme)

The agent's TURN client (allocations over the tunnel socket) is overlay.traversal.turn_client.
"""
