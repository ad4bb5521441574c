"""`overlay netcheck` without a network: the UDP checks (netcheck_probe.FamilyCheck)
driven against an emulated NAT and relay with a fake clock, the conclusions and
their rendering (netcheck_report), and how relays are named on the command line.

The emulated relay answers Bindings like overlay-relay does with an alternate
address and port (RFC 5780: XOR-MAPPED-ADDRESS and OTHER-ADDRESS, from the
address the request went to); the emulated NAT maps our socket to a public
address chosen by its mapping behaviour and loops packets to that address back
when hairpinning is on.
"""

from __future__ import annotations

import socket

import pytest

from overlay import netcheck
from overlay.cli import main
from overlay.netcheck_probe import FamilyCheck
from overlay.netcheck_report import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    UNKNOWN,
    VARIES,
    TcpResult,
    build_report,
    format_report,
)
from overlay.stun import message as m

RELAY = ("203.0.113.10", 3478)
RELAY_ALT_IP = "203.0.113.11"
RELAY_ALT_PORT = 3479
PUBLIC_IP = "198.51.100.7"
LOCAL_IP = "192.168.1.20"
RTT = 0.02


class FakeInternet:
    """One host behind one NAT, and STUN servers answering on their addresses."""

    def __init__(self, mapping: str = ENDPOINT_INDEPENDENT, hairpin: bool = True, udp: bool = True,
                 servers: dict | None = None, drop_first: int = 0):
        self.mapping = mapping
        self.hairpin = hairpin
        self.udp = udp
        # server address -> its OTHER-ADDRESS (None: a server without RFC 5780 support)
        self.servers = servers if servers is not None else {
            RELAY: (RELAY_ALT_IP, RELAY_ALT_PORT),
            (RELAY_ALT_IP, RELAY[1]): RELAY,
            (RELAY[0], RELAY_ALT_PORT): (RELAY_ALT_IP, RELAY[1]),
            (RELAY_ALT_IP, RELAY_ALT_PORT): RELAY,
        }
        self.drop_first = drop_first
        self.ports: dict = {}
        self.sent: list = []

    def mapped_for(self, dest) -> tuple[str, int]:
        key = {ENDPOINT_INDEPENDENT: None, ADDRESS_DEPENDENT: dest[0], ADDRESS_AND_PORT_DEPENDENT: dest}[self.mapping]
        return PUBLIC_IP, self.ports.setdefault(key, 40000 + len(self.ports))

    def send(self, data: bytes, dest) -> list:
        """What comes back to our socket for one datagram we send."""
        self.sent.append(dest)
        if not self.udp:
            return []
        if self.drop_first:
            self.drop_first -= 1
            return []
        if dest[0] == PUBLIC_IP:
            # To our own public address: only a hairpinning NAT turns it around.
            return [(data, self.mapped_for(dest))] if self.hairpin else []
        if dest not in self.servers:
            return []
        req = m.parse(data)
        resp = m.Message(m.BINDING, m.SUCCESS, req.transaction_id)
        resp.add_xor_address(m.XOR_MAPPED_ADDRESS, self.mapped_for(dest))
        other = self.servers[dest]
        if other is not None:
            resp.add_address(m.RESPONSE_ORIGIN, dest)
            resp.add_address(m.OTHER_ADDRESS, other)
        return [(resp.encode(), dest)]


def drive(check: FamilyCheck, net: FakeInternet, limit: int = 200) -> float:
    """Run the check to the end on a fake clock; answers take RTT. Returns the end time."""
    now = 0.0
    check.start(now)
    for _ in range(limit):
        if check.done:
            return now
        answers = []
        for data, dest in check.datagrams_to_send():
            answers += net.send(data, dest)
        if answers:
            now += RTT
            for data, source in answers:
                check.receive(data, source, now)
        else:
            deadline = check.next_deadline()
            assert deadline is not None, "a check that is not done must have a deadline"
            now = max(now, deadline)
        check.handle_timers(now)
    raise AssertionError("the check never finished")


def report_for(net: FakeInternet, servers=(RELAY,), local_ip: str = LOCAL_IP, tcp=()) -> dict:
    check = FamilyCheck(4, list(servers))
    drive(check, net)
    return build_report({4: check.result(), 6: None}, list(tcp), {4: local_ip, 6: None})


# -- the UDP checks ------------------------------------------------------------------------------


def test_endpoint_independent_nat_with_hairpinning():
    report = report_for(FakeInternet(ENDPOINT_INDEPENDENT, hairpin=True))
    v4 = report["ipv4"]
    assert report["udp"] is True and v4["udp"] is True
    assert v4["srflx"] == [f"{PUBLIC_IP}:40000"]
    assert v4["behind_nat"] is True
    assert v4["mapping"] == ENDPOINT_INDEPENDENT and v4["mapping_varies_by_destination"] is False
    assert v4["hairpinning"] is True
    relay = report["relays"][0]
    assert relay["server"] == "203.0.113.10:3478" and relay["udp_rtt_ms"] == pytest.approx(RTT * 1000)
    assert relay["other_address"] == "203.0.113.11:3479"
    assert report["closest_relay"] == "203.0.113.10:3478"


@pytest.mark.parametrize("behaviour", [ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT])
def test_mapping_that_depends_on_the_destination_is_named(behaviour):
    v4 = report_for(FakeInternet(behaviour))["ipv4"]
    assert v4["mapping"] == behaviour
    assert v4["mapping_varies_by_destination"] is True


def test_no_hairpinning():
    assert report_for(FakeInternet(hairpin=False))["ipv4"]["hairpinning"] is False


def test_the_mapping_tests_go_to_the_relays_second_address_and_port():
    net = FakeInternet()
    drive(FamilyCheck(4, [RELAY]), net)
    assert {(RELAY_ALT_IP, RELAY[1]), (RELAY_ALT_IP, RELAY_ALT_PORT), (PUBLIC_IP, 40000)} <= set(net.sent)


def test_udp_blocked_is_reported_within_the_wait():
    check = FamilyCheck(4, [RELAY], give_up_after=3.0)
    end = drive(check, FakeInternet(udp=False))
    assert end <= 3.0 + 1e-9
    v4 = build_report({4: check.result()}, [], {4: LOCAL_IP}, wait=3.0)["ipv4"]
    assert v4["udp"] is False and "no answer" in v4["error"] and "3 s" in v4["error"]
    assert v4["srflx"] == [] and v4["mapping"] == UNKNOWN and v4["hairpinning"] is None


def test_a_lost_request_is_retransmitted():
    report = report_for(FakeInternet(drop_first=1))
    assert report["ipv4"]["udp"] is True
    # The first answer came to the retransmission (its round trip includes the wait);
    # the latency shown is the best of the samples, not inflated by the lost one.
    assert report["relays"][0]["udp_rtt_ms"] == pytest.approx(RTT * 1000)


def test_without_a_second_address_two_relays_are_compared():
    other = ("203.0.113.50", 3478)
    plain = {RELAY: None, other: None}
    same = report_for(FakeInternet(ENDPOINT_INDEPENDENT, servers=dict(plain)), servers=(RELAY, other))
    assert same["ipv4"]["mapping"] == ENDPOINT_INDEPENDENT
    varies = report_for(FakeInternet(ADDRESS_DEPENDENT, servers=dict(plain)), servers=(RELAY, other))
    assert varies["ipv4"]["mapping"] == VARIES and varies["ipv4"]["mapping_varies_by_destination"] is True
    alone = report_for(FakeInternet(servers={RELAY: None}))
    assert alone["ipv4"]["mapping"] == UNKNOWN and alone["ipv4"]["mapping_varies_by_destination"] is None


def test_no_nat_when_the_relay_sees_our_own_address():
    v4 = report_for(FakeInternet(), local_ip=PUBLIC_IP)["ipv4"]
    assert v4["behind_nat"] is False and v4["hairpinning"] is None


def test_a_family_the_socket_cannot_send_on():
    check = FamilyCheck(6, [("2001:db8::10", 3478)])
    check.start(0.0)
    check.datagrams_to_send()
    check.send_failed("Network is unreachable")
    assert check.done
    v6 = build_report({4: None, 6: check.result()}, [], {})["ipv6"]
    assert v6["udp"] is False and v6["error"] == "Network is unreachable"


def test_a_family_without_relays_is_not_tested():
    check = FamilyCheck(6, [RELAY])  # an IPv4 relay only
    check.start(0.0)
    assert check.done
    v6 = build_report({4: None, 6: check.result()}, [], {})["ipv6"]
    assert v6["tested"] is False and v6["udp"] is None


# -- the report as text --------------------------------------------------------------------------


def test_human_report():
    tcp = [TcpResult(RELAY, True, 0.0042, (PUBLIC_IP, 50123))]
    text = format_report(report_for(FakeInternet(), tcp=tcp))
    assert "UDP IPv4: yes" in text
    assert f"public address: {PUBLIC_IP}:40000 (behind a NAT; local {LOCAL_IP})" in text
    assert "mapping: endpoint-independent" in text and "hairpinning: yes" in text
    assert "UDP IPv6: not tested" in text
    assert "203.0.113.10:3478  UDP 20.0 ms  TCP 4.2 ms  (closest)" in text
    assert "TCP fallback: yes" in text


def test_human_report_when_only_tcp_gets_out():
    check = FamilyCheck(4, [RELAY])
    drive(check, FakeInternet(udp=False))
    tcp = [TcpResult(RELAY, True, 0.01, (PUBLIC_IP, 50123))]
    report = build_report({4: check.result()}, tcp, {4: LOCAL_IP})
    text = format_report(report)
    assert "UDP IPv4: no (no answer from 1 relay address(es) within 3 s)" in text
    assert "TCP fallback: yes" in text and report["tcp_fallback"] is True
    symmetric = format_report(report_for(FakeInternet(ADDRESS_AND_PORT_DEPENDENT)))
    assert "mapping: address-and-port-dependent" in symmetric and "direct paths rarely open" in symmetric


# -- naming the relays ---------------------------------------------------------------------------


@pytest.mark.parametrize("url,expected", [
    ("http://203.0.113.10:8080", ("203.0.113.10", 3478)),
    ("https://relay.example.org", ("relay.example.org", 3478)),
    ("http://[2001:db8::10]:8080/v1/ws", ("2001:db8::10", 3478)),
    ("stun:203.0.113.10:3479", ("203.0.113.10", 3479)),
    ("turn:relay.example.org?transport=tcp", ("relay.example.org", 3478)),
])
def test_relay_urls(url, expected):
    assert netcheck.relay_from_url(url) == expected


@pytest.mark.parametrize("url", ["turns:relay.example.org:5349", "ftp://x", "relay", "http://"])
def test_bad_relay_urls(url):
    with pytest.raises(netcheck.NetcheckError):
        netcheck.relay_from_url(url)


def test_relays_of_a_running_agent():
    doc = {"rendezvous": {"url": "http://203.0.113.10:8080", "relays": [
        {"server": "203.0.113.10:3478", "transport": "udp"},
        {"server": "[2001:db8::10]:3478", "transport": "udp"},
    ]}}
    assert netcheck.relays_from_status(doc) == [("203.0.113.10", 3478), ("2001:db8::10", 3478)]
    assert netcheck.relays_from_status({"rendezvous": None}) == []


def test_resolve_keeps_both_families_and_drops_duplicates():
    def resolver(host, port, type=0):
        assert host == "relay.example.org"
        return [(socket.AF_INET, type, 17, "", ("203.0.113.10", port)),
                (socket.AF_INET6, type, 17, "", ("2001:db8::10", port, 0, 0)),
                (socket.AF_INET, type, 17, "", ("203.0.113.10", port))]

    assert netcheck.resolve([("relay.example.org", 3478)], resolver) == [("203.0.113.10", 3478),
                                                                         ("2001:db8::10", 3478)]


def test_unresolvable_relay_is_named():
    def resolver(host, port, type=0):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(netcheck.NetcheckError, match="cannot resolve relay nowhere.invalid"):
        netcheck.resolve([("nowhere.invalid", 3478)], resolver)


def test_cli_without_any_relay_says_what_to_give(tmp_path, capsys):
    assert main(["netcheck", "--socket-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("overlay: netcheck: no relay to check") and "Traceback" not in err


def test_cli_bad_relay_url_is_one_line(capsys):
    assert main(["netcheck", "--relay", "ftp://relay"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("overlay: netcheck: 'ftp://relay'") and len(err.splitlines()) == 1


def test_cli_config_without_rendezvous(tmp_path, capsys):
    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nPrivateKey = " + "A" * 43 + "=\n")
    assert main(["netcheck", str(conf)]) == 1
    assert "names no relay" in capsys.readouterr().err


def test_cli_config_relays(tmp_path, monkeypatch, capsys):
    """The relays of a config: its rendezvous host, and `Relay =` lines (turns: skipped)."""
    seen = {}

    async def fake_netcheck(servers, sources, wait):
        seen["servers"], seen["sources"] = servers, sources
        return {"udp": True, "tcp_fallback": True}

    monkeypatch.setattr(netcheck, "netcheck", fake_netcheck)
    conf = tmp_path / "home.conf"
    conf.write_text("[Interface]\nPrivateKey = " + "A" * 43 + "=\n"
                    "Relay = turn:203.0.113.20:3479\nRelay = turns:203.0.113.30\n"
                    "[Rendezvous]\nURL = http://203.0.113.10:8080\n")
    assert main(["netcheck", str(conf), "--json"]) == 0
    assert seen["servers"] == [("203.0.113.10", 3478), ("203.0.113.20", 3479)]
    assert seen["sources"] == [str(conf)]
