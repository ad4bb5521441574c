"""Clients nobody here wrote against a running overlay-relay: coturn's turnutils_*, stun-client,
aioice's TURN client; and rendezvous-issued credentials on a real coturn (bring your own TURN)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time

import pytest

from overlay.rendezvous import RendezvousClient
from overlay.stun.credentials import make_rest_credentials
from tests.support import needs_tools

from .relayproc import free_port

pytestmark = pytest.mark.timeout(120)


def _run(cmd: list[str], timeout: float = 60) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


def _uclient_totals(output: str) -> tuple[int, int, float]:
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    lost = re.search(r"Total lost packets (\d+)", output)
    assert sent and lost, output[-2000:]
    s, r = map(int, sent[-1])
    return s, r, int(lost.group(1))


@needs_tools("turnutils_stunclient")
def test_turnutils_stunclient_gets_reflexive_address(relay):
    out = _run(["turnutils_stunclient", "-p", str(relay.port), "127.0.0.1"])
    assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", out), out


@needs_tools("turnutils_uclient")
@pytest.mark.parametrize(
    "label,flags,host",
    [
        ("udp", [], "127.0.0.1"),
        ("tcp", ["-t"], "127.0.0.1"),
        ("udp-send-indications", ["-s"], "127.0.0.1"),
        ("udp-ipv6-relay", ["-x"], "::1"),
    ],
)
def test_turnutils_uclient_relays_everything(relay, label, flags, host):
    # Two clients talking to each other through their relayed addresses (-y), REST credentials (-W).
    out = _run(["turnutils_uclient", *flags, "-p", str(relay.port), "-W", relay.secret, "-y",
                "-m", "2", "-n", "40", "-l", "300", "-z", "5", host])
    sent, received, lost = _uclient_totals(out)
    assert sent == received == 160 and lost == 0  # -y with RTCP: 2 clients x 2 sessions x 40, out[-1500:]


def _relayed_packets(relay) -> float:
    import urllib.request

    text = urllib.request.urlopen(relay.http_url + "/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("overlay_relay_relayed_packets_total"))


@needs_tools("turnutils_uclient")
def test_turnutils_uclient_over_tls(relay):
    before = _relayed_packets(relay)
    out = _run(["turnutils_uclient", "-S", "-t", "-p", str(relay.tls_port), "-W", relay.secret, "-y",
                "-m", "1", "-n", "30", "-l", "200", "-z", "5", "127.0.0.1"])
    sent, received, lost = _uclient_totals(out)
    assert sent == received == 120 and lost == 0, out[-1500:]  # -y pairs at least 2 clients, x2 with RTCP
    # Each message crosses the relay twice (client -> peer relayed address -> other client).
    assert _relayed_packets(relay) - before >= 2 * 120


@needs_tools("turnutils_uclient")
def test_turnutils_uclient_with_static_user_and_wrong_password(tmp_path):
    from .relayproc import Relay

    r = Relay(tmp_path, ipv6=False, extra=["--config", str(_write(tmp_path / "c.toml", '[turn]\nusers = { alice = "wonderland" }\n'))])
    r.start()
    try:
        out = _run(["turnutils_uclient", "-p", str(r.port), "-u", "alice", "-w", "wonderland", "-y",
                    "-m", "1", "-n", "10", "-z", "5", "127.0.0.1"])
        assert _uclient_totals(out) == (40, 40, 0)
        bad = _run(["turnutils_uclient", "-p", str(r.port), "-u", "alice", "-w", "nope", "-y",
                    "-m", "1", "-n", "5", "127.0.0.1"], timeout=60)
        assert not re.search(r"tot_recv_msgs=[1-9]", bad), bad[-800:]
        assert re.search(r"error 401|Unauthorized|Cannot complete Allocation", bad), bad[-800:]
    finally:
        r.stop()


def _write(path, text):
    path.write_text(text)
    return path


@needs_tools("turnutils_natdiscovery")
def test_natdiscovery_classifies_through_rfc5780(relay):
    out = _run(["turnutils_natdiscovery", "-m", "-f", "-p", str(relay.port), "127.0.0.1"])
    # On loopback there is no NAT: both behaviours must come out endpoint-independent,
    # which needs OTHER-ADDRESS, RESPONSE-ORIGIN and CHANGE-REQUEST from the other IP/port.
    assert "NAT with Endpoint Independent Mapping" in out, out
    assert "NAT with Endpoint Independent Filtering" in out, out
    assert f"Other addr: : 127.0.0.2:{relay.alt_port}" in out, out


@needs_tools("stun")
def test_stun_client_sees_open_internet(relay):
    out = _run(["stun", f"127.0.0.1:{relay.port}", "-v"])
    # RFC 3489 tests I, II (change IP+port) and III (change port) all answered -> "Open".
    assert "Primary: Open" in out, out
    assert "test I(2) = 1" in out and "test III = 1" in out, out


async def test_aioice_turn_client_exchanges_data(relay):
    from aioice import turn

    creds = make_rest_credentials(relay.secret, "aioice", 600)
    received: asyncio.Queue = asyncio.Queue()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            received.put_nowait((data, addr))

    for transport_kind in ("udp", "tcp"):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)
        transport, _ = await turn.create_turn_endpoint(
            Proto, ("127.0.0.1", relay.port), creds.username, creds.password, transport=transport_kind)
        try:
            relayed = transport.get_extra_info("sockname")
            assert relayed[0] == "127.0.0.1" and relayed[1] not in (relay.port, 0)
            for i in range(5):
                transport.sendto(b"to-peer-%d" % i, peer.getsockname())
                data, src = await asyncio.to_thread(peer.recvfrom, 2048)
                assert data == b"to-peer-%d" % i and src[:2] == tuple(relayed)
                peer.sendto(b"to-client-%d" % i, src)
                got, addr = await asyncio.wait_for(received.get(), 5)
                assert got == b"to-client-%d" % i and addr[:2] == peer.getsockname()
        finally:
            transport.close()
            peer.close()
            await asyncio.sleep(0.2)


@needs_tools("turnserver", "turnutils_uclient")
async def test_rendezvous_credentials_work_on_coturn(relay, tmp_path):
    """Bring your own TURN: a coturn with use-auth-secret and the same secret accepts what we issue."""
    port = free_port()
    coturn = subprocess.Popen(
        ["turnserver", "-n", "--no-cli", "--listening-ip=127.0.0.1", f"--listening-port={port}",
         "--relay-ip=127.0.0.1", "--use-auth-secret", f"--static-auth-secret={relay.secret}", "--realm=byo",
         "--allow-loopback-peers", "--no-tls", "--no-dtls", f"--pidfile={tmp_path}/t.pid",
         f"--log-file={tmp_path}/coturn.log", "--min-port=50000", "--max-port=50999"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(1.0)
        token = relay.token("byo")
        client = RendezvousClient(relay.http_url, os.urandom(32), name="byo")
        await client.connect(token=token)
        try:
            creds = client.turn
        finally:
            await client.close()
        assert creds is not None and creds.expires > time.time()
        out = await asyncio.to_thread(_run, ["turnutils_uclient", "-p", str(port), "-u", creds.username,
                                             "-w", creds.password, "-y", "-m", "1", "-n", "10", "-z", "5",
                                             "127.0.0.1"])
        assert _uclient_totals(out) == (40, 40, 0), out[-1500:]
        # ...and a wrong password is refused by coturn, so the check above is meaningful.
        bad = await asyncio.to_thread(_run, ["turnutils_uclient", "-p", str(port), "-u", creds.username,
                                             "-w", "x" + creds.password, "-y", "-m", "1", "-n", "3", "127.0.0.1"])
        assert not re.search(r"tot_recv_msgs=[1-9]", bad), bad[-800:]
    finally:
        coturn.terminate()
        coturn.wait(10)


@needs_tools("turnutils_uclient")
def test_coturn_style_rest_credentials_work_on_overlay_relay(relay):
    """The reverse direction: credentials computed the way coturn's tools do (-W) were used above;
    here an explicit REST username/password pair computed independently is accepted."""
    import base64
    import hashlib
    import hmac

    username = f"{int(time.time()) + 600}:someone"
    password = base64.b64encode(hmac.new(relay.secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    out = _run(["turnutils_uclient", "-p", str(relay.port), "-u", username, "-w", password, "-y",
                "-m", "1", "-n", "10", "-z", "5", "127.0.0.1"])
    assert _uclient_totals(out) == (40, 40, 0)
    expired = f"{int(time.time()) - 10}:someone"
    pw = base64.b64encode(hmac.new(relay.secret.encode(), expired.encode(), hashlib.sha1).digest()).decode()
    out = _run(["turnutils_uclient", "-p", str(relay.port), "-u", expired, "-w", pw, "-y", "-m", "1", "-n", "3",
                "127.0.0.1"])
    assert not re.search(r"tot_recv_msgs=[1-9]", out), out[-800:]
