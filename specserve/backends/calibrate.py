"""Measure what a window costs on a backend: the numbers behind adaptive k and the bench's cost table."""

from __future__ import annotations

import statistics
import time

from specserve.backends.base import Backend


def window_seconds(
    backend: Backend, context: list[int], windows: tuple[int, ...], repeats: int = 3
) -> dict[int, float]:
    """Median seconds to append each window size to a warm sequence (the cache is restored after)."""
    backend.reset()
    backend.eval(context, all_logits=False)
    base = backend.n_past
    result: dict[int, float] = {}
    for size in windows:
        window = (context * size)[:size]
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.eval(window)
            samples.append(time.perf_counter() - start)
            backend.truncate(base)
        result[size] = statistics.median(samples)
    backend.reset()
    return result
