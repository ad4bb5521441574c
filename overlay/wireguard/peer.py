"""Per-peer state: configuration, endpoint set, sessions and timer deadlines.

The peer is plain data; the rules that move it along live in device.py. The
session (keypairs, counters, replay windows) belongs to the peer and not to an
endpoint, so a change of path never resets it.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable

from .allowedips import IPNetwork
from .constants import MAX_STAGED_PACKETS
from .cookie import CookieJar
from .endpoints import Endpoint, EndpointSet
from .keypair import Keypair
from .noise import InitiatorState
from .pathstats import PathStats


class Peer:
    def __init__(self, public_key: bytes, static_static: bytes | None):
        self.public_key = public_key
        self.preshared_key: bytes | None = None
        self.allowed_ips: list[IPNetwork] = []
        self.persistent_keepalive = 0
        # Automatic keepalive (seconds, 0 = off) for a path through a NAT, set by the
        # traversal session from the measured mapping lifetime (traversal/keepalive.py).
        # Unlike PersistentKeepalive only what we send to the active endpoint counts:
        # a NAT mapping is held by outbound packets, not by the peer's.
        self.auto_keepalive = 0.0
        self.last_sent_active: float | None = None  # core time we last sent to the active endpoint
        self.endpoint_set = EndpointSet()
        self.cookies = CookieJar(public_key)
        # DH(our static, their static), precomputed; None if their key is a bad point.
        self.static_static = static_static

        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: InitiatorState | None = None
        # The initiation bytes of the pending handshake, re-sent unchanged to
        # every endpoint (happy eyeballs) and after a send error.
        self.initiation_bytes: bytes | None = None
        self.last_initiation_sent: float | None = None
        self.handshake_attempts = 0
        self.sent_lastminute_handshake = False

        # Responder side: replay protection and duplicate answering.
        self.latest_timestamp = b""
        self.last_initiation_consumed: float | None = None
        self.answered_initiation: bytes | None = None
        self.answered_response: bytes | None = None
        self.answered_at = 0.0
        self.answered_duplicates = 0

        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)

        # Timer deadlines (core clock) or None when not armed.
        self.t_retransmit: float | None = None
        self.t_send_keepalive: float | None = None
        self.keepalive_needed = False
        self.t_new_handshake: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent: float | None = None
        # Happy eyeballs: (message, endpoints, when) still to be sent.
        self.eyeballs: tuple[bytes, list[Endpoint], float] | None = None

        self.last_handshake: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0

        # In-session path probes (paths.py): probe id -> (endpoint, sent at),
        # endpoint -> first unanswered probe time.
        self.probes: dict[bytes, tuple[Endpoint, float]] = {}
        self.probe_unanswered_since: dict[Endpoint, float] = {}
        # Set for peers known to run this agent (rendezvous peers): crossing
        # initiations are settled by key order instead of both being lost.
        self.crossing_tiebreak = False
        self.probe_bytes = 0  # of rx_bytes + tx_bytes, what probes took (not user traffic)
        self.last_user_data = -1e18  # core time an IP packet last went to or came from the peer
        # What probes showed per endpoint (pathstats.py), and the path choice (paths.py).
        self.path_stats: dict[Endpoint, PathStats] = {}
        self.path_since: float | None = None  # core time the active endpoint last changed
        self.path_reason = ""  # why it changed then
        self.path_change_count = 0
        self.path_events: list[tuple[float, Endpoint | None, str]] = []  # not yet reported
        # First packet sent to the active endpoint that expects an answer (data or a
        # probe) since we last heard from it; None while it answers.
        self.unanswered_since: float | None = None
        # Set while the active endpoint is in doubt (silent while we send, send error):
        # every endpoint is probed and the first to answer takes over.
        self.suspect_since: float | None = None
        self.path_reason_pending: str | None = None  # the reason the doubt began with
        self.doubt_limit = 0.0  # the silence that raised it (it fails at twice that)
        self.data_elsewhere_at = -1e18  # core time the peer's data last came from another endpoint
        # An alternative that costs clearly less than the active one, and since when.
        self.cheaper: tuple[Endpoint, float] | None = None
        self.cost_switches: deque[float] = deque(maxlen=16)  # times of changes made for cost
        self.pong_hooks: dict[bytes, Callable[[Endpoint, float], None]] = {}

    def __repr__(self) -> str:
        return f"Peer({base64.b64encode(self.public_key).decode()}, active={self.active_endpoint!r})"

    # Endpoint views (the API other parts use).
    @property
    def configured_endpoints(self) -> list[Endpoint]:
        return list(self.endpoint_set.configured)

    @property
    def learned_endpoints(self) -> list[Endpoint]:
        return list(self.endpoint_set.learned)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.endpoint_set.all()

    @property
    def active_endpoint(self) -> Endpoint | None:
        return self.endpoint_set.active

    def keypairs(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def deadlines(self) -> list[float]:
        out = [t for t in (self.t_retransmit, self.t_send_keepalive, self.t_new_handshake,
                           self.t_zero_keys, self.t_persistent) if t is not None]
        if self.eyeballs is not None:
            out.append(self.eyeballs[2])
        return out
