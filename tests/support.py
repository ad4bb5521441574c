"""Shared test helpers: skip conditions for tests that need root or Debian tools."""

from __future__ import annotations

import os
import shutil

import pytest

IS_ROOT = os.geteuid() == 0
HAS_TUN = os.path.exists("/dev/net/tun")


def needs_root():
    """Mark for tests that build namespaces, TUN devices or nft rules."""
    return pytest.mark.skipif(
        not (IS_ROOT and HAS_TUN and shutil.which("ip") and shutil.which("nft")),
        reason="needs root, /dev/net/tun, iproute2 and nftables",
    )


def needs_tools(*tools: str):
    """Mark for tests that drive programs nobody here wrote (wireguard-go, coturn, ...)."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}")
