"""Draft proposers behind one interface.

A proposer sees the whole context (prompt + emitted tokens) and returns up to k draft tokens, each with the
distribution it was drawn from (None = a deterministic point mass), which rejection sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from specserve.backends.base import Backend
from specserve.engine.sampling import SamplingParams, probabilities, sample


@dataclass
class Proposal:
    tokens: list[int]
    probs: list[np.ndarray | None]  # per token: the draft distribution q it was sampled from


class Proposer(Protocol):
    name: str

    def propose(self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Proposal: ...

    def reset(self) -> None: ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens, propose what
    followed it. Tries n = max_n down to min_n. No model, so drafting is free."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        tokens = self.lookup(context, k)
        return Proposal(tokens, [None] * len(tokens))

    def lookup(self, context: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        arr = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            pattern = arr[-n:]
            # Candidate starts where the pattern occurs and is followed by at least one token.
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return [int(t) for t in arr[start : start + k]]
        return []

    def reset(self) -> None:
        pass


class DraftModelProposer:
    """A small model with the target's tokenizer drafts k tokens autoregressively.

    Its KV cache is kept in sync by longest common prefix with the context: rolled-back draft tokens
    are truncated away and only the new tokens are evaluated.
    """

    name = "draft"

    def __init__(self, backend: Backend):
        self.backend = backend
        self._cached: list[int] = []  # tokens whose KV is in the draft backend

    def reset(self) -> None:
        self.backend.reset()
        self._cached = []

    def _sync(self, context: list[int]) -> np.ndarray:
        common = 0
        limit = min(len(self._cached), len(context))
        while common < limit and self._cached[common] == context[common]:
            common += 1
        if common == len(context):
            common -= 1  # we need the logits after the last context token: evaluate it again
        self.backend.truncate(common)
        logits = self.backend.eval(context[common:], all_logits=False)[-1]
        self._cached = list(context)
        return logits

    def propose(self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        if k <= 0:
            return Proposal([], [])
        room = self.backend.n_ctx - len(context)
        k = min(k, room)
        logits = self._sync(context)
        tokens: list[int] = []
        probs: list[np.ndarray | None] = []
        for i in range(k):
            if params.greedy:
                token, q = int(np.argmax(logits)), None
            else:
                q = probabilities(logits, params)
                token = sample(q, rng)
            tokens.append(token)
            probs.append(q)
            if i < k - 1:
                logits = self.backend.eval([token], all_logits=False)[-1]
                self._cached.append(token)
        return Proposal(tokens, probs)
