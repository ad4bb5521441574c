"""A peer's paths as plain data, for `overlay status`, `overlay ping` and /metrics.

Reads what the in-session probes left on the peer (`peer.path_stats`, the path
choice's `path_since` / `path_reason` / `path_change_count`) and turns it into
numbers in the units people read: milliseconds and shares of lost probes. Nothing
here changes the peer.
"""

from __future__ import annotations

from typing import Any

from overlay.config import format_endpoint
from overlay.wireguard.endpoints import KIND_CONFIGURED


def describe(endpoint: Any) -> str:
    """`ip:port`, `[ip6]:port`, or `peer via server` for a relayed endpoint."""
    if isinstance(endpoint, tuple) and len(endpoint) == 2 and isinstance(endpoint[0], str):
        return format_endpoint(endpoint)
    return str(endpoint)


def kind_of(peer: Any, endpoint: Any) -> str:
    """host / srflx / prflx / relay for candidates, configured / learned otherwise."""
    if endpoint in peer.configured_endpoints:
        return KIND_CONFIGURED
    return peer.endpoint_set.kind_of(endpoint)


def rtt_seconds(peer: Any, endpoint: Any) -> float | None:
    """The round trip the path choice uses (median of the last probes)."""
    st = peer.path_stats.get(endpoint)
    return None if st is None else st.median_rtt


def loss_ratio(peer: Any, endpoint: Any) -> float | None:
    """Share of probes lost over the recent window; None when never probed."""
    st = peer.path_stats.get(endpoint)
    if st is None or not st.samples:
        return None
    return st.loss


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def endpoint_stats(peer: Any, endpoint: Any) -> dict[str, Any]:
    """Per-endpoint fields of the status document."""
    st = peer.path_stats.get(endpoint)
    loss = loss_ratio(peer, endpoint)
    return {
        "rtt_ms": _ms(rtt_seconds(peer, endpoint)),
        "loss": None if loss is None else round(loss, 3),
        "probes": st.samples if st is not None else 0,
        "lossy": bool(st is not None and st.lossy),
    }


def active_path(peer: Any, to_wall: Any) -> dict[str, Any]:
    """The active path's fields of the status document; `to_wall` maps the device
    clock to Unix time."""
    active = peer.active_endpoint
    since = peer.path_since
    loss = loss_ratio(peer, active) if active is not None else None
    return {
        "path_rtt_ms": _ms(rtt_seconds(peer, active)) if active is not None else None,
        "path_loss": None if loss is None else round(loss, 3),
        "path_since": None if since is None or active is None else to_wall(since),
        "path_reason": peer.path_reason or None,
        "path_changes": peer.path_change_count,
    }
