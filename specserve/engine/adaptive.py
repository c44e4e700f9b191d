"""Adaptive draft length: pick k per step to maximise expected tokens per second.

With per-token acceptance probability a, a window of k drafts yields E(k) = (1 - a^(k+1)) / (1 - a) tokens
(accepted drafts plus the target's correction or bonus token) and costs T(k) = draft(k) + verify(k+1)
+ round_trip, where draft(k) is a first draft pass over the target's last token(s) and k - 1 more. k = 0 is
plain decoding (E = 1, T = verify(1)), so choosing argmax E/T never does worse than plain decoding by the
model's own measurements.

All quantities are measured: acceptance online from verify outcomes (for sampled requests the expected
acceptance sum min(p, q), which is far less noisy than the outcomes); the costs of draft passes and of each
verify window size at start-up. Costs then follow what windows really take through two speed factors
(`MachineSpeed`), one for the target and one for the draft, shared by a runtime's requests: every window
updates them, so all window sizes move together and the next request starts from them.

A new request's acceptance starts from the runtime's recent acceptance on text the target is about as sure
of (`SharedAcceptance`), until its own draft windows measure it.

A draft that has not seen the prompt or tokens decoded at k = 0 must first catch up on them; a window that
starts drafting is charged its share of that one-off cost over the tokens the reply may still produce.
After a stretch at k = 0, a 1-token probe re-measures acceptance now and then, less often each time it
fails.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field

_EMA = 0.1  # weight of a new observation
_PROBE_EVERY = 16  # steps at k = 0 before drafting one short window again to re-measure acceptance
_PROBE_EVERY_MAX = 64  # ... doubling after each probe that did not bring drafting back (each one costs a
# draft pass over every token since the last one, and on unpredictable text they keep failing)
_PROBE_BUDGET = 0.03  # the most of the reply's remaining plain-decoding time a probe's catch-up may cost:
# the slowdown speculation is allowed on text it cannot help with
_SHAPE_EMA = 0.01  # weight of a window's cost against its size's calibrated cost, beside the speed factor
_CAUTIOUS_AFTER = 4  # tried draft positions of its own before a request weighs its estimate's noise
_CONFIDENCE_BUCKETS = 10  # acceptance is tracked per tenth of the draft's own confidence in its token
# (and, runtime-wide, per tenth of the target's confidence: `SharedAcceptance`)
# Rows a drafting sequence's first draft pass holds in the steady state: the target's token, and the last
# draft token when the whole window was accepted. Anything beyond is catch-up.
STEADY_SYNC_ROWS = 2


@dataclass
class SharedAcceptance:
    """Acceptance over all the requests of one runtime and method: where a new request's estimate starts,
    instead of a fixed prior (a server that serves code should start the next code request drafting).
    Greedy and sampled requests keep apart: a draft agrees with the target's argmax more often than its
    samples survive rejection sampling, and a sampled request starting from greedy's rate drafts at a loss.

    Each is also kept per tenth of the target's confidence (a request's running top probability, see
    `AdaptiveK.observe_target_confidence`), which the target reports for free with every window: text the
    target itself finds unpredictable is text a draft guesses badly (sampled random words: confidence 0.4-0.5,
    acceptance 0.25-0.45; code: 0.9 and 0.8), and a request on such text should not pay a draft's prompt
    prefill because the requests before it were code. A tenth nobody has drafted in yet starts at the
    square of its confidence: what acceptance measured over whole replies (per prompt, k = 4: code, edits,
    prose, random words, greedy and sampled) ran close to; the confidence itself was too hopeful for prose."""

    weight_per_trial: float = 0.02  # ~50 recent draft positions make up an estimate
    prior: float = 0.7  # for requests whose target confidence is unknown
    prior_trials: float = 2.0  # a confidence tenth's prior is worth this many draft positions
    # (greedy, tenth of target confidence or None for all) -> [acceptance, draft positions seen]
    _estimates: dict[tuple[bool, int | None], list[float]] = field(default_factory=dict)

    def value(self, greedy: bool, confidence: float | None = None) -> float:
        return self._estimate(greedy, confidence)[0]

    def observe(self, greedy: bool, successes: float, trials: int, confidence: float | None = None) -> None:
        if not trials:
            return
        for scope in {None, confidence}:  # every observation counts for all, and for its confidence tenth
            estimate = self._estimate(greedy, scope)
            estimate[1] += trials
            # a running mean while the prior still weighs, then a moving average of recent requests
            weight = min(max(trials / estimate[1], self.weight_per_trial * trials), 0.5)
            estimate[0] += weight * (successes / trials - estimate[0])

    def _estimate(self, greedy: bool, confidence: float | None) -> list[float]:
        if confidence is None:
            return self._estimates.setdefault((greedy, None), [self.prior, 1 / self.weight_per_trial])
        tenth = min(int(confidence * _CONFIDENCE_BUCKETS), _CONFIDENCE_BUCKETS - 1)
        prior = ((tenth + 0.5) / _CONFIDENCE_BUCKETS) ** 2
        return self._estimates.setdefault((greedy, tenth), [prior, self.prior_trials])


@dataclass
class MachineSpeed:
    """Time one model's passes take in the loop now over the time they took at start-up calibration. Cost
    tables keep their calibrated shape (how much more a bigger window costs) and all move with this one
    factor: a shared machine's speed drifts by 1.5x within minutes, and a per-size average refreshed only
    when that size runs left plain decoding priced at an old, slower speed while drafting ran at the new
    one, so drafting looked better than it was (sampled random text: 0.86x of plain decoding). The factor
    also takes in what the loop adds to a bare pass (a draft token's distribution and confidence)."""

    factor: float = 1.0
    observations: int = 1  # the calibration counts as one; 0 when the tables are only a relative prior

    def observe(self, measured_s: float, calibrated_s: float) -> None:
        if measured_s <= 0 or calibrated_s <= 0:
            return
        self.observations += 1
        # without a calibration the first measurement sets the scale; then an exponential average
        weight = 1.0 if self.observations == 1 else _EMA
        # geometric: one stall of a busy machine moves the factor by a bounded ratio, not by its length
        self.factor *= (measured_s / calibrated_s / self.factor) ** weight

    def drifted(self) -> bool:
        """Whether the machine runs 25% off the calibration: not a stall but another phase of a shared
        machine, in which bigger and smaller windows no longer cost what they did relative to each other
        (int8 target in the bench's cost tables: 1 token 41-45 ms and 8 tokens 1.2-1.3x that in one phase;
        30 ms and 1.7x in the next). Time to measure the costs again (`Runtime.refresh_costs`)."""
        return self.observations > 1 and not 0.8 <= self.factor <= 1.25

    def recalibrated(self) -> None:
        """The cost tables were just measured again: they are now's speed."""
        self.factor, self.observations = 1.0, 1


@dataclass
class AdaptiveK:
    k_max: int = 8
    acceptance: float = 0.7  # prior; the first windows quickly replace it
    # Costs in seconds as calibrated; the speed factors scale them to now. Draft: None until measured.
    draft_cost_s: float | None = None  # one draft pass of one row: each drafted token after the first
    draft_first_s: float | None = None  # a window's first draft pass (the steady 2 rows); None: draft_cost_s
    verify_cost_s: dict[int, float] = field(default_factory=dict)  # window size -> seconds
    round_trip_s: float = 0.0  # network time per verify call when the target is remote (measured live)
    catch_up_s: float = 0.0  # per token the draft evaluates to catch up on a context it has not seen
    verify_speed: MachineSpeed | None = None  # shared by the requests of a runtime; None: this one's own
    draft_speed: MachineSpeed = field(default_factory=MachineSpeed)
    _accepted: float = 2.1  # pseudo-counts behind `acceptance` (a prior worth 3 trials)
    _tried: float = 3.0
    shared: SharedAcceptance | None = None  # the runtime's estimate this request starts from and feeds
    greedy: bool = True  # which of the shared estimates
    target_confidence: float | None = None  # running mean of `observe_target_confidence`'s values
    _confidences: int = 0
    _own_trials: int = 0  # draft positions this request has tried
    _steps_at_zero: int = 0
    _probe_every: int = _PROBE_EVERY
    # Per confidence bucket: pseudo-counts of accepted / tried draft tokens (prior: acceptance = confidence).
    _conf_accepted: list[float] = field(default_factory=lambda: [(b + 0.5) / _CONFIDENCE_BUCKETS for b in range(10)])
    _conf_tried: list[float] = field(default_factory=lambda: [1.0] * _CONFIDENCE_BUCKETS)

    def __post_init__(self) -> None:
        if self.verify_speed is None:  # without calibrated costs the first measurement sets the scale
            self.verify_speed = MachineSpeed(observations=1 if self.verify_cost_s else 0)

    def fresh(self, greedy: bool = True) -> AdaptiveK:
        """A controller for a new (greedy or sampled) request: these costs and the shared speeds, and
        acceptance starting from the shared estimate (worth as much evidence as the fixed prior was)."""
        shared = (self.shared, self.verify_speed, self.draft_speed, self.verify_cost_s)
        new = copy.deepcopy(self, memo={id(x): x for x in shared})
        new.greedy = greedy
        if self.shared is not None:
            new.acceptance = self.shared.value(greedy)
            new._accepted = new.acceptance * new._tried
        return new

    def observe_target_confidence(self, confidence: float | None) -> None:
        """The target's confidence where a window began (`Verdict.confidence`; the prompt's last position
        first). Until this request has drafted, its acceptance estimate is the runtime's for text the target
        finds as predictable: a request decides on drafting (and paying the draft's prompt prefill) from
        what its own text looks like, not from what the requests before it were."""
        if confidence is None:
            return
        self._confidences += 1
        if self.target_confidence is None:
            self.target_confidence = confidence
        else:  # a mean over the first tokens, then a moving average of the recent ones
            weight = max(1 / self._confidences, _EMA)
            self.target_confidence += weight * (confidence - self.target_confidence)
        if self._own_trials == 0 and self.shared is not None:
            self.acceptance = self.shared.value(self.greedy, self.target_confidence)
            self._accepted = self.acceptance * self._tried

    def _calibrated_verify(self, window: int) -> float:
        if not self.verify_cost_s:
            return 1.0 + 0.1 * (window - 1)  # relative prior: windows are cheap on a memory-bound backend
        return _interpolate(self.verify_cost_s, window)

    def verify_cost(self, window: int) -> float:
        """Estimated seconds to verify a window now."""
        return self.verify_speed.factor * self._calibrated_verify(window)

    def _calibrated_draft(self, k: int) -> float:
        if k <= 0 or self.draft_cost_s is None:
            return 0.0  # nothing measured yet: drafting is tried, and its first window measures it
        return (self.draft_first_s or self.draft_cost_s) + (k - 1) * self.draft_cost_s

    def draft_cost(self, k: int) -> float:
        """Estimated seconds to draft a window of k tokens now."""
        return self.draft_speed.factor * self._calibrated_draft(k)

    def catch_up_cost(self, tokens: float) -> float:
        """Estimated seconds for the draft to evaluate `tokens` it has not seen, now."""
        return self.draft_speed.factor * self.catch_up_s * tokens

    def expected_rate(
        self, k: int, backlog: int = 0, remaining: int = 1 << 30, acceptance: float | None = None
    ) -> float:
        """Expected tokens per second for a window of k drafts. `backlog`: tokens the draft must first catch
        up on beyond its steady 1-2 (`plan_batch` explains the charge), `remaining`: tokens the reply may
        still have, `acceptance`: instead of the estimate."""
        tokens = expected_tokens(self.acceptance if acceptance is None else acceptance, k)
        seconds = self.draft_cost(k) + self.verify_cost(k + 1) + self.round_trip_s
        if k > 0:
            seconds += self.catch_up_cost(backlog * tokens / max(remaining, 1))
        return tokens / seconds

    def choose(self, limit: int, sync_rows: int = 1, remaining: int = 1 << 30) -> int:
        """The best k for the next window; `sync_rows` as `Proposer.sync_rows` gives them."""
        limit = min(limit, self.k_max)
        if limit <= 0:
            return 0
        backlog = max(sync_rows - STEADY_SYNC_ROWS, 0)
        best = max(range(limit + 1), key=lambda k: self.expected_rate(k, backlog, remaining))
        if best:  # draft only if some window pays at a cautious acceptance; then the best at the estimate
            cautious = self.cautious_acceptance()
            plain = self.expected_rate(0)
            if all(self.expected_rate(k, backlog, remaining, cautious) < plain for k in range(1, limit + 1)):
                best = 0
        return self.probe(best, remaining, sync_rows)

    def cautious_acceptance(self) -> float:
        """The acceptance estimate less one standard error of it, once this request has measured some.
        Drafting must keep paying at this rate: where it only breaks even at the estimate (sampled text the
        draft half guesses), the noise of a few dozen trials decides, and drafting that turns out wrong
        costs more than it gains when right. Before that the estimate is the runtime's recent one, and
        a request must draft to find out how its own text goes."""
        a = self.acceptance
        if self._own_trials < _CAUTIOUS_AFTER:
            return a
        return max(a - (a * (1 - a) / max(self._tried, 1.0)) ** 0.5, 0.0)

    def min_confidence(self) -> float:
        """Draft confidence below which another draft token does not pay (llama.cpp's draft-p-min, learned):
        one more draft costs a draft pass, which at the current rate would buy that many seconds' tokens;
        it yields a token with the acceptance measured for its confidence bucket."""
        if not self.draft_cost_s:
            return 0.0
        best_k = max(range(self.k_max + 1), key=self.expected_rate)
        break_even = self.draft_speed.factor * self.draft_cost_s * self.expected_rate(best_k)
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

    def probe_due(self, remaining: int = 1 << 30, sync_rows: int = 0) -> bool:
        """Whether `probe(0, remaining, sync_rows)` would draft now. A probe first evaluates `sync_rows`
        (all the draft has not seen, the prompt too if it never drafted): it may cost at most 3% of
        the time the reply still needs (a first probe on a 48-token reply to a 300-token prompt cost more
        than it could win)."""
        if self._steps_at_zero + 1 < self._probe_every or remaining <= _PROBE_EVERY:
            return False
        return self.catch_up_cost(sync_rows) <= _PROBE_BUDGET * remaining * self.verify_cost(1)

    def probe(self, k: int, remaining: int = 1 << 30, sync_rows: int = 0) -> int:
        """After too many steps at k = 0, draft one token: acceptance may have changed, look again cheaply.
        A probe after which k stays 0 doubles the wait for the next one; near the end of a reply there is
        nothing left for a probe to pay off on."""
        if k > 0:
            self._steps_at_zero, self._probe_every = 0, _PROBE_EVERY
            return k
        due = self.probe_due(remaining, sync_rows)
        self._steps_at_zero += 1
        if due:
            self._steps_at_zero = 0
            self._probe_every = min(2 * self._probe_every, _PROBE_EVERY_MAX)
            return 1
        return 0

    def observe(
        self,
        drafted: int,
        accepted: int,
        draft_s: float | None,
        verify_s: float | None,
        expected_accepted: float | None = None,
        backlog: int = 0,
    ) -> None:
        """One verify outcome. Times are None when the step served a batch (its wall time is not this
        window's cost; `BatchCosts` learns from it instead). `expected_accepted`: `Verdict.expected_accepted`
        when the verifier knows it. `backlog`: catch-up tokens the draft evaluated first (not drafting cost)."""
        successes = accepted if expected_accepted is None else expected_accepted
        if verify_s is None or draft_s is None:
            self._observe_acceptance(drafted, accepted, successes)
            return
        verify_s = max(verify_s - self.round_trip_s, 0.0)  # a remote window's wall time includes the network
        window, calibrated = drafted + 1, self._calibrated_verify(drafted + 1)
        if window in self.verify_cost_s and verify_s > 0:
            # A size's own error (calibration noise: 42 ms for 1 token on a machine that then ran it in 31,
            # 44 for 3) corrects slowly; the machine's drift is the speed factor's, which moves faster.
            ratio = verify_s / (self.verify_speed.factor * calibrated)
            self.verify_cost_s[window] = calibrated * ratio**_SHAPE_EMA
        self.verify_speed.observe(verify_s, calibrated)
        if drafted == 0:
            return
        # Draft cost from windows without a catch-up only: one (a prompt: hundreds of ms, its cost per token
        # known only roughly) would swamp the drafting's own few ms.
        if not backlog and self.draft_cost_s is None:  # not calibrated: the first window sets the scale
            self.draft_cost_s = draft_s / drafted
        elif not backlog:
            self.draft_speed.observe(draft_s, self._calibrated_draft(drafted))
        self._observe_acceptance(drafted, accepted, successes)

    def _observe_acceptance(self, drafted: int, accepted: int, successes: float) -> None:
        if drafted == 0:
            return
        # Positions are tried in order until the first rejection: `accepted` successes (or their expectation)
        # out of accepted + (1 if a rejection happened) trials. Decay old evidence so the estimate can move.
        trials = accepted + (accepted < drafted)
        self._own_trials += trials
        self._accepted = (1 - _EMA) * self._accepted + successes
        self._tried = (1 - _EMA) * self._tried + trials
        self.acceptance = self._accepted / self._tried
        if self.shared is not None:
            self.shared.observe(self.greedy, successes, trials, self.target_confidence)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a window of k drafts yields: accepted drafts plus the target's own token."""
    a = min(acceptance, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def _interpolate(table: dict[int, float], x: int) -> float:
    """The measured cost at x, piecewise linear between measured points and linear beyond the largest. Not
    made monotone: a kernel that handles rows in groups can make a bigger window cheaper than a smaller one
    (llama.cpp's Q4_0 GEMM: 4 rows cost less than 3), and the tables are measured at every window size. But
    never below the smallest size's cost: a window holds that pass and more, so below it is noise (which
    would make drafting at no acceptance look like a gain)."""
    xs = sorted(table)  # a handful of keys; cheaper than keeping a sorted copy in sync with the averaging
    i = bisect.bisect_right(xs, x)  # xs[:i] <= x < xs[i:]
    return max(_between(table, xs, i, x), table[xs[0]])


def _between(table: dict[int, float], xs: list[int], i: int, x: int) -> float:
    if i == 0:
        return table[xs[0]]
    lower = xs[i - 1]
    if i == len(xs):  # at or beyond the measurements: keep the last segment's cost per row
        if len(xs) == 1:
            return table[lower] * x / lower
        a = xs[-2]
        slope = max(0.0, (table[lower] - table[a]) / (lower - a))
        return table[lower] + slope * (x - lower)
    upper = xs[i]
    return table[lower] + (x - lower) / (upper - lower) * (table[upper] - table[lower])


@dataclass
class BatchCosts:
    """Seconds of one batched pass by total rows: the target (verify) and one draft step; and what a draft
    pays per token to catch up on a context it has not seen (a prompt, or a stretch decoded without
    drafting). Measured at start-up; the speed factors (`MachineSpeed`) scale them to now: batched steps
    update the target's, and the draft's is the one single requests keep up to date (a batched draft step's
    wall time mixes catch-up and drafting)."""

    verify_s: dict[int, float]
    draft_s: dict[int, float] = field(default_factory=dict)  # empty: no draft model
    catch_up_s: float = 0.0  # per token
    verify_speed: MachineSpeed = field(default_factory=MachineSpeed)
    draft_speed: MachineSpeed = field(default_factory=MachineSpeed)

    def verify(self, rows: int) -> float:
        return self.verify_speed.factor * _interpolate(self.verify_s, rows)

    def draft(self, rows: int) -> float:
        return self.draft_speed.factor * _interpolate(self.draft_s, rows) if rows and self.draft_s else 0.0

    def catch_up(self, tokens: float) -> float:
        return self.draft_speed.factor * self.catch_up_s * tokens

    def observe(self, verify_rows: int, verify_s: float) -> None:
        self.verify_speed.observe(verify_s, _interpolate(self.verify_s, verify_rows))


def plan_batch(
    acceptance: list[float],
    limits: list[int],
    model_drafted: list[bool],
    costs: BatchCosts,
    fixed_rows: int = 0,
    sync_rows: list[int] | None = None,
    remaining: list[int] | None = None,
) -> list[int]:
    """Draft lengths for the sequences of one batched step, maximising the batch's tokens per second.

    Plain decoding of n sequences costs one pass of n rows; drafting k tokens for m of them adds k draft
    steps (batched over the model-drafted ones) and k rows each to the verify pass. Batching already makes
    plain decoding cheap per token, so the larger the batch, the less speculation pays; the plan can be
    all zeros. Candidates: a common k for the m sequences most likely to accept (k capped per sequence).
    `fixed_rows`: rows of the same pass that are not planned here (prefill chunks, fixed-k windows). Their
    time is spent anyway, so the plan weighs tokens against the time it adds to the pass: beside a prefill
    chunk a decode row is nearly free, and drafting, which is not, does not pay.
    `sync_rows[i]`: tokens sequence i's draft must evaluate first (`Proposer.sync_rows`). A catch-up beyond
    the steady state is a one-off that later windows share, so each window is charged its part of it:
    the catch-up's cost times the tokens the window yields over the `remaining[i]` tokens the request may
    still produce. Starting to draft late in a long reply pays; in the last few tokens it does not.
    """
    n = len(acceptance)
    sync_rows = sync_rows or [1] * n
    remaining = remaining or [1 << 30] * n
    order = sorted(range(n), key=lambda i: -acceptance[i])
    spent = costs.verify(fixed_rows) if fixed_rows else 0.0

    def added(rows: int) -> float:  # what the pass costs beyond the fixed rows (noise must not make it 0)
        return max(costs.verify(rows) - spent, 1e-4)

    best_rate, best_k, best_m = n / added(n + fixed_rows), 0, 0
    for k in range(1, max(limits, default=0) + 1):
        tokens, rows, drafters, first_rows, catch_up = float(n), n + fixed_rows, 0, 0, 0.0
        for m, i in enumerate(order, start=1):
            ki = min(k, limits[i])
            gain = expected_tokens(acceptance[i], ki)
            tokens += gain - 1
            rows += ki
            if model_drafted[i] and ki > 0:
                drafters += 1
                first_rows += min(sync_rows[i], STEADY_SYNC_ROWS)
                backlog = max(sync_rows[i] - STEADY_SYNC_ROWS, 0)
                catch_up += costs.catch_up(backlog * gain / max(remaining[i], 1))
            seconds = added(rows) + costs.draft(first_rows) + (k - 1) * costs.draft(drafters) + catch_up
            rate = tokens / seconds
            if rate > best_rate:
                best_rate, best_k, best_m = rate, k, m
    chosen = set(order[:best_m])
    return [min(best_k, limits[i]) if i in chosen else 0 for i in range(n)]
