"""The speculative decoding loop, top to bottom.

    prefill the prompt on the target -> first token
    repeat:
        proposer drafts k tokens (with the distributions it drew them from)
        target evaluates [pending token, d1..dk] in ONE call -> k+1 rows of logits
        verify: accept a prefix of the drafts, plus one correction/bonus token from the target
        roll the target's KV back to the accepted length (the proposer re-syncs itself by prefix)
        emit the tokens, checking EOS / stop strings / max_tokens / context length

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
from specserve.engine.proposers import Proposal, Proposer
from specserve.engine.sampling import SamplingParams, probabilities, sample
from specserve.engine.stats import GenerationStats
from specserve.engine.stops import TextStream
from specserve.engine.verify import verify


@dataclass(frozen=True)
class Emitted:
    token: int | None  # None: only releases text held back until the end
    text: str  # text released with this token (held-back text comes out with later tokens)
    from_draft: bool  # accepted draft token (True) or produced by the target itself (False)


class Generation:
    """One request. Iterate it to run the loop; afterwards `stats`, `finish_reason` and `text` are set."""

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
        self.tokens: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        self._text = TextStream(token_bytes, params.stop)
        self._rng = np.random.default_rng(params.seed)

    @property
    def text(self) -> str:
        return self._text.released_text

    def __iter__(self) -> Iterator[Emitted]:
        start = time.perf_counter()
        try:
            yield from self._run(start)
        finally:
            self.stats.total_s = time.perf_counter() - start

    def _pick(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        return sample(probabilities(logits, self.params), self._rng)

    def _emit(self, token: int, from_draft: bool, start: float) -> Emitted | None:
        """Account for one new token; None means generation is over and the token is not part of it."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        self.stats.generated += 1
        self.stats.token_times.append(time.perf_counter() - start)
        text = self._text.push(token)
        if self._text.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return Emitted(token, text, from_draft)

    def _run(self, start: float) -> Iterator[Emitted]:
        target, stats = self.target, self.stats
        target.reset()
        if self.proposer is not None:
            self.proposer.reset()
        logits = target.eval(self.prompt, all_logits=False)[-1]
        stats.prefill_s = time.perf_counter() - start

        pending = self._pick(logits)  # emitted but not yet in the target's KV cache
        emitted = self._emit(pending, from_draft=False, start=start)
        if emitted is None:
            return
        yield emitted
        context = self.prompt + [pending]

        while self.finish_reason is None:
            base = target.n_past  # == len(context) - 1
            room = target.n_ctx - base - 1  # window slots left after the pending token
            if room < 0:
                self.finish_reason = "length"
                break
            limit = max(0, min(self.k, room, self.params.max_tokens - len(self.tokens) - 1))
            if self.proposer is None:
                k = 0
            else:
                k = self.adaptive.choose(limit) if self.adaptive else limit
            stats.chosen_k.append(k)

            t0 = time.perf_counter()
            proposal = Proposal([], [])
            if self.proposer is not None and k > 0:
                proposal = self.proposer.propose(context, k, self.params, self._rng)
            t1 = time.perf_counter()
            window_logits = target.eval([pending, *proposal.tokens])  # one target pass for the whole window
            verdict = verify(window_logits, proposal.tokens, proposal.probs, self.params, self._rng)
            target.truncate(base + 1 + verdict.accepted)  # KV rollback of the rejected drafts
            t2 = time.perf_counter()
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            if self.adaptive:
                self.adaptive.observe(len(proposal.tokens), verdict.accepted, t1 - t0, t2 - t1)
            stats.record_window(len(proposal.tokens), verdict.accepted)

            new_tokens = proposal.tokens[: verdict.accepted] + [verdict.next_token]
            for i, token in enumerate(new_tokens):
                emitted = self._emit(token, from_draft=i < verdict.accepted, start=start)
                if emitted is None:
                    break
                yield emitted
                if self.finish_reason is not None:
                    break
            context.extend(new_tokens)
            pending = verdict.next_token

        if tail := self._text.finish():
            yield Emitted(None, tail, False)  # text held back for a possible stop string; no new token
