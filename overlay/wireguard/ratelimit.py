"""Per-source token buckets for handshake messages while the device is under load.

Like WireGuard's ratelimiter: each source address (IP, not port) may send a
few handshake messages per second once the device is busy, so one flooding
host cannot crowd out the others. The table is bounded and forgets idle
entries.
"""

from __future__ import annotations

from .endpoints import Endpoint

PACKETS_PER_SECOND = 20
BURST = 5
MAX_ENTRIES = 4096


class SourceRateLimiter:
    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: int = BURST,
                 max_entries: int = MAX_ENTRIES):
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, last time)

    @staticmethod
    def _key(source: Endpoint) -> object:
        if isinstance(source, tuple) and source and isinstance(source[0], str):
            return source[0]
        return source

    def allow(self, source: Endpoint, now: float) -> bool:
        key = self._key(source)
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            if len(buckets) >= self.max_entries:
                self._expire(now)
                if len(buckets) >= self.max_entries:
                    return False  # table full of active sources: refuse newcomers
            tokens = float(self.burst)
        else:
            tokens, last = entry
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return False
        buckets[key] = (tokens - 1.0, now)
        return True

    def _expire(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key in [k for k, (_, last) in self._buckets.items() if now - last > full_after]:
            del self._buckets[key]
