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
_CONFIDENCE_BUCKETS = 10  # acceptance is tracked per tenth of the draft's own confidence in its token


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
    # Per confidence bucket: pseudo-counts of accepted / tried draft tokens (prior: acceptance = confidence).
    _conf_accepted: list[float] = field(default_factory=lambda: [(b + 0.5) / _CONFIDENCE_BUCKETS for b in range(10)])
    _conf_tried: list[float] = field(default_factory=lambda: [1.0] * _CONFIDENCE_BUCKETS)

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
        tokens = expected_tokens(self.acceptance, k)
        seconds = k * (self.draft_cost_s or 0.0) + self.verify_cost(k + 1) + self.round_trip_s
        return tokens / seconds

    def choose(self, limit: int) -> int:
        limit = min(limit, self.k_max)
        if limit <= 0:
            return 0
        return self.probe(max(range(limit + 1), key=self.expected_rate))

    def min_confidence(self) -> float:
        """Draft confidence below which another draft token does not pay (llama.cpp's draft-p-min, learned):
        one more draft costs `draft_cost_s`, which at the current rate would buy draft_cost_s * rate tokens;
        it yields a token with the acceptance measured for its confidence bucket."""
        if not self.draft_cost_s:
            return 0.0
        best_k = max(range(self.k_max + 1), key=self.expected_rate)
        break_even = self.draft_cost_s * self.expected_rate(best_k)
        threshold = 0.0
        for bucket in range(_CONFIDENCE_BUCKETS):  # cut the low buckets whose measured acceptance is too low
            if self._conf_accepted[bucket] / self._conf_tried[bucket] >= break_even:
                break
            threshold = (bucket + 1) / _CONFIDENCE_BUCKETS
        return threshold

    def observe_confidence(self, confidence: list[float], accepted: int) -> None:
        """Draft tokens up to the first rejection were tried; later ones say nothing."""
        for position, value in enumerate(confidence[: accepted + 1]):
            bucket = min(int(value * _CONFIDENCE_BUCKETS), _CONFIDENCE_BUCKETS - 1)
            self._conf_tried[bucket] += 1
            self._conf_accepted[bucket] += position < accepted

    def probe(self, k: int) -> int:
        """After too many steps at k = 0, draft one token: acceptance may have changed, look again cheaply."""
        if k > 0:
            self._steps_at_zero = 0
            return k
        self._steps_at_zero += 1
        if self._steps_at_zero >= _PROBE_EVERY:
            self._steps_at_zero = 0
            return 1
        return 0

    def observe(self, drafted: int, accepted: int, draft_s: float | None, verify_s: float | None) -> None:
        """One verify outcome. Times are None when the step served a batch (its wall time is not this
        window's cost; `BatchCosts` learns from it instead)."""
        if verify_s is None or draft_s is None:
            self._observe_acceptance(drafted, accepted)
            return
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
        self._observe_acceptance(drafted, accepted)

    def _observe_acceptance(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        # Positions are tried in order until the first rejection: accepted successes out of
        # accepted + (1 if a rejection happened) trials. Decay old evidence so the estimate can move.
        self._accepted = (1 - _EMA) * self._accepted + accepted
        self._tried = (1 - _EMA) * self._tried + accepted + (accepted < drafted)
        self.acceptance = self._accepted / self._tried


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a window of k drafts yields: accepted drafts plus the target's own token."""
    a = min(acceptance, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def _interpolate(table: dict[int, float], x: int) -> float:
    """Piecewise linear in x through the measured points, linear extrapolation beyond the largest, and never
    below a smaller x's cost (noise must not make more rows look cheaper)."""
    xs = sorted(table)
    if x <= xs[0]:
        return table[xs[0]]
    lower = max(w for w in xs if w <= x)
    upper = min((w for w in xs if w > x), default=None)
    if upper is None:  # beyond the measurements: keep the last segment's cost per row
        if len(xs) == 1:
            return table[xs[0]] * x / xs[0]
        a, b = xs[-2], xs[-1]
        slope = max(0.0, (table[b] - table[a]) / (b - a))
        return table[b] + slope * (x - b)
    estimate = table[lower] + (x - lower) / (upper - lower) * (table[upper] - table[lower])
    return max(estimate, max(table[w] for w in xs if w <= x))


@dataclass
class BatchCosts:
    """Seconds of one batched pass by total rows: the target (verify) and one draft step. Measured at
    start-up, then exponentially averaged with what batched steps take."""

    verify_s: dict[int, float]
    draft_s: dict[int, float] = field(default_factory=dict)  # empty: no draft model

    def verify(self, rows: int) -> float:
        return _interpolate(self.verify_s, rows)

    def draft(self, rows: int) -> float:
        return _interpolate(self.draft_s, rows) if rows and self.draft_s else 0.0

    def observe(self, verify_rows: int, verify_s: float, draft_rows: int, draft_steps: int, draft_s: float) -> None:
        _average(self.verify_s, verify_rows, verify_s)
        if draft_rows and draft_steps and self.draft_s:
            _average(self.draft_s, draft_rows, draft_s / draft_steps)


def _average(table: dict[int, float], rows: int, seconds: float) -> None:
    table[rows] = seconds if rows not in table else (1 - _EMA) * table[rows] + _EMA * seconds


def plan_batch(
    acceptance: list[float], limits: list[int], model_drafted: list[bool], costs: BatchCosts, fixed_rows: int = 0
) -> list[int]:
    """Draft lengths for the sequences of one batched step, maximising the batch's tokens per second.

    Plain decoding of n sequences costs one pass of n rows; drafting k tokens for m of them adds k draft
    steps (batched over the model-drafted ones) and k rows each to the verify pass. Batching already makes
    plain decoding cheap per token, so the larger the batch, the less speculation pays; the plan can be
    all zeros. Candidates: a common k for the m sequences most likely to accept (k capped per sequence).
    `fixed_rows`: rows of the same pass that are not planned here (prefill chunks, fixed-k windows).
    """
    n = len(acceptance)
    order = sorted(range(n), key=lambda i: -acceptance[i])
    best_rate, best_k, best_m = n / costs.verify(n + fixed_rows), 0, 0
    for k in range(1, max(limits, default=0) + 1):
        tokens, rows, drafters = float(n), n + fixed_rows, 0
        for m, i in enumerate(order, start=1):
            ki = min(k, limits[i])
            tokens += expected_tokens(acceptance[i], ki) - 1
            rows += ki
            drafters += model_drafted[i] and ki > 0
            rate = tokens / (costs.verify(rows) + k * costs.draft(drafters))
            if rate > best_rate:
                best_rate, best_k, best_m = rate, k, m
    chosen = set(order[:best_m])
    return [min(best_k, limits[i]) if i in chosen else 0 for i in range(n)]
