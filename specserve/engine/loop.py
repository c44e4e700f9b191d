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
from specserve.engine.adaptive import AdaptiveK
from specserve.engine.proposers import DraftModelProposer, DraftRequest, Proposal, Proposer, propose_batch
from specserve.engine.sampling import SamplingParams
from specserve.engine.stats import GenerationStats
from specserve.engine.stops import TextStream
from specserve.engine.target import LocalTarget, TargetSession, Window, run_windows
from specserve.engine.verify import Verdict

# Prompt tokens per prefill pass: a fixed size (not one that depends on who else is running) keeps a
# request's numerics the same alone or batched, and bounds how long a new prompt stalls other streams.
PREFILL_CHUNK = 256
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
    requests = [g.draft_request() for g in generations]
    try:
        proposals = propose_batch(requests)
    except Exception:  # the draft side failed: carry on without it; the target alone gives the same output
        log.exception("drafting failed; %d requests continue with target-only decoding (k=0)", len(generations))
        proposals = [g.without_draft_model() for g in generations]
    t1 = time.perf_counter()
    windows = [g.open_window(p) for g, p in zip(generations, proposals, strict=True)]
    verdicts = run_windows([g.target for g in generations], windows)
    t2 = time.perf_counter()
    events = [g.close_window(v, t1 - t0, t2 - t1) for g, v in zip(generations, verdicts, strict=True)]
    return Step(events, (t0, t1, t2, time.perf_counter()))


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
    ):
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
        self._prefilled = 0  # prompt tokens in the target's KV cache
        self._proposal = Proposal([], [])

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

    def draft_request(self) -> DraftRequest:
        """Phase 1: what to draft now. k is 0 while prefilling, for plain decoding, and when adaptive k
        finds drafting not worth its cost."""
        if self._start is None:
            self._start = time.perf_counter()
            self.target.reset()
            if self.proposer is not None:
                self.proposer.reset()
        if self._prefilled < len(self.prompt):
            return DraftRequest(None, self.context, 0, self.params, self._rng)
        base = self.target.n_past  # == len(context) - 1: the pending token is not in the cache yet
        room = self.target.n_ctx - base - 1  # window slots left after the pending token
        limit = max(0, min(self.k, room, self.params.max_tokens - len(self.tokens) - 1))
        if self.proposer is None:
            k = 0
        else:
            k = self.adaptive.choose(limit) if self.adaptive else limit
        self.stats.chosen_k.append(k)
        return DraftRequest(self.proposer, self.context, k, self.params, self._rng)

    def open_window(self, proposal: Proposal) -> Window:
        """Phase 2: what the target pass appends and verifies for this generation."""
        if self._prefilled < len(self.prompt):
            chunk = self.prompt[self._prefilled : self._prefilled + PREFILL_CHUNK]
            last = self._prefilled + len(chunk) == len(self.prompt)
            return Window(chunk, [], [], last, self.params, self._rng)
        self._proposal = proposal
        return Window([self.context[-1]], proposal.tokens, proposal.probs, True, self.params, self._rng)

    def close_window(self, verdict: Verdict | None, draft_s: float, verify_s: float) -> list[Emitted]:
        """Phase 3: take the target's verdict on the window, emit."""
        stats = self.stats
        if self._prefilled < len(self.prompt):
            self._prefilled += min(PREFILL_CHUNK, len(self.prompt) - self._prefilled)
            if verdict is None:
                return []
            stats.prefill_s = time.perf_counter() - self._start
            return self._accept([], verdict.next_token)

        drafted = self._proposal.tokens
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        if self.adaptive:
            self.adaptive.observe(len(drafted), verdict.accepted, draft_s, verify_s)
        stats.record_window(len(drafted), verdict.accepted)
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
