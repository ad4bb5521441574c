"""NAT behaviour settings and the text the lab loads, checked without and with the kernel."""

from __future__ import annotations

import itertools

import pytest

from overlay.lab.faults import Impairment, render_path_faults
from overlay.lab.natrules import (
    APDF,
    APDM,
    EIF,
    EIM,
    FILTERINGS,
    IPV6_MODES,
    MAPPINGS,
    NatBehaviour,
    NatConfigError,
    RouterAddresses,
    render_router_rules,
)
from overlay.lab.netns import Namespace
from tests.support import needs_root

ADDRS = RouterAddresses("wan", "lan", "203.0.113.101", "2001:db8:1::101", "10.1.0.0/24", "2001:db8:100::/64",
                        ("203.0.113.10", "203.0.113.11"), ("2001:db8:1::10", "2001:db8:1::11"))


def test_classic_types_map_to_rfc4787_behaviours():
    assert NatBehaviour.of("full-cone") == NatBehaviour(mapping=EIM, filtering=EIF)
    assert NatBehaviour.of("symmetric").mapping == APDM
    assert NatBehaviour.of("port-restricted", udp_timeout=5).udp_timeout == 5
    assert NatBehaviour.of("udp-blocked").udp_blocked
    for name in ("full-cone", "restricted", "port-restricted", "symmetric", "udp-blocked"):
        assert NatBehaviour.of(name).type_name == name


def test_short_names_are_accepted():
    assert NatBehaviour(mapping="eim", filtering="adf").filtering == "address-dependent"
    assert NatBehaviour(mapping="APDM", filtering="apdf").mapping == APDM


@pytest.mark.parametrize("kwargs, message", [
    ({"mapping": "random"}, "mapping 'random' not supported"),
    ({"mapping": "adm"}, "mapping 'adm' not supported"),
    ({"filtering": "none"}, "filtering 'none' not supported"),
    ({"udp_timeout": 0}, "udp_timeout"),
    ({"udp_timeout": "30"}, "udp_timeout"),
    ({"hairpin": "yes"}, "hairpin must be true or false"),
    ({"ipv6": "nat64"}, "ipv6 mode 'nat64' unknown"),
])
def test_bad_settings_name_what_is_wrong(kwargs, message):
    with pytest.raises(NatConfigError, match=message):
        NatBehaviour(**kwargs)


def test_changes_keep_other_settings():
    b = NatBehaviour.of("full-cone", hairpin=True, udp_timeout=7)
    c = b.with_changes("symmetric")
    assert (c.mapping, c.filtering, c.hairpin, c.udp_timeout) == (APDM, APDF, True, 7)
    with pytest.raises(NatConfigError, match="unknown NAT setting"):
        b.with_changes(colour="blue")


def test_filtering_modes_differ_where_they_should():
    apdf = render_router_rules(NatBehaviour.of("port-restricted"), ADDRS)
    adf = render_router_rules(NatBehaviour.of("restricted"), ADDRS)
    eif = render_router_rules(NatBehaviour.of("full-cone"), ADDRS)
    assert "dnat ip to udp dport map @mapping_in" not in apdf  # only replies get in
    assert "ip daddr . udp dport . ip saddr @contacted accept" in adf
    assert 'iifname "wan" oifname "lan" ct status dnat accept' in eif
    assert "fully-random" in render_router_rules(NatBehaviour.of("symmetric"), ADDRS)


def test_impairment_arguments():
    assert Impairment(5, 50, 10).tc_args("wan") == [
        "qdisc", "replace", "dev", "wan", "root", "netem", "delay", "50ms", "10ms", "loss", "5%"]
    assert Impairment().tc_args("wan") == ["qdisc", "del", "dev", "wan", "root"]
    with pytest.raises(ValueError, match="jitter_ms needs a delay_ms"):
        Impairment(jitter_ms=5)
    with pytest.raises(ValueError, match="loss"):
        Impairment(loss=-1)


@needs_root()
def test_every_behaviour_combination_loads_into_nftables(netns_prefix):
    """nft itself accepts every ruleset the lab can produce (checked with `nft -c` in a namespace)."""
    ns = Namespace(f"{netns_prefix}labrules").create()
    try:
        for mapping, filtering, hairpin, blocked, ipv6 in itertools.product(
                MAPPINGS, FILTERINGS, (False, True), (False, True), IPV6_MODES):
            b = NatBehaviour(mapping=mapping, filtering=filtering, hairpin=hairpin, udp_blocked=blocked, ipv6=ipv6)
            ns.run("nft", "-c", "-f", "-", input=render_router_rules(b, ADDRS))
        ns.run("nft", "-c", "-f", "-", input=render_path_faults([("p1", "p2")], ["prelay"]))
    finally:
        ns.delete()
