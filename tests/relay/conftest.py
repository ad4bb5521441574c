"""Fixtures for the relay tests: a real overlay-relay process on loopback."""

from __future__ import annotations

import pytest

from .relayproc import Relay


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    # Many tests log in from 127.0.0.1: lift the per-IP limit here (it has its own test).
    r = Relay(tmp_path_factory.mktemp("relay"), alternate=True,
              extra=["--rate-per-minute", "100000", "--rate-burst", "10000"])
    r.start()
    try:
        yield r
    finally:
        r.stop()
