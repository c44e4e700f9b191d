"""Tolerance verification (lossy, opt-in) and the controller that calibrates its delta, on synthetic logits."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve.engine.sampling import SamplingParams, probabilities
from specserve.engine.verify import (
    ToleranceController,
    Verdict,
    target_choice,
    tolerance_distribution,
    tolerated_prefix,
    verify_greedy,
)

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8)
V = 12


def verify_tolerance(target, draft, q, params, delta, rng) -> Verdict:
    """A window under the rule, as the target pass composes it (engine/target.py)."""
    accepted = tolerated_prefix(target, draft, q, params, delta=delta)
    return Verdict(accepted=accepted, next_token=target_choice(target[accepted], params, rng))


@st.composite
def windows(draw, max_k: int = 6):
    """(target logits [k+1, V], draft logits [k, V], seed) with k >= 0 and well-spread logits."""
    k = draw(st.integers(0, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    return rng.normal(0, scale, (k + 1, V)), rng.normal(0, scale, (k, V)), seed


@settings(max_examples=200, deadline=None)
@given(windows())
def test_delta_zero_greedy_with_the_targets_own_distribution_is_verify_greedy(window):
    target, _, seed = window
    k = len(target) - 1
    draft = [int(t) for t in np.argmax(target[:k], axis=-1)]
    own = [tolerance_distribution(target[i], GREEDY) for i in range(k)]
    expected = verify_greedy(target, draft)
    assert verify_tolerance(target, draft, own, GREEDY, 0.0, np.random.default_rng(seed)) == expected
    # Same with the probability of the drafted token alone instead of the whole row.
    own_token = [float(own[i][draft[i]]) for i in range(k)]
    assert verify_tolerance(target, draft, own_token, GREEDY, 0.0, np.random.default_rng(seed)) == expected


@settings(max_examples=200, deadline=None)
@given(windows(), st.sampled_from([GREEDY, SAMPLED]))
def test_acceptance_never_falls_as_delta_grows(window, params):
    target, draft_logits, seed = window
    rng = np.random.default_rng(seed)
    draft = [int(rng.integers(V)) for _ in range(len(draft_logits))]
    q = [tolerance_distribution(row, params) for row in draft_logits]
    accepted = [
        verify_tolerance(target, draft, q, params, delta, np.random.default_rng(seed)).accepted
        for delta in (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0)
    ]
    assert accepted == sorted(accepted)


@settings(max_examples=100, deadline=None)
@given(windows())
def test_greedy_tolerance_accepts_at_least_what_exact_greedy_does(window):
    """The target's own argmax is never rejected, however confident the draft was."""
    target, draft_logits, seed = window
    draft = [int(t) for t in np.argmax(draft_logits, axis=-1)] if len(draft_logits) else []
    q = [tolerance_distribution(row, GREEDY) for row in draft_logits]
    exact = verify_greedy(target, draft)
    tolerant = verify_tolerance(target, draft, q, GREEDY, 0.0, np.random.default_rng(seed))
    assert tolerant.accepted >= exact.accepted
    if tolerant.accepted == exact.accepted:
        assert tolerant.next_token == exact.next_token


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("delta", [1e6, math.inf])
def test_huge_delta_accepts_everything_the_draft_proposes(params, delta):
    rng = np.random.default_rng(7)
    for _ in range(50):
        k = int(rng.integers(1, 8))
        target, draft_logits = rng.normal(0, 4, (k + 1, V)), rng.normal(0, 4, (k, V))
        draft = [int(rng.integers(V)) for _ in range(k)]
        for q in ([tolerance_distribution(row, params) for row in draft_logits], [None] * k):
            verdict = verify_tolerance(target, draft, q, params, delta, rng)
            assert verdict.accepted == k
        # The bonus comes from the last row: its argmax when greedy.
        if params.greedy:
            assert verdict.next_token == int(np.argmax(target[k]))


def test_tokens_the_target_excludes_are_never_accepted():
    """top-k = 2: a draft token outside the target's top 2 has p = 0, so not even delta = inf accepts it."""
    params = SamplingParams(temperature=1.0, top_k=2)
    target = np.array([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0]])
    verdict = verify_tolerance(target, [2], [None], params, math.inf, np.random.default_rng(0))
    assert verdict.accepted == 0 and verdict.next_token in (0, 1)
    assert verify_tolerance(target, [1], [None], params, math.inf, np.random.default_rng(0)).accepted == 1


def test_the_rule_at_its_boundary():
    """Accept iff log p(t) >= log q(t) - delta; a point-mass draft has log q = 0."""
    target = np.log(np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]))
    p1 = 0.3  # target probability of token 1 at position 0
    for q1, delta, accepts in [(0.6, 0.69, False), (0.6, 0.70, True), (0.29, 0.0, True), (0.31, 0.0, False)]:
        q = np.array([1.0 - q1, q1, 0.0])
        verdict = verify_tolerance(target, [1], [q], GREEDY, delta, np.random.default_rng(0))
        assert verdict.accepted == int(accepts), (q1, delta, math.log(p1) - math.log(q1))
        if not accepts:
            assert verdict.next_token == 0  # the target's argmax replaces the rejected token
    # Point mass: accept token 1 iff log 0.3 >= -delta, i.e. delta >= 1.204.
    assert verify_tolerance(target, [1], [None], GREEDY, 1.20, np.random.default_rng(0)).accepted == 0
    assert verify_tolerance(target, [1], [None], GREEDY, 1.21, np.random.default_rng(0)).accepted == 1


def test_sampled_rejection_emits_a_draw_from_the_target():
    """On rejection the emitted token follows p (not the residual p - q, which is what makes this lossy)."""
    target = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    params = SamplingParams(temperature=1.0)
    q = np.array([0.97, 0.01, 0.01, 0.01])  # draft token 0: log 0.1 < log 0.97 - 1, always rejected
    rng = np.random.default_rng(3)
    counts = np.zeros(4)
    n = 20_000
    for _ in range(n):
        verdict = verify_tolerance(target, [0], [q], params, 1.0, rng)
        assert verdict.accepted == 0
        counts[verdict.next_token] += 1
    p = probabilities(target[0], params)
    assert 0.5 * np.abs(counts / n - p).sum() < 0.02


def test_negative_or_nan_delta_is_an_error():
    target = np.zeros((2, V))
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError):
            verify_tolerance(target, [0], [None], GREEDY, bad, np.random.default_rng(0))


def test_greedy_tolerance_distribution_is_the_temperature_one_softmax():
    logits = np.array([2.0, 1.0, 0.0])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(tolerance_distribution(logits, GREEDY), expected)
    np.testing.assert_array_equal(tolerance_distribution(logits, SAMPLED), probabilities(logits, SAMPLED))


# --- ToleranceController ----------------------------------------------------------------------------------


def test_controller_moves_delta_toward_the_target_rate():
    c = ToleranceController(target_acceptance=0.8, delta=1.0, step=0.05)
    assert c.observe(4, 1) > 1.0  # below target: loosen
    before = c.delta
    assert c.observe(4, 4) < before  # above target: tighten
    assert c.observe(0, 0) == c.delta  # nothing drafted: nothing learned
    exact = ToleranceController(target_acceptance=0.5, delta=1.0)
    assert exact.observe(4, 2) == pytest.approx(1.0)  # on target: unchanged


def test_controller_stays_in_bounds():
    c = ToleranceController(target_acceptance=0.9, delta=1.0, step=0.5, min_delta=0.2, max_delta=3.0)
    for _ in range(100):
        c.observe(8, 0)
    assert c.delta == 3.0
    for _ in range(100):
        c.observe(8, 8)
    assert c.delta == 0.2
    assert ToleranceController(target_acceptance=0.5, delta=50.0).delta == 10.0  # the start is clamped too


def test_a_fixed_delta_is_a_controller_that_never_moves():
    fixed = ToleranceController(delta=50.0)  # no target acceptance: no bounds but the delta itself
    assert fixed.delta == 50.0
    assert fixed.observe(4, 0) == 50.0 and fixed.observe(4, 4) == 50.0
    assert (fixed.drafted, fixed.accepted) == (8, 4)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_controller_converges_on_a_synthetic_pair(target):
    """Per-token acceptance 1 - exp(-delta) (rises with delta): the controller should find delta* = -log(1 - a)
    and realise acceptance close to a."""
    rng = np.random.default_rng(11)
    c = ToleranceController(target_acceptance=target, delta=0.0, step=0.02)
    deltas, drafted, accepted = [], 0, 0
    for step in range(4000):
        p_accept = 1.0 - math.exp(-c.delta)
        k = 4
        n_acc = 0
        while n_acc < k and rng.random() < p_accept:  # a prefix is accepted, as in the real loop
            n_acc += 1
        if step >= 2000:
            deltas.append(c.delta)
            drafted, accepted = drafted + k, accepted + n_acc
        c.observe(k, n_acc)
    realised = accepted / drafted
    assert abs(realised - target) < 0.03, realised
    # Prefix acceptance makes accepted/drafted lower than the per-token rate, so delta* is at least -log(1-a).
    assert np.mean(deltas) >= -math.log(1 - target) - 0.1


def test_controller_rejects_bad_arguments():
    for kwargs in (
        {"target_acceptance": 0.0},
        {"target_acceptance": 1.5},
        {"target_acceptance": 0.5, "min_delta": 2.0, "max_delta": 1.0},
        {"target_acceptance": 0.5, "step": 0.0},
    ):
        with pytest.raises(ValueError):
            ToleranceController(**kwargs)
    with pytest.raises(ValueError):
        ToleranceController(target_acceptance=0.5).observe(2, 3)
