"""Measurements shared by in-process and worker-process benchmark runs."""

from __future__ import annotations

from specserve.backends.base import Backend
from specserve.backends.calibrate import window_seconds
from specserve.engine.loop import Generation

COST_WINDOWS = (1, 2, 4, 5, 8, 16)


def window_costs(backend: Backend, context: list[int], repeats: int = 5) -> dict[str, float]:
    """Time to append k tokens to a warm sequence relative to one token (medians), and the 1-token ms."""
    seconds = window_seconds(backend, context, COST_WINDOWS, repeats)
    one = seconds[1]
    return {"ms_1": round(one * 1000, 1), **{f"k{k}": round(seconds[k] / one, 2) for k in COST_WINDOWS[1:]}}


def run_generation(generation: Generation) -> dict:
    """Run a generation to the end; return what the bench records of it."""
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
        "windows": s.windows,  # (drafted, accepted) per target pass: acceptance over time
        "token_ids": generation.tokens,
    }
