"""Measurements shared by in-process and worker-process benchmark runs."""

from __future__ import annotations

import statistics
import time

from specserve.backends.base import Backend
from specserve.engine.loop import Generation
from specserve.engine.proposers import Proposer
from specserve.engine.sampling import SamplingParams
from specserve.models.tokenizer import Tokenizer

COST_WINDOWS = (1, 2, 4, 5, 8, 16)


def window_costs(backend: Backend, context: list[int], repeats: int = 5) -> dict[str, float]:
    """Median time to append k tokens to a warm sequence, relative to one token."""
    backend.reset()
    backend.eval(context, all_logits=False)
    base = backend.n_past
    times: dict[int, float] = {}
    for k in COST_WINDOWS:
        window = (context * k)[:k]
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.eval(window)
            samples.append(time.perf_counter() - start)
            backend.truncate(base)
        times[k] = statistics.median(samples)
    return {"ms_1": round(times[1] * 1000, 1), **{f"k{k}": round(times[k] / times[1], 2) for k in COST_WINDOWS[1:]}}


def generate_once(
    target: Backend, proposer: Proposer | None, k: int, tokenizer: Tokenizer, ids: list[int], params: SamplingParams
) -> dict:
    generation = Generation(target, tokenizer.decode_bytes, tokenizer.stop_ids, ids, params, proposer, k)
    for _ in generation:
        pass
    s = generation.stats
    return {
        "tokens": s.generated,
        "decode_s": s.decode_s,
        "ms_per_token": 1000 * s.decode_s / max(s.generated - 1, 1),
        "drafted": s.drafted,
        "accepted": s.accepted,
        "tokens_per_pass": s.tokens_per_pass,
        "chosen_k": s.chosen_k,
        "token_ids": generation.tokens,
    }
