"""Shared fixtures of the traversal lab tests."""

from __future__ import annotations

import os

import pytest

# Pairs run at the same time in the matrix (each pair: two NATs, two agents).
MATRIX_WORKERS = int(os.environ.get("OVERLAY_TRAVERSAL_WORKERS", "3"))


@pytest.fixture(scope="module")
def ifprefix(netns_prefix: str, request: pytest.FixtureRequest) -> str:
    """Interface names of this module: session prefix + a letter per module (max 15 chars in all)."""
    letter = getattr(request.module, "IFNAME_LETTER", "x")
    return f"{netns_prefix}{letter}"
