"""Measure what a window costs on a backend: the numbers behind adaptive k and the bench's cost table."""

from __future__ import annotations

import time

from specserve.backends.base import Backend


def window_seconds(
    backend: Backend, context: list[int], windows: tuple[int, ...], repeats: int = 3
) -> dict[int, float]:
    """Seconds to append each window size to a warm sequence (the cache is restored after): the fastest of
    the repeats, since a shared machine's noise only ever adds time. Each repeat runs every size in turn,
    so a change of the machine's speed while calibrating touches all sizes alike: adaptive k keeps this
    shape (how much more a bigger window costs) for good."""
    backend.reset()
    backend.eval(context, all_logits=False)
    base = backend.n_past
    result = dict.fromkeys(windows, float("inf"))
    for _ in range(repeats):
        for size in windows:
            start = time.perf_counter()
            backend.eval((context * size)[:size])
            result[size] = min(result[size], time.perf_counter() - start)
            backend.truncate(base)
    backend.reset()
    return result


def batch_seconds(
    backend: Backend, context: list[int], rows: tuple[int, ...], window: int, repeats: int = 2
) -> dict[int, float]:
    """Seconds (fastest of the repeats) of one batched pass of `rows` total rows, as concurrent verify
    windows of at most `window` rows each (the shape a batched step has), on warm sequences of one model."""
    context = context[:8]  # enough keys for attention to be there; a long warm-up only costs start-up time
    sequences = [backend.new_sequence() for _ in range(-(-max(rows) // window))]
    backend.eval_batch([(sequence, context, False) for sequence in sequences])
    base = len(context)
    result: dict[int, float] = {}
    for total in rows:
        n = -(-total // window)
        sizes = [total // n + (i < total % n) for i in range(n)]
        work = [(sequences[i], (context * window)[:size], True) for i, size in enumerate(sizes)]
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.eval_batch(work)
            samples.append(time.perf_counter() - start)
            for sequence, _, _ in work:
                sequence.truncate(base)
        result[total] = min(samples)
    return result
