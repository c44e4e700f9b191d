"""How many tokens to draft in each window: a fixed k, or the k that maximises expected tokens per second.

With acceptance a per draft position, a window of k drafts yields E(k) = (1 - a^(k+1)) / (1 - a) tokens
(the accepted drafts and the target's own token) and costs, in seconds (engine/costs.py),

    T(k) = verify(rows) + drafting(k) + catch-up share + network round trip

k = 0 is plain decoding (E = 1, T = verify(1 row)), so taking the best k never does worse than plain
decoding by the model's own measurements. A batch is planned as a whole: plain decoding of n sequences costs
one pass of n rows, and drafting k tokens for m of them adds k draft steps and k rows each to that pass; the
bigger the batch, the less speculation pays, and the plan can be all zeros. One request is a batch of one.

Refinements, each of which `specserve bench --ablate NAME` switches off to measure what it is worth:
- shared-prior: a request starts from the runtime's recent acceptance for its method (engine/acceptance.py),
  not from a fixed prior;
- confidence: ... and from what was measured on text the target is about as sure of;
- catch-up: a draft that has not seen the prompt (or tokens decoded at k = 0) first evaluates them, a
  one-off that later windows share: a window is charged its part of it over the tokens the reply may still
  produce, so starting to draft late in a long reply pays and in its last tokens does not;
- probes: after a stretch at k = 0, one 1-token window re-measures acceptance, less often after each probe
  that did not bring drafting back, and only when its catch-up costs at most PROBE_BUDGET of the reply's
  remaining plain-decoding time;
- draft-p-min: the draft stops a window at a token it is unsure of, where the acceptance measured for its
  confidence does not pay for another draft pass (llama.cpp's --draft-p-min, learned);
- row-cost: every row a window adds to the pass costs at least ROW_COST of a one-row pass. A row's true
  cost is a few percent of a pass, and a table measured on a shared machine varies by as much: one where a
  2-row window came out no dearer than one row would have a free drafter draft every window at any
  acceptance above zero (a measured failure). The floor corrects only such tables; a plan-wide margin
  over plain decoding did the same but kept moderate-acceptance requests at k = 0 too (ablation in
  docs/benchmarks/2026-12-03-intel-amx-ablation.md);
- speed: the cost tables follow the machine's speed (engine/costs.py), and cost-refresh: they are measured
  again when it drifts far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from specserve.config import ABLATIONS
from specserve.engine.acceptance import Acceptance, DraftConfidence, SharedAcceptance
from specserve.engine.costs import STEADY_DRAFT_ROWS, CostModel

FEATURES = ABLATIONS  # the refinements above, by the names `--ablate` takes
PROBE_EVERY = 16  # steps at k = 0 before a probe ...
PROBE_EVERY_MAX = 64  # ... doubling after each probe that did not bring drafting back, up to this
PROBE_BUDGET = 0.03  # the most of the reply's remaining plain-decoding time a probe's catch-up may cost
ROW_COST = 0.03  # the least a window's extra row costs, as a share of a one-row pass (the tables' resolution)
SURE = 0.99  # acceptance at which a probe is pointless if even it would not make the batch draft


@dataclass
class RequestState:
    """What an adaptive policy keeps for one request."""

    acceptance: Acceptance
    draft_confidence: DraftConfidence = field(default_factory=DraftConfidence)
    steps_at_zero: int = 0
    probe_every: int = PROBE_EVERY


@dataclass(frozen=True, kw_only=True)
class WindowRecord:
    """One request's window in a step: what the policy plans it from, then (`dataclasses.replace`d after the
    target pass) what the pass did with it, for the policy to learn from."""

    state: RequestState | None  # what the policy keeps for the request (None: the policy keeps nothing)
    limit: int = 0  # the most drafts the window may hold (k_max, the context and max_tokens allowing)
    uses_model: bool = False  # whether its drafts cost draft-model passes
    sync_rows: int = 0  # tokens its draft evaluates first (`Proposer.sync_rows`); beyond the steady 1-2: catch-up
    remaining: int = 0  # tokens the reply may still produce
    round_trip_s: float = 0.0  # network time of a remote target's window
    # after the pass
    rows: int = 0  # tokens the target pass appended for it
    drafted: int = 0
    accepted: int = 0
    expected_accepted: float | None = None  # `Verdict.expected_accepted`
    draft_confidence: tuple[float, ...] = ()  # the draft's probability of each drafted token
    target_confidence: float | None = None  # `Verdict.confidence`


class DraftLengthPolicy(Protocol):
    k_max: int  # the most drafts a window may hold

    def start(self, method: str, greedy: bool) -> RequestState | None:
        """State for a new request drafting with `method`."""
        ...

    def plan(self, slots: list[WindowRecord], other_rows: int) -> list[int]:
        """Draft lengths for windows that share one target pass with `other_rows` rows planned elsewhere."""
        ...

    def min_confidence(self, slot: WindowRecord) -> float:
        """The draft probability below which the window's drafting stops."""
        ...

    def observe(self, results: list[WindowRecord], draft_s: float, verify_s: float) -> None:
        """A finished step: every window of its target pass, and how long drafting and the pass took."""
        ...


class FixedK:
    """Always the most drafts the window may hold: k, the context and max_tokens allowing."""

    def __init__(self, k: int):
        self.k_max = k

    def start(self, method: str, greedy: bool) -> RequestState | None:
        return None

    def plan(self, slots: list[WindowRecord], other_rows: int) -> list[int]:
        return [slot.limit for slot in slots]

    def min_confidence(self, slot: WindowRecord) -> float:
        return 0.0

    def observe(self, results: list[WindowRecord], draft_s: float, verify_s: float) -> None:
        pass


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a window of k drafts yields: accepted drafts plus the target's own token."""
    a = min(acceptance, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


class AdaptiveK:
    """k per window from measured acceptance and measured costs; one per runtime, shared by its requests."""

    def __init__(self, costs: CostModel, k_max: int, ablate: frozenset[str] = frozenset()):
        unknown = ablate - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown adaptive-k features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        self.costs, self.k_max, self.on = costs, k_max, set(FEATURES) - ablate
        for cost in (costs.target, costs.draft):
            if cost is not None:
                cost.speed.follows = "speed" in self.on
        if "cost-refresh" not in self.on:
            costs.remeasure = None
        self._shared: dict[str, SharedAcceptance] = {}

    def start(self, method: str, greedy: bool) -> RequestState:
        shared = self.shared_acceptance(method) if "shared-prior" in self.on else None
        return RequestState(Acceptance(shared, greedy))

    def shared_acceptance(self, method: str) -> SharedAcceptance:
        """The recent acceptance of this runtime's requests of one method."""
        return self._shared.setdefault(method, SharedAcceptance("confidence" in self.on))

    # --- planning ---

    def plan(self, slots: list[WindowRecord], other_rows: int) -> list[int]:
        if not self.costs.target.batches_sequences:  # passes cost the sum of their sequences': each alone
            return [self._plan_together([slot], 0)[0] for slot in slots]
        return self._plan_together(slots, other_rows)

    def _plan_together(self, slots: list[WindowRecord], other_rows: int) -> list[int]:
        plan, _ = self._best(slots, [self._acceptance(s) for s in slots], other_rows)
        if "probes" in self.on:
            could_pay: bool | None = None  # whether any drafting could pay here, worked out when needed
            for i, slot in enumerate(slots):
                probed = False
                if plan[i] == 0 and self._probe_due(slot):
                    if could_pay is None:
                        could_pay = any(self._best(slots, [SURE] * len(slots), other_rows)[0])
                    probed = could_pay
                    plan[i] = int(probed)
                self._count_probe(slot.state, plan[i], probed)
        return plan

    @staticmethod
    def _acceptance(slot: WindowRecord) -> float:
        return slot.state.acceptance.value

    def _best(self, slots: list[WindowRecord], acceptance: list[float], other_rows: int) -> tuple[list[int], float]:
        """The plan with the most expected tokens per second, and that rate. Candidates: a common k for the m
        sequences most likely to accept (capped per sequence at its limit)."""
        costs, n = self.costs, len(slots)
        order = sorted(range(n), key=lambda i: -acceptance[i])
        spent = costs.verify([other_rows])  # the rows planned elsewhere: their time is spent anyway
        round_trip = max((s.round_trip_s for s in slots), default=0.0)

        plain = max(costs.verify([other_rows + n]) - spent, 1e-4)  # what the pass costs beyond them
        row_cost = ROW_COST * costs.verify([1]) if "row-cost" in self.on else 0.0

        def added(rows: int) -> float:  # ... with `rows - n` drafts among its rows, each costing at least row_cost
            return max(costs.verify([other_rows + rows]) - spent, plain + (rows - n) * row_cost) + round_trip

        plain_rate = n / added(n)
        best_rate, best_k, best_m = plain_rate, 0, 0
        for k in range(1, max((s.limit for s in slots), default=0) + 1):
            tokens, rows, first_rows, catch_up = float(n), n, [], 0.0
            for m, i in enumerate(order, start=1):
                slot = slots[i]
                ki = min(k, slot.limit)
                gain = expected_tokens(acceptance[i], ki)
                tokens, rows = tokens + gain - 1, rows + ki
                if slot.uses_model and ki > 0:
                    first_rows.append(min(slot.sync_rows, STEADY_DRAFT_ROWS))
                    if "catch-up" in self.on:
                        backlog = max(slot.sync_rows - STEADY_DRAFT_ROWS, 0)
                        catch_up += costs.catch_up(backlog) * gain / max(slot.remaining, 1)
                rate = tokens / (added(rows) + costs.drafting(first_rows, k) + catch_up)
                if rate > best_rate:
                    best_rate, best_k, best_m = rate, k, m
        chosen = set(order[:best_m])
        plan = [min(best_k, s.limit) if i in chosen else 0 for i, s in enumerate(slots)]
        return plan, best_rate if best_k else plain_rate

    def _probe_due(self, slot: WindowRecord) -> bool:
        state = slot.state
        if slot.limit <= 0 or state.steps_at_zero + 1 < state.probe_every or slot.remaining <= PROBE_EVERY:
            return False
        catch_up = self.costs.catch_up(slot.sync_rows) if slot.uses_model else 0.0
        return catch_up <= PROBE_BUDGET * slot.remaining * self.costs.verify([1])

    @staticmethod
    def _count_probe(state: RequestState, k: int, probed: bool) -> None:
        if probed:  # the next probe waits twice as long unless this one brings drafting back
            state.steps_at_zero, state.probe_every = 0, min(2 * state.probe_every, PROBE_EVERY_MAX)
        elif k > 0:
            state.steps_at_zero, state.probe_every = 0, PROBE_EVERY
        else:
            state.steps_at_zero += 1

    def min_confidence(self, slot: WindowRecord) -> float:
        """One more draft token costs a draft pass, which at the slot's best rate would buy that many
        seconds' tokens: worth it only from the confidence at which tokens are accepted that often."""
        if "draft-p-min" not in self.on or not slot.uses_model or self.costs.draft is None:
            return 0.0
        _, rate = self._best([slot], [self._acceptance(slot)], 0)
        return slot.state.draft_confidence.cutoff(self.costs.draft.seconds([1]) * rate)

    # --- learning ---

    def observe(self, results: list[WindowRecord], draft_s: float, verify_s: float) -> None:
        for r in results:
            if r.state is None:
                continue
            r.state.acceptance.observe_target_confidence(r.target_confidence)
            if r.drafted:
                r.state.acceptance.observe(r.drafted, r.accepted, r.expected_accepted)
                r.state.draft_confidence.observe(list(r.draft_confidence), r.accepted)
        round_trip = max((r.round_trip_s for r in results), default=0.0)
        self.costs.target.observe([r.rows for r in results], max(verify_s - round_trip, 0.0))
        self._observe_drafting([r for r in results if r.uses_model and r.drafted], draft_s)

    def _observe_drafting(self, drafters: list[WindowRecord], draft_s: float) -> None:
        """The draft's speed, from steps without a catch-up only: one (a prompt, hundreds of ms, its cost
        per token known only roughly) would swamp the drafting's own few ms."""
        draft = self.costs.draft
        if draft is None or not drafters or any(r.sync_rows > STEADY_DRAFT_ROWS for r in drafters):
            return
        calibrated = draft.calibrated([r.sync_rows for r in drafters])
        for position in range(2, max(r.drafted for r in drafters) + 1):
            calibrated += draft.calibrated([1] * sum(r.drafted >= position for r in drafters))
        draft.speed.observe(draft_s, calibrated)
