"""Sliding-window replay protection for transport counters (RFC 6479 idea).

The window is a Python int used as a bitmap: bit i set means counter
`highest - i` was seen. Shifting a few-thousand-bit int is cheap, and a jump
further than the window simply clears it.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_BITS


class ReplayWindow:
    __slots__ = ("_highest", "_bitmap", "size", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW_BITS - 64):
        self.size = size
        self._mask = (1 << size) - 1
        self._highest = -1
        self._bitmap = 0

    def check(self, counter: int) -> bool:
        """True if `counter` would be accepted; does not record it."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self._highest:
            return True
        diff = self._highest - counter
        return diff < self.size and not (self._bitmap >> diff) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` if it is new and inside the window; False if it must be dropped."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        highest = self._highest
        if counter > highest:
            shift = counter - highest
            if shift >= self.size:
                self._bitmap = 1
            else:
                self._bitmap = ((self._bitmap << shift) | 1) & self._mask
            self._highest = counter
            return True
        diff = highest - counter
        if diff >= self.size:
            return False
        bit = 1 << diff
        if self._bitmap & bit:
            return False
        self._bitmap |= bit
        return True
