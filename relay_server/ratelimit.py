"""Per-source token buckets for unauthenticated requests (join attempts, login challenges)."""

from __future__ import annotations


class RateLimiter:
    """`allow(key, now)` spends one token from `key`'s bucket; refill `per_minute`, cap `burst`.

    The table is bounded: when it grows past `max_keys`, buckets that are full again
    (idle sources) are forgotten, so a flood of distinct sources cannot grow memory.
    """

    def __init__(self, per_minute: int, burst: int, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return ok

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate if self.rate else float("inf")
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
