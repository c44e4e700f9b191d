"""Adaptive draft length: the cost model, and k = 0 when drafts are always wrong."""

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
    choices = [model.choose(8) for _ in range(40)]
    assert choices.count(0) >= 36 and 1 in choices  # mostly plain, with an occasional 1-token probe


class AlwaysWrongProposer:
    """Proposes a token the target never picks here (a rare CJK piece), so acceptance is zero."""

    name = "always-wrong"

    def __init__(self, token: int):
        self.token = token

    def propose(self, context, k, params, rng):
        return Proposal([self.token] * k, [None] * k)

    def reset(self):
        pass


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


def test_noisy_costs_never_make_a_bigger_window_look_cheaper():
    model = AdaptiveK(acceptance=0.0, draft_cost_s=0.0, verify_cost_s={1: 0.040, 3: 0.030, 9: 0.035})
    assert model.verify_cost(3) >= model.verify_cost(1) and model.verify_cost(5) >= model.verify_cost(1)
    assert model.choose(8) == 0  # with nothing accepted, drafting can only cost time
