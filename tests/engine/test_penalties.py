"""Penalties, logit bias and min-p shape draft and target logits alike, so speculation under them stays exact;
stop tokens end the reply as the request says.

With the draft and the target the same model (the bigram table of test_cascade.py, a real implementation
of the backend protocol), a draft whose penalties saw the same history as the target's rows gives q == p:
every draft token is accepted, greedy or sampled. A draft that penalized a different history (missing its
own drafted tokens, or counting the prompt) would have some rejected."""

from types import SimpleNamespace

import numpy as np
import pytest

from specserve.engine.loop import Generation, Speculation
from specserve.engine.policy import FixedK
from specserve.engine.proposers import CascadeProposer, DraftModelProposer, NgramProposer
from specserve.engine.sampling import SamplingParams, adjust_logits, probabilities
from specserve.engine.target import LocalTarget
from tests.support.table_model import TableModel

PENALTIES = {"presence_penalty": 0.7, "frequency_penalty": 0.4, "repetition_penalty": 1.5, "logit_bias": ((4, -1.0),)}


def generate(proposer_factory, k: int, stop_ids: frozenset[int] = frozenset(), **params) -> Generation:
    draft = proposer_factory()
    generation = Generation(
        target=LocalTarget(TableModel().new_sequence()),
        tokenizer=SimpleNamespace(decode_bytes=bytes, stop_ids=stop_ids),
        prompt=[0, 1, 1, 2],
        params=SamplingParams(max_tokens=40, seed=3, **params),
        speculation=Speculation(proposer=draft, policy=FixedK(k)),
    )
    list(generation)
    return generation


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("method", ["draft", "cascade"])
def test_a_draft_penalized_like_the_target_is_always_accepted(temperature, method):
    def proposer():
        draft = DraftModelProposer(TableModel().new_sequence())
        return CascadeProposer(draft, NgramProposer()) if method == "cascade" else draft

    speculative = generate(proposer, 4, temperature=temperature, **PENALTIES)
    assert speculative.stats.drafted > 20 and speculative.stats.accepted == speculative.stats.drafted
    if temperature == 0.0:  # and greedy output is plain decoding's under the same penalties
        assert speculative.tokens == generate(proposer, 0, **PENALTIES).tokens
        assert speculative.tokens != generate(proposer, 0).tokens  # which do change the text


def test_penalties_follow_vllm_definitions():
    params = SamplingParams(
        presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=2.0, logit_bias=((0, 5.0),), reply_start=2
    )
    rows = np.array([[1.0, -1.0, 2.0, 0.5]] * 2, dtype=np.float32)
    context, drafts = [1, 3, 2, 2], [3]  # prompt [1, 3]; reply [2, 2]; then a draft 3
    adjusted = adjust_logits(rows, params, context, drafts)
    # token 0: only its bias; 1: in the prompt, negative: x2; 2: in the reply twice: /2, -0.5*2, -1;
    # 3: in the prompt: /2, and (row 1) once in the reply after the draft: -0.5, -1
    assert adjusted.tolist() == [[6.0, -2.0, -1.0, 0.25], [6.0, -2.0, -1.0, -1.25]]
    assert adjust_logits(rows, SamplingParams(), context) is rows  # nothing to adjust: untouched


def test_min_p_cuts_below_a_fraction_of_the_most_likely_and_keeps_speculation_exact():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    kept = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.25))  # the line: 0.125
    assert (kept > 0).tolist() == [True, True, True, False]
    np.testing.assert_allclose(kept[:3], np.array([0.5, 0.3, 0.15]) / 0.95)
    colder = probabilities(logits, SamplingParams(temperature=0.5, min_p=0.25))  # after temperature: 0.36, 0.09
    assert (colder > 0).tolist() == [True, True, False, False]

    def draft():
        return DraftModelProposer(TableModel().new_sequence())

    speculative = generate(draft, 4, temperature=1.0, min_p=0.45)
    assert speculative.stats.drafted > 20 and speculative.stats.accepted == speculative.stats.drafted
    allowed = {0: {1}, 1: {0, 2, 3}, 2: {0, 1, 3}, 3: {4}, 4: {0, 1, 2, 3}}  # within 0.45 of each row's best

    def within(generation: Generation) -> bool:
        context = [2, *generation.tokens]  # the prompt ends with 2
        return all(b in allowed[a] for a, b in zip(context, context[1:], strict=False))

    assert within(speculative) and not within(generate(draft, 4, temperature=1.0))


def test_stop_token_ids_end_the_reply_and_ignore_eos_goes_past_eos():
    def draft():
        return DraftModelProposer(TableModel().new_sequence())

    plain = generate(draft, 4, temperature=1.0)  # seeded: the same draws each time
    assert 4 in plain.tokens and plain.finish_reason == "length"
    at_four = generate(draft, 4, temperature=1.0, stop_token_ids=(4,))
    assert at_four.finish_reason == "stop" and at_four.tokens == plain.tokens[: plain.tokens.index(4)]
    eos = generate(draft, 4, temperature=1.0, stop_ids=frozenset({4}))
    assert eos.tokens == at_four.tokens and eos.finish_reason == "stop"
    past = generate(draft, 4, temperature=1.0, stop_ids=frozenset({4}), ignore_eos=True)
    assert past.tokens == plain.tokens and past.finish_reason == "length"
