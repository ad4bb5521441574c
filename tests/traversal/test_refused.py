"""Who must not get in: a wrong or reused token, a key the relay does not know,
a node of another network. Real `overlay up` processes with a `[Rendezvous]`
section in their config, on the NAT lab; what a user sees is a clear line in
the agent's log (the relay's reason in it, no traceback), and no peer."""

from __future__ import annotations

import time

import pytest

from overlay import keys
from overlay.config import InterfaceConfig, RendezvousConfig, render_config
from overlay.lab import Host, Lab

from tests.support import needs_root, needs_tools

from .scenario import Node, Scenario

IFNAME_LETTER = "r"
pytestmark = [needs_root(), needs_tools("ping"), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def hosts(module_lab: Lab) -> list[Host]:
    module_lab.add_relay()
    nat1 = module_lab.add_nat("r1", "full-cone")
    nat2 = module_lab.add_nat("r2", "full-cone")
    return [module_lab.add_host("rh1", nat1), module_lab.add_host("rh2", nat2), module_lab.add_host("rh3", nat2)]


@pytest.fixture(scope="module")
def scenario(module_lab: Lab, hosts, tmp_path_factory, ifprefix):
    sc = Scenario(module_lab, tmp_path_factory.mktemp("refused"), ifprefix)
    try:
        sc.start_relay()
        yield sc
    finally:
        sc.close()


def rendezvous_only_node(scenario: Scenario, host: Host, name: str, token: str | None) -> Node:
    """A config a user could have written by hand: a fresh key and a [Rendezvous] section."""
    assert scenario.relay is not None
    node = scenario.new_node(host, name)
    config = InterfaceConfig(private_key=keys.generate_private_key(),
                             rendezvous=RendezvousConfig(scenario.relay.http_url, token=token, name=name))
    node.config.write_text(render_config(config))
    node.config.chmod(0o600)
    node.load()
    return node


def wait_for_log(scenario: Scenario, node: Node, needles: list[str], timeout: float = 20.0) -> str:
    """The agent's log once it contains every needle (case-insensitive)."""
    deadline = time.monotonic() + timeout
    while True:
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        if all(n.lower() in text.lower() for n in needles):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{node.name}: the agent never said {needles} within {timeout} s; its log:\n{text[-3000:]}")
        time.sleep(0.1)


def assert_refused(scenario: Scenario, node: Node, reason: str) -> None:
    scenario.up(node, wait=False)
    try:
        text = wait_for_log(scenario, node, [reason])
        assert "Traceback" not in text, text
        # Whether or not the agent keeps running for static peers, it has no rendezvous peer.
        if node.proc is not None and node.proc.poll() is None:
            try:
                assert scenario.status(node)["peers"] == []
            except Exception as e:  # noqa: BLE001 - an agent that exited has no socket
                if node.proc.poll() is None:
                    raise AssertionError(f"running agent does not answer status: {e}") from None
    finally:
        scenario.stop(node)


def test_wrong_token_is_refused_with_a_clear_message(scenario: Scenario, hosts) -> None:
    real = scenario.token("refnet", uses=1)
    wrong = real.split(".")[0] + ".this-is-not-the-secret"
    node = rendezvous_only_node(scenario, hosts[0], "wrongtoken", wrong)
    assert_refused(scenario, node, "invalid token")
    assert "wrongtoken" not in scenario.relay.cli("node", "list").stdout  # type: ignore[union-attr]


def test_reused_token_is_refused_with_a_clear_message(scenario: Scenario, hosts) -> None:
    token = scenario.token("reuse", uses=1)
    scenario.join(hosts[0], token, "first")  # spends the only use
    node = rendezvous_only_node(scenario, hosts[1], "second", token)
    assert_refused(scenario, node, "used up")


def test_unknown_key_is_refused_with_a_clear_message(scenario: Scenario, hosts) -> None:
    node = rendezvous_only_node(scenario, hosts[0], "stranger", None)
    assert_refused(scenario, node, "not a member")


def test_node_of_another_network_is_not_a_peer_and_cannot_reach_in(scenario: Scenario, hosts) -> None:
    t1, t2 = scenario.token("home", uses=2), scenario.token("elsewhere", uses=1)
    a, b = scenario.join(hosts[0], t1, "home-a"), scenario.join(hosts[1], t1, "home-b")
    c = scenario.join(hosts[2], t2, "other-c")
    try:
        for node in (a, b, c):
            scenario.up(node)
        scenario.wait_ping(a, b, timeout=20)  # the members do reach each other
        assert scenario.peer_status(a, c) is None and scenario.peer_status(b, c) is None
        assert scenario.peer_status(c, a) is None and scenario.peer_status(c, b) is None
        # c's overlay is another network: a's overlay address is not reachable from it.
        assert not scenario.ping_once(c, a, wait=2)
        assert {p["public_key"] for p in scenario.status(a)["peers"]} == {b.public_key}
    finally:
        for node in (a, b, c):
            scenario.stop(node)
