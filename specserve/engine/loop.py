"""The speculative decoding loop, top to bottom.

    prefill the prompt on the target (in chunks) -> first token
    repeat:
        proposer drafts k tokens (with the distributions it drew them from)
        target evaluates [pending token, d1..dk] in ONE call -> k+1 rows of logits
        verify: accept a prefix of the drafts, plus one correction/bonus token from the target
        roll the target's KV back to the accepted length (the proposer re-syncs itself by prefix)
        emit the tokens, checking EOS / stop strings / max_tokens / context length

`step(generations)` runs one such iteration for several requests at once: their draft steps run in
lockstep batches and their windows share one target pass (backends are batch-invariant, so each request
gets exactly what it would get alone). Iterating a single `Generation` is `step([self])` until done.

With k = 0 (or no proposer) each step is exactly plain decoding: one token per target pass. k is fixed, or
chosen per step by `AdaptiveK` from measured acceptance and costs (engine/adaptive.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from specserve.backends.base import Backend, ContextOverflowError
from specserve.engine.adaptive import AdaptiveK
from specserve.engine.proposers import DraftRequest, Proposal, Proposer, propose_batch
from specserve.engine.sampling import SamplingParams, probabilities, sample
from specserve.engine.stats import GenerationStats
from specserve.engine.stops import TextStream
from specserve.engine.verify import verify

# Prompt tokens per prefill pass: a fixed size (not one that depends on who else is running) keeps a
# request's numerics the same alone or batched, and bounds how long a new prompt stalls other streams.
PREFILL_CHUNK = 256


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
    drafts = [g.draft_request() for g in generations]
    proposals = propose_batch(drafts)
    t1 = time.perf_counter()
    work = [(g.target, *g.open_window(p)) for g, p in zip(generations, proposals, strict=True)]
    logits = generations[0].target.eval_batch(work)
    t2 = time.perf_counter()
    events = [g.close_window(rows, t1 - t0, t2 - t1) for g, rows in zip(generations, logits, strict=True)]
    return Step(events, (t0, t1, t2, time.perf_counter()))


class Generation:
    """One request on its own target sequence. Iterate it (or pass it to `step` with others) to run the
    loop; `stats`, `finish_reason` and `text` follow its progress."""

    def __init__(
        self,
        target: Backend,
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
        self.target, self.prompt, self.params = target, prompt, params
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

    def open_window(self, proposal: Proposal) -> tuple[list[int], bool]:
        """Phase 2: the tokens the target evaluates, and whether it must return logits for all of them."""
        if self._prefilled < len(self.prompt):
            chunk = self.prompt[self._prefilled : self._prefilled + PREFILL_CHUNK]
            return chunk, False
        self._proposal = proposal
        return [self.context[-1], *proposal.tokens], True  # [pending, d1..dk]

    def close_window(self, logits: np.ndarray, draft_s: float, verify_s: float) -> list[Emitted]:
        """Phase 3: verify the window against the target's logits, roll back, emit."""
        stats = self.stats
        if self._prefilled < len(self.prompt):
            self._prefilled += min(PREFILL_CHUNK, len(self.prompt) - self._prefilled)
            if self._prefilled < len(self.prompt):
                return []
            stats.prefill_s = time.perf_counter() - self._start
            return self._accept([], self._pick(logits[-1]))

        drafted = self._proposal.tokens
        base = self.target.n_past - len(drafted) - 1
        verdict = verify(logits, drafted, self._proposal.probs, self.params, self._rng)
        self.target.truncate(base + 1 + verdict.accepted)  # KV rollback of the rejected drafts
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        if self.adaptive:
            self.adaptive.observe(len(drafted), verdict.accepted, draft_s, verify_s)
        stats.record_window(len(drafted), verdict.accepted)
        return self._accept(drafted[: verdict.accepted], verdict.next_token)

    # --- emitting ---

    def _pick(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        return sample(probabilities(logits, self.params), self._rng)

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
