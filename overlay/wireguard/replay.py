"""Sliding-window replay protection for transport counters (RFC 6479).

A ring of 64-bit blocks, as WireGuard does it: advancing the window clears
whole blocks instead of shifting a long bitmap, so an in-order packet costs a
few small-integer operations.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_BITS


class ReplayWindow:
    __slots__ = ("_highest", "_ring", "_mask", "size")

    def __init__(self, size: int = REPLAY_WINDOW_BITS - 64):
        blocks = 1
        while blocks < size // 64 + 1:
            blocks *= 2
        if blocks < 2:
            blocks = 2
        self.size = size  # counters this far below the highest one are too old
        self._ring = [0] * blocks
        self._mask = blocks - 1
        self._highest = -1

    def check(self, counter: int) -> bool:
        """True if `counter` would be accepted; records nothing."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self._highest:
            return True
        if self._highest - counter >= self.size:
            return False
        return not (self._ring[(counter >> 6) & self._mask] >> (counter & 63)) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` if new and inside the window; False if it must be dropped."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        ring = self._ring
        mask = self._mask
        highest = self._highest
        block = counter >> 6
        if counter > highest:
            current = highest >> 6 if highest >= 0 else -1
            advance = block - current
            if advance > mask:
                for i in range(mask + 1):
                    ring[i] = 0
            else:
                for i in range(current + 1, block + 1):
                    ring[i & mask] = 0
            self._highest = counter
        elif highest - counter >= self.size:
            return False
        idx = block & mask
        bit = 1 << (counter & 63)
        word = ring[idx]
        if word & bit:
            return False
        ring[idx] = word | bit
        return True
