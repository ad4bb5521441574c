import ipaddress

from overlay.wireguard.allowedips import AllowedIPs
from tests.unit.wg_helpers import B1, ip4, ip6, make_device, net, pair


def test_longest_prefix_match_v4_v6():
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(net("10.0.0.0/8"), "wide")
    t.insert(net("10.1.0.0/16"), "mid")
    t.insert(net("10.1.2.3/32"), "host")
    t.insert(net("::/0"), "v6default")
    t.insert(net("2001:db8::/32"), "doc")
    t.insert(net("2001:db8:1::/48"), "doc1")
    assert t.lookup("10.1.2.3") == "host"
    assert t.lookup("10.1.2.4") == "mid"
    assert t.lookup("10.2.0.1") == "wide"
    assert t.lookup("11.0.0.1") is None
    assert t.lookup("2001:db8:1::5") == "doc1"
    assert t.lookup("2001:db8:2::5") == "doc"
    assert t.lookup("fe80::1") == "v6default"
    t.remove(net("10.1.2.3/32"))
    assert t.lookup("10.1.2.3") == "mid"


def test_packet_destination_lookup_and_junk():
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(net("10.0.0.0/24"), "p")
    t.insert(net("fd00::/64"), "q")
    assert t.lookup_packet_destination(ip4("1.1.1.1", "10.0.0.9")) == "p"
    assert t.lookup_packet_destination(ip6("fd01::1", "fd00::9")) == "q"
    assert t.lookup_packet_destination(b"") is None
    assert t.lookup_packet_destination(b"\x45\x00") is None
    assert t.lookup_packet_destination(b"\x70" + bytes(50)) is None


def test_network_moves_between_peers_and_host_bits_are_masked():
    d = make_device(9)
    p1 = d.set_peer(b"\x01" * 32, 0, allowed_ips=[ipaddress.ip_network("10.0.0.5/24", strict=False)])
    assert p1.allowed_ips == [net("10.0.0.0/24")]
    p2 = d.set_peer(b"\x02" * 32, 0, allowed_ips=[net("10.0.0.0/24")])
    assert p1.allowed_ips == [] and p2.allowed_ips == [net("10.0.0.0/24")]
    d.set_peer(b"\x02" * 32, 0, allowed_ips=[net("10.9.0.0/16")], replace_allowed_ips=True)
    assert p2.allowed_ips == [net("10.9.0.0/16")]
    assert d.allowed_ips.lookup("10.0.0.1") is None


def test_outbound_picks_peer_by_destination():
    a, b, n = pair()
    c = make_device(3)
    a.set_peer(c.public_key, 0, endpoints=[("192.0.2.3", 1)], allowed_ips=[net("10.0.0.0/24")])
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 1.0)
    assert [e for _, e in out] == [B1]  # /32 of B wins over C's /24
    out = a.tun_packets([ip4("10.0.0.1", "10.0.0.7")], 1.0)
    assert [e for _, e in out] == [("192.0.2.3", 1)]
    assert a.tun_packets([ip4("10.0.0.1", "172.16.0.1")], 1.0) == []


def test_inbound_source_must_match_sending_peer():
    a, b, n = pair()
    from tests.unit.wg_helpers import handshake
    handshake(a, b, n)
    n.tun[b].clear()
    spoofed = a.tun_packets([ip4("10.0.0.99", "10.0.0.2")], 2.0)
    good = a.tun_packets([ip4("10.0.0.1", "10.0.0.2")], 2.0)
    good6 = a.tun_packets([ip6("fd00::1", "fd00::2")], 2.0)
    spoofed6 = a.tun_packets([ip6("fd00::77", "fd00::2")], 2.0)
    dropped = b.dropped
    pkts, _ = b.datagrams([(m, ("192.0.2.1", 51820)) for m, _ in spoofed + good + good6 + spoofed6], 2.0)
    assert pkts == [ip4("10.0.0.1", "10.0.0.2"), ip6("fd00::1", "fd00::2")]
    assert b.dropped == dropped + 2
