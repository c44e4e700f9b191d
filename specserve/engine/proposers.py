"""Draft proposers behind one interface.

A proposer sees the whole context (prompt + emitted tokens) and returns up to k draft tokens, each with the
distribution it was drawn from (None = a deterministic point mass), which rejection sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from specserve.engine.model import Sequence
from specserve.engine.sampling import (
    SamplingParams,
    adjust_logits,
    keep_top_k,
    probabilities,
    sample,
    top_probability,
)
from specserve.engine.verify import tolerance_distribution, verify


@dataclass(kw_only=True)
class Proposal:
    tokens: list[int]
    probs: list[np.ndarray | None]  # per token: the draft distribution q it was sampled from
    confidence: list[float] = field(default_factory=list)  # per token: the draft's probability of it, if known


class Proposer(Protocol):
    name: str  # the method: "draft", "cascade", "ngram", "suffix" or "suffix-draft"
    uses_model: bool  # whether it has a draft model (which, when it fails, is dropped)

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        """Up to k tokens after the context. `with_probs`: report the draft distribution (under
        `tolerance_distribution`) even for greedy drafts, which tolerance verification compares against."""
        ...

    def reset(self) -> None: ...

    def sync_rows(self, context: list[int]) -> int:
        """Tokens a model proposer must evaluate to catch up on the context before drafting (0: none)."""
        ...

    def drafts_with_model(self, context: list[int]) -> bool:
        """Whether drafting after this context costs draft-model passes."""
        ...

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        """The draft model that drafts after this context, one token per batched step with other requests'
        (`draft_in_lockstep`); None: `propose` drafts alone."""
        ...


class ModelFreeProposer:
    """What a proposer without a draft model answers: nothing to catch up, reset or batch."""

    uses_model = False

    def reset(self) -> None:
        pass

    def sync_rows(self, context: list[int]) -> int:
        return 0

    def drafts_with_model(self, context: list[int]) -> bool:
        return False

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        return None


class NgramProposer(ModelFreeProposer):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens, propose what
    followed it. Tries n = max_n down to min_n. No model, so drafting is free."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        tokens = self.lookup(context, k)
        return Proposal(tokens=tokens, probs=[None] * len(tokens))

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


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, one extends the other: compared in C
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


class DraftModelProposer:
    """A small model with the target's tokenizer drafts k tokens autoregressively.

    Its KV cache is kept in sync by longest common prefix with the context: rolled-back draft tokens
    are truncated away and only the new tokens are evaluated.
    """

    name = "draft"
    uses_model = True

    def __init__(self, sequence: Sequence, cached: list[int] | None = None, q_top_k: int = 0):
        self.sequence = sequence  # the draft model's KV cache for this request
        self.q_top_k = q_top_k  # > 0: sample from the top-k of q only (sparse q for a remote verifier)
        self._cached: list[int] = list(cached or [])  # tokens whose KV is in `sequence`

    def reset(self) -> None:
        self.sequence.reset()
        self._cached = []

    def _kept(self, context: list[int]) -> int:
        """How much of the draft's cache stays valid for this context; never all of it, since the logits
        after the last context token come from evaluating that token again."""
        return min(common_prefix(self._cached, context), len(context) - 1)

    def sync_rows(self, context: list[int]) -> int:
        """Tokens the next draft pass must evaluate before its first proposal: 1-2 while drafting every
        step, the whole gap after a stretch without drafting (or the prompt, at first)."""
        return len(context) - self._kept(context)

    def drafts_with_model(self, context: list[int]) -> bool:
        return True

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        return self

    def _sync(self, context: list[int]) -> list[int]:
        """Roll the draft's cache back to what it shares with the context; return the tokens to evaluate
        so that the last row of logits predicts the token after the context."""
        common = self._kept(context)
        self.sequence.truncate(common)
        self._cached = list(context)
        return context[common:]

    def evaluate(self, context: list[int], then: list[int]) -> np.ndarray:
        """Bring the draft's cache to `context` followed by `then` (tokens someone else proposed); return
        len(then) + 1 rows of logits, predicting each of `then` and the token after."""
        pending = self._sync(context)
        if len(pending) > 1:  # a catch-up (a prompt): no logits, the LM head on every row cost twice its pass
            self.sequence.eval(pending[:-1], all_logits=False)
        rows = self.sequence.eval([pending[-1], *then], all_logits=True)
        self._cached.extend(then)
        return rows

    def rollback(self, length: int) -> None:
        """Forget all but the first `length` cached tokens (those that were rejected)."""
        self.sequence.truncate(length)
        del self._cached[length:]

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        request = DraftRequest(proposer=self, context=context, k=k, params=params, rng=rng, with_probs=with_probs)
        return draft_in_lockstep([request])[0]


@dataclass(kw_only=True)
class DraftRequest:
    proposer: Proposer | None  # in `draft_in_lockstep`: a DraftModelProposer
    context: list[int]
    k: int
    params: SamplingParams
    rng: np.random.Generator
    with_probs: bool = False
    min_confidence: float = 0.0  # stop drafting at a token the draft itself gives less than this


def draft_in_lockstep(requests: list[DraftRequest]) -> list[Proposal]:
    """Draft-model proposals for several sequences of one draft model: each draft step evaluates one
    token of every sequence that still drafts in one batched call."""
    proposals = [Proposal(tokens=[], probs=[]) for _ in requests]
    ks = [min(r.k, r.proposer.sequence.model.n_ctx - len(r.context)) for r in requests]
    live = [i for i, k in enumerate(ks) if k > 0]
    if not live:
        return proposals
    model = requests[live[0]].proposer.sequence.model
    work = [(requests[i].proposer.sequence, requests[i].proposer._sync(requests[i].context), False) for i in live]
    logits = {i: rows[-1] for i, rows in zip(live, model.eval_batch(work), strict=True)}
    while live:
        for i in live:
            request = requests[i]
            row = logits[i]
            if request.params.adjusts_logits:  # the history the target's row for this token will see
                row = adjust_logits(row[None], request.params, [*request.context, *proposals[i].tokens])[0]
            q = draft_distribution(row, request.params, request.with_probs, request.proposer.q_top_k)
            if request.params.greedy:
                token = int(np.argmax(row))
                confidence = top_probability(row, request.params)
            else:
                token = sample(q, request.rng)
                confidence = float(q[token])
            if confidence < requests[i].min_confidence and proposals[i].tokens:
                ks[i] = len(proposals[i].tokens)  # not sure enough to be worth verifying: end the window here
                continue
            proposals[i].tokens.append(token)
            proposals[i].probs.append(q)
            proposals[i].confidence.append(confidence)
        live = [i for i in live if len(proposals[i].tokens) < ks[i]]
        if live:
            work = [(requests[i].proposer.sequence, proposals[i].tokens[-1:], False) for i in live]
            for i, rows in zip(live, model.eval_batch(work), strict=True):
                logits[i] = rows[-1]
                requests[i].proposer._cached.append(proposals[i].tokens[-1])
    return proposals


def draft_distribution(
    logits: np.ndarray, params: SamplingParams, with_probs: bool, top_k: int = 0
) -> np.ndarray | None:
    """The distribution q a draft token is drawn from, as verification needs it: a greedy draft is a point
    mass (None) unless `with_probs` asks for its distribution under the tolerance rule; a sampled one is
    the request's distribution, cut to its `top_k` most likely tokens when that is what it sampled from."""
    if params.greedy:
        return tolerance_distribution(logits, params) if with_probs else None
    return keep_top_k(probabilities(logits, params), top_k)


def propose_batch(requests: list[DraftRequest]) -> list[Proposal]:
    """Proposals for several sequences at once; those a draft model drafts share batched draft steps."""
    proposals = [Proposal(tokens=[], probs=[]) for _ in requests]
    together: dict[int, DraftRequest] = {}
    for i, r in enumerate(requests):
        if r.proposer is None or r.k <= 0:
            continue
        if (draft := r.proposer.lockstep_draft(r.context)) is not None:
            together[i] = replace(r, proposer=draft)
        else:
            proposals[i] = r.proposer.propose(r.context, r.k, r.params, r.rng, r.with_probs)
    for i, proposal in zip(together, draft_in_lockstep(list(together.values())), strict=True):
        proposals[i] = proposal
    return proposals


class CascadeProposer:
    """Multi-stage drafting: n-gram lookup -> draft model -> (the target, in the loop).

    The draft model checks the n-gram's guess in one pass, exactly as the target checks a draft: verification
    against a point mass, so the tokens that come out are distributed exactly as the draft model's own
    samples (greedy: its argmax) and their q is the draft's distribution. It then keeps drafting on its own
    up to k. When the n-gram guess is right, k draft tokens cost one draft pass instead of k.
    """

    name = "cascade"
    uses_model = True

    def __init__(self, draft: DraftModelProposer, ngram: NgramProposer | None = None):
        self.draft, self.ngram = draft, ngram or NgramProposer()

    def reset(self) -> None:
        self.draft.reset()

    def sync_rows(self, context: list[int]) -> int:
        return self.draft.sync_rows(context)

    def drafts_with_model(self, context: list[int]) -> bool:
        return True

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        return None  # it checks the n-gram guess first, a pass of its own

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        k = min(k, self.draft.sequence.model.n_ctx - len(context) - 1)
        guess = self.ngram.lookup(context, k)
        if k <= 0 or not guess:
            return self.draft.propose(context, k, params, rng, with_probs)
        draft = self.draft
        rows = adjust_logits(draft.evaluate(context, guess), params, context, guess)
        verdict = verify(rows, guess, [None] * len(guess), params, rng)
        tokens = [*guess[: verdict.accepted], verdict.next_token][:k]
        probs = [draft_distribution(row, params, with_probs) for row in rows[: len(tokens)]]
        draft.rollback(len(context) + verdict.accepted)  # draft cache: context + accepted guesses
        if len(tokens) < k:  # the draft model continues alone from the correction token
            more = draft.propose([*context, *tokens], k - len(tokens), params, rng, with_probs)
            tokens, probs = tokens + more.tokens, probs + more.probs
        return Proposal(tokens=tokens, probs=probs)
