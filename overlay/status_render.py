"""`overlay status` for a person: the status document (uapi.status_dict) as text.

Per peer: the active path (direct or relay, endpoint, round trip, loss), since
when and why it is the active one, and the alternatives with their state, so
that "why is this going through the relay?" has its answer on the screen.
"""

from __future__ import annotations

import time
from typing import Any

CANDIDATE_KINDS = ("host", "srflx", "prflx", "relay")


def ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    secs = max(0, int(now - t))
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if secs >= size or (unit == "second" and not parts):
            n, secs = divmod(secs, size)
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return ", ".join(parts) + " ago"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def measured(rtt_ms: float | None, loss: float | None, probes: int | None = None) -> str:
    """", rtt 1.20 ms, loss 5% of 40 probes" (empty when nothing was measured)."""
    out = ""
    if rtt_ms is not None:
        out += f", rtt {rtt_ms:.2f} ms"
    if loss is not None:
        out += f", loss {loss * 100:.0f}%" + (f" of {probes} probe{'s' if probes != 1 else ''}" if probes else "")
    return out


def _endpoint_entries(peer: dict[str, Any]) -> list[dict[str, Any]]:
    """Endpoint entries, from old agents' plain strings too."""
    out = []
    for ep in peer["endpoints"]:
        if isinstance(ep, dict):
            out.append(ep)
        else:
            state = "active" if ep == peer.get("active_endpoint") else ""
            out.append({"endpoint": ep, "kind": "configured", "state": state})
    return out


def _path_lines(peer: dict[str, Any], entries: list[dict[str, Any]], now: float) -> list[str]:
    lines = []
    active = next((e for e in entries if e.get("state") == "active"), None)
    if peer.get("path"):
        where = peer.get("endpoint") or peer.get("active_endpoint") or "?"
        kind = f" ({active['kind']}, active)" if active is not None else ""
        probes = active.get("probes") if active is not None else None
        lines.append(f"  path: {peer['path']} {where}{kind}"
                     f"{measured(peer.get('path_rtt_ms'), peer.get('path_loss'), probes)}")
        since = peer.get("path_since")
        if since is not None:
            why = f", because: {peer['path_reason']}" if peer.get("path_reason") else ""
            changes = peer.get("path_changes") or 0
            lines.append(f"  since: {clock(since)} ({ago(since, now)}){why}"
                         f" ({changes} path change{'s' if changes != 1 else ''})")
    elif peer.get("path") is None and "path" in peer:
        lines.append("  path: none yet (no endpoint has answered)")
    return lines


def format_peer(peer: dict[str, Any], now: float) -> list[str]:
    lines = [f"peer: {peer['public_key']}"]
    if peer.get("name"):
        lines.append(f"  name: {peer['name']} ({', '.join(peer.get('overlay_ips') or [])})")
    entries = _endpoint_entries(peer)
    lines += _path_lines(peer, entries, now)
    if any(e["kind"] in CANDIDATE_KINDS for e in entries):
        # A rendezvous peer: every candidate is a possible path; show why each is (not) used.
        others = [e for e in entries if e.get("state") != "active"]
        lines.append("  alternatives:" + ("" if others else " (none)"))
        for e in others:
            lines.append(f"    {e['endpoint']} ({e['kind']}, {e['state']})"
                         f"{measured(e.get('rtt_ms'), e.get('loss'), e.get('probes'))}")
    else:
        shown = [f"{e['endpoint']} (active)" if e.get("state") == "active" else e["endpoint"] for e in entries]
        active = peer.get("active_endpoint")
        if active and active not in [e["endpoint"] for e in entries]:
            shown.insert(0, f"{active} (active)")
        lines.append(f"  endpoints: {', '.join(shown) if shown else '(none)'}")
    if peer.get("preshared_key"):
        lines.append("  preshared key: (hidden)")
    lines.append(f"  allowed ips: {', '.join(peer['allowed_ips']) or '(none)'}")
    lines.append(f"  latest handshake: {ago(peer['latest_handshake'], now)}")
    lines.append(f"  transfer: {human_bytes(peer['rx_bytes'])} received, {human_bytes(peer['tx_bytes'])} sent")
    ka = peer["persistent_keepalive"]
    lines.append(f"  persistent keepalive: {'every ' + str(ka) + ' seconds' if ka else 'off'}")
    return lines


def format_status(doc: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"interface: {doc['interface']}"]
    if doc.get("public_key"):
        lines.append(f"  public key: {doc['public_key']}")
    lines.append(f"  listening port: {doc['listen_port']}")
    for peer in doc["peers"]:
        lines += ["", *format_peer(peer, now)]
    return "\n".join(lines)
