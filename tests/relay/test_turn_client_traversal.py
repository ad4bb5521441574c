"""The agent's traversal cores (overlay/traversal) on real sockets against real servers on loopback:
a real `overlay-relay` process and a real coturn `turnserver`, each with TURN REST credentials."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials
from overlay.traversal import demux
from overlay.traversal.turn_client import FAILED, READY, TurnClient
from overlay.traversal.udp_shell import TraversalSocket, TurnStream
from .relayproc import Relay, free_port

pytestmark = pytest.mark.timeout(60)

SECRET = "traversal-test-secret"
REALM = "traversal.test"


@dataclass
class Server:
    kind: str
    port: int  # STUN/TURN on 127.0.0.1 and ::1, UDP and TCP
    secret: str
    ipv6: bool
    tls_port: int = 0


def _turnserver_listening(port: int) -> bool:
    """One STUN Binding over UDP answered and a TCP connect accepted on 127.0.0.1:port."""
    req = sc.binding_request().encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(req, ("127.0.0.1", port))
            s.recvfrom(2048)
        except OSError:
            return False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for coturn's TLS listener (the client does not verify it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turn.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def start_coturn(workdir: Path) -> tuple[subprocess.Popen, int, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(pair=True)
    tls_port = free_port()
    min_port = free_port()
    cert, key = self_signed_cert(workdir)
    log = open(workdir / "turnserver.log", "w")
    argv = ["turnserver", "-n", "--listening-ip=127.0.0.1", "--listening-ip=127.0.0.2", "--listening-ip=::1",
            f"--listening-port={port}", f"--alt-listening-port={port + 1}",
            "--relay-ip=127.0.0.1", "--relay-ip=::1", f"--min-port={min_port}", f"--max-port={min_port + 200}",
            "--use-auth-secret", f"--static-auth-secret={SECRET}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-cli", "--no-dtls", "--log-file=stdout", "--simple-log",
            f"--tls-listening-port={tls_port}", f"--cert={cert}", f"--pkey={key}",
            f"--pidfile={workdir / 'turnserver.pid'}", f"--userdb={workdir / 'turndb'}"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 15
    while not (_turnserver_listening(port) and _tcp_listening(tls_port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"turnserver did not start; see {workdir / 'turnserver.log'}")
        time.sleep(0.1)
    return proc, port, tls_port


def _tcp_listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", params=["overlay-relay", "coturn"])
def server(request, tmp_path_factory):
    if request.param == "overlay-relay":
        relay = Relay(tmp_path_factory.mktemp("relay"), secret=SECRET, alternate=True)
        relay.start()
        try:
            yield Server("overlay-relay", relay.port, SECRET, ipv6=True, tls_port=relay.tls_port)
        finally:
            relay.stop()
    else:
        if shutil.which("turnserver") is None:
            pytest.skip("coturn's turnserver is not installed")
        proc, port, tls_port = start_coturn(tmp_path_factory.mktemp("coturn"))
        try:
            yield Server("coturn", port, SECRET, ipv6=True, tls_port=tls_port)
        finally:
            stop(proc)


@pytest.fixture
async def peer():
    """A plain UDP socket standing for the remote WireGuard peer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
async def tsock():
    s = await TraversalSocket.open(("127.0.0.1", 0))
    try:
        yield s
    finally:
        s.close()


def creds(server: Server, name: str = "node"):
    return make_rest_credentials(server.secret, name, ttl=3600)


async def recv(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, tuple]:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 4096), timeout)


async def allocated(s: TraversalSocket, server: Server, host: str = "127.0.0.1", family: int = 4,
                    name: str = "node") -> TurnClient:
    turn = await asyncio.wait_for(s.allocate(TurnClient((host, server.port), creds(server, name),
                                                        family=family)), 10)
    assert turn.state == READY, turn.reason
    return turn


# -- STUN -----------------------------------------------------------------------------------------

async def test_gather_srflx_from_the_tunnel_socket(server, tsock):
    prober = await asyncio.wait_for(tsock.gather([("127.0.0.1", server.port)]), 10)
    result = prober.results[("127.0.0.1", server.port)]
    assert result.error is None
    # On loopback there is no NAT: the reflexive address is the socket's own address.
    assert result.mapped == tsock.local_address
    assert 0 <= result.rtt < 1.0
    # Both servers run RFC 5780 with a second address: the second destination was probed too
    # and, with no NAT in between, saw the same mapping.
    assert result.other_address is not None and result.other_address != ("127.0.0.1", server.port)
    assert {o.server for o in prober.observations} == {("127.0.0.1", server.port), result.other_address}
    assert prober.mapping_varies_by_destination(4) is False


async def test_gather_from_a_server_that_also_holds_our_allocation(server, tsock):
    """One relay is usually both: its Binding answers must reach the prober, not the TURN client."""
    turn = await allocated(tsock, server)
    prober = await asyncio.wait_for(tsock.gather([turn.server]), 10)
    assert prober.results[turn.server].mapped == tsock.local_address == turn.mapped_address
    assert turn.state == READY


async def test_gather_reports_a_dead_server_within_the_give_up_time(tsock):
    dead = ("127.0.0.1", free_port())
    started = time.monotonic()
    prober = await asyncio.wait_for(tsock.gather([dead]), 10)
    assert prober.results[dead].error == "timeout"
    assert time.monotonic() - started < 4.0


# -- TURN over UDP ------------------------------------------------------------------------------------

async def test_allocate_then_send_indication_and_data_indication(server, tsock, peer):
    turn = await allocated(tsock, server)
    assert turn.relayed_address[0] == "127.0.0.1"
    assert turn.mapped_address == tsock.local_address
    paddr = peer.getsockname()
    tsock.kick(lambda now: turn.permit(paddr[0], now))
    await tsock.wait_for(lambda: turn.has_permission(paddr[0]))
    assert tsock.send_via(turn, b"via send indication", paddr, channel=False)
    data, src = await recv(peer)
    assert data == b"via send indication" and src == turn.relayed_address
    assert turn.channel_of(paddr) is None
    # No channel: the answer comes back as a Data indication and is still delivered.
    peer.sendto(b"answer without channel", src)
    payload, frm, via = await asyncio.wait_for(tsock.peer_data.get(), 3)
    assert (payload, frm, via) == (b"answer without channel", paddr, turn.server)
    assert tsock.received_kinds[demux.CHANNEL_DATA] == 0


async def test_channel_bind_and_channeldata_both_ways(server, tsock, peer):
    turn = await allocated(tsock, server)
    paddr = peer.getsockname()
    # The first send binds a channel; the data goes as a Send indication meanwhile and the
    # ChannelBind travels first, so it is not dropped for want of a permission.
    assert tsock.send_via(turn, b"first", paddr)
    data, src = await recv(peer)
    assert data == b"first"
    await tsock.wait_for(lambda: turn.channel_of(paddr) is not None)
    frame = turn.wrap(b"x", paddr, 0.0)
    assert 0x40 <= frame[0] <= 0x4F and len(frame) == 5  # 4-byte ChannelData header
    for i in range(20):
        tsock.send_via(turn, b"wg-%d" % i, paddr)
        data, _ = await recv(peer)
        assert data == b"wg-%d" % i
    before = tsock.received_kinds[demux.CHANNEL_DATA]
    for i in range(20):
        peer.sendto(b"back-%d" % i, src)
        payload, frm, _ = await asyncio.wait_for(tsock.peer_data.get(), 3)
        assert (payload, frm) == (b"back-%d" % i, paddr)
    assert tsock.received_kinds[demux.CHANNEL_DATA] - before == 20


async def test_wireguard_shaped_datagrams_share_the_socket(server, tsock, peer):
    turn = await allocated(tsock, server)
    paddr = peer.getsockname()
    tsock.send_via(turn, b"bind", paddr)
    await recv(peer)
    await tsock.wait_for(lambda: turn.channel_of(paddr) is not None)
    # WireGuard messages (type 1-4, three zero bytes) straight to the socket, including ones
    # whose bytes 4..7 spell the STUN magic cookie: they go to the WireGuard side untouched.
    wg = [bytes([t, 0, 0, 0]) + m.MAGIC_COOKIE_BYTES + bytes(range(40)) for t in (1, 2, 3, 4)]
    wg.append(bytes([4, 0, 0, 0]) + bytes(28))  # keepalive-sized transport message
    for d in wg:
        peer.sendto(d, tsock.local_address)
    got = [await asyncio.wait_for(tsock.other.get(), 3) for _ in wg]
    assert [g[0] for g in got] == wg and all(g[1] == paddr for g in got)
    assert turn.state == READY and tsock.peer_data.empty()
    # And the same bytes relayed through TURN arrive as payloads, unchanged.
    for d in wg:
        assert tsock.send_via(turn, d, paddr)
        assert (await recv(peer))[0] == d
        peer.sendto(d, turn.relayed_address)
        assert (await asyncio.wait_for(tsock.peer_data.get(), 3))[:2] == (d, paddr)


async def test_refresh_extends_and_close_releases(server, tsock, peer):
    turn = await allocated(tsock, server)
    first_expiry = turn.expires_at
    await asyncio.sleep(0.05)
    tsock.kick(turn.refresh)
    await tsock.wait_for(lambda: turn.expires_at > first_expiry and not turn._txs)
    assert turn.state == READY and turn.expires_at > first_expiry
    # Still relaying after the refresh.
    tsock.send_via(turn, b"after refresh", peer.getsockname())
    assert (await recv(peer))[0] == b"after refresh"
    # A second allocation on the same 5-tuple is refused while the first lives ...
    again = await asyncio.wait_for(tsock.allocate(TurnClient(turn.server, creds(server))), 10)
    assert again.state == FAILED and again.failure.code == 437, again.reason
    # ... and accepted once the first is released with a zero-lifetime Refresh.
    tsock.turns[turn.server] = turn
    tsock.kick(turn.close)
    # coturn frees a released allocation on its next timer tick (about a second), so try a few times.
    for _ in range(10):
        await asyncio.sleep(0.5)
        fresh = await asyncio.wait_for(tsock.allocate(TurnClient(turn.server, creds(server))), 10)
        if fresh.state == READY:
            break
    assert fresh.state == READY, fresh.reason


async def test_wrong_credentials_fail_with_reason(server, tsock):
    bad = make_rest_credentials("not-the-secret", "mallory", ttl=3600)
    turn = await asyncio.wait_for(tsock.allocate(TurnClient(("127.0.0.1", server.port), bad)), 10)
    assert turn.state == FAILED
    assert turn.failure.code in (401, 441) and not turn.failure.retryable
    assert "mallory" in turn.reason or "redential" in turn.reason or "nauthorized" in turn.reason


# -- IPv6 -------------------------------------------------------------------------------------------

async def test_ipv6_relayed_allocation_over_ipv6(server, peer):
    s = await TraversalSocket.open(("::1", 0))
    p6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        p6.bind(("::1", 0))
        p6.setblocking(False)
        turn = await asyncio.wait_for(s.allocate(TurnClient(("::1", server.port), creds(server), family=6)), 10)
        if turn.state == FAILED and turn.failure.code == 440:
            pytest.skip(f"{server.kind} has no IPv6 relay: {turn.reason}")
        assert turn.state == READY, turn.reason
        assert ":" in turn.relayed_address[0]
        paddr = p6.getsockname()[:2]
        s.send_via(turn, b"six", paddr)
        data, src = await recv(p6)
        assert data == b"six" and src[:2] == turn.relayed_address
        await s.wait_for(lambda: turn.channel_of(paddr) is not None)
        p6.sendto(b"six back", src[:2])
        payload, frm, _ = await asyncio.wait_for(s.peer_data.get(), 3)
        assert (payload, frm) == (b"six back", paddr)
        # An IPv4 peer cannot be reached through an IPv6 relayed address.
        assert turn.wrap(b"x", peer.getsockname(), 0.0) is None
    finally:
        p6.close()
        s.close()


async def test_ipv6_relayed_address_requested_over_ipv4(server, tsock):
    """REQUESTED-ADDRESS-FAMILY: an IPv6 relay through an IPv4 path to the server."""
    turn = await asyncio.wait_for(tsock.allocate(TurnClient(("127.0.0.1", server.port), creds(server), family=6)), 10)
    if turn.state == FAILED and turn.failure.code == 440:
        pytest.skip(f"{server.kind} refuses an IPv6 relay over IPv4: {turn.reason}")
    assert turn.state == READY, turn.reason
    assert ":" in turn.relayed_address[0]


# -- TURN over TCP / TLS ---------------------------------------------------------------------------------

async def _exchange_over_stream(stream: TurnStream, peer: socket.socket) -> None:
    turn = await asyncio.wait_for(stream.allocate(), 10)
    assert turn.state == READY, turn.reason
    paddr = peer.getsockname()
    # Payload lengths that are not multiples of 4: ChannelData padding on the stream.
    stream.send_via(b"tcp-1", paddr)
    data, src = await recv(peer)
    assert data == b"tcp-1" and src == turn.relayed_address
    peer.sendto(b"via data indication?", src)
    await stream.wait_for(lambda: turn.channel_of(paddr) is not None)
    for i in range(10):
        payload = b"p" * (i + 1)
        stream.send_via(payload, paddr)
        assert (await recv(peer))[0] == payload
        peer.sendto(payload + b"!", src)
    got = [await asyncio.wait_for(stream.peer_data.get(), 3) for _ in range(11)]
    assert got[0] == (b"via data indication?", paddr)
    assert got[1:] == [(b"p" * (i + 1) + b"!", paddr) for i in range(10)]
    assert stream.framer.error is None


async def test_allocate_over_tcp(server, peer):
    stream = await TurnStream.connect(TurnClient(("127.0.0.1", server.port), creds(server), stream=True))
    try:
        await _exchange_over_stream(stream, peer)
    finally:
        await stream.close()


async def test_allocate_over_tls(server, peer):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # both test servers use throwaway self-signed certificates
    stream = await TurnStream.connect(TurnClient(("127.0.0.1", server.tls_port), creds(server), stream=True), tls=ctx)
    try:
        await _exchange_over_stream(stream, peer)
    finally:
        await stream.close()
