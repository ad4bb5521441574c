"""Suite-wide fixtures.

Every namespace a test creates starts with the session's `netns_prefix`; the
suite itself checks at the end that none is left behind.
"""

from __future__ import annotations

import os

import pytest

from overlay.lab import netns

pytest_plugins = ["tests.lab_fixtures"]


@pytest.fixture(scope="session")
def netns_prefix() -> str:
    # Short, because veth names derived from it are limited to 15 characters.
    return f"t{os.getpid() % 10000:04d}"


@pytest.fixture(scope="session", autouse=True)
def _no_namespaces_left_behind(netns_prefix):
    yield
    leftovers = netns.list_namespaces(netns_prefix)
    netns.sweep(netns_prefix)
    assert not leftovers, f"tests left namespaces behind: {leftovers}"
