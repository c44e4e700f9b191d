"""Measurements shared by in-process and worker-process benchmark runs."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from specserve.engine.costs import measure_rows
from specserve.engine.loop import Generation
from specserve.engine.model import Sequence

COST_WINDOWS = (1, 2, 4, 5, 8, 16)


def window_costs(sequence: Sequence, context: list[int], repeats: int = 5) -> dict[str, float]:
    """Time to append k tokens to a warm sequence relative to one token (medians), and the 1-token ms."""
    seconds = measure_rows(sequence, context, COST_WINDOWS, repeats)
    one = seconds[1]
    return {"ms_1": round(one * 1000, 1), **{f"k{k}": round(seconds[k] / one, 2) for k in COST_WINDOWS[1:]}}


def cost_table(title: str, costs: dict[str, dict[str, float]]) -> Table:
    """`window_costs` of several models as a table: a row each."""
    table = Table(title=title)
    table.add_column("backend / model")
    table.add_column("1 token ms", justify="right")
    for k in COST_WINDOWS[1:]:
        table.add_column(f"k={k}", justify="right")
    for name, row in costs.items():
        table.add_row(name, f"{row['ms_1']:.1f}", *(f"{row[f'k{k}']:.2f}" for k in COST_WINDOWS[1:]))
    return table


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


def summarize(runs: list[dict]) -> dict:
    """One row of a bench table: per-token latency (mean, p90 over requests), aggregate decode tokens/s,
    acceptance, tokens per target pass, the mean draft length, and the quality of lossy rows if measured."""
    ms = [r["ms_per_token"] for r in runs]
    tokens = sum(r["tokens"] - 1 for r in runs)
    decode = sum(r["decode_s"] for r in runs)
    drafted = sum(r["drafted"] for r in runs)
    ks = [k for r in runs for k in r.get("chosen_k", ())]
    quality = {}
    if all("target_logprob" in r for r in runs):
        quality = {
            "same_as_target": round(float(np.mean([r["same_as_target"] for r in runs])), 3),
            "target_logprob": round(float(np.mean([r["target_logprob"] for r in runs])), 4),
        }
    return {
        **quality,
        "requests": len(runs),
        "ms_per_token_mean": round(float(np.mean(ms)), 2),
        "ms_per_token_p90": round(float(np.percentile(ms, 90)), 2),
        "tokens_per_s": round(tokens / decode, 2) if decode else 0.0,
        "acceptance_rate": round(sum(r["accepted"] for r in runs) / drafted, 3) if drafted else None,
        "tokens_per_pass": round(float(np.mean([r["tokens_per_pass"] for r in runs])), 2),
        "mean_k": round(float(np.mean(ks)), 2) if ks else 0.0,
    }
