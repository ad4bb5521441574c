"""`overlay netcheck`: what this machine's network lets the tunnel do.

Runs on its own sockets (no agent needed): one UDP socket per address family
driven through `netcheck_probe.FamilyCheck` (reachability, server-reflexive
address, mapping behaviour, hairpinning, latency per relay) and one STUN-over-TCP
exchange per relay (the fallback when UDP is blocked). The conclusions and their
rendering are in `netcheck_report`; this module only finds the relays, moves
bytes and keeps time.

Which relays: `--relay URL` (the rendezvous URL, or a stun:/turn: URL), a config
file (its [Rendezvous] URL), or a running interface (the relays its agent uses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from overlay.netcheck_probe import GIVE_UP_AFTER, FamilyCheck, FamilyResult
from overlay.netcheck_report import TcpResult, build_report
from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.message import Address, StunError
from overlay.traversal.gatherer import DEFAULT_TURN_PORT, parse_turn_url
from overlay.traversal.stream import StreamFramer
from overlay.traversal.stun_probe import family_of, normalize

TCP_TIMEOUT = 3.0
RENDEZVOUS_SCHEMES = ("http", "https", "ws", "wss")

Resolver = Callable[..., list]


class NetcheckError(Exception):
    """Something the user can fix (a bad URL, a name that does not resolve)."""


# -- which relays -------------------------------------------------------------------------------


def relay_from_url(url: str) -> tuple[str, int]:
    """(host, port) of the STUN service a URL names. A rendezvous URL means the STUN
    port on the same host (where `overlay-relay serve` puts it)."""
    scheme = url.partition(":")[0].lower()
    if scheme in RENDEZVOUS_SCHEMES:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        if not host:
            raise NetcheckError(f"{url!r}: no host in the URL")
        return host, DEFAULT_TURN_PORT
    if scheme == "turns":
        raise NetcheckError(f"{url!r}: TURN over TLS is not checked; give the relay's stun: or turn: URL, "
                            "or its rendezvous URL")
    parsed = parse_turn_url(url)
    if parsed is None:
        raise NetcheckError(f"{url!r}: expected a rendezvous URL (http://host:8080) or a stun:/turn: URL")
    _, host, port, _ = parsed
    return host, port


def parse_hostport(text: str) -> Address | None:
    """`1.2.3.4:5` or `[2001:db8::1]:5` as status documents write them."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


def relays_from_status(doc: dict[str, Any]) -> list[tuple[str, int]]:
    """The relays a running agent uses: its allocations' servers, and the rendezvous host."""
    rdv = doc.get("rendezvous") or {}
    out: list[tuple[str, int]] = []
    for relay in rdv.get("relays") or []:
        addr = parse_hostport(str(relay.get("server", "")))
        if addr is not None and addr not in out:
            out.append(addr)
    if rdv.get("url"):
        try:
            host = relay_from_url(rdv["url"])
        except NetcheckError:
            host = None
        if host is not None and host not in out:
            out.append(host)
    return out


def resolve(relays: list[tuple[str, int]], resolver: Resolver = socket.getaddrinfo) -> list[Address]:
    """Every address (both families) of every relay, in order, without duplicates.
    A name that resolves to nothing is an error: the user asked for that relay."""
    out: list[Address] = []
    for host, port in relays:
        try:
            infos = resolver(host, port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise NetcheckError(f"cannot resolve relay {host}: {getattr(exc, 'strerror', None) or exc}") from None
        for info in infos:
            addr = normalize(info[4])
            if addr not in out:
                out.append(addr)
    return out


# -- measuring ----------------------------------------------------------------------------------


def _route_source(server: Address) -> str | None:
    """The address this host sends from towards `server` (connect() on UDP only picks a route)."""
    fam = socket.AF_INET6 if family_of(server[0]) == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect(server)
            return normalize(s.getsockname())[0]
        except OSError:
            return None


def _udp_socket(family: int) -> socket.socket:
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    if family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if family == 6 else "0.0.0.0", 0))
    sock.setblocking(False)
    return sock


async def run_family(check: FamilyCheck) -> FamilyResult:
    """Drive one family's UDP checks on a fresh socket with the real clock."""
    loop = asyncio.get_running_loop()
    check.start(time.monotonic())
    if check.done:
        return check.result()
    try:
        sock = _udp_socket(check.family)
    except OSError as exc:
        check.send_failed(exc.strerror or str(exc))
        return check.result()
    with sock:
        while not check.done:
            for data, addr in check.datagrams_to_send():
                try:
                    sock.sendto(data, addr)
                except OSError as exc:
                    check.send_failed(exc.strerror or str(exc))
                    break
            if check.done:
                break
            deadline = check.next_deadline()
            wait = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                data, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), wait)
            except (TimeoutError, asyncio.TimeoutError):
                pass
            except OSError:
                pass  # an ICMP error on the socket: the timers decide
            else:
                check.receive(data, source, time.monotonic())
            check.handle_timers(time.monotonic())
    return check.result()


async def tcp_check(server: Address, timeout: float = TCP_TIMEOUT) -> TcpResult:
    """One STUN Binding over TCP (RFC 8489 framing: messages back to back)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server[0], server[1]), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        return TcpResult(server, False, error=f"no connection within {timeout:g} s")
    except OSError as exc:
        return TcpResult(server, False, error=(exc.strerror or str(exc)).lower())
    try:
        request = sc.binding_request()
        sent = time.monotonic()
        writer.write(request.encode())
        await writer.drain()
        framer = StreamFramer()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(reader.read(4096), remaining)
            if not data:
                return TcpResult(server, False, error="closed without an answer")
            for frame in framer.feed(data):
                try:
                    msg = m.parse(frame)
                except StunError:
                    continue
                if msg.transaction_id != request.transaction_id or msg.method != m.BINDING:
                    continue
                if msg.cls != m.SUCCESS:
                    code, reason = msg.error_code() or (0, "error")
                    return TcpResult(server, False, error=f"{code} {reason}")
                return TcpResult(server, True, time.monotonic() - sent, sc.mapped_address(msg))
            if framer.error:
                return TcpResult(server, False, error=framer.error)
    except (TimeoutError, asyncio.TimeoutError):
        return TcpResult(server, False, error=f"no answer within {timeout:g} s")
    except OSError as exc:
        return TcpResult(server, False, error=(exc.strerror or str(exc)).lower())
    finally:
        writer.close()


async def netcheck(servers: list[Address], sources: list[str] | None = None,
                   wait: float = GIVE_UP_AFTER) -> dict[str, Any]:
    """Every check against `servers` at once; the report document."""
    checks = {fam: FamilyCheck(fam, servers, give_up_after=wait) for fam in (4, 6)}
    local_ips: dict[int, str | None] = {}
    for fam, check in checks.items():
        local_ips[fam] = _route_source(check.servers[0]) if check.servers else None
    results = await asyncio.gather(*(run_family(c) for c in checks.values()),
                                   *(tcp_check(s, max(wait, TCP_TIMEOUT)) for s in servers))
    families = {fam: results[i] for i, fam in enumerate(checks)}
    tcp = list(results[len(checks):])
    return build_report(families, tcp, local_ips, wait, sources)
