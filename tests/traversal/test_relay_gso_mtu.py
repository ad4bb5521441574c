"""The relay's GSO sender with full-size ChannelData over IPv6 (real namespaces, real veth).

An agent's full-size tunnel packet is 1452 bytes; relayed back as ChannelData it is 1456,
plus 48 bytes of IPv6 and UDP headers: 1504 on a 1500-byte link. The kernel refuses a GSO
send whose segments exceed the MTU (EMSGSIZE) but fragments a plain send; before the fix
every run of two or more such packets was silently dropped, so a TCP transfer over an
IPv6 relay path crawled to a timeout while single pings passed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support import needs_root

pytestmark = [needs_root(), pytest.mark.timeout(60)]

SENDER = textwrap.dedent("""
    import socket
    from relay_server.turn_server import Coalescer
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    c = Coalescer()
    for size in (1456, 1456, 1456, 1456, 100, 100):
        c.add("k", s, ("2001:db8:99::2", 5000), memoryview(bytes([size % 251]) * size))
    c.flush()
    print("gso still on" if c.enabled else "gso off")
""")
RECEIVER = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("2001:db8:99::2", 5000))
    s.settimeout(2)
    print("ready", flush=True)
    sizes = []
    try:
        while True:
            sizes.append(len(s.recv(70000)))
    except OSError:
        pass
    print(" ".join(map(str, sizes)))
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def veth_pair(netns_prefix):
    a, b = f"{netns_prefix}gsoa", f"{netns_prefix}gsob"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("-n", a, "link", "add", "gso0", "mtu", "1500", "type", "veth", "peer", "name", "gso1", "netns", b)
        _ip("-n", a, "addr", "add", "2001:db8:99::1/64", "dev", "gso0", "nodad")
        _ip("-n", b, "addr", "add", "2001:db8:99::2/64", "dev", "gso1", "nodad")
        for ns, dev in ((a, "gso0"), (b, "gso1")):
            _ip("-n", ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_full_size_channeldata_runs_over_ipv6_all_arrive(veth_pair):
    a, b = veth_pair
    recv = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", RECEIVER],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        sent = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", SENDER],
                              capture_output=True, text=True, timeout=20)
        assert sent.returncode == 0, sent.stderr
        out, _ = recv.communicate(timeout=20)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert sorted(map(int, out.split())) == [100, 100, 1456, 1456, 1456, 1456], out
    assert sent.stdout.strip() == "gso still on"  # the small run still went out with GSO
