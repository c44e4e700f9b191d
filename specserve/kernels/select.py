"""Which build runs here: those that compute bitwise what the portable spelling does (`agrees`), and of those
the fastest at streaming weights on this machine (`choose_build`, timed once and cached)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from specserve.hardware import build_key
from specserve.kernels.build import build, source_id
from specserve.kernels.pack import LAYOUTS, packed_linear, random_blocks
from specserve.models.fetch import cache_dir, exclusive


def agrees(lib, reference) -> bool:
    """Whether `lib` computes bitwise what the portable build does, on random inputs to every kernel."""
    rng = np.random.default_rng(0)
    n, k = 64, 512
    weights = {kind: random_blocks(rng, kind, n, k) for kind in LAYOUTS}
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    gate_up = torch.from_numpy(rng.uniform(-20, 20, (3, 2 * k)).astype(np.float32))
    q, keys, values = (
        torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for shape in ((2, 4 * 64), (2, 16, 64), (2, 16, 64))
    )
    results = []
    for ops in (lib, reference):
        results.append(
            (
                *(packed_linear(ops, kind, blocks)(x, None, n) for kind, blocks in weights.items()),
                ops.rms_norm(x, x[0].abs(), 1e-6),
                ops.silu_mul(gate_up),
                ops.gelu_tanh_mul(gate_up),
                ops.attention(q, keys, values, 10, 0.125, 0),
                ops.attention(q, keys, values, 10, 0.125, 4),
            )
        )
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


BUILD_CHOICE_ROWS = (1, 2, 4)  # the windows that matter most: plain decoding and short drafts


def choose_build(variants: list[str]) -> dict:
    """The fastest of `variants` (builds of distinct ISAs) at streaming a model's worth of the MLP weights of
    a Q4_K_M file (larger than any cache) for BUILD_CHOICE_ROWS rows: {"chosen", "ms": {variant: total}}.
    Measured once per machine and build, then read from the cache dir."""
    isas = {variant: build(variant).isa() for variant in variants}
    distinct = list({isa: variant for variant, isa in reversed(isas.items())}.values())
    if len(distinct) == 1:
        return {"chosen": distinct[0], "ms": {}}
    keys = [source_id(), torch.__version__, *sorted(distinct)]
    path = cache_dir() / "kernels" / f"choice-{build_key(*keys)}.json"
    # Processes started together (a verifier and a server) time once and all read that one choice: `auto`'s
    # measurements are keyed by the build in use, so two picks would mean two measurements, or two models.
    with exclusive(path, lambda text: print(text, file=sys.stderr)):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        result = _time_builds(distinct)
        path.write_text(json.dumps(result))
    return result


def _time_builds(distinct: list[str]) -> dict:
    print("timing the specserve kernel builds on this CPU (once) ...", file=sys.stderr)
    rng = np.random.default_rng(0)
    shapes = [("Q4_K", 8960 * 2, 1536), ("Q6_K", 1536, 8960)]  # gate+up and down of one layer of the 1.5B
    weights = [(kind, n, k, random_blocks(rng, kind, n, k)) for kind, n, k in shapes for _ in range(6)]
    inputs = {rows: {k: torch.randn(rows, k) for _, _, k in shapes} for rows in BUILD_CHOICE_ROWS}
    streams = {}
    for variant in distinct:
        lib = build(variant)
        streams[variant] = [(packed_linear(lib, kind, blocks), n, k) for kind, n, k, blocks in weights]
    best = {variant: {rows: float("inf") for rows in BUILD_CHOICE_ROWS} for variant in distinct}
    for _ in range(5):  # rounds alternate the builds, so drift in the machine's speed hits them alike
        for variant, stream in streams.items():
            for rows in BUILD_CHOICE_ROWS:
                start = time.perf_counter()
                for linear, n, k in stream:
                    linear(inputs[rows][k], None, n)
                best[variant][rows] = min(best[variant][rows], time.perf_counter() - start)
    totals = {variant: round(1000 * sum(times.values()), 2) for variant, times in best.items()}
    return {"chosen": min(totals, key=totals.get), "ms": totals}
