"""How likely the target is to accept the next draft token: one estimate per request, from a shared prior.

Positions of a window are tried in order until the first rejection, so a window with `accepted` of `drafted`
tokens accepted is `accepted` successes out of `accepted + (1 if one was rejected)` trials. For sampled
requests the success count is the verifier's expectation sum min(p, q) (`Verdict.expected_accepted`), far
less noisy than the outcomes. Old evidence decays so the estimate follows the text.

A request starts from `SharedAcceptance`: what the runtime's recent requests of the same method measured
(greedy and sampled apart: a draft agrees with the target's argmax more often than its samples survive
rejection sampling), and, once the target has reported its confidence at the prompt's end, what was
measured on text the target was about as sure of. A request on text the target finds unpredictable (random
words: target confidence 0.4-0.5) should not pay the draft's prompt prefill because the requests before it
were code (0.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR = 0.7  # acceptance before anything is known
PRIOR_TRIALS = 3.0  # the evidence a starting estimate is worth
DECAY = 0.1  # weight of a window's evidence against a request's older windows
SHARED_WEIGHT = 0.02  # per draft position: ~50 recent positions make up the shared estimate
CONFIDENCE_BINS = 10  # the shared estimate is also kept per tenth of the target's confidence


def _bin(confidence: float) -> int:
    return min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)


@dataclass
class SharedAcceptance:
    """A runtime's recent acceptance for one method: per greedy/sampled, overall and per tenth of the
    target's confidence. A tenth nobody has drafted in yet starts at the square of its confidence, which
    acceptance over whole replies ran close to (code, edits, prose, random words, greedy and sampled)."""

    by_confidence: bool = True  # False: one estimate per greedy/sampled (ablation)
    # (greedy, confidence tenth or None for all) -> [estimate, draft positions seen]
    _estimates: dict[tuple[bool, int | None], list[float]] = field(default_factory=dict)

    def value(self, greedy: bool, confidence: float | None = None) -> float:
        return self._estimate(greedy, confidence)[0]

    def observe(self, greedy: bool, successes: float, trials: int, confidence: float | None) -> None:
        for scope in {None, confidence}:
            estimate = self._estimate(greedy, scope)
            estimate[1] += trials
            # a running mean while the prior still weighs, then a moving average of recent positions
            weight = min(max(trials / estimate[1], SHARED_WEIGHT * trials), 0.5)
            estimate[0] += weight * (successes / trials - estimate[0])

    def _estimate(self, greedy: bool, confidence: float | None) -> list[float]:
        if confidence is None or not self.by_confidence:
            return self._estimates.setdefault((greedy, None), [PRIOR, 1 / SHARED_WEIGHT])
        tenth = _bin(confidence)
        return self._estimates.setdefault((greedy, tenth), [((tenth + 0.5) / CONFIDENCE_BINS) ** 2, PRIOR_TRIALS])


class Acceptance:
    """One request's acceptance estimate. `shared`: where it starts and what it feeds (None: a fixed prior)."""

    def __init__(self, shared: SharedAcceptance | None = None, greedy: bool = True):
        self.shared, self.greedy = shared, greedy
        self.target_confidence: float | None = None  # running mean of the target's confidence
        self.own_trials = 0  # draft positions this request has tried
        self._confidences = 0
        self._set(shared.value(greedy) if shared is not None else PRIOR)

    def _set(self, value: float) -> None:
        self.value = value
        self._successes, self._trials = value * PRIOR_TRIALS, PRIOR_TRIALS

    def observe_target_confidence(self, confidence: float | None) -> None:
        """The target's top probability where a window began (the prompt's last position first). Until the
        request has drafted, its estimate is the shared one for text the target finds as predictable."""
        if confidence is None:
            return
        self._confidences += 1
        if self.target_confidence is None:
            self.target_confidence = confidence
        else:  # a mean over the first tokens, then a moving average of the recent ones
            self.target_confidence += max(1 / self._confidences, DECAY) * (confidence - self.target_confidence)
        if self.own_trials == 0 and self.shared is not None:
            self._set(self.shared.value(self.greedy, self.target_confidence))

    def observe(self, drafted: int, accepted: int, successes: float | None = None) -> None:
        """One verified window. `successes`: the expected accepted count when the verifier knows it."""
        if drafted == 0:
            return
        trials = accepted + (accepted < drafted)
        successes = accepted if successes is None else successes
        self.own_trials += trials
        self._successes = (1 - DECAY) * self._successes + successes
        self._trials = (1 - DECAY) * self._trials + trials
        self.value = self._successes / self._trials
        if self.shared is not None:
            self.shared.observe(self.greedy, successes, trials, self.target_confidence)


@dataclass
class DraftConfidence:
    """Acceptance per tenth of the draft's own probability of its token (prior: acceptance = confidence),
    for the policy's cut-off below which another draft token does not pay (llama.cpp's draft-p-min, learned)."""

    accepted: list[float] = field(default_factory=lambda: [(b + 0.5) / CONFIDENCE_BINS for b in range(10)])
    tried: list[float] = field(default_factory=lambda: [1.0] * CONFIDENCE_BINS)

    def observe(self, confidence: list[float], accepted: int) -> None:
        """Draft tokens up to the first rejection were tried; later ones say nothing."""
        for position, value in enumerate(confidence[: accepted + 1]):
            self.tried[_bin(value)] += 1
            self.accepted[_bin(value)] += position < accepted

    def cutoff(self, break_even: float) -> float:
        """The lowest confidence from which tokens are accepted at least `break_even` of the time."""
        threshold = 0.0
        for tenth in range(CONFIDENCE_BINS):
            if self.accepted[tenth] / self.tried[tenth] >= break_even:
                break
            threshold = (tenth + 1) / CONFIDENCE_BINS
        return threshold
