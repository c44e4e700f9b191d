"""What the target's and the draft's passes cost: the numbers adaptive k plans with (engine/policy.py).

Each model has a table of seconds per pass by rows, measured on this machine at start-up (`calibrate`). A pass
over several sequences costs what one pass of their total rows costs on a backend that batches sequences,
and the sum of their own costs on one that runs them in turn (`Model.batches_sequences`). One request is
a batch of one: the same tables price both.

A speed factor per model scales its table to now. A shared machine's speed drifts by 1.5x within minutes,
and every pass that runs updates the factor, so the window sizes that do not run move with it (else plain
decoding would be priced at an old speed and drafting at the new one). When a factor drifts far, the machine
is in another phase where sizes no longer cost what they did relative to each other: the tables are measured
again (`CostModel.refresh`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from specserve.engine.model import Model, Sequence

# Rows a drafting sequence's first draft pass holds in the steady state: the target's token, and the last
# draft token when the whole window was accepted. Anything beyond is catch-up (a prompt, or tokens decoded
# without drafting), a one-off that later windows share (engine/policy.py charges it).
STEADY_DRAFT_ROWS = 2
DRAFT_ROWS = (1, STEADY_DRAFT_ROWS, 32)  # draft passes timed: a drafted token, a window's first pass, a catch-up
CALIBRATION_TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
BATCH_ROWS = (16, 32, 64)  # batched target passes measured beyond the window sizes; beyond them: extrapolated
SPEED_EMA = 0.1  # weight of a new pass in a speed factor
DRIFTED = (0.8, 1.25)  # a speed factor outside this range: measure the tables again
REFRESH_MIN_S = 30.0  # ... at most this often (it takes seconds of the models' time, which a new request waits for)


Tables = tuple[dict[int, float], dict[int, float] | None]  # the target's and the draft's (None: no draft)


@dataclass
class Speed:
    """Time a model's passes take now over the time its table says: a geometric moving average, so one
    stall of a busy machine moves it by a bounded ratio, not by the stall's length. It also takes in what
    the loop adds to a bare pass (sampling, a draft token's distribution)."""

    factor: float = 1.0
    observations: int = 0
    follows: bool = True  # False: the tables as calibrated, whatever the machine does (ablation)

    def observe(self, measured_s: float, calibrated_s: float) -> None:
        if not self.follows or measured_s <= 0 or calibrated_s <= 0:
            return
        self.observations += 1
        self.factor *= (measured_s / calibrated_s / self.factor) ** SPEED_EMA

    def drifted(self) -> bool:
        return self.observations > 0 and not DRIFTED[0] <= self.factor <= DRIFTED[1]

    def recalibrated(self) -> None:
        self.factor, self.observations = 1.0, 0


@dataclass
class PassCost:
    """One model's pass costs: `table[rows]` seconds as calibrated, times `speed` now."""

    table: dict[int, float]
    batches_sequences: bool
    speed: Speed = field(default_factory=Speed)

    def calibrated(self, rows: list[int]) -> float:
        """Seconds of one pass appending `rows[i]` tokens to sequence i, as calibrated."""
        rows = [r for r in rows if r > 0]
        if not rows:
            return 0.0
        if self.batches_sequences:
            return interpolate(self.table, sum(rows))
        return sum(interpolate(self.table, r) for r in rows)

    def seconds(self, rows: list[int]) -> float:
        return self.speed.factor * self.calibrated(rows)

    def observe(self, rows: list[int], measured_s: float) -> None:
        self.speed.observe(measured_s, self.calibrated(rows))


def drafting_seconds(*, first_pass_s: float, one_row_s: float, k: int) -> float:
    """A window of k drafts: a first pass (the pending token, and the one before it after a full accept),
    then one pass of one row per further token."""
    return 0.0 if k <= 0 else first_pass_s + (k - 1) * one_row_s


@dataclass
class CostModel:
    """The target's and the draft's pass costs (no draft model: `draft` is None, drafting is free), and how
    to measure them again (None: never, e.g. a remote target whose verifier measured its own)."""

    target: PassCost
    draft: PassCost | None = None
    # measure the tables again, or None if `wanted()` says the models are wanted before it is done
    remeasure: Callable[[Callable[[], bool]], Tables | None] | None = None
    refreshes: int = 0  # times `refresh` measured the tables again
    _measured_at: float = field(default_factory=time.monotonic)

    def verify(self, rows: list[int]) -> float:
        """Seconds of a target pass appending `rows[i]` tokens to sequence i."""
        return self.target.seconds(rows)

    def drafting(self, first_rows: list[int], k: int) -> float:
        """Seconds to draft k tokens for each sequence whose first draft pass evaluates `first_rows[i]`
        tokens (the steady 1-2, see STEADY_DRAFT_ROWS): that pass, then k - 1 passes of one row each."""
        if self.draft is None or not first_rows:
            return 0.0
        return drafting_seconds(
            first_pass_s=self.draft.seconds(first_rows), one_row_s=self.draft.seconds([1] * len(first_rows)), k=k
        )

    def catch_up(self, tokens: float) -> float:
        """Seconds for the draft to evaluate `tokens` it has not seen, beyond a steady first pass."""
        if self.draft is None or tokens <= 0:
            return 0.0
        steady = self.draft.seconds([STEADY_DRAFT_ROWS])
        return max(self.draft.speed.factor * interpolate(self.draft.table, STEADY_DRAFT_ROWS + tokens) - steady, 0.0)

    def refresh(self, wanted: Callable[[], bool] = lambda: False) -> bool:
        """Measure the tables again if a speed factor has drifted (`DRIFTED`), at most every REFRESH_MIN_S.
        Call it between requests, while no step runs: it takes the models for seconds, so it gives them up
        between two passes as soon as `wanted()` (a request came), and is tried again at the next call."""
        drafted = self.draft is not None and self.draft.speed.drifted()
        if self.remeasure is None or time.monotonic() - self._measured_at < REFRESH_MIN_S:
            return False
        if not self.target.speed.drifted() and not drafted:
            return False
        if (tables := self.remeasure(wanted)) is None:
            return False
        target, draft = tables
        self.target.table = target
        self.target.speed.recalibrated()
        if self.draft is not None and draft is not None:
            self.draft.table = draft
            self.draft.speed.recalibrated()
        self._measured_at = time.monotonic()
        self.refreshes += 1
        return True


def measure_rows(
    sequence: Sequence,
    context: list[int],
    rows: tuple[int, ...],
    repeats: int = 3,
    wanted: Callable[[], bool] = lambda: False,
) -> dict[int, float] | None:
    """Seconds to append each number of rows to a warm sequence (emptied before and after, keeping what it
    holds: a llama.cpp context): the fastest of the repeats, since a shared machine's noise only ever adds
    time. Each repeat runs every size in turn, so a change of the machine's speed while measuring touches all
    sizes alike. None if `wanted()` before a pass: the models are needed for something else."""
    sequence.truncate(0)
    sequence.eval(context, all_logits=False)
    base = sequence.n_past
    result = dict.fromkeys(rows, float("inf"))
    for _ in range(repeats):
        for size in rows:
            if wanted():
                sequence.truncate(0)
                return None
            start = time.perf_counter()
            sequence.eval((context * size)[:size])
            result[size] = min(result[size], time.perf_counter() - start)
            sequence.truncate(base)
    sequence.truncate(0)
    return result


def calibrate(target: Model, draft: Model | None, context: list[int], k_max: int, refresh: bool = True) -> CostModel:
    """Measure the tables: every window size up to k_max + 1 and bigger batched passes on the target; a
    drafted token, a window's first pass, batched draft steps and a catch-up on the draft."""
    target_rows = tuple(range(1, k_max + 2)) + (BATCH_ROWS if target.batches_sequences else ())
    draft_rows = ()
    if draft is not None:
        draft_rows = (1, 2, 4, 8, 16, 32) if draft.batches_sequences else DRAFT_ROWS

    # The sequences measured on stay with the cost model: measuring again (a refresh, while requests run)
    # must not need another KV cache, which for llama.cpp is another context, ~100 MB held from then on.
    target_seq, draft_seq = target.new_sequence(), draft.new_sequence() if draft is not None else None

    def measure(repeats: int, wanted: Callable[[], bool] = lambda: False) -> Tables | None:
        target_table = measure_rows(target_seq, context, target_rows, repeats, wanted)
        if draft_seq is None or target_table is None:
            return (target_table, None) if target_table is not None else None
        draft_table = measure_rows(draft_seq, context, draft_rows, repeats, wanted)
        return (target_table, draft_table) if draft_table is not None else None

    target_table, draft_table = measure(repeats=3)
    return CostModel(
        PassCost(target_table, target.batches_sequences),
        PassCost(draft_table, draft.batches_sequences) if draft is not None else None,
        remeasure=(lambda wanted: measure(repeats=2, wanted=wanted)) if refresh else None,
    )


def interpolate(table: dict[int, float], x: float) -> float:
    """The measured cost at x, piecewise linear between measured points and linear beyond the largest. Not
    made monotone: a kernel that takes rows in groups can make a bigger window cheaper than a smaller one
    (llama.cpp's Q4_0 GEMM: 4 rows cost less than 3). But never below the smallest size's cost: a window
    holds that pass and more, so below it is noise (which would make drafting with no acceptance look free)."""
    xs = sorted(table)
    i = bisect.bisect_right(xs, x)  # xs[:i] <= x < xs[i:]
    if i == 0:
        return table[xs[0]]
    lower = xs[i - 1]
    if i == len(xs):  # at or beyond the measurements: keep the last segment's cost per row
        if len(xs) == 1:
            return table[lower] * x / lower
        slope = max(0.0, (table[lower] - table[xs[-2]]) / (lower - xs[-2]))
        return max(table[lower] + slope * (x - lower), table[xs[0]])
    upper = xs[i]
    return max(table[lower] + (x - lower) / (upper - lower) * (table[upper] - table[lower]), table[xs[0]])
