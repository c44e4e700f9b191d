"""Draft proposers behind one interface.

A proposer sees the whole context (prompt + emitted tokens) and returns up to k draft tokens, each with the
distribution it was drawn from (None = a deterministic point mass), which rejection sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from specserve.backends.base import Backend
from specserve.engine.sampling import SamplingParams, keep_top_k, probabilities, sample


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

    def __init__(self, backend: Backend, q_top_k: int = 0):
        self.backend = backend
        self.q_top_k = q_top_k  # > 0: sample from the top-k of q only (sparse q for a remote verifier)
        self._cached: list[int] = []  # tokens whose KV is in the draft backend

    def reset(self) -> None:
        self.backend.reset()
        self._cached = []

    def _sync(self, context: list[int]) -> list[int]:
        """Roll the draft's cache back to what it shares with the context; return the tokens to evaluate
        so that the last row of logits predicts the token after the context."""
        common = 0
        limit = min(len(self._cached), len(context))
        while common < limit and self._cached[common] == context[common]:
            common += 1
        if common == len(context):
            common -= 1  # we need the logits after the last context token: evaluate it again
        self.backend.truncate(common)
        self._cached = list(context)
        return context[common:]

    def propose(self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        return draft_in_lockstep([DraftRequest(self, context, k, params, rng)])[0]


@dataclass
class DraftRequest:
    proposer: Proposer | None
    context: list[int]
    k: int
    params: SamplingParams
    rng: np.random.Generator


def draft_in_lockstep(requests: list[DraftRequest]) -> list[Proposal]:
    """Draft-model proposals for several sequences of one draft model: each draft step evaluates one
    token of every sequence that still drafts in one batched call."""
    proposals = [Proposal([], []) for _ in requests]
    ks = [min(r.k, r.proposer.backend.n_ctx - len(r.context)) for r in requests]
    live = [i for i, k in enumerate(ks) if k > 0]
    if not live:
        return proposals
    backend = requests[live[0]].proposer.backend
    work = [(requests[i].proposer.backend, requests[i].proposer._sync(requests[i].context), False) for i in live]
    logits = {i: rows[-1] for i, rows in zip(live, backend.eval_batch(work), strict=True)}
    while live:
        for i in live:
            params = requests[i].params
            if params.greedy:
                token, q = int(np.argmax(logits[i])), None
            else:
                q = keep_top_k(probabilities(logits[i], params), requests[i].proposer.q_top_k)
                token = sample(q, requests[i].rng)
            proposals[i].tokens.append(token)
            proposals[i].probs.append(q)
        live = [i for i in live if len(proposals[i].tokens) < ks[i]]
        if live:
            work = [(requests[i].proposer.backend, proposals[i].tokens[-1:], False) for i in live]
            for i, rows in zip(live, backend.eval_batch(work), strict=True):
                logits[i] = rows[-1]
                requests[i].proposer._cached.append(proposals[i].tokens[-1])
    return proposals


def propose_batch(requests: list[DraftRequest]) -> list[Proposal]:
    """Proposals for several sequences at once; draft-model proposers share batched draft steps."""
    proposals = [Proposal([], []) for _ in requests]
    together = [i for i, r in enumerate(requests) if isinstance(r.proposer, DraftModelProposer) and r.k > 0]
    for i, r in enumerate(requests):
        if r.proposer is not None and r.k > 0 and i not in together:
            proposals[i] = r.proposer.propose(r.context, r.k, r.params, r.rng)
    for i, proposal in zip(together, draft_in_lockstep([requests[i] for i in together]), strict=True):
        proposals[i] = proposal
    return proposals
