"""Pipelined drafting for a remote verifier: while a window travels and is verified, draft the next one.

The bet is full acceptance: the next context will be context + drafts + the target's bonus token, and the
draft's own next token is its guess for that bonus. So right after proposing a window, a background thread
drafts `ahead` more tokens after it. If the verdict accepts every draft and the bonus equals the guess, the
next window is ready without any draft time; otherwise the pre-drafted tokens are thrown away (the draft's
KV cache rolls back by prefix, as always). Greedy only: output never changes, only when the drafting happens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from specserve.engine.proposers import DraftModelProposer, Proposal
from specserve.engine.sampling import SamplingParams


@dataclass
class _Ahead:
    context: list[int]  # the context the pre-drafted tokens assume (ends with the guessed bonus token)
    tokens: list[int]


class PipelinedDrafter:
    """Wraps a draft-model proposer (not a subclass: proposals come one request at a time, not batched)."""

    name = "draft"
    uses_model = True

    def __init__(self, inner: DraftModelProposer):
        self.inner = inner
        self.hits = self.misses = 0  # windows served from, or thrown away by, the pre-draft
        self._thread: threading.Thread | None = None
        self._ahead: _Ahead | None = None

    def reset(self) -> None:
        self._join()
        self._ahead = None
        self.inner.reset()

    def sync_rows(self, context: list[int]) -> int:
        return self.inner.sync_rows(context)

    def drafts_with_model(self, context: list[int]) -> bool:
        return True

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        return None  # one request at a time, drafting ahead in a thread of its own

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        if not params.greedy or with_probs:  # only greedy drafts without distributions are pre-drafted
            self._join()
            return self.inner.propose(context, k, params, rng, with_probs)
        self._join()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and k > 0 and ahead.tokens and ahead.context == context:
            tokens = ahead.tokens[:k]
            self.hits += 1
        else:
            self.misses += ahead is not None
            tokens = self.inner.propose(context, k, params, rng).tokens if k > 0 else []
        if tokens:  # guess the bonus token and draft the next window while this one is verified
            self._thread = threading.Thread(
                target=self._draft_ahead, args=([*context, *tokens], len(tokens) + 1, params, rng), daemon=True
            )
            self._thread.start()
        return Proposal(tokens=tokens, probs=[None] * len(tokens))

    def _draft_ahead(self, context: list[int], n: int, params: SamplingParams, rng: np.random.Generator) -> None:
        drafted = self.inner.propose(context, n, params, rng).tokens
        if len(drafted) > 1:
            self._ahead = _Ahead([*context, drafted[0]], drafted[1:])
