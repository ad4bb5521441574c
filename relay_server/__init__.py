"""overlay-relay: STUN server, TURN relay and rendezvous in one asyncio process.

turn_state / turn_auth / stun_binding / turn_core   sans-I/O STUN + TURN server core
turn_server     asyncio shell: UDP/TCP/TLS listeners, relayed sockets, the relay hot path
rendezvous      HTTP/WebSocket rendezvous (wire protocol in its docstring)
store           SQLite: networks, join tokens, nodes
config / cli / app / datadir / logs / metrics / ratelimit   operation
"""
