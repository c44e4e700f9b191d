"""The speculative decoding loop, top to bottom.

    prefill the prompt on the target (in chunks) -> first token
    repeat:
        proposer drafts k tokens (with the distributions it drew them from)
        target evaluates [pending token, d1..dk] in ONE pass -> k+1 rows of logits
        verify: accept a prefix of the drafts, plus one correction/bonus token from the target
        roll the target's KV back to the accepted length (the proposer re-syncs itself by prefix)
        emit the tokens, checking EOS / stop strings / max_tokens / context length

The target pass, verification and rollback are one call to the generation's `TargetSession`
(engine/target.py): in this process, or on a remote verifier service (specserve/cluster).

`step(generations)` runs one such iteration for several requests at once: their draft steps run in
lockstep batches and their windows share one target pass (backends are batch-invariant, so each request
gets exactly what it would get alone). Iterating a single `Generation` is `step([self])` until done.

With k = 0 (or no proposer) each step is exactly plain decoding: one token per target pass. k is fixed, or
chosen per step by `AdaptiveK` from measured acceptance and costs (engine/adaptive.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from specserve.backends.base import Backend, ContextOverflowError
from specserve.engine.adaptive import STEADY_SYNC_ROWS, AdaptiveK, BatchCosts, plan_batch
from specserve.engine.proposers import (
    DraftModelProposer,
    DraftRequest,
    NgramProposer,
    Proposal,
    Proposer,
    propose_batch,
)
from specserve.engine.sampling import SamplingParams
from specserve.engine.stats import GenerationStats
from specserve.engine.stops import TextStream
from specserve.engine.target import LocalTarget, TargetSession, Window, run_windows
from specserve.engine.verify import ToleranceController, Verdict

# Prompt tokens per prefill pass: a fixed size (not one that depends on who else is running) keeps a
# request's numerics the same alone or batched, and bounds how long a new prompt stalls other streams.
PREFILL_CHUNK = 128
log = logging.getLogger("specserve.loop")


@dataclass(frozen=True)
class Emitted:
    token: int | None  # None: only releases text held back until the end
    text: str  # text released with this token (held-back text comes out with later tokens)
    from_draft: bool  # accepted draft token (True) or produced by the target itself (False)


@dataclass(frozen=True)
class Step:
    events: list[list[Emitted]]  # per generation, in order
    times: tuple[float, float, float, float]  # perf_counter at start, drafted, verified, accepted


def step(generations: list[Generation]) -> Step:
    """One iteration for each (unfinished) generation: draft, one shared target pass, verify, emit."""
    t0 = time.perf_counter()
    costs = generations[0].batch_costs if len(generations) > 1 else None
    planned, probe = _plan(generations, costs) if costs is not None else ([None] * len(generations), True)
    requests = [g.draft_request(k, probe) for g, k in zip(generations, planned, strict=True)]
    try:
        proposals = propose_batch(requests)
    except Exception:  # the draft side failed: carry on without it; the target alone gives the same output
        log.exception("drafting failed; %d requests continue with target-only decoding (k=0)", len(generations))
        proposals = [g.without_draft_model() for g in generations]
    t1 = time.perf_counter()
    windows = [g.open_window(p) for g, p in zip(generations, proposals, strict=True)]
    verdicts = run_windows([g.target for g in generations], windows)
    t2 = time.perf_counter()
    if costs is not None:  # what this batch shape really cost, for the next plans
        costs.observe(sum(len(w.append) + len(w.drafts) for w in windows), t2 - t1)
    batched = len(generations) > 1
    events = [g.close_window(v, t1 - t0, t2 - t1, batched) for g, v in zip(generations, verdicts, strict=True)]
    return Step(events, (t0, t1, t2, time.perf_counter()))


def _model_drafted(proposer: Proposer | None) -> bool:
    return proposer is not None and not isinstance(proposer, NgramProposer)


def _plan(generations: list[Generation], costs: BatchCosts) -> tuple[list[int | None], bool]:
    """Draft lengths for the adaptive generations of a batch (`plan_batch`); None for the others, which
    choose their own (prefill chunks and fixed k count as rows of the shared pass). Second: whether a
    sequence at k = 0 should still probe its acceptance now and then; not when the batch would not draft
    even if every draft were accepted (then a probe only costs everyone a draft pass)."""
    planned: list[int | None] = [None] * len(generations)
    members = [i for i, g in enumerate(generations) if g.adaptive is not None and not g.prefilling]
    fixed_rows = 0
    for g in generations:
        if g.prefilling:
            fixed_rows += min(PREFILL_CHUNK, len(g.prompt) - g.prefilled)
        elif g.adaptive is None:
            fixed_rows += 1 + (g.draft_limit() if g.proposer is not None else 0)
    if not members:
        return planned, True
    sequences = [generations[i] for i in members]
    limits = [g.draft_limit() for g in sequences]
    model_drafted = [_model_drafted(g.proposer) for g in sequences]
    acceptance = [g.adaptive.acceptance for g in sequences]
    sync = [g.sync_rows() for g in sequences]
    remaining = [g.remaining for g in sequences]
    plan = plan_batch(acceptance, limits, model_drafted, costs, fixed_rows, sync, remaining)
    if any(plan):  # as for one sequence (`AdaptiveK.choose`): drafting must pay at a cautious acceptance too
        cautious = [g.adaptive.cautious_acceptance() for g in sequences]
        if not any(plan_batch(cautious, limits, model_drafted, costs, fixed_rows, sync, remaining)):
            plan = [0] * len(plan)
    for i, k in zip(members, plan, strict=True):
        planned[i] = k
    if any(plan) or not any(g.adaptive.probe_due(g.remaining, rows) for g, rows in zip(sequences, sync, strict=True)):
        return planned, True
    sure = plan_batch([0.99] * len(members), limits, model_drafted, costs, fixed_rows, sync, remaining)
    return planned, any(sure)


class Generation:
    """One request on its own target sequence. Iterate it (or pass it to `step` with others) to run the
    loop; `stats`, `finish_reason` and `text` follow its progress."""

    def __init__(
        self,
        target: TargetSession | Backend,
        token_bytes: Callable[[list[int]], bytes],
        stop_ids: frozenset[int],
        prompt: list[int],
        params: SamplingParams,
        proposer: Proposer | None,
        k: int | AdaptiveK,
        cached_prefix: int = 0,
        tolerance: float | ToleranceController | None = None,
        batch_costs: BatchCosts | None = None,
    ):
        """`cached_prefix`: this many prompt tokens are already in the target's cache (prefix reuse);
        otherwise the target session is reset first. Proposers sync themselves to the context.
        `tolerance`: lossy opt-in verification with a fixed delta, or one a controller calibrates online.
        `batch_costs`: the model pair's cost of batched passes, shared by the generations of one runtime;
        with it, `step` plans draft lengths for a whole batch (`plan_batch`)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= target.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the context holds {target.n_ctx} including the reply"
            )
        self.target = target if hasattr(target, "run_many") else LocalTarget(target)
        self.prompt, self.params = prompt, params
        self.adaptive = k if isinstance(k, AdaptiveK) else None
        self.k = k.k_max if isinstance(k, AdaptiveK) else k  # the most drafts a window may hold
        self.proposer = proposer if self.k > 0 else None
        self.stop_ids = stop_ids
        self.tokens: list[int] = []  # emitted tokens
        self.context = list(prompt)  # prompt + emitted tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        self._text = TextStream(token_bytes, params.stop)
        self._rng = np.random.default_rng(params.seed)
        self._start: float | None = None
        self._prefilled = cached_prefix  # prompt tokens in the target's KV cache
        self.stats.prefix_reused = cached_prefix
        self._proposal = Proposal([], [])
        self._backlog = 0  # catch-up tokens the draft evaluates before this window's drafts
        self.tolerance = tolerance
        self.batch_costs = batch_costs

    @property
    def text(self) -> str:
        return self._text.released_text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Emitted]:
        while not self.done:
            yield from step([self]).events[0]

    # --- one step, in three phases (see `step`) ---

    @property
    def prefilling(self) -> bool:
        return self._prefilled < len(self.prompt)

    @property
    def prefilled(self) -> int:
        return self._prefilled

    @property
    def remaining(self) -> int:
        """Tokens the reply may still produce (max_tokens allowing)."""
        return self.params.max_tokens - len(self.tokens)

    def sync_rows(self) -> int:
        """Tokens the draft must evaluate before it drafts again (`Proposer.sync_rows`), the prompt too
        when it has not drafted yet: adaptive k charges them (a draft that starts and then finds nothing to
        accept has paid for the prompt for nothing: 4 ms a token of a 64-token reply on random words)."""
        return self.proposer.sync_rows(self.context) if self.proposer is not None else 0

    def draft_limit(self) -> int:
        """The most drafts the next window may hold: k (or k_max), the context and max_tokens allowing."""
        room = self.target.n_ctx - self.target.n_past - 1  # window slots left after the pending token
        return max(0, min(self.k, room, self.remaining - 1))

    def draft_request(self, planned_k: int | None = None, probe: bool = True) -> DraftRequest:
        """Phase 1: what to draft now. k is 0 while prefilling, for plain decoding, and when adaptive k
        finds drafting not worth its cost; `planned_k` is the batch plan's choice for an adaptive one, and
        `probe` False keeps it at 0 even when acceptance is due for a re-measurement."""
        if self._start is None:
            self._start = time.perf_counter()
            if self._prefilled == 0:
                self.target.reset()
        if self._prefilled < len(self.prompt):
            return DraftRequest(None, self.context, 0, self.params, self._rng)
        limit = self.draft_limit()
        sync = self.sync_rows()
        if self.proposer is None:
            k = 0
        elif self.adaptive is None:
            k = limit
        elif planned_k is None:
            k = self.adaptive.choose(limit, sync, self.remaining)
        else:
            k = self.adaptive.probe(planned_k, self.remaining, sync) if limit and probe else min(planned_k, limit)
        self.stats.chosen_k.append(k)
        # all of the catch-up, prompt included, is draft time that is not drafting
        self._backlog = max(sync - STEADY_SYNC_ROWS, 0) if k else 0
        # Tolerance needs the draft's probability of each token even when drafting greedily.
        min_confidence = self.adaptive.min_confidence() if self.adaptive else 0.0
        return DraftRequest(
            self.proposer, self.context, k, self.params, self._rng, self.tolerance is not None, min_confidence
        )

    def open_window(self, proposal: Proposal) -> Window:
        """Phase 2: what the target pass appends and verifies for this generation."""
        adaptive = self.adaptive is not None  # only adaptive k reads the target's confidence
        if self._prefilled < len(self.prompt):
            chunk = self.prompt[self._prefilled : self._prefilled + PREFILL_CHUNK]
            last = self._prefilled + len(chunk) == len(self.prompt)
            return Window(chunk, [], [], last, self.params, self._rng, with_confidence=adaptive)
        self._proposal = proposal
        delta = self.tolerance.delta if isinstance(self.tolerance, ToleranceController) else self.tolerance
        drafts, probs = proposal.tokens, proposal.probs
        return Window([self.context[-1]], drafts, probs, True, self.params, self._rng, delta, adaptive)

    def close_window(self, verdict: Verdict | None, draft_s: float, verify_s: float, batched: bool) -> list[Emitted]:
        """Phase 3: take the target's verdict on the window, emit. Times are the step's; in a batch they are
        not this window's own cost, so adaptive k learns only acceptance from it."""
        stats = self.stats
        if self._prefilled < len(self.prompt):
            self._prefilled += min(PREFILL_CHUNK, len(self.prompt) - self._prefilled)
            if verdict is None:
                return []
            stats.prefill_s = time.perf_counter() - self._start
            if self.adaptive:
                self.adaptive.observe_target_confidence(verdict.confidence)
            return self._accept([], verdict.next_token)

        drafted = self._proposal.tokens
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        if self.adaptive:
            self.adaptive.observe_target_confidence(verdict.confidence)
            self.adaptive.observe_confidence(self._proposal.confidence, verdict.accepted)
            own = not batched
            self.adaptive.observe(
                len(drafted),
                verdict.accepted,
                draft_s if own else None,
                verify_s if own else None,
                verdict.expected_accepted,
                self._backlog,
            )
        stats.record_window(len(drafted), verdict.accepted)
        if isinstance(self.tolerance, ToleranceController):
            self.tolerance.observe(len(drafted), verdict.accepted)
        return self._accept(drafted[: verdict.accepted], verdict.next_token)

    def without_draft_model(self) -> Proposal:
        """After a draft failure: no drafts in this step, and no draft model from now on (k = 0)."""
        if self._prefilled >= len(self.prompt) and self.stats.chosen_k:
            self.stats.chosen_k[-1] = 0  # this step drafts nothing after all
        if isinstance(self.proposer, DraftModelProposer) or getattr(self.proposer, "name", "") == "draft":
            self.proposer = None
        return Proposal([], [])

    # --- emitting ---

    def _accept(self, accepted_drafts: list[int], next_token: int) -> list[Emitted]:
        """Emit accepted drafts and the target's token, up to the first stop condition."""
        out: list[Emitted] = []
        for i, token in enumerate([*accepted_drafts, next_token]):
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            self.stats.generated += 1
            self.stats.token_times.append(time.perf_counter() - self._start)
            out.append(Emitted(token, self._text.push(token), from_draft=i < len(accepted_drafts)))
            if self._text.stopped:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                break
        self.context.extend([*accepted_drafts, next_token])
        if self.finish_reason is None and self.target.n_past >= self.target.n_ctx:
            self.finish_reason = "length"  # no room for the pending token
        if self.finish_reason is not None:
            self.stats.total_s = time.perf_counter() - self._start
            if tail := self._text.finish():
                out.append(Emitted(None, tail, False))  # text held back for a possible stop string
        return out
