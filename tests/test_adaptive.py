"""Adaptive draft length: the cost model, and k = 0 when drafts are always wrong."""

import itertools

import numpy as np
import pytest

from specserve.engine.adaptive import AdaptiveK
from specserve.engine.proposers import Proposal
from specserve.engine.sampling import SamplingParams


def test_cost_model_prefers_long_windows_when_drafts_are_cheap_and_good():
    model = AdaptiveK(k_max=8, acceptance=0.9, draft_cost_s=0.001, verify_cost_s={1: 0.030, 9: 0.050})
    assert model.choose(8) >= 6


def test_cost_model_chooses_plain_decoding_when_drafts_are_expensive_or_bad():
    assert AdaptiveK(acceptance=0.9, draft_cost_s=0.040, verify_cost_s={1: 0.030, 9: 0.09}).choose(8) == 0
    assert AdaptiveK(acceptance=0.05, draft_cost_s=0.002, verify_cost_s={1: 0.030, 9: 0.05}).choose(8) == 0


def test_acceptance_estimate_follows_observed_windows():
    model = AdaptiveK(acceptance=0.7)
    for _ in range(50):
        model.observe(drafted=4, accepted=0, draft_s=0.04, verify_s=0.04)
    assert model.acceptance < 0.05
    for _ in range(50):
        model.observe(drafted=4, accepted=4, draft_s=0.04, verify_s=0.04)
    assert model.acceptance > 0.95


def test_probe_after_a_run_of_plain_steps():
    model = AdaptiveK(acceptance=0.01, draft_cost_s=0.01, verify_cost_s={1: 0.03, 2: 0.031})
    choices = [model.choose(8) for _ in range(400)]
    assert choices.count(0) >= 390 and 1 in choices  # mostly plain, with an occasional 1-token probe
    probes = [i for i, k in enumerate(choices) if k == 1]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[0] < gaps[-1] <= 64  # failed probes space the next ones out, up to a bound


class AlwaysWrongProposer:
    """Proposes a token the target never picks here (a rare CJK piece), so acceptance is zero."""

    name = "always-wrong"

    def __init__(self, token: int):
        self.token = token

    def propose(self, context, k, params, rng, with_probs=False):
        return Proposal([self.token] * k, [None] * k)

    def reset(self):
        pass

    def sync_rows(self, context):
        return 0


@pytest.mark.models
def test_adaptive_k_falls_to_zero_and_output_stays_the_targets(runtime):
    from specserve.engine.loop import Generation

    ids = runtime.encode_prompt(
        messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}]
    )
    params = SamplingParams(max_tokens=48)
    plain = runtime.generate(ids, params, method="none")
    list(plain)
    wrong = AlwaysWrongProposer(token=runtime.tokenizer.encode("龘")[0])
    adaptive = runtime.draft_length("draft", "auto")
    generation = Generation(
        runtime.target, runtime.tokenizer.decode_bytes, runtime.tokenizer.stop_ids, ids, params, wrong, adaptive
    )
    list(generation)
    assert generation.tokens == plain.tokens
    assert generation.stats.accepted == 0
    tail = generation.stats.chosen_k[len(generation.stats.chosen_k) // 2 :]
    assert np.mean([k == 0 for k in tail]) > 0.8, generation.stats.chosen_k


def test_noisy_costs_never_make_a_window_look_cheaper_than_one_token():
    model = AdaptiveK(acceptance=0.0, draft_cost_s=0.0, verify_cost_s={1: 0.040, 3: 0.030, 9: 0.035})
    assert model.verify_cost(3) >= model.verify_cost(1) and model.verify_cost(5) >= model.verify_cost(1)
    assert model.choose(8) == 0  # with nothing accepted, drafting can only cost time


def test_windows_follow_a_kernel_that_takes_rows_in_groups():
    """llama.cpp's repacked Q4_0 GEMM takes rows in fours (measured: 4 rows cost less than 3): the plan
    follows the measured table, not a monotone version of it, and skips the expensive 3-row window."""
    costs = {1: 0.060, 2: 0.090, 3: 0.120, 4: 0.095, 5: 0.150, 6: 0.170}
    model = AdaptiveK(acceptance=0.8, draft_cost_s=0.001, verify_cost_s=costs)
    assert model.verify_cost(4) == pytest.approx(0.095) and model.verify_cost(4) < model.verify_cost(3)
    assert model.choose(5) == 3  # a window of 4 rows


def test_batch_plan_drafts_alone_but_not_in_a_big_batch():
    """Measured shape of this machine's int8 costs: a pass of 1 row 31 ms, 16 rows 86 ms, 80 rows 326 ms;
    a draft step 18 ms for 1 row, 42 ms for 16. One sequence with 80% acceptance should draft; sixteen of
    them already decode 16 tokens per 86 ms pass, which drafting cannot beat."""
    from specserve.engine.adaptive import BatchCosts, plan_batch

    costs = BatchCosts(
        verify_s={1: 0.031, 2: 0.036, 4: 0.049, 8: 0.060, 16: 0.086, 32: 0.170, 64: 0.280, 128: 0.480},
        draft_s={1: 0.010, 2: 0.011, 4: 0.013, 8: 0.016, 16: 0.022, 32: 0.040},
    )
    assert plan_batch([0.8], [8], [True], costs)[0] > 0
    assert plan_batch([0.8] * 16, [8] * 16, [True] * 16, costs) == [0] * 16
    # model-free drafts (n-gram) cost only verify rows: with 95% acceptance they pay even in a batch of 4
    assert min(plan_batch([0.95] * 4, [8] * 4, [False] * 4, costs)) > 0
    # a sequence that never accepts is left out while the others draft
    plan = plan_batch([0.9, 0.9, 0.0], [8, 8, 8], [False, False, False], costs)
    assert plan[2] == 0 and plan[0] > 0


def test_batch_plan_charges_a_draft_catch_up_against_the_tokens_left():
    """A sequence whose draft has 200 tokens to catch up on (after decoding without drafting) starts
    drafting when the reply has long to go, not in its last tokens; a steady one (2 rows) always drafts."""
    from specserve.engine.adaptive import BatchCosts, plan_batch

    costs = BatchCosts(
        verify_s={1: 0.031, 2: 0.036, 4: 0.049, 8: 0.060},
        draft_s={1: 0.015, 2: 0.017, 4: 0.020},
        catch_up_s=0.003,
    )
    assert plan_batch([0.9], [8], [True], costs, sync_rows=[2], remaining=[4])[0] > 0
    assert plan_batch([0.9], [8], [True], costs, sync_rows=[200], remaining=[1000])[0] > 0
    assert plan_batch([0.9], [8], [True], costs, sync_rows=[200], remaining=[8]) == [0]
    # beside a prefill chunk of 128 rows a decode row costs little and drafting does not pay
    assert plan_batch([0.9], [8], [True], costs, fixed_rows=128) == [0]


def test_learned_confidence_cutoff_drops_tokens_the_draft_is_unsure_of():
    """Tokens the draft gives < 30% are never accepted, confident ones always: the learned cutoff lands
    between them, and stays at 0 while every bucket pays."""
    model = AdaptiveK(acceptance=0.8, draft_cost_s=0.015, verify_cost_s={1: 0.03, 5: 0.04, 9: 0.05})
    # prior (acceptance = confidence): cut where a token's odds are below the break-even draft_cost * rate
    assert 0.0 < model.min_confidence() <= 0.7
    for _ in range(200):
        model.observe_confidence([0.95, 0.9, 0.2], accepted=2)  # the unsure third token is rejected
        model.observe_confidence([0.25], accepted=0)
    cutoff = model.min_confidence()
    assert 0.3 <= cutoff <= 0.9
    generous = AdaptiveK(acceptance=0.8, draft_cost_s=0.015, verify_cost_s={1: 0.03, 5: 0.04, 9: 0.05})
    for _ in range(200):
        generous.observe_confidence([0.05, 0.15, 0.25, 0.35], accepted=4)
    assert generous.min_confidence() == 0.0


def test_a_new_request_starts_from_the_runtimes_recent_acceptance():
    """Requests of one runtime share a running acceptance estimate: after code that drafts well, the next
    request starts high (and drafts from its first window); after text the draft misses, it starts low."""
    from specserve.engine.adaptive import SharedAcceptance

    template = AdaptiveK(draft_cost_s=0.01, verify_cost_s={1: 0.03, 5: 0.035}, shared=SharedAcceptance())
    first = template.fresh()
    for _ in range(30):
        first.observe(drafted=4, accepted=4, draft_s=0.04, verify_s=0.035)
    second = template.fresh()
    assert second.acceptance > 0.9 and second.shared is first.shared
    assert template.acceptance == 0.7  # the template itself keeps its prior
    for _ in range(100):  # a rejection is one trial: it takes more of them to move the estimate
        second.observe(drafted=4, accepted=0, draft_s=0.04, verify_s=0.035)
    assert template.fresh().acceptance < 0.3
    # sampled requests keep their own estimate: greedy agreement says little about rejection sampling
    sampled = template.fresh(greedy=False)
    assert sampled.acceptance == 0.7
    for _ in range(60):
        sampled.observe(drafted=4, accepted=1, draft_s=0.04, verify_s=0.035, expected_accepted=1.0)
    assert template.fresh(greedy=False).acceptance == pytest.approx(0.5, abs=0.05)  # 1 of 2 tried
    assert template.fresh().acceptance < 0.3


def test_a_request_the_target_is_unsure_of_does_not_draft_on_the_last_requests_acceptance():
    """After code that drafts well (target confidence 0.95), a request whose text the target finds
    unpredictable (0.3) starts at the acceptance of its own confidence, not the code's: it does not pay the
    draft's prompt prefill. A confident request drafts at once; when its text turns unpredictable midway
    (its own windows not yet tried), its estimate follows."""
    from specserve.engine.adaptive import SharedAcceptance

    template = AdaptiveK(
        draft_cost_s=0.008, draft_first_s=0.012, verify_cost_s={1: 0.03, 5: 0.035, 9: 0.04}, catch_up_s=0.002
    )
    template.shared = SharedAcceptance()
    code = template.fresh(greedy=False)
    code.observe_target_confidence(0.95)
    for _ in range(40):
        code.observe_target_confidence(0.95)
        code.observe(drafted=4, accepted=4, draft_s=0.04, verify_s=0.035, expected_accepted=3.8)
    assert template.fresh(greedy=False).acceptance > 0.85  # what a request of unknown confidence would start at

    prompt_rows = 90  # the draft has not seen the prompt yet
    unsure = template.fresh(greedy=False)
    unsure.observe_target_confidence(0.3)  # the prompt's last position
    assert unsure.acceptance < 0.4
    assert unsure.choose(8, prompt_rows, remaining=64) == 0
    sure = template.fresh(greedy=False)
    sure.observe_target_confidence(0.97)
    assert sure.acceptance > 0.85 and sure.choose(8, prompt_rows, remaining=64) > 0
    drifting = template.fresh(greedy=False)
    drifting.observe_target_confidence(0.95)
    assert drifting.acceptance > 0.85
    for _ in range(20):
        drifting.observe_target_confidence(0.3)
    assert drifting.acceptance < 0.4

    # what requests measure at low confidence is the runtime's estimate there, apart from the code's
    for _ in range(30):
        unsure.observe(drafted=2, accepted=0, draft_s=0.02, verify_s=0.035, expected_accepted=0.2)
    assert template.shared.value(False, 0.3) < 0.25 and template.shared.value(False, 0.95) > 0.85
    assert template.shared.value(True, 0.3) == pytest.approx(0.35**2)  # greedy apart, at its prior


def test_window_sizes_that_do_not_run_follow_the_machines_speed():
    """Calibrated in a slow phase (46 ms a token), then the machine speeds up while the request drafts
    windows of 2: plain decoding's cost must follow, or drafting is compared with a stale, slower k = 0.
    The draft's windows take 1.5x their calibrated bare passes (the loop's own work): its cost follows."""
    from specserve.engine.adaptive import MachineSpeed

    model = AdaptiveK(
        acceptance=0.5,
        draft_cost_s=0.010,
        draft_first_s=0.012,
        verify_cost_s={1: 0.046, 3: 0.050, 9: 0.070},
        verify_speed=MachineSpeed(),
    )
    for _ in range(60):
        model.observe(drafted=2, accepted=1, draft_s=1.5 * 0.022, verify_s=0.035)
    # (the size that runs takes a small part of the change as its own error: see the next test)
    assert model.verify_speed.factor == pytest.approx(0.7, rel=0.05)
    assert model.verify_cost(1) == pytest.approx(0.046 * 0.7, rel=0.05)
    assert model.draft_cost(1) == pytest.approx(0.018, rel=0.02) and model.draft_cost(4) > 3 * 0.015
    # the speeds are the runtime's: the next request starts from them
    assert model.fresh().verify_cost(1) == pytest.approx(0.046 * 0.7, rel=0.05)
    assert model.fresh().draft_speed is model.draft_speed
    # one stall of a busy machine moves a factor by a bounded ratio, not by its length
    model.observe(drafted=0, accepted=0, draft_s=0.0, verify_s=10 * 0.046)
    assert model.verify_speed.factor < 0.95  # 0.7 * 10 ** 0.1 (a weight of 0.1): a 10x stall costs under 30%


def test_batch_costs_follow_the_machines_speed_at_every_size():
    from specserve.engine.adaptive import BatchCosts

    costs = BatchCosts(verify_s={1: 0.03, 4: 0.05, 16: 0.09}, draft_s={1: 0.01, 4: 0.012})
    for _ in range(60):
        costs.observe(4, 0.10)  # only 4-row passes run, at twice the calibrated time
    assert costs.verify(16) == pytest.approx(0.18, rel=0.02)


def test_drafting_that_only_breaks_even_at_the_estimate_is_not_risked():
    """Costs measured here (verify 32 ms for 1 token, 35 for 2; a draft pass of 2 rows 15 ms): at an
    estimated acceptance of 0.65 a 1-token window is worth 5% more than plain decoding by the estimate,
    but a dozen trials cannot tell 0.65 from 0.55, at which it loses. At 0.9 drafting pays either way."""
    costs = dict(draft_cost_s=0.0086, draft_first_s=0.0154, verify_cost_s={1: 0.032, 2: 0.0346, 3: 0.0389, 5: 0.044})
    marginal = AdaptiveK(acceptance=0.65, _accepted=0.65 * 15, _tried=15, _own_trials=15, **costs)
    assert marginal.expected_rate(1) > marginal.expected_rate(0)
    assert marginal.choose(4) == 0
    assert AdaptiveK(acceptance=0.9, _accepted=0.9 * 15, _tried=15, _own_trials=15, **costs).choose(4) > 0
    # before measuring anything of its own a request goes by the runtime's estimate: it must try
    assert AdaptiveK(acceptance=0.65, _accepted=0.65 * 15, _tried=15, **costs).choose(4) > 0
    # a request starting from the runtime's code acceptance (0.9 on a 3-trial prior) drafts from the start
    assert AdaptiveK(acceptance=0.9, _accepted=0.9 * 3, **costs).choose(8) > 0


def test_a_probe_that_would_catch_up_on_a_long_prompt_waits_for_a_long_reply():
    """A probe drafts one token, but first the draft evaluates everything it has not seen: on a short reply
    to a 300-token prompt that costs more than the probe could win back; on a long reply it is worth it."""
    model = AdaptiveK(acceptance=0.01, draft_cost_s=0.009, catch_up_s=0.0024, verify_cost_s={1: 0.032, 2: 0.035})
    short = [model.choose(8, sync_rows=300, remaining=48) for _ in range(40)]
    assert short == [0] * 40
    long = [model.choose(8, sync_rows=300, remaining=1000) for _ in range(40)]
    assert 1 in long


def test_a_window_size_calibrated_wrong_is_corrected_by_what_it_costs():
    """Calibration measured 1 token at 42 ms and 5 at 46 (a noisy moment); in fact they take 31 and 44.
    Whatever the machine's speed does meanwhile, the ratio of their estimated costs comes right."""
    model = AdaptiveK(acceptance=0.5, draft_cost_s=0.009, verify_cost_s={1: 0.042, 5: 0.046})
    speeds = [1.0, 1.4, 0.9]  # the machine drifts while this runs
    for i in range(600):
        drift = speeds[i // 200]
        model.observe(drafted=0, accepted=0, draft_s=0.0, verify_s=0.031 * drift)
        model.observe(drafted=4, accepted=2, draft_s=0.04, verify_s=0.044 * drift)
    assert model.verify_cost(5) / model.verify_cost(1) == pytest.approx(44 / 31, rel=0.05)
    assert model.verify_cost(1) == pytest.approx(0.031 * 0.9, rel=0.05)


def test_a_machine_running_a_quarter_off_its_calibration_has_drifted():
    from specserve.engine.adaptive import MachineSpeed

    speed = MachineSpeed()
    assert not speed.drifted()
    for _ in range(5):
        speed.observe(0.9, 1.0)  # 10% off: noise and small drift, the factor absorbs it
    assert not speed.drifted()
    for _ in range(30):
        speed.observe(0.7, 1.0)  # another phase of the shared machine
    assert speed.drifted()
    speed.recalibrated()
    assert speed.factor == 1.0 and not speed.drifted()


@pytest.mark.models
def test_a_runtime_whose_speed_drifted_measures_its_costs_again(runtime):
    """The cost table is measured at start-up and refreshed: when the target runs 40% faster than it was
    calibrated (another phase of the shared machine), the next refresh measures the window sizes again, at
    most every COST_REFRESH_MIN_S; a steady machine is left alone. Output stays the target's."""
    import time

    from specserve.runtime import COST_REFRESH_MIN_S

    templates = runtime._adaptive_templates
    anchor = templates["ngram"]
    for template in templates.values():
        template.verify_speed.recalibrated()
        template.draft_speed.recalibrated()
    runtime._costs_measured_at = time.monotonic() - COST_REFRESH_MIN_S
    assert not runtime.refresh_costs()  # steady: nothing to measure
    anchor.verify_speed.factor, anchor.verify_speed.observations = 0.6, 20
    assert runtime.refresh_costs()
    assert sorted(anchor.verify_cost_s) == list(range(1, runtime.k_max + 2))  # every window size, measured
    assert all(templates[m].verify_cost_s is anchor.verify_cost_s for m in templates)  # still one shared table
    assert all(0 < seconds < 5 for seconds in anchor.verify_cost_s.values())
    assert anchor.verify_speed.factor == 1.0 and templates["draft"].draft_cost_s > 0
    anchor.verify_speed.factor, anchor.verify_speed.observations = 0.6, 20
    assert not runtime.refresh_costs()  # just measured: not again so soon
    anchor.verify_speed.recalibrated()

    prompt = "Write a Python function that adds two numbers."
    ids = runtime.encode_prompt(messages=[{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=24)
    plain = runtime.generate(ids, params, method="none")
    list(plain)
    drafted = runtime.generate(ids, params, method="draft", k="auto")
    list(drafted)
    assert drafted.tokens == plain.tokens
    assert 0.0 < drafted.adaptive.target_confidence <= 1.0  # every verdict reported the target's confidence
