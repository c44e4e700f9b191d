"""Constrained replies (engine/grammar.py): always in the grammar, and speculation under a grammar stays exact.

On a synthetic model (the bigram table of test_cascade.py, with a five-token vocabulary llguidance reads)
the draft and the target are the same model: when both mask with the same history, q == p and every draft
is accepted, and the first token's distribution is the target's masked one. On the real pair, greedy JSON
output under a schema is the same with and without speculation, and validates."""

import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from llguidance import LLTokenizer, TokenizerWrapper

from specserve.engine.grammar import Grammar, GrammarError, json_schema_grammar, regex_grammar
from specserve.engine.loop import Generation, Speculation
from specserve.engine.policy import FixedK
from specserve.engine.proposers import DraftModelProposer, NgramProposer
from specserve.engine.sampling import SamplingParams, probabilities
from specserve.engine.target import LocalTarget
from tests.support.table_model import TABLE, TableModel

PIECES = [b"a", b"b", b"c", b"d", b"\xff<eos>"]  # token 4 ends the reply (0xff: a special token)


class FiveTokens:
    """The table model's vocabulary, as llguidance's TokenizerWrapper takes a tokenizer."""

    eos_token_id, bos_token_id, tokens = 4, None, PIECES

    def __call__(self, text: bytes) -> list[int]:
        return [PIECES.index(bytes([b])) for b in text]


TOKENIZER = LLTokenizer(TokenizerWrapper(FiveTokens()))
REGEX = "(a|b)+c(a|d)*"


def generate(grammar: str, proposer, k: int, seed: int, temperature: float = 1.0, max_tokens: int = 12):
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens)
    generation = Generation(
        target=LocalTarget(TableModel().new_sequence()),
        tokenizer=SimpleNamespace(decode_bytes=lambda ids: b"".join(PIECES[i] for i in ids), stop_ids=frozenset({4})),
        prompt=[3],
        params=SamplingParams(**{**params.__dict__, "grammar": Grammar(TOKENIZER, grammar)}),
        speculation=Speculation(proposer=proposer, policy=FixedK(k)),
    )
    list(generation)
    return generation


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_masked_like_the_target_is_always_accepted_and_the_reply_matches(temperature):
    import re

    for seed in range(20):
        generation = generate(
            regex_grammar(REGEX), DraftModelProposer(TableModel().new_sequence()), 4, seed, temperature
        )
        text = "".join(PIECES[t].decode() for t in generation.tokens)
        assert re.fullmatch(REGEX, text) or generation.finish_reason == "length", text
        assert generation.stats.accepted == generation.stats.drafted > 0


def test_point_mass_drafts_the_grammar_forbids_are_cut_and_output_stays_exact():
    # the n-gram lookup proposes what followed earlier: often a token the grammar rules out here
    for seed in range(10):
        plain = generate(regex_grammar(REGEX), None, 0, seed, temperature=0.0)
        ngram = generate(regex_grammar(REGEX), NgramProposer(), 4, seed, temperature=0.0)
        assert ngram.tokens == plain.tokens


def test_the_first_token_follows_the_masked_target_distribution():
    n = 3000
    counts = np.zeros(5)
    for seed in range(n):
        generation = generate(
            regex_grammar(REGEX), DraftModelProposer(TableModel().new_sequence()), 4, seed, max_tokens=1
        )
        counts[generation.tokens[0]] += 1
    p = probabilities(TABLE[3], SamplingParams(temperature=1.0))
    p[[2, 3, 4]] = 0  # the regex starts with a or b
    p /= p.sum()
    chi2 = ((counts / n - p) ** 2 / np.where(p > 0, p, 1) * n)[p > 0].sum()
    assert chi2 < 10.8 and counts[2:].sum() == 0, (counts / n, p)  # 99.9% quantile of chi-square(1)


def test_a_broken_grammar_is_a_clear_error():
    with pytest.raises(GrammarError):
        Grammar(TOKENIZER, regex_grammar("(a|"))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},  # so the reply ends
    },
    "required": ["name", "year", "tags"],
    "additionalProperties": False,
}


@pytest.mark.models
def test_greedy_json_under_a_schema_is_the_same_with_and_without_speculation(runtime):
    ids = runtime.encode_prompt(
        messages=[{"role": "user", "content": "Describe the Python language as JSON: name, first release year, tags."}]
    )
    grammar = json_schema_grammar(SCHEMA)
    outputs = {}
    for method, k in (("none", 0), ("draft", 4), ("suffix-draft", "auto"), ("ngram", 8)):
        generation = runtime.generate(ids, SamplingParams(max_tokens=120), method=method, k=k, grammar=grammar)
        list(generation)
        outputs[method] = generation.text
        if method == "draft":
            assert generation.stats.accepted > 0
    assert len(set(outputs.values())) == 1, outputs
    jsonschema.validate(json.loads(outputs["none"]), SCHEMA)
