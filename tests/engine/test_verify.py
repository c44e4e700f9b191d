"""Verification is lossless: greedy reproduces the target's argmax; sampling reproduces p exactly."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from specserve.engine.sampling import SamplingParams, probabilities
from specserve.engine.verify import verify_greedy, verify_sampled

V = 6
SAMPLED = SamplingParams(temperature=1.0)


def _logits_for(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def _emitted_first_token(p: np.ndarray, q: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Empirical distribution of the first emitted token when the draft proposes x ~ q (or a fixed token)."""
    rng = np.random.default_rng(seed)
    target_logits = np.stack([_logits_for(p), _logits_for(p)])
    counts = np.zeros(V)
    for _ in range(n):
        if q is None:
            draft, probs = 2, [None]  # deterministic proposer: point mass on token 2
        else:
            draft, probs = int(rng.choice(V, p=q)), [q]
        verdict = verify_sampled(target_logits, [draft], probs, SAMPLED, rng)
        counts[draft if verdict.accepted else verdict.next_token] += 1
    return counts / n


CASES = {
    "q close to p": (np.array([0.3, 0.2, 0.2, 0.1, 0.1, 0.1]), np.array([0.25, 0.25, 0.2, 0.1, 0.1, 0.1])),
    "q far from p": (np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3]), np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])),
    "q zero where p is not": (np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1]), np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])),
    "p zero where q is not": (np.array([0.0, 0.0, 0.5, 0.5, 0.0, 0.0]), np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])),
    "point-mass draft": (np.array([0.1, 0.1, 0.4, 0.2, 0.1, 0.1]), None),
}


@pytest.mark.parametrize("case", CASES)
def test_rejection_sampling_matches_target_distribution(case):
    p, q = CASES[case]
    n = 40_000
    empirical = _emitted_first_token(p, q, n, seed=1234)
    tv = 0.5 * np.abs(empirical - p).sum()
    # With 40k samples over 6 outcomes the TV distance of a correct sampler is ~0.005; a wrong one
    # (e.g. emitting draft tokens unconditionally) is >= 0.1 on every case above.
    assert tv < 0.02, f"TV distance {tv:.4f}: empirical {np.round(empirical, 3)} vs p {p}"
    # Pearson chi-square against p over outcomes with p > 0 (df <= 5): 99.9% quantile is 20.5.
    support = p > 0
    chi2 = (((empirical - p) ** 2 / np.where(support, p, 1)) * n)[support].sum()
    assert chi2 < 20.5, f"chi-square {chi2:.1f}"
    assert np.all(empirical[~support] == 0), "emitted a token the target gives probability 0"


@pytest.mark.parametrize("case", CASES)
def test_expected_acceptance_is_the_mean_of_the_coin_flips(case):
    """`Verdict.expected_accepted` for one draft is sum_x min(p, q): what adaptive k learns from instead
    of the 0/1 outcome. Its mean must be the observed acceptance rate."""
    p, q = CASES[case]
    rng = np.random.default_rng(5)
    target_logits = np.stack([_logits_for(p), _logits_for(p)])
    accepted, expected = [], []
    for _ in range(20_000):
        draft, probs = (2, [None]) if q is None else (int(rng.choice(V, p=q)), [q])
        verdict = verify_sampled(target_logits, [draft], probs, SAMPLED, rng)
        accepted.append(verdict.accepted)
        expected.append(verdict.expected_accepted)
    assert np.mean(expected) == pytest.approx(np.minimum(p, q).sum() if q is not None else p[2])
    assert abs(np.mean(accepted) - np.mean(expected)) < 0.015  # ~4 standard errors at 20k samples


def test_a_sampler_that_skips_rejection_is_caught():
    """The statistical bound above has teeth: always accepting the draft fails it."""
    p, q = CASES["q far from p"]
    rng = np.random.default_rng(0)
    draws = rng.choice(V, p=q, size=40_000)
    empirical = np.bincount(draws, minlength=V) / len(draws)
    assert 0.5 * np.abs(empirical - p).sum() > 0.1


def test_bonus_token_sampled_from_next_distribution_when_all_accepted():
    p0 = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # draft token 1 is certain to be accepted
    p1 = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])
    rng = np.random.default_rng(7)
    bonus = np.zeros(V)
    for _ in range(20_000):
        verdict = verify_sampled(np.stack([_logits_for(p0), _logits_for(p1)]), [1], [p0], SAMPLED, rng)
        assert verdict.accepted == 1
        bonus[verdict.next_token] += 1
    assert 0.5 * np.abs(bonus / bonus.sum() - p1).sum() < 0.02


def test_sampling_transforms_shape_target_and_draft_alike():
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0]]) + 1e-12)
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert np.count_nonzero(probs) == 2 and abs(probs.sum() - 1) < 1e-12
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))[0]
    assert np.count_nonzero(probs) == 2  # 0.5 alone < 0.7, with 0.3 it reaches 0.8
    cold = probabilities(logits, SamplingParams(temperature=0.1))[0]
    assert cold[0] > 0.99


@given(
    st.lists(st.integers(0, V - 1), min_size=1, max_size=8),
    st.lists(st.integers(0, V - 1), min_size=9, max_size=9),
)
def test_greedy_accepts_exactly_the_matching_prefix(draft, target_choice):
    logits = np.full((len(draft) + 1, V), -5.0)
    for row, token in enumerate(target_choice[: len(draft) + 1]):
        logits[row, token] = 5.0
    verdict = verify_greedy(logits, draft)
    expected = 0
    while expected < len(draft) and draft[expected] == target_choice[expected]:
        expected += 1
    assert verdict.accepted == expected
    assert verdict.next_token == target_choice[expected]


def _nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The textbook nucleus: a stable sort of the whole vocabulary, keep the prefix reaching top_p."""
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    return np.sort(order[np.cumsum(ranked) - ranked < top_p])


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([40, 3000, 20000]),
    st.sampled_from([0.0, 0.3, 1.0, 4.0]),  # 0: all tied; rounded logits below give ties at the line
    st.floats(0.01, 0.999),
)
def test_nucleus_from_candidates_equals_a_full_sort(seed, vocab, scale, top_p):
    """top-p sorts only the most likely tokens; the kept set must be exactly a full stable sort's, ties
    included (draft and target must agree on it, or sampled verification is no longer exact)."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.standard_normal(vocab) * scale, 1)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    plain = probabilities(logits, SamplingParams(temperature=1.0))
    kept = np.flatnonzero(probabilities(logits, params))
    assert np.array_equal(kept, _nucleus_by_full_sort(plain, top_p))


def test_token_logprobs_follow_the_requests_distribution():
    from specserve.engine.sampling import token_logprobs

    rows = np.log(np.array([[0.5, 0.3, 0.1, 0.1, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0, 0.0]]) + 1e-12)
    greedy = token_logprobs(rows, [0, 2], SamplingParams(), top_n=2)
    assert np.isclose(greedy[0].logprob, np.log(0.5)) and np.isclose(greedy[1].logprob, np.log(0.3))
    assert [t for t, _ in greedy[1].top] == [3, 2]  # most likely first
    cut = token_logprobs(rows, [2, 3], SamplingParams(temperature=1.0, top_k=2), top_n=0)
    assert cut[0].logprob == -np.inf and np.isclose(cut[1].logprob, np.log(0.4 / 0.7)) and cut[1].top == ()
