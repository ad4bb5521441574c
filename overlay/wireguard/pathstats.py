"""What in-session probes have shown about one endpoint: round trip and loss.

Each probe ends as an answer (with its round trip) or as lost (no pong within
`lost_after()`). From these:

- `srtt` / `rttvar`: smoothed round trip and its variation (the TCP estimator,
  RFC 6298 gains), used for how long silence must last before the path is in doubt;
- `median_rtt`: the median of the last RTT_SAMPLES round trips, used for cost
  (one slow answer on a loaded machine must not move a peer);
- `loss`: the share of lost probes among the last WINDOW outcomes. A run of
  OUTAGE_RUN or more losses that ends with an answer was an outage (a path that was
  down, then back), not loss, and is taken out of the window when the answer comes;
- `lossy`: the verdict with hysteresis, set at LOSSY_ON (with at least LOSSY_MIN_LOST
  lost probes, so a few unlucky ones on a clean path do not count, and LOSSY_MIN_ANSWERS
  answers, since a path that never answers is down, not lossy) and cleared only below
  LOSSY_OFF over a full window.

Plain data, no clock: callers pass round trips and outcomes.
"""

from __future__ import annotations

from collections import deque
from statistics import median

RTT_SAMPLES = 12
WINDOW = 40
OUTAGE_RUN = 4
LOSSY_ON = 0.30
LOSSY_MIN_LOST = 12
LOSSY_OFF = 0.10
LOSSY_MIN_ANSWERS = 4
MIN_LOST_AFTER = 1.5  # a probe unanswered this long is lost (slow machines stall pongs for ~1 s)


class PathStats:
    __slots__ = ("_lost_run", "_outcomes", "_rtts", "answered_at", "answered_sent_at", "answers_in_a_row",
                 "forgive_before", "lossy", "rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)
        self._outcomes: deque[bool] = deque(maxlen=WINDOW)  # True = lost
        self._lost_run = 0
        self.answers_in_a_row = 0
        self.lossy = False
        self.answered_at = -1e18  # (the caller's clock) when a probe was last answered
        self.answered_sent_at = -1e18  # when that probe had been sent
        # Probes sent before this time that are still unanswered were sent into an
        # outage that has ended: they are not counted as lost (see `answered`).
        self.forgive_before = -1e18

    def answered(self, rtt: float, now: float | None = None, sent_at: float | None = None,
                 unanswered_before: int = 0) -> None:
        """A probe sent at `sent_at` was answered at `now` after `rtt` seconds;
        `unanswered_before` probes sent before it are still out."""
        if now is not None and sent_at is not None:
            if self._lost_run + unanswered_before >= OUTAGE_RUN:
                # (`unanswered_before`: those sent since the last answered one.)
                # Back after an outage: the probes still out from before this one went
                # into it. Their loss says nothing about this path.
                self.forgive_before = sent_at
            self.answered_at = now
            self.answered_sent_at = max(self.answered_sent_at, sent_at)
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar += (abs(self.srtt - rtt) - self.rttvar) / 4
            self.srtt += (rtt - self.srtt) / 8
        self._rtts.append(rtt)
        if self._lost_run >= OUTAGE_RUN:
            # The path was down and is back: that run says nothing about loss.
            for _ in range(min(self._lost_run, len(self._outcomes))):
                self._outcomes.pop()
        self._lost_run = 0
        self._outcomes.append(False)
        self.answers_in_a_row += 1
        self._judge()

    def lost(self, sent_at: float | None = None) -> None:
        """A probe (sent at `sent_at`) went unanswered."""
        self._outcomes.append(True)
        if sent_at is None or sent_at > self.answered_sent_at:
            self._lost_run += 1  # (not when a later probe was answered already)
            self.answers_in_a_row = 0
        self._judge()

    def _judge(self) -> None:
        lost = sum(self._outcomes)
        n = len(self._outcomes)
        if not n:
            return
        if not self.lossy:
            # (An endpoint that hardly ever answers is unreachable, not lossy.)
            self.lossy = lost >= LOSSY_MIN_LOST and lost / n >= LOSSY_ON and n - lost >= LOSSY_MIN_ANSWERS
        elif n == WINDOW and lost / n < LOSSY_OFF:
            self.lossy = False

    @property
    def lost_in_a_row(self) -> int:
        return self._lost_run

    @property
    def samples(self) -> int:
        return len(self._outcomes)

    @property
    def loss(self) -> float:
        n = len(self._outcomes)
        return sum(self._outcomes) / n if n else 0.0

    @property
    def median_rtt(self) -> float | None:
        return median(self._rtts) if self._rtts else None

    def lost_after(self) -> float:
        """How long a probe may go unanswered before it counts as lost."""
        if self.srtt is None:
            return MIN_LOST_AFTER
        return max(MIN_LOST_AFTER, 2 * self.srtt + 4 * self.rttvar)

    def silence_limit(self, floor: float) -> float:
        """How long the active endpoint may be silent while we send before it is in doubt:
        a couple of round trips plus their variation, at least `floor`."""
        if self.srtt is None:
            return max(floor, 1.0)
        return max(floor, 2 * self.srtt + 4 * self.rttvar)
