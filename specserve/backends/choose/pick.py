"""The pick among measured backends (`pick_target`, `pick_draft`): the policy of `auto`, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from specserve.engine.costs import STEADY_DRAFT_ROWS, drafting_seconds
from specserve.engine.policy import expected_tokens

# Acceptance rates the target is judged at (plain decoding, prose-like and code-like text): a target is
# picked for the mean time per token over these, so neither plain decoding nor drafting alone decides.
REFERENCE_ACCEPTANCE = (0.0, 0.6, 0.85)
# A target may be slower on plain decoding than llama.cpp on the model's own file by at most this much;
# and a requantized file (a different model: the bench's fidelity table) is picked over the model's own
# weights only where it is faster than that by more than this much.
PLAIN_TOLERANCE = 1.05
# The cached table is taken to be measured on a busy machine when a one-row pass runs this much faster now.
# Both take the fastest of several passes, which a busy spell slows but a quiet one does not speed up; only
# a faster machine now says the table is off (a slower one says that now is busy, not a time to measure).
BUSY_WHEN_MEASURED = 1.3


@dataclass
class Measured:
    """One backend on one model file, as measured in its own process."""

    backend: str
    model: str  # the file it ran
    seconds: dict[int, float] = field(default_factory=dict)  # rows appended -> seconds (fastest of 2 rounds of 3)
    exact: list[int] = field(default_factory=list)  # window sizes bitwise equal to one-token steps
    memory: int = 0
    converted_to: str | None = None  # the model's `converted_to`: what the backend made of the file's weights
    error: str | None = None  # why it cannot be used here

    @property
    def label(self) -> str:
        return f"{self.backend} {Path(self.model).name}"

    @property
    def weights(self) -> str:
        from specserve.models.quantize import weights_in_words

        return weights_in_words(Path(self.model), self.converted_to)

    @property
    def usable(self) -> bool:
        return self.error is None and bool(self.seconds)

    def exact_windows(self) -> int:
        return exact_prefix(self.exact)


def exact_prefix(sizes: list[int]) -> int:
    """The largest n such that windows of 1..n rows are all exact."""
    n = 0
    while n + 1 in sizes:
        n += 1
    return n


@dataclass
class Choice:
    target: Measured | None
    draft: Measured | None
    reason: str
    targets: list[Measured]
    drafts: list[Measured]
    scores: dict[str, float]  # target label -> mean ms per token over REFERENCE_ACCEPTANCE
    cached: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def draft_window_seconds(draft: Measured, k: int) -> float:
    """A window of k drafts as the cost model prices it (a first pass of 2 rows, then one row a token)."""
    return drafting_seconds(first_pass_s=draft.seconds[STEADY_DRAFT_ROWS], one_row_s=draft.seconds[1], k=k)


def mean_ms_per_token(target: Measured, k_max: int) -> float:
    """Mean over REFERENCE_ACCEPTANCE of the target's best time per token, over exact windows up to k_max
    drafts. Drafting's cost is the drafter's and is left out: model-free drafters cost nothing, a front-end's
    draft runs on another machine, and a verifier, which knows no drafter, must pick the target a local
    server on the same machine picks (the same greedy output either way)."""
    limit = min(k_max, target.exact_windows() - 1, max(target.seconds) - 1)
    times = []
    for a in REFERENCE_ACCEPTANCE:
        best = target.seconds[1]
        for k in range(1, limit + 1):
            best = min(best, target.seconds[k + 1] / expected_tokens(a, k))
        times.append(best)
    return 1000 * sum(times) / len(times)


def measured_while_busy(choice: Choice, one_row_s: float) -> bool:
    """Whether `choice` came from the cache and its target's one-row pass, which takes `one_row_s` now,
    was measured BUSY_WHEN_MEASURED times slower or more."""
    target = choice.target
    return choice.cached and target is not None and target.seconds[1] > BUSY_WHEN_MEASURED * one_row_s


def pick_draft(drafts: list[Measured]) -> tuple[Measured | None, str]:
    """The draft that drafts a window of 4 fastest (a first pass of 2 rows and three of 1)."""
    usable = [d for d in drafts if d.usable]
    if not usable:
        return None, "no draft backend runs here"
    best = min(usable, key=lambda d: draft_window_seconds(d, 4))
    return best, f"{best.label}: a window of 4 drafts in {1000 * draft_window_seconds(best, 4):.0f} ms"


def pick_target(
    targets: list[Measured], k_max: int, reference: Measured | None
) -> tuple[Measured | None, str, dict[str, float]]:
    """The target with the least mean time per token over REFERENCE_ACCEPTANCE (`mean_ms_per_token`: exact
    window sizes only), among those at most PLAIN_TOLERANCE slower on plain decoding than `reference`
    (llama.cpp on the model's own file: what a user would run instead); one on the model's own file rather
    than a requantization unless that is more than PLAIN_TOLERANCE faster."""
    usable = [t for t in targets if t.usable]
    scores = {t.label: round(mean_ms_per_token(t, k_max), 2) for t in usable}
    if not usable:
        return None, "no target backend runs here", scores
    fast_enough = usable
    if reference is not None and reference.usable:
        fast_enough = [t for t in usable if t.seconds[1] <= PLAIN_TOLERANCE * reference.seconds[1]] or usable
    best = min(fast_enough, key=lambda t: scores[t.label])
    own = [t for t in fast_enough if reference is not None and t.model == reference.model]
    if own and best not in own:
        best_own = min(own, key=lambda t: scores[t.label])
        if scores[best_own.label] <= PLAIN_TOLERANCE * scores[best.label]:
            best = best_own
    reason = (
        f"{best.label}: {scores[best.label]:.1f} ms/token on average at acceptance "
        f"{', '.join(f'{a:g}' for a in REFERENCE_ACCEPTANCE)}; plain decoding {1000 * best.seconds[1]:.1f} ms/token"
    )
    if reference is not None and reference.usable and best is not reference:
        reason += f" (llama.cpp on the model's file: {1000 * reference.seconds[1]:.1f})"
    return best, reason, scores
