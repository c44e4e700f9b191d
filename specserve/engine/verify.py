"""Lossless verification of a draft window against the target's distributions.

Greedy: accept while the target's argmax equals the draft token; the first mismatch is replaced by the
target's argmax, so the output is exactly the target's greedy output.

Sampling: modified rejection sampling (Leviathan et al. 2023, Chen et al. 2023). Draft token x drawn from q
is accepted with probability min(1, p(x)/q(x)); on rejection the replacement is drawn from
normalize(max(0, p - q)); if every draft token is accepted, a bonus token is drawn from the next p. Each
emitted token is then distributed exactly as p, whatever q is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specserve.engine.sampling import SamplingParams, probabilities, sample


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many draft tokens were accepted (a prefix of the window)
    next_token: int  # correction (on rejection) or bonus (all accepted), produced by the target


def verify_greedy(target_logits: np.ndarray, draft_tokens: list[int]) -> Verdict:
    """target_logits[i] is the target's prediction after the i-th window position: k+1 rows for k drafts."""
    choices = np.argmax(target_logits, axis=-1)
    accepted = 0
    while accepted < len(draft_tokens) and int(choices[accepted]) == draft_tokens[accepted]:
        accepted += 1
    return Verdict(accepted, int(choices[accepted]))


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
    for i, token in enumerate(draft_tokens):
        p = p_rows[i]
        q = draft_probs[i]
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
        return Verdict(i, sample(residual, rng))
    return Verdict(len(draft_tokens), sample(p_rows[len(draft_tokens)], rng))


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
