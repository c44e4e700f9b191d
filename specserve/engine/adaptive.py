"""Adaptive draft length: pick k per step to maximise expected tokens per second.

With per-token acceptance probability a, a window of k drafts yields E(k) = (1 - a^(k+1)) / (1 - a) tokens
(accepted drafts plus the target's correction or bonus token) and costs T(k) = k * draft_cost + verify(k+1)
+ round_trip. k = 0 is plain decoding (E = 1, T = verify(1)), so choosing argmax E/T never does worse than
plain decoding by the model's own measurements.

All quantities are measured online: acceptance from verify outcomes, draft cost per drafted token, and the
verify cost of each window size (seeded with a prior, then exponentially averaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_EMA = 0.1  # weight of a new observation
_PROBE_EVERY = 16  # steps at k = 0 before drafting one short window again to re-measure acceptance


@dataclass
class AdaptiveK:
    k_max: int = 8
    acceptance: float = 0.7  # prior; the first windows quickly replace it
    draft_cost_s: float | None = None  # per drafted token
    verify_cost_s: dict[int, float] = field(default_factory=dict)  # window size -> seconds
    round_trip_s: float = 0.0  # network time per verify call when the target is remote
    _accepted: float = 2.1  # pseudo-counts behind `acceptance` (a prior worth 3 trials)
    _tried: float = 3.0
    _steps_at_zero: int = 0

    def verify_cost(self, window: int) -> float:
        """Estimated seconds to verify a window; never below a smaller window's cost (noise can make a
        bigger window look cheaper, and that would make drafting look free)."""
        known = sorted(self.verify_cost_s)
        if not known:
            return 1.0 + 0.1 * (window - 1)  # relative prior: windows are cheap on a memory-bound backend
        below = [w for w in known if w <= window]
        above = [w for w in known if w > window]
        if not below:
            return self.verify_cost_s[above[0]]  # smaller than anything measured: its nearest measurement
        floor = max(self.verify_cost_s[w] for w in below)
        if below[-1] == window or not above:
            return floor  # measured, or beyond the largest measured window: flat
        lower, upper = below[-1], above[0]  # linear between the nearest measured sizes
        frac = (window - lower) / (upper - lower)
        estimate = self.verify_cost_s[lower] + frac * (self.verify_cost_s[upper] - self.verify_cost_s[lower])
        return max(floor, estimate)

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second for a window of k drafts."""
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        seconds = k * (self.draft_cost_s or 0.0) + self.verify_cost(k + 1) + self.round_trip_s
        return tokens / seconds

    def choose(self, limit: int) -> int:
        limit = min(limit, self.k_max)
        if limit <= 0:
            return 0
        best = max(range(limit + 1), key=self.expected_rate)
        if best == 0:
            self._steps_at_zero += 1
            if self._steps_at_zero >= _PROBE_EVERY:  # acceptance may have changed: look again, cheaply
                self._steps_at_zero = 0
                return 1
        else:
            self._steps_at_zero = 0
        return best

    def observe(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        window = drafted + 1
        verify_s = max(verify_s - self.round_trip_s, 0.0)  # a remote window's wall time includes the network
        old = self.verify_cost_s.get(window)
        self.verify_cost_s[window] = verify_s if old is None else (1 - _EMA) * old + _EMA * verify_s
        if drafted == 0:
            return
        per_token = draft_s / drafted
        self.draft_cost_s = (
            per_token if self.draft_cost_s is None else (1 - _EMA) * self.draft_cost_s + _EMA * per_token
        )
        # Positions are tried in order until the first rejection: accepted successes out of
        # accepted + (1 if a rejection happened) trials. Decay old evidence so the estimate can move.
        self._accepted = (1 - _EMA) * self._accepted + accepted
        self._tried = (1 - _EMA) * self._tried + accepted + (accepted < drafted)
        self.acceptance = self._accepted / self._tried
