"""Adaptive draft length: the cost model, the acceptance estimate, the policy, and k = 0 when drafts are
always wrong. Cost figures are shapes measured on these machines (noted per test)."""

import itertools

import numpy as np
import pytest

from specserve.engine.acceptance import Acceptance, DraftConfidence, SharedAcceptance
from specserve.engine.costs import CostModel, PassCost, Speed, interpolate
from specserve.engine.policy import AdaptiveK, RequestState, WindowRecord
from specserve.engine.proposers import Proposal
from specserve.engine.sampling import SamplingParams


def policy(verify: dict, draft: dict | None = None, batched: bool = True, ablate=()) -> AdaptiveK:
    costs = CostModel(PassCost(dict(verify), batched), PassCost(dict(draft), batched) if draft else None)
    return AdaptiveK(costs, k_max=8, ablate=frozenset(ablate))


def request(p: AdaptiveK, acceptance: float | None = None, trials: float = 3.0) -> RequestState:
    """A request's state with its acceptance estimate set as if measured over `trials` positions."""
    state = p.start("draft", greedy=True)
    if acceptance is not None:
        estimate = state.acceptance
        estimate.value, estimate._successes, estimate._trials = acceptance, acceptance * trials, trials
    return state


def slot(state, limit=8, uses_model=True, sync_rows=2, remaining=1 << 30) -> WindowRecord:
    return WindowRecord(state=state, limit=limit, uses_model=uses_model, sync_rows=sync_rows, remaining=remaining)


def plan_one(p: AdaptiveK, state: RequestState, **kwargs) -> int:
    return p.plan([slot(state, **kwargs)], 0)[0]


def test_long_windows_when_drafts_are_cheap_and_good():
    p = policy({1: 0.030, 9: 0.050}, {1: 0.001, 2: 0.001})
    assert plan_one(p, request(p, 0.9)) >= 6


def test_plain_decoding_when_drafts_are_expensive_or_bad():
    expensive = policy({1: 0.030, 9: 0.09}, {1: 0.040, 2: 0.040})
    assert plan_one(expensive, request(expensive, 0.9)) == 0
    bad = policy({1: 0.030, 9: 0.05}, {1: 0.002, 2: 0.002})
    assert plan_one(bad, request(bad, 0.05)) == 0


def test_acceptance_estimate_follows_observed_windows():
    estimate = Acceptance()
    assert estimate.value == 0.7  # the prior
    for _ in range(50):
        estimate.observe(drafted=4, accepted=0)
    assert estimate.value < 0.05
    for _ in range(50):
        estimate.observe(drafted=4, accepted=4)
    assert estimate.value > 0.95


def test_probe_after_a_run_of_plain_steps_and_less_often_after_each_failed_one():
    p = policy({1: 0.03, 2: 0.031}, {1: 0.01, 2: 0.01})
    state = request(p, 0.01)
    choices = [plan_one(p, state) for _ in range(400)]
    assert choices.count(0) >= 390 and 1 in choices  # mostly plain, with an occasional 1-token probe
    probes = [i for i, k in enumerate(choices) if k == 1]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[0] < gaps[-1] <= 64  # failed probes space the next ones out, up to a bound
    # ablated: no probes at all
    off = policy({1: 0.03, 2: 0.031}, {1: 0.01, 2: 0.01}, ablate={"probes"})
    state = request(off, 0.01)
    assert [plan_one(off, state) for _ in range(200)] == [0] * 200


class AlwaysWrongProposer:
    """Proposes a token the target never picks here (a rare CJK piece), so acceptance is zero."""

    name = "always-wrong"
    uses_model = False

    def __init__(self, token: int):
        self.token = token

    def propose(self, context, k, params, rng, with_probs=False):
        return Proposal(tokens=[self.token] * k, probs=[None] * k)

    def reset(self):
        pass

    def sync_rows(self, context):
        return 0

    def drafts_with_model(self, context):
        return False

    def lockstep_draft(self, context):
        return None


@pytest.mark.models
def test_adaptive_k_falls_to_zero_and_output_stays_the_targets(runtime):
    from specserve.engine.loop import Generation, Speculation
    from specserve.engine.target import LocalTarget

    ids = runtime.encode_prompt(
        messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}]
    )
    params = SamplingParams(max_tokens=48)
    plain = runtime.generate(ids, params, method="none")
    list(plain)
    wrong = AlwaysWrongProposer(token=runtime.tokenizer.encode("龘")[0])
    target = LocalTarget(runtime.target.new_sequence())
    tokenizer = runtime.tokenizer
    generation = Generation(
        target=target,
        tokenizer=tokenizer,
        prompt=ids,
        params=params,
        speculation=Speculation(proposer=wrong, policy=runtime.draft_length("draft", "auto")),
    )
    list(generation)
    assert generation.tokens == plain.tokens
    assert generation.stats.accepted == 0
    tail = generation.stats.chosen_k[len(generation.stats.chosen_k) // 2 :]
    table = {
        rows: round(s / runtime.policy.costs.target.table[1], 3)
        for rows, s in runtime.policy.costs.target.table.items()
    }
    assert np.mean([k == 0 for k in tail]) > 0.8, (generation.stats.chosen_k, table)


def test_noisy_costs_never_make_a_window_look_cheaper_than_one_token():
    table = {1: 0.040, 3: 0.030, 9: 0.035}
    assert interpolate(table, 3) >= interpolate(table, 1) and interpolate(table, 5) >= interpolate(table, 1)
    p = policy(table)
    assert plan_one(p, request(p, 0.0), uses_model=False) == 0  # with nothing accepted, drafting only costs


def test_a_window_measured_as_cheap_as_one_row_is_not_drafted_on_a_sliver_of_acceptance():
    # one CI run's calibration on an Intel VM had 2 rows at 0.989 of one row (truly ~1.05): every window then
    # looked free, and a request whose drafts were never accepted drafted to its end
    table = {1: 0.040, 2: 0.0396, 3: 0.0425, 9: 0.060}
    p = policy(table)
    assert plan_one(p, request(p, 0.02), uses_model=False) == 0
    assert plan_one(p, request(p, 0.2), uses_model=False) > 0  # a real gain still drafts
    off = policy(table, ablate={"row-cost", "probes"})
    assert plan_one(off, request(off, 0.02), uses_model=False) == 1


def test_windows_follow_a_kernel_that_takes_rows_in_groups():
    """llama.cpp's repacked Q4_0 GEMM takes rows in fours (measured: 4 rows cost less than 3): the plan
    follows the measured table, not a monotone version of it, and skips the expensive 3-row window."""
    table = {1: 0.060, 2: 0.090, 3: 0.120, 4: 0.095, 5: 0.150, 6: 0.170}
    assert interpolate(table, 4) == pytest.approx(0.095) and interpolate(table, 4) < interpolate(table, 3)
    p = policy(table, {1: 0.001, 2: 0.001})
    assert plan_one(p, request(p, 0.8), limit=5) == 3  # a window of 4 rows


# Measured shape of int8 costs on an AMD machine: a pass of 1 row 31 ms, 16 rows 86 ms, 128 rows 480 ms;
# a draft step 10 ms for 1 row, 22 ms for 16.
BATCH_VERIFY = {1: 0.031, 2: 0.036, 4: 0.049, 8: 0.060, 16: 0.086, 32: 0.170, 64: 0.280, 128: 0.480}
BATCH_DRAFT = {1: 0.010, 2: 0.011, 4: 0.013, 8: 0.016, 16: 0.022, 32: 0.040}


def test_batch_plan_drafts_alone_but_not_in_a_big_batch():
    """One sequence with 80% acceptance should draft; sixteen of them already decode 16 tokens per 86 ms
    pass, which drafting cannot beat."""
    p = policy(BATCH_VERIFY, BATCH_DRAFT)
    assert plan_one(p, request(p, 0.8)) > 0
    assert p.plan([slot(request(p, 0.8)) for _ in range(16)], 0) == [0] * 16
    # model-free drafts (n-gram) cost only verify rows: with 95% acceptance they pay even in a batch of 4
    assert min(p.plan([slot(request(p, 0.95), uses_model=False) for _ in range(4)], 0)) > 0
    # a sequence that never accepts is left out while the others draft
    plan = p.plan([slot(request(p, a), uses_model=False) for a in (0.9, 0.9, 0.0)], 0)
    assert plan[2] == 0 and plan[0] > 0


def test_a_backend_that_runs_sequences_in_turn_plans_each_alone():
    """llama.cpp evaluates a batch's sequences one after another: a pass of 16 one-row sequences costs 16
    one-row passes, so batching makes plain decoding no cheaper and each sequence drafts as it would alone."""
    p = policy(BATCH_VERIFY, BATCH_DRAFT, batched=False)
    alone = plan_one(p, request(p, 0.8))
    assert alone > 0 and p.plan([slot(request(p, 0.8)) for _ in range(16)], 0) == [alone] * 16


def test_a_draft_catch_up_is_charged_against_the_tokens_left():
    """A sequence whose draft has 200 tokens to catch up on (after decoding without drafting) starts
    drafting when the reply has long to go, not in its last tokens; a steady one (2 rows) always drafts."""
    draft = {1: 0.015, 2: 0.017, 4: 0.020, 32: 0.017 + 30 * 0.003}  # a catch-up costs 3 ms a token
    p = policy({1: 0.031, 2: 0.036, 4: 0.049, 8: 0.060}, draft)
    assert plan_one(p, request(p, 0.9), sync_rows=2, remaining=4) > 0
    assert plan_one(p, request(p, 0.9), sync_rows=200, remaining=1000) > 0
    assert plan_one(p, request(p, 0.9), sync_rows=200, remaining=8) == 0
    # beside a prefill chunk of 128 rows a decode row costs little and drafting does not pay
    assert p.plan([slot(request(p, 0.9))], other_rows=128) == [0]
    # ablated: the catch-up is not charged, and the short reply drafts
    free = policy({1: 0.031, 2: 0.036, 4: 0.049, 8: 0.060}, draft, ablate={"catch-up"})
    assert plan_one(free, request(free, 0.9), sync_rows=200, remaining=8) > 0


def test_learned_confidence_cutoff_drops_tokens_the_draft_is_unsure_of():
    """Tokens the draft gives < 30% are never accepted, confident ones always: the learned cutoff lands
    between them, and stays at 0 while every tenth pays."""
    p = policy({1: 0.03, 5: 0.04, 9: 0.05}, {1: 0.015, 2: 0.015})
    state = request(p, 0.8)
    # prior (acceptance = confidence): cut where a token's odds are below the break-even draft_cost * rate
    assert 0.0 < p.min_confidence(slot(state)) <= 0.7
    for _ in range(200):
        state.draft_confidence.observe([0.95, 0.9, 0.2], accepted=2)  # the unsure third token is rejected
        state.draft_confidence.observe([0.25], accepted=0)
    assert 0.3 <= p.min_confidence(slot(state)) <= 0.9
    generous = DraftConfidence()
    for _ in range(200):
        generous.observe([0.05, 0.15, 0.25, 0.35], accepted=4)
    assert generous.cutoff(break_even=0.6) == 0.0
    off = policy({1: 0.03, 5: 0.04, 9: 0.05}, {1: 0.015, 2: 0.015}, ablate={"draft-p-min"})
    assert off.min_confidence(slot(request(off, 0.8))) == 0.0


def window(state, drafted=4, accepted=4, expected=None, confidence=None) -> WindowRecord:
    return WindowRecord(
        state=state,
        rows=1 + drafted,
        drafted=drafted,
        accepted=accepted,
        expected_accepted=expected,
        target_confidence=confidence,
        uses_model=True,
        sync_rows=2,
    )


def test_a_new_request_starts_from_the_runtimes_recent_acceptance():
    """Requests of one runtime share a running acceptance estimate per method: after code that drafts well,
    the next request starts high (and drafts from its first window); after text the draft misses, low."""
    p = policy({1: 0.03, 5: 0.035}, {1: 0.01, 2: 0.01})
    first = p.start("draft", greedy=True)
    for _ in range(30):
        p.observe([window(first)], draft_s=0.04, verify_s=0.035)
    second = p.start("draft", greedy=True)
    assert second.acceptance.value > 0.9 and second.acceptance.shared is first.acceptance.shared
    assert p.start("ngram", greedy=True).acceptance.value == 0.7  # another method keeps its own
    for _ in range(100):  # a rejection is one trial: it takes more of them to move the estimate
        p.observe([window(second, accepted=0)], draft_s=0.04, verify_s=0.035)
    assert p.start("draft", greedy=True).acceptance.value < 0.3
    # sampled requests keep their own estimate: greedy agreement says little about rejection sampling
    sampled = p.start("draft", greedy=False)
    assert sampled.acceptance.value == 0.7
    for _ in range(60):
        p.observe([window(sampled, accepted=1, expected=1.0)], draft_s=0.04, verify_s=0.035)
    assert p.start("draft", greedy=False).acceptance.value == pytest.approx(0.5, abs=0.05)  # 1 of 2 tried
    assert p.start("draft", greedy=True).acceptance.value < 0.3
    # ablated: every request starts from the fixed prior
    off = policy({1: 0.03, 5: 0.035}, {1: 0.01, 2: 0.01}, ablate={"shared-prior"})
    for _ in range(30):
        off.observe([window(off.start("draft", True))], draft_s=0.04, verify_s=0.035)
    assert off.start("draft", True).acceptance.value == 0.7


def test_a_request_the_target_is_unsure_of_does_not_draft_on_the_last_requests_acceptance():
    """After code that drafts well (target confidence 0.95), a request whose text the target finds
    unpredictable (0.3) starts at the acceptance of its own confidence, not the code's: it does not pay the
    draft's prompt prefill. A confident request drafts at once; when its text turns unpredictable midway
    (its own windows not yet tried), its estimate follows."""
    draft = {1: 0.008, 2: 0.012, 32: 0.012 + 30 * 0.002}
    p = policy({1: 0.03, 5: 0.035, 9: 0.04}, draft)
    code = p.start("draft", greedy=False)
    code.acceptance.observe_target_confidence(0.95)
    for _ in range(40):
        p.observe([window(code, expected=3.8, confidence=0.95)], draft_s=0.04, verify_s=0.035)
    assert p.shared_acceptance("draft").value(False) > 0.85  # where a request of unknown confidence starts

    prompt_rows = 90  # the draft has not seen the prompt yet
    unsure = p.start("draft", greedy=False)
    unsure.acceptance.observe_target_confidence(0.3)  # the prompt's last position
    assert unsure.acceptance.value < 0.4
    assert plan_one(p, unsure, sync_rows=prompt_rows, remaining=64) == 0
    sure = p.start("draft", greedy=False)
    sure.acceptance.observe_target_confidence(0.97)
    assert sure.acceptance.value > 0.85 and plan_one(p, sure, sync_rows=prompt_rows, remaining=64) > 0
    drifting = p.start("draft", greedy=False)
    drifting.acceptance.observe_target_confidence(0.95)
    assert drifting.acceptance.value > 0.85
    for _ in range(20):
        drifting.acceptance.observe_target_confidence(0.3)
    assert drifting.acceptance.value < 0.4

    # what requests measure at low confidence is the runtime's estimate there, apart from the code's
    for _ in range(30):
        p.observe([window(unsure, drafted=2, accepted=0, expected=0.2, confidence=0.3)], 0.02, 0.035)
    shared = p.shared_acceptance("draft")
    assert shared.value(False, 0.3) < 0.25 and shared.value(False, 0.95) > 0.85
    assert shared.value(True, 0.3) == pytest.approx(0.35**2)  # greedy apart, at its prior
    assert SharedAcceptance(by_confidence=False).value(True, 0.3) == 0.7  # ablated: one estimate


def test_window_sizes_that_do_not_run_follow_the_machines_speed():
    """Calibrated in a slow phase (46 ms a token), then the machine speeds up while the request drafts
    windows of 2: plain decoding's cost must follow, or drafting is compared with a stale, slower k = 0.
    The draft's windows take 1.5x their calibrated bare passes (the loop's own work): its cost follows."""
    p = policy({1: 0.046, 3: 0.050, 9: 0.070}, {1: 0.010, 2: 0.012})
    state = request(p, 0.5)
    for _ in range(60):
        p.observe([window(state, drafted=2, accepted=1)], draft_s=1.5 * 0.022, verify_s=0.035)
    costs = p.costs
    assert costs.target.speed.factor == pytest.approx(0.7, rel=0.01)
    assert costs.verify([1]) == pytest.approx(0.046 * 0.7, rel=0.01)  # a size that did not run
    assert costs.verify([16]) == pytest.approx(0.7 * interpolate(costs.target.table, 16), rel=0.01)  # beyond
    assert costs.drafting([2], 1) == pytest.approx(0.018, rel=0.01) and costs.drafting([2], 4) > 3 * 0.015
    # one stall of a busy machine moves a factor by a bounded ratio, not by its length
    p.observe([WindowRecord(state=state, rows=1)], draft_s=0.0, verify_s=10 * 0.046)
    assert costs.target.speed.factor < 0.95  # 0.7 * 10 ** 0.1 (a weight of 0.1): a 10x stall costs under 30%
    # ablated: the tables as calibrated
    off = policy({1: 0.046, 3: 0.050, 9: 0.070}, {1: 0.010, 2: 0.012}, ablate={"speed"})
    off.observe([window(request(off), drafted=2, accepted=1)], draft_s=0.033, verify_s=0.035)
    assert off.costs.target.speed.factor == 1.0 and off.costs.draft.speed.factor == 1.0


def test_a_probe_that_would_catch_up_on_a_long_prompt_waits_for_a_long_reply():
    """A probe drafts one token, but first the draft evaluates everything it has not seen: on a short reply
    to a 300-token prompt that costs more than the probe could win back; on a long reply it is worth it."""
    p = policy({1: 0.032, 2: 0.035}, {1: 0.009, 2: 0.009, 32: 0.009 + 30 * 0.0024})
    state = request(p, 0.01)
    assert [plan_one(p, state, sync_rows=300, remaining=48) for _ in range(40)] == [0] * 40
    state = request(p, 0.01)
    assert 1 in [plan_one(p, state, sync_rows=300, remaining=1000) for _ in range(40)]


def test_a_machine_running_a_quarter_off_its_calibration_has_drifted():
    speed = Speed()
    assert not speed.drifted()
    for _ in range(5):
        speed.observe(0.9, 1.0)  # 10% off: noise and small drift, the factor absorbs it
    assert not speed.drifted()
    for _ in range(30):
        speed.observe(0.7, 1.0)  # another phase of the shared machine
    assert speed.drifted()
    speed.recalibrated()
    assert speed.factor == 1.0 and not speed.drifted()


def test_unknown_features_to_ablate_are_refused():
    with pytest.raises(ValueError, match="unknown adaptive-k features"):
        policy({1: 0.03}, ablate={"draft-pmin"})


@pytest.mark.models
def test_a_runtime_whose_speed_drifted_measures_its_costs_again(runtime):
    """The cost tables are measured at start-up and refreshed: when the target runs 40% faster than it was
    calibrated (another phase of the shared machine), the next refresh measures them again, at most every
    REFRESH_MIN_S, giving the models up when a request comes; a steady machine is left alone. Output stays the
    target's."""
    import time

    from specserve.engine.costs import REFRESH_MIN_S

    costs = runtime.policy.costs
    costs.target.speed.recalibrated()
    costs.draft.speed.recalibrated()
    costs._measured_at = time.monotonic() - REFRESH_MIN_S
    refreshes = costs.refreshes
    assert not runtime.refresh_costs()  # steady: nothing to measure
    costs.target.speed.factor, costs.target.speed.observations = 0.6, 20
    before = dict(costs.target.table)
    passes = []  # a request comes after the second pass: the refresh gives the models up, tables untouched
    assert not runtime.refresh_costs(wanted=lambda: passes.append(1) or len(passes) > 2)
    assert costs.target.table == before and costs.refreshes == refreshes and len(passes) == 3
    assert runtime.refresh_costs() and costs.refreshes == refreshes + 1
    assert set(range(1, runtime.k_max + 2)) <= set(costs.target.table)  # every window size, measured
    assert all(0 < seconds < 5 for seconds in costs.target.table.values())
    assert costs.target.speed.factor == 1.0 and all(s > 0 for s in costs.draft.table.values())
    costs.target.speed.factor, costs.target.speed.observations = 0.6, 20
    assert not runtime.refresh_costs()  # just measured: not again so soon
    costs.target.speed.recalibrated()

    prompt = "Write a Python function that adds two numbers."
    ids = runtime.encode_prompt(messages=[{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=24)
    plain = runtime.generate(ids, params, method="none")
    list(plain)
    drafted = runtime.generate(ids, params, method="draft", k="auto")
    list(drafted)
    assert drafted.tokens == plain.tokens
    assert 0.0 < drafted.draft_state.acceptance.target_confidence <= 1.0  # every verdict reported it
