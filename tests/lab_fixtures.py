"""pytest fixtures for the NAT lab (loaded by tests/conftest.py as a plugin).

Every lab is named from the session's `netns_prefix` plus "lab" and a counter,
so the suite's own leftover check covers it. Teardown always runs, and it
checks that every process that was running inside the lab is gone.

    def test_x(lab):                      # empty Lab, function scope
        relay = lab.add_relay()
        ...

    def test_y(nat_pair):                 # relay + two port-restricted NATs, one host each
        nat_pair.h1.ns.run(...)

    @pytest.fixture(scope="module")
    def topo(lab_factory_module): ...     # build your own, torn down with the module
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from overlay.lab import Host, Lab, Nat, Relay

_counter = itertools.count(1)


def lab_processes(lab: Lab) -> list[int]:
    """Pids of the processes currently inside any of the lab's namespaces."""
    inodes = set()
    for ns in lab.namespaces():
        try:
            inodes.add(os.stat(f"/var/run/netns/{ns.name}").st_ino)
        except FileNotFoundError:
            pass
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    pids.append(int(entry))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def teardown_checked(lab: Lab) -> None:
    """Tear the lab down and fail if any process that ran in it survived."""
    pids = lab_processes(lab)
    lab.teardown()
    survivors = [p for p in pids if _alive(p)]
    assert not survivors, f"processes survived the lab teardown: {survivors}"


def _make_factory(netns_prefix: str, labs: list[Lab]) -> Callable[[], Lab]:
    def make() -> Lab:
        lab = Lab(f"{netns_prefix}lab{next(_counter)}")
        labs.append(lab)
        return lab

    return make


def _teardown_all(labs: list[Lab]) -> None:
    errors = []
    for lab in labs:
        try:
            teardown_checked(lab)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "; ".join(errors)


@pytest.fixture
def lab_factory(netns_prefix: str) -> Iterator[Callable[[], Lab]]:
    """Makes empty labs, all torn down at the end of the test."""
    labs: list[Lab] = []
    try:
        yield _make_factory(netns_prefix, labs)
    finally:
        _teardown_all(labs)


@pytest.fixture(scope="module")
def lab_factory_module(netns_prefix: str) -> Iterator[Callable[[], Lab]]:
    """Makes empty labs, all torn down at the end of the module."""
    labs: list[Lab] = []
    try:
        yield _make_factory(netns_prefix, labs)
    finally:
        _teardown_all(labs)


@pytest.fixture
def lab(lab_factory: Callable[[], Lab]) -> Lab:
    """An empty lab (function scope)."""
    return lab_factory()


@pytest.fixture(scope="module")
def module_lab(lab_factory_module: Callable[[], Lab]) -> Lab:
    """An empty lab shared by a test module."""
    return lab_factory_module()


@dataclass
class NatPair:
    lab: Lab
    relay: Relay
    nat1: Nat
    nat2: Nat
    h1: Host
    h2: Host


def build_nat_pair(lab: Lab, nat_type: str = "port-restricted", **nat_options: object) -> NatPair:
    """The usual two-sites topology: relay, nat1 and nat2, host h1 behind nat1 and h2 behind nat2."""
    relay = lab.add_relay()
    nat1 = lab.add_nat("nat1", nat_type, **nat_options)  # type: ignore[arg-type]
    nat2 = lab.add_nat("nat2", nat_type, **nat_options)  # type: ignore[arg-type]
    return NatPair(lab, relay, nat1, nat2, lab.add_host("h1", nat1), lab.add_host("h2", nat2))


@pytest.fixture
def nat_pair(lab: Lab) -> NatPair:
    """Relay plus two port-restricted NATs with one host each (function scope)."""
    return build_nat_pair(lab)


@pytest.fixture(scope="module")
def module_nat_pair(module_lab: Lab) -> NatPair:
    """Relay plus two port-restricted NATs with one host each, shared by a module."""
    return build_nat_pair(module_lab)
