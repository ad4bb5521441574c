"""STUN Binding answers (RFC 8489), with RFC 5780 NAT-behaviour discovery support and
RFC 3489 compatibility for clients that send no magic cookie (e.g. Debian's stun-client).

CHANGE-REQUEST asks for the answer to leave from the alternate IP and/or port: the
answer's `via` is then the (ip, port) of the listener to send from. RESPONSE-PORT
sends the answer to another port of the client's IP.
"""

from __future__ import annotations

import struct

from overlay.stun import message as m
from overlay.stun.message import Address, Message

from .turn_state import ClientTransport, Out, TurnSettings, error_response


def _advertised(s: TurnSettings, addr: Address) -> Address:
    return s.advertise.get(addr[0], addr[0]), addr[1]


def answer_binding(msg: Message, transport: ClientTransport, client: Address, s: TurnSettings) -> list[Out]:
    """Binding success (or error) for `msg`, and which listener it must leave from."""
    local = transport.local
    source: object = transport
    resp = Message(m.BINDING, m.SUCCESS, msg.transaction_id, classic=msg.classic)
    alt_ip = s.alternate_ip.get(local[0])
    alt_port = s.alternate_port.get(local[1])
    change = msg.get(m.CHANGE_REQUEST)
    if change is not None and not transport.stream:
        if len(change) != 4:
            return [(transport, error_response(msg, 400, s.software, "CHANGE-REQUEST must be 4 bytes"), client)]
        flags = change[3]
        want_ip, want_port = bool(flags & 0x04), bool(flags & 0x02)
        if (want_ip and not alt_ip) or (want_port and not alt_port):
            return [(transport, error_response(msg, 420, s.software, unknown=[m.CHANGE_REQUEST]), client)]
        if want_ip or want_port:
            source = (alt_ip if want_ip else local[0], alt_port if want_port else local[1])
    origin = source if isinstance(source, tuple) else local
    dest = client
    response_port = msg.get(m.RESPONSE_PORT)
    if response_port is not None and not transport.stream:
        # RFC 5780 7.5: answer to the client's IP at the port it names (filtering tests).
        if len(response_port) != 4 or response_port[:2] == b"\0\0":
            return [(transport, error_response(msg, 400, s.software, "bad RESPONSE-PORT"), client)]
        dest = (client[0], struct.unpack("!H", response_port[:2])[0])
    if msg.classic:
        resp.add_address(m.MAPPED_ADDRESS, client)
        resp.add_address(m.SOURCE_ADDRESS, _advertised(s, origin))
        if alt_ip and alt_port:
            resp.add_address(m.CHANGED_ADDRESS, _advertised(s, (alt_ip, alt_port)))
        return [(source, resp.encode(fingerprint=False), dest)]
    resp.add_xor_address(m.XOR_MAPPED_ADDRESS, client)
    resp.add_address(m.MAPPED_ADDRESS, client)
    if alt_ip and alt_port:
        resp.add_address(m.RESPONSE_ORIGIN, _advertised(s, origin))
        resp.add_address(m.OTHER_ADDRESS, _advertised(s, (alt_ip, alt_port)))
    if s.software:
        resp.add(m.SOFTWARE, s.software.encode())
    return [(source, resp.encode(), dest)]
