"""Sans-I/O client helpers: build STUN/TURN requests and read their answers.

No sockets here: the caller sends the returned bytes from whatever socket it
owns (the agent's tunnel socket, a test socket) and feeds replies back.
"""

from __future__ import annotations

import struct

from . import message as m
from .message import Address, Message


def binding_request(software: str | None = None) -> Message:
    msg = Message(m.BINDING, m.REQUEST)
    if software:
        msg.add(m.SOFTWARE, software.encode())
    return msg


def mapped_address(response: Message) -> Address | None:
    """XOR-MAPPED-ADDRESS, falling back to MAPPED-ADDRESS (old servers)."""
    return response.xor_address(m.XOR_MAPPED_ADDRESS) or response.address(m.MAPPED_ADDRESS)


def allocate_request(family: int = m.FAMILY_IPV4) -> Message:
    msg = Message(m.ALLOCATE, m.REQUEST)
    msg.add(m.REQUESTED_TRANSPORT, struct.pack("!B3x", m.TRANSPORT_UDP))
    if family != m.FAMILY_IPV4:
        msg.add(m.REQUESTED_ADDRESS_FAMILY, struct.pack("!B3x", family))
    return msg


def add_auth(msg: Message, username: str, realm: str, nonce: bytes) -> Message:
    msg.add(m.USERNAME, username.encode()).add(m.REALM, realm.encode()).add(m.NONCE, nonce)
    return msg


def create_permission_request(peers: list[Address]) -> Message:
    msg = Message(m.CREATE_PERMISSION, m.REQUEST)
    for peer in peers:
        msg.add_xor_address(m.XOR_PEER_ADDRESS, peer)
    return msg


def channel_bind_request(channel: int, peer: Address) -> Message:
    msg = Message(m.CHANNEL_BIND, m.REQUEST)
    msg.add(m.CHANNEL_NUMBER, struct.pack("!H2x", channel))
    msg.add_xor_address(m.XOR_PEER_ADDRESS, peer)
    return msg


def refresh_request(lifetime: int) -> Message:
    return Message(m.REFRESH, m.REQUEST).add_u32(m.LIFETIME, lifetime)


def send_indication(peer: Address, data: bytes) -> Message:
    msg = Message(m.SEND, m.INDICATION)
    msg.add_xor_address(m.XOR_PEER_ADDRESS, peer)
    msg.add(m.DATA_ATTR, data)
    return msg
