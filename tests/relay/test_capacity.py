"""Running out of relayed sockets is a clean 508 for the next client, not a crash."""

from __future__ import annotations

import resource
import socket
import subprocess

import pytest

from overlay.stun import client as sc
from overlay.stun import message as m
from overlay.stun.credentials import make_rest_credentials

from .relayproc import Relay

pytestmark = pytest.mark.timeout(60)


def _allocate(port: int, creds) -> tuple[socket.socket, m.Message]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    first = sc.allocate_request()
    s.sendto(first.encode(), ("127.0.0.1", port))
    challenge = m.parse(s.recv(2048))
    assert challenge.error_code()[0] == 401
    realm, nonce = challenge.get(m.REALM).decode(), challenge.get(m.NONCE)
    req = sc.add_auth(sc.allocate_request(), creds.username, realm, nonce)
    s.sendto(req.encode(key=m.long_term_key(creds.username, realm, creds.password)), ("127.0.0.1", port))
    return s, m.parse(s.recv(2048))


def test_out_of_descriptors_gives_508_and_server_keeps_serving(tmp_path, monkeypatch):
    relay = Relay(tmp_path, ipv6=False, extra=["--max-allocations-per-user", "1000"])

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: real_popen(*a, preexec_fn=low_limit, **kw))
    relay.start()
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    creds = make_rest_credentials(relay.secret, "many", 600)
    sockets, codes = [], []
    try:
        for _ in range(120):
            s, reply = _allocate(relay.port, creds)
            sockets.append(s)
            codes.append(reply.cls == m.SUCCESS or reply.error_code()[0])
            if codes[-1] == 508:
                break
        assert codes[-1] == 508 and codes.count(True) > 40, codes
        # STUN and the rendezvous still answer while the relay is full.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(3)
            probe.sendto(sc.binding_request().encode(), ("127.0.0.1", relay.port))
            assert m.parse(probe.recv(2048)).cls == m.SUCCESS
        import urllib.request

        assert urllib.request.urlopen(relay.http_url + "/healthz", timeout=5).status == 200
    finally:
        for s in sockets:
            s.close()
        relay.stop()
