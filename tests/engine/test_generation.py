"""Stop conditions and sampling on the real model pair."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from specserve.engine.loop import Generation
from specserve.engine.model import ContextOverflowError
from specserve.engine.sampling import SamplingParams
from specserve.engine.target import LocalTarget

pytestmark = pytest.mark.models
CODE_PROMPT = "Write a Python function `is_prime(n)` that returns True if n is prime."


def chat_ids(runtime, text=CODE_PROMPT):
    return runtime.encode_prompt(messages=[{"role": "user", "content": text}])


def run(runtime, ids, method="draft", k=4, **params):
    generation = runtime.generate(ids, SamplingParams(**params), method=method, k=k)
    events = list(generation)
    return generation, events


def test_max_tokens_is_exact(runtime):
    for method in ("none", "draft", "ngram"):
        generation, _ = run(runtime, chat_ids(runtime), method=method, max_tokens=7)
        assert len(generation.tokens) == 7 and generation.finish_reason == "length"


def test_end_of_turn_stops_generation(runtime):
    ids = chat_ids(runtime, "Reply with just the word: yes")
    generation, events = run(runtime, ids, max_tokens=50)
    assert generation.finish_reason == "stop"
    assert len(generation.tokens) < 10
    assert not any(t in runtime.tokenizer.stop_ids for t in generation.tokens)
    assert "yes" in generation.text.lower()


def test_stop_string_inside_an_accepted_draft_run(runtime):
    ids = chat_ids(runtime)
    plain, _ = run(runtime, ids, method="none", max_tokens=64)
    stop = "return"
    cut = plain.text.index(stop)  # the reply contains code with `return`
    for method, k in (("none", 0), ("draft", 8)):
        generation, events = run(runtime, ids, method=method, k=k, max_tokens=64, stop=(stop,))
        assert generation.finish_reason == "stop"
        assert generation.text == plain.text[:cut]
        assert "".join(e.text for e in events) == plain.text[:cut]
    # The speculative run accepted draft tokens, i.e. the stop string arrived inside an accepted run.
    assert generation.stats.accepted > 0


def test_events_mark_draft_accepted_and_target_tokens(runtime):
    generation, events = run(runtime, chat_ids(runtime), method="draft", k=4, max_tokens=32)
    from_draft = sum(e.from_draft for e in events if e.token is not None)
    assert from_draft == generation.stats.accepted > 0
    assert len([e for e in events if e.token is not None]) == len(generation.tokens)
    assert generation.stats.target_passes + 1 == len(generation.tokens) - generation.stats.accepted


def test_prompt_longer_than_context_is_a_clear_error(runtime):
    with pytest.raises(ContextOverflowError, match="context holds"):
        runtime.generate([198] * runtime.target.n_ctx, SamplingParams(max_tokens=4), method="none")


def test_generation_ends_at_the_context_limit(runtime):
    from specserve.backends import load_backend
    from specserve.models.fetch import resolve_model
    from specserve.models.registry import DEFAULT_DRAFT

    small = load_backend("torch-int8", resolve_model(DEFAULT_DRAFT, False), n_ctx=48, show_progress=False)
    ids = runtime.tokenizer.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    generation = Generation(
        target=LocalTarget(small.new_sequence()),
        tokenizer=SimpleNamespace(decode_bytes=runtime.tokenizer.decode_bytes, stop_ids=frozenset()),  # no EOS
        prompt=ids,
        params=SamplingParams(max_tokens=500),
    )
    list(generation)
    assert generation.finish_reason == "length"
    assert len(ids) + len(generation.tokens) == small.n_ctx + 1  # the last token needs no KV slot


def test_seeded_sampling_is_reproducible_and_speculation_keeps_stats(runtime):
    ids = chat_ids(runtime, "Tell a short story about a robot learning to paint.")
    params = dict(temperature=0.8, top_p=0.95, seed=42, max_tokens=40)
    first, _ = run(runtime, ids, method="draft", k=4, **params)
    second, _ = run(runtime, ids, method="draft", k=4, **params)
    assert first.tokens == second.tokens
    assert 0 < first.stats.acceptance_rate < 1
    assert len(first.stats.per_position_acceptance) == 4


def test_cli_generate_streams_text_then_a_stats_line():
    result = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "generate", CODE_PROMPT, "--chat", "--max-tokens", "12", "-k", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "def" in result.stdout or "prime" in result.stdout
    stats = result.stderr.strip().splitlines()[-1]
    assert "12 tokens" in stats and "accepted" in stats and "finish=length" in stats


def test_prefix_reuse_is_exact_and_skips_the_shared_prompt(runtime):
    """A second chat with the same long system prompt starts from the first one's KV (whole prefill
    chunks only) and decodes exactly what a fresh sequence decodes."""
    from specserve.config import PREFILL_CHUNK

    if not runtime.target.copies_prefix:
        pytest.skip(f"the {runtime.target.name} target cannot copy KV between sequences (auto picked it here)")
    system = "You are a careful senior Python reviewer. " * 60
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Review: x = [i for i in range(10)]"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Write a function to add two ints."}]
    params = SamplingParams(max_tokens=24)
    list(runtime.generate(runtime.encode_prompt(messages=first), params, method="draft", k=4))
    ids = runtime.encode_prompt(messages=second)
    reused = runtime.generate(ids, params, method="draft", k=4)
    list(reused)
    assert reused.stats.prefix_reused >= 2 * PREFILL_CHUNK and reused.stats.prefix_reused % PREFILL_CHUNK == 0
    target = LocalTarget(runtime.target.new_sequence())
    fresh = Generation(
        target=target,
        tokenizer=runtime.tokenizer,
        prompt=ids,
        params=params,
    )
    list(fresh)
    assert fresh.stats.prefix_reused == 0 and fresh.tokens == reused.tokens


def test_tolerance_mode_is_opt_in_and_loosens_acceptance(runtime):
    """Exact by default; with a huge delta every draft token is accepted (lossy, so only on request); a
    controller moves delta toward its target acceptance."""
    from specserve.engine.verify import ToleranceController

    ids = chat_ids(runtime, "Write a haiku about the sea.")
    plain, _ = run(runtime, ids, method="none", max_tokens=24)
    speculative, _ = run(runtime, ids, method="draft", k=4, max_tokens=24)
    assert speculative.tokens == plain.tokens  # exact unless tolerance is asked for
    huge = ToleranceController(delta=1e9)
    generation = runtime.generate(ids, SamplingParams(max_tokens=24), method="draft", k=4, tolerance=huge)
    list(generation)
    assert generation.stats.drafted > 0 and generation.stats.accepted == generation.stats.drafted
    controller = ToleranceController(target_acceptance=0.99, delta=0.0, step=0.5)
    list(runtime.generate(ids, SamplingParams(max_tokens=24), method="draft", k=4, tolerance=controller))
    assert controller.drafted > 0 and (controller.delta > 0.0 or controller.accepted == controller.drafted)
