"""Greedy speculative output is token-for-token the target's own greedy output.

Every divergence is reported with the plain path's top-2 logit margin at that position; only a near-tie
(margin below 1e-3 of the logit scale) may be put down to floating-point numerics. Anything else fails.

Run on the target backend `auto` picks here, and on llama.cpp with the model's own file, whose windows are
exact only up to the size measured at start-up (speculation is limited to those windows).
"""

import numpy as np
import pytest

from specserve.engine.sampling import SamplingParams
from tests.support.prompts import project_prompts

pytestmark = pytest.mark.models
NEW_TOKENS = 32  # a divergence shows within a few windows; more tokens per setting only cost CI time
PROMPTS = project_prompts(per_kind=1)  # code, prose, random words, code edits: each config runs on each kind
CONFIGS = [
    ("draft", 1),
    ("draft", 4),
    ("draft", 8),
    ("draft", "auto"),
    ("ngram", 4),
    ("cascade", 4),
    ("suffix", 8),
    ("suffix-draft", "auto"),
]
NEAR_TIE = 1e-3


def run(runtime, ids, method, k):
    generation = runtime.generate(ids, SamplingParams(max_tokens=NEW_TOKENS), method=method, k=k)
    for _ in generation:
        pass
    return generation


def divergences(runtime, ids, plain_tokens, spec_tokens):
    """Positions where the outputs differ, with the plain path's top-2 margin there."""
    found = []
    for pos, (a, b) in enumerate(zip(plain_tokens, spec_tokens, strict=False)):
        if a != b:
            logits = runtime.target.new_sequence().eval(ids + plain_tokens[:pos], all_logits=False)[-1]
            top2 = np.sort(logits)[-2:]
            scale = float(np.abs(logits).max())
            found.append({"position": pos, "plain": a, "spec": b, "margin": float(top2[1] - top2[0]), "scale": scale})
            break  # after the first divergence the contexts differ; later positions say nothing
    if not found and len(plain_tokens) != len(spec_tokens):
        found.append({"position": min(len(plain_tokens), len(spec_tokens)), "length_mismatch": True})
    return found


def check_equivalence(runtime, prompt, configs):
    check_ids(runtime, runtime.encode_prompt(messages=[{"role": "user", "content": prompt["prompt"]}]), configs)


def check_ids(runtime, ids, configs):
    plain = run(runtime, ids, "none", 0)
    report = []
    drafted = 0
    for method, k in configs:
        spec = run(runtime, ids, method, k)
        drafted += spec.stats.drafted
        for d in divergences(runtime, ids, plain.tokens, spec.tokens):
            d.update(method=method, k=k, near_tie=d.get("margin", 1.0) < NEAR_TIE * d.get("scale", 1.0))
            report.append(d)
        assert spec.finish_reason == plain.finish_reason
    if report:
        print(f"divergences for {runtime.tokenizer.decode(ids)[-40:]!r}: {report}")
    bugs = [d for d in report if not d.get("near_tie")]
    assert not bugs, f"speculative output differs from target greedy (not a near-tie): {bugs}"
    assert drafted > 0, "nothing was drafted: the test would not have seen a divergence"


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{p['kind']}:{p['prompt'][:32]}")
def test_speculative_greedy_equals_target_greedy(runtime, prompt):
    check_equivalence(runtime, prompt, CONFIGS)


@pytest.fixture(scope="module")
def llamacpp_runtime(runtime):
    """llama.cpp on the registry's Q4_K_M file (the draft as `auto` picked it)."""
    from specserve.config import EngineConfig
    from specserve.runtime import LocalRuntime

    config = EngineConfig(target_backend="llama.cpp", draft_backend=runtime.draft.name)
    return LocalRuntime(config, show_progress=False)


def test_llamacpp_target_speculates_only_in_windows_it_computes_exactly(llamacpp_runtime):
    assert llamacpp_runtime.exact_window is not None and llamacpp_runtime.exact_window >= 1
    assert llamacpp_runtime.k_max == min(8, llamacpp_runtime.exact_window - 1)
    fixed = llamacpp_runtime.draft_length("draft", 8)
    assert fixed.k_max == llamacpp_runtime.exact_window - 1  # a fixed k beyond the exact windows is capped


@pytest.mark.parametrize("prompt", project_prompts(per_kind=1)[:2], ids=lambda p: p["kind"])
def test_speculation_on_a_llamacpp_target_equals_its_greedy(llamacpp_runtime, prompt):
    if llamacpp_runtime.k_max == 0:
        pytest.skip("llama.cpp computes no window of 2 rows as 2 single steps on this CPU: nothing to speculate")
    check_equivalence(llamacpp_runtime, prompt, [("draft", 8), ("draft", "auto"), ("ngram", 8)])


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_speculation_on_other_architectures_equals_their_greedy(name):
    """A Llama and a Gemma 3 target on torch-q4, drafted for by a requantized copy of themselves (Q2_K, on
    llama.cpp): speculative greedy output is the target's own greedy output."""
    from specserve.config import EngineConfig
    from specserve.runtime import LocalRuntime

    config = EngineConfig(target=name, draft="self:Q2_K", target_backend="torch-q4", draft_backend="llama.cpp")
    runtime = LocalRuntime(config, show_progress=False)
    text = "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n"
    for prompt in (text, "The three primary colours are"):
        check_ids(runtime, runtime.tokenizer.encode(prompt, add_special=True), [("draft", 4), ("draft", "auto")])
