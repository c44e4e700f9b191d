"""Lossless verification of a draft window against the target's distributions.

Greedy: accept while the target's argmax equals the draft token; the first mismatch is replaced by the
target's argmax, so the output is exactly the target's greedy output.

Sampling: modified rejection sampling (Leviathan et al. 2023, Chen et al. 2023). Draft token x drawn from q
is accepted with probability min(1, p(x)/q(x)); on rejection the replacement is drawn from
normalize(max(0, p - q)); if every draft token is accepted, a bonus token is drawn from the next p. Each
emitted token is then distributed exactly as p, whatever q is.

Tolerance verification (lossy, opt-in: accept tokens the target finds nearly as likely as the draft does)
and its online calibration are at the end of this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specserve.engine.sampling import SamplingParams, TokenLogprob, probabilities, sample


@dataclass(frozen=True, kw_only=True)
class Verdict:
    accepted: int  # how many draft tokens were accepted (a prefix of the window)
    next_token: int  # correction (on rejection) or bonus (all accepted), produced by the target
    # Sampled verification: the sum over the tried positions of their acceptance probability
    # sum_x min(p(x), q(x)), an estimate of `accepted` with far less noise than the coin flips (None: unknown)
    expected_accepted: float | None = None
    # The target's top probability at the window's first position (`top_probability`): how predictable the
    # text is there, a row every window has whatever its drafts did (None: unknown)
    confidence: float | None = None
    # per emitted token (accepted drafts, then next_token): its log-probability under the target, when the
    # window's params asked for them (`SamplingParams.logprobs`)
    logprobs: tuple[TokenLogprob, ...] | None = None


def verify_greedy(target_logits: np.ndarray, draft_tokens: list[int]) -> Verdict:
    """target_logits[i] is the target's prediction after the i-th window position: k+1 rows for k drafts."""
    choices = np.argmax(target_logits, axis=-1)
    accepted = 0
    while accepted < len(draft_tokens) and int(choices[accepted]) == draft_tokens[accepted]:
        accepted += 1
    return Verdict(accepted=accepted, next_token=int(choices[accepted]))


def verify_sampled(
    target_logits: np.ndarray,
    draft_tokens: list[int],
    draft_probs: list[np.ndarray | None],
    params: SamplingParams,
    rng: np.random.Generator,
) -> Verdict:
    """draft_probs[i] is the distribution draft token i was drawn from; None means a point mass on it
    (deterministic proposers such as n-gram lookup)."""
    p_rows = probabilities(target_logits, params)
    odds = 0.0
    for i, token in enumerate(draft_tokens):
        p = p_rows[i]
        q = draft_probs[i]
        odds += float(p[token]) if q is None else float(np.minimum(p, q).sum())
        q_token = 1.0 if q is None else float(q[token])
        if q_token > 0.0 and rng.random() * q_token < p[token]:
            continue  # accepted with probability min(1, p/q)
        residual = p.copy()
        if q is None:
            residual[token] = 0.0
        else:
            residual = np.maximum(residual - q, 0.0)
        if residual.sum() <= 0.0:
            residual = p  # p == q: rejection has probability 0, but guard against rounding
        return Verdict(accepted=i, next_token=sample(residual, rng), expected_accepted=odds)
    bonus = sample(p_rows[len(draft_tokens)], rng)
    return Verdict(accepted=len(draft_tokens), next_token=bonus, expected_accepted=odds)


def verify(
    target_logits: np.ndarray,
    draft_tokens: list[int],
    draft_probs: list[np.ndarray | None],
    params: SamplingParams,
    rng: np.random.Generator,
) -> Verdict:
    if params.greedy:
        return verify_greedy(target_logits, draft_tokens)
    return verify_sampled(target_logits, draft_tokens, draft_probs, params, rng)


# --- Tolerance verification (lossy, opt-in) ---------------------------------------------------------------
#
# Exact verification rejects a draft token whenever the target would not have produced it, even when the
# target finds it nearly as likely as the draft does. Tolerance verification trades exactness for acceptance:
# draft token t at window position i is accepted when
#
#     log p_target(t) >= log p_draft(t) - delta
#
# so delta (in nats) bounds how much less likely than the draft the target may find an accepted token. The
# output is no longer the target's greedy output (or distribution); delta = 0 is *not* lossless either. It is
# meant to be switched on explicitly, with `ToleranceController` holding delta at a chosen acceptance rate.


def tolerance_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the tolerance rule compares, for one row [V] or rows [n, V]; target and draft must
    both use this function so that p and q are shaped alike.

    Sampled requests: exactly `probabilities` (temperature, top-k, top-p). Greedy requests: the plain softmax
    at temperature 1, because the temperature-0 limit is a point mass on the argmax, under which every
    non-argmax token has probability 0 and no delta could ever accept it.
    """
    return probabilities(logits, SamplingParams(temperature=1.0) if params.greedy else params)


def tolerated_prefix(
    target_logits: np.ndarray,
    draft_tokens: list[int],
    draft_probs: Sequence[np.ndarray | float | None],
    params: SamplingParams,
    *,
    delta: float,
) -> int:
    """How many draft tokens the rule accepts: those before the first with log p(t) < log q(t) - delta. The
    token emitted after them is the target's own (`target_choice` on row `accepted`): at a rejection the
    target's choice instead of the rejected token, after a fully accepted window the bonus from the last row.

    target_logits: k+1 rows, as for `verify_greedy`.
    draft_probs[i]: what the draft thought of token i, under `tolerance_distribution` with the same params:
      - an array: the draft's whole distribution for position i (what the draft proposer already passes for
        sampled requests, since there `tolerance_distribution` is `probabilities`);
      - a float: just q(t_i), the probability of the drafted token (enough for this rule; cheaper to ship);
      - None: a point mass (deterministic proposers such as n-gram lookup), so log q = 0 and the rule becomes
        p(t) >= exp(-delta).
    With tolerance on, the loop asks the draft for its `tolerance_distribution` even when drafting greedily
    (`DraftRequest.with_probs`); otherwise every greedy draft token would be judged against a point mass.

    Two deliberate details: a token the target's sampling transform excludes (p = 0, e.g. outside top-k) is
    never accepted, whatever delta; and for greedy requests the target's own argmax is always accepted.
    Rejecting it would emit that same token as the correction and only throw away the rest of the window, so
    acceptance is never lower than `verify_greedy`'s. No randomness decides acceptance.
    """
    if not delta >= 0.0:  # also rejects NaN
        raise ValueError(f"tolerance delta must be >= 0, got {delta}")
    threshold = math.exp(-delta)  # the rule in probability space: p >= q * e^-delta (0.0 for delta = inf)
    for i, token in enumerate(draft_tokens):
        row = target_logits[i]
        if params.greedy and token == int(np.argmax(row)):
            continue
        entry = draft_probs[i]
        q = 1.0 if entry is None else float(entry[token]) if isinstance(entry, np.ndarray) else float(entry)
        p = float(tolerance_distribution(row, params)[token])
        if not (p > 0.0 and p >= q * threshold):
            return i
    return len(draft_tokens)


def target_choice(row: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The token the target emits itself: argmax of the raw logits when greedy, else a draw from p (not the
    residual p - q of exact verification, which is what makes the tolerance rule lossy)."""
    if params.greedy:
        return int(np.argmax(row))
    return sample(probabilities(row, params), rng)


class ToleranceController:
    """The lossy tolerance rule's delta: fixed, or (with a target acceptance) calibrated online to hold it.

    Why: the delta that gives, say, 80% acceptance depends on the model pair and on the text (code accepts far
    more than prose), so a fixed delta is either too loose on one or useless on the other. After each verify
    step, delta moves by `step` nats per drafted token times the gap to the target: up for every token short
    of `target_acceptance * drafted`, down for every token beyond it (a stochastic-approximation step whose
    fixed point is the delta at which the expected acceptance equals the target). Acceptance rises with delta,
    so this converges; it is clamped to [min_delta, max_delta]. Without a target acceptance the delta is
    fixed: a controller that never moves, so the loop has one rule type to apply.
    """

    def __init__(
        self,
        *,
        delta: float = 1.0,
        target_acceptance: float | None = None,
        step: float = 0.05,
        min_delta: float = 0.0,
        max_delta: float = 10.0,
    ):
        if target_acceptance is None:
            min_delta = max_delta = delta
        elif not 0.0 < target_acceptance <= 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1], got {target_acceptance}")
        if not 0.0 <= min_delta <= max_delta:
            raise ValueError(f"need 0 <= min_delta <= max_delta, got {min_delta}, {max_delta}")
        if not step > 0.0:
            raise ValueError(f"step must be > 0, got {step}")
        self.target_acceptance = target_acceptance
        self.step = step
        self.min_delta, self.max_delta = min_delta, max_delta
        self._delta = min(max(delta, min_delta), max_delta)
        self.drafted = 0
        self.accepted = 0

    @property
    def delta(self) -> float:
        """The delta to pass to `tolerated_prefix` for the next step."""
        return self._delta

    def observe(self, drafted: int, accepted: int) -> float:
        """Record one verify step (accepted of drafted tokens); returns the updated delta."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got accepted={accepted}, drafted={drafted}")
        self.drafted += drafted
        self.accepted += accepted
        if drafted and self.target_acceptance is not None:
            shortfall = self.target_acceptance * drafted - accepted  # > 0: too few accepted, loosen
            self._delta = min(max(self._delta + self.step * shortfall, self.min_delta), self.max_delta)
        return self._delta


def tolerance_rule(delta: float, target_acceptance: float | None) -> ToleranceController:
    """What a request asks for: a fixed delta, or (with a target acceptance) a controller starting there."""
    return ToleranceController(delta=delta, target_acceptance=target_acceptance)
