"""Backends: KV rollback is exact, and int8 windows compute exactly what one-token steps compute."""

import numpy as np
import pytest

pytestmark = pytest.mark.models

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
WINDOW = [262, 470, 15801, 1445, 77, 12, 16, 8]  # arbitrary tokens: rollback must not care what they are


def _rollback_vs_fresh(backend, prompt_ids):
    backend.reset()
    backend.eval(prompt_ids, all_logits=False)
    base = backend.n_past
    backend.eval(WINDOW)  # a verify window ...
    backend.truncate(base + 2)  # ... of which two tokens were accepted
    after_rollback = backend.eval([WINDOW[5]])[0]
    backend.reset()
    backend.eval(prompt_ids, all_logits=False)
    fresh = backend.eval([WINDOW[0], WINDOW[1], WINDOW[5]])[-1]
    return after_rollback, fresh


def test_int8_rollback_equals_fresh_sequence_bitwise(runtime):
    ids = runtime.tokenizer.encode(PROMPT)
    after_rollback, fresh = _rollback_vs_fresh(runtime.target, ids)
    assert np.array_equal(after_rollback, fresh)


def test_int8_window_logits_are_bitwise_equal_to_one_token_steps(runtime):
    target = runtime.target
    ids = runtime.tokenizer.encode(PROMPT)
    target.reset()
    target.eval(ids, all_logits=False)
    base = target.n_past
    window = target.eval(WINDOW)
    target.truncate(base)
    steps = np.stack([target.eval([t])[0] for t in WINDOW])
    mismatch = np.flatnonzero(~(window == steps).all(axis=1))
    assert mismatch.size == 0, f"rows {mismatch.tolist()} differ, max |diff| {np.abs(window - steps).max()}"


def test_llamacpp_rollback_leaves_no_trace_of_rejected_tokens(target_path, runtime):
    """llama.cpp rounds differently by batch shape (logits move by ~0.5 between a 3- and an 8-token batch
    here), so compare like shapes: the same window with different rejected tokens must give identical
    logits after rollback."""
    from specserve.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(target_path, n_ctx=512)
    ids = runtime.tokenizer.encode(PROMPT)
    results = []
    for rejected in (WINDOW[2:], [220] * 6):
        backend.reset()
        backend.eval(ids, all_logits=False)
        base = backend.n_past
        backend.eval(WINDOW[:2] + rejected)
        backend.truncate(base + 2)
        results.append(backend.eval([WINDOW[5]])[0])
    assert np.array_equal(results[0], results[1])


def test_context_overflow_is_an_error(runtime):
    from specserve.backends.base import ContextOverflowError

    runtime.target.reset()
    with pytest.raises(ContextOverflowError):
        runtime.target.eval([198] * (runtime.target.n_ctx + 1), all_logits=False)


def test_int8_batched_sequences_equal_each_sequence_alone_bitwise(runtime):
    """Concurrent requests share one forward pass: a prefill, a window and a one-token step of three
    sequences in one call give exactly the logits each would get alone."""
    target = runtime.target
    prompts = [runtime.tokenizer.encode(p) for p in (PROMPT, "import numpy as np\n", "# Sort a list\n" * 3)]
    seqs = [target.new_sequence() for _ in prompts]
    for seq, ids in zip(seqs[:2], prompts[:2], strict=True):
        seq.eval(ids, all_logits=False)
    work = [(seqs[0], WINDOW, True), (seqs[1], [WINDOW[0]], True), (seqs[2], prompts[2], False)]
    batched = target.eval_batch(work)
    for (seq, tokens, all_logits), together in zip(work, batched, strict=True):
        alone_seq = target.new_sequence()
        history = prompts[seqs.index(seq)]
        if tokens is not history:
            alone_seq.eval(history, all_logits=False)
        alone = alone_seq.eval(tokens, all_logits)
        assert together.shape == alone.shape
        assert np.array_equal(together, alone)


def test_llamacpp_sequences_are_independent(target_path, runtime):
    from specserve.backends.llamacpp import LlamaCppBackend

    first = LlamaCppBackend(target_path, n_ctx=512)
    second = first.new_sequence()
    ids = runtime.tokenizer.encode(PROMPT)
    first.eval(ids, all_logits=False)
    second.eval(ids[:3], all_logits=False)
    a, b = first.eval_batch([(first, [WINDOW[0]], True), (second, ids[3:], False)])
    assert (first.n_past, second.n_past) == (len(ids) + 1, len(ids))
    first.reset()
    first.eval(ids[:3], all_logits=False)  # the same batch shapes: llama.cpp rounds by shape
    assert np.array_equal(b, first.eval(ids[3:], all_logits=False))
