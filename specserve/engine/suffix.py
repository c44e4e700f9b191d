"""Suffix-tree drafting (SuffixDecoding, as vLLM runs it): free drafts from text seen before.

Two trees answer each lookup, and the draft with the higher score wins:
- the request's own tree, over its prompt and its reply so far (a file quoted back, a schema restated);
- a tree over the recent replies of this runtime in the request's scope (the same tool loop, another day).

The trees are Arctic Inference's `SuffixTree` (C++, `arctic-inference` on PyPI): a draft is the most
frequent continuation of the longest suffix of the context found in the tree, as long as its estimated
probability (counts along the path) stays above MIN_TOKEN_PROB, and at most as long as the match
(MAX_SPEC_FACTOR). Drafts are point masses (q = 1 for the drafted token), so verification accepts token x
with probability p(x): greedy and sampled output stay exactly the target's.

Scopes keep one tenant's text from being *proposed* for another's request. The target decides every token,
so nothing is ever emitted from another scope, but how fast a reply comes would tell whether a text was seen
before (`EngineConfig.draft_cache` says which scope a request drafts in).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from arctic_inference.suffix_decoding._C import SuffixTree

from specserve.engine.proposers import DraftModelProposer, ModelFreeProposer, Proposal
from specserve.engine.sampling import SamplingParams

MAX_DEPTH = 24  # longest context suffix matched and longest draft (vLLM's default)
MAX_SPEC_FACTOR = 1.0  # a draft at most as long as the context it matched
MIN_TOKEN_PROB = 0.1  # stop the draft where the tree's estimate of the next token falls below this
MAX_SPEC_OFFSET = 0.0  # no tokens beyond MAX_SPEC_FACTOR's bound
USE_TREE_SPEC = False  # a path, not a tree of candidates (docs/benchmarks: trees measured, not worth it)
CASCADE_MIN_SCORE = 1.0  # the suffix cascade drafts from the trees when they expect at least this many accepted
MAX_CACHED_TOKENS = 2_000_000  # reply tokens all scopes' trees hold at most; the oldest replies go first


class SuffixCache:
    """One runtime's trees over its recent replies, one tree per scope; bounded in reply tokens. When full,
    the oldest reply is removed first (a tree does not say which reply a match came from, so recency of use
    is not known), and a scope whose replies are all gone is dropped."""

    def __init__(self, max_tokens: int = MAX_CACHED_TOKENS, max_depth: int = MAX_DEPTH):
        self.max_tokens, self.max_depth = max_tokens, max_depth
        self._trees: dict[str, SuffixTree] = {}
        self._replies: OrderedDict[int, tuple[str, int]] = OrderedDict()  # reply id -> (scope, tokens), oldest first
        self._tokens = 0
        self._next_id = 0
        self._lock = threading.Lock()  # requests open replies while the scheduler's thread extends others

    def open(self, scope: str) -> Reply:
        """A new reply in `scope`, which later requests of the scope draft from as it grows."""
        with self._lock:
            tree = self._trees.get(scope)
            if tree is None:
                tree = self._trees[scope] = SuffixTree(self.max_depth)
            reply_id, self._next_id = self._next_id, (self._next_id + 1) & 0x7FFFFFFF  # the tree's ids are int32
            self._replies[reply_id] = (scope, 0)
            return Reply(self, tree, reply_id)

    def _extend(self, reply: Reply, tokens: list[int]) -> None:
        with self._lock:
            if reply.reply_id not in self._replies:
                return  # evicted while it was still being written
            scope, held = self._replies[reply.reply_id]
            reply.tree.extend(reply.reply_id, tokens)
            self._replies[reply.reply_id] = (scope, held + len(tokens))
            self._tokens += len(tokens)
            while self._tokens > self.max_tokens and len(self._replies) > 1:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        reply_id, (scope, held) = self._replies.popitem(last=False)
        tree = self._trees[scope]
        tree.remove(reply_id)
        self._tokens -= held
        if tree.num_seqs() == 0:
            del self._trees[scope]

    def speculate(self, tree: SuffixTree, context: np.ndarray, k: int):
        with self._lock:
            return _speculate(tree, context, k)

    @property
    def tokens(self) -> int:
        return self._tokens

    def memory_bytes(self) -> int:
        """What the trees take (walks them all: for reports, not for a request's path)."""
        with self._lock:
            return sum(tree.estimate_memory() for tree in self._trees.values())


class Reply:
    """One request's reply as a sequence of its scope's tree."""

    def __init__(self, cache: SuffixCache, tree: SuffixTree, reply_id: int):
        self.cache, self.tree, self.reply_id = cache, tree, reply_id

    def extend(self, tokens: list[int]) -> None:
        self.cache._extend(self, tokens)


def _speculate(tree: SuffixTree, context: np.ndarray, k: int):
    # positional only in the native call; the order is arctic's SuffixDecodingCache.speculate's
    return tree.speculate_ndarray(context, k, MAX_SPEC_FACTOR, MAX_SPEC_OFFSET, MIN_TOKEN_PROB, USE_TREE_SPEC)


class SuffixProposer(ModelFreeProposer):
    """Drafts from the request's own tree and its scope's tree of recent replies (None: its own only)."""

    name = "suffix"

    def __init__(self, prompt: list[int], reply: Reply | None = None, max_depth: int = MAX_DEPTH):
        self.own = SuffixTree(max_depth)
        self.own.extend(0, prompt)
        self.reply, self.max_depth = reply, max_depth
        self._seen = len(prompt)  # context tokens already in the trees
        self._looked_up: tuple[int, int, Proposal] | None = None  # (context length, k, proposal): the last lookup

    def lookup(self, context: list[int], k: int) -> Proposal:
        """The better of the two trees' drafts of up to k tokens after the context, with the trees'
        probability estimates as its confidence."""
        if self._looked_up is not None and self._looked_up[:2] == (len(context), k):
            return self._looked_up[2]
        self._add(context)
        tail = np.asarray(context[-self.max_depth :], dtype=np.int32)
        best = _speculate(self.own, tail, k) if k > 0 else None
        if self.reply is not None and k > 0:
            shared = self.reply.cache.speculate(self.reply.tree, tail, k)
            best = shared if shared.score > best.score else best
        tokens = list(best.token_ids) if best is not None else []
        proposal = Proposal(tokens=tokens, probs=[None] * len(tokens), confidence=list(best.probs) if tokens else [])
        self._looked_up = (len(context), k, proposal)
        return proposal

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        return self.lookup(context, k)

    def _add(self, context: list[int]) -> None:
        """Put the tokens emitted since the last lookup into both trees (the context only ever grows)."""
        new = context[self._seen :]
        if new:
            self.own.extend(0, new)
            if self.reply is not None:
                self.reply.extend(new)
            self._seen = len(context)


class SuffixCascade:
    """The suffix trees first; the draft model where they have nothing for the context. Nothing: a draft
    whose score (the sum of its tokens' estimated probabilities, the tokens the trees expect accepted) is
    below CASCADE_MIN_SCORE, since almost every context ends in some token the trees have seen."""

    name = "suffix-draft"
    uses_model = True

    def __init__(self, suffix: SuffixProposer, draft: DraftModelProposer, k_max: int):
        self.suffix, self.draft, self.k_max = suffix, draft, k_max

    def _from_trees(self, context: list[int]) -> Proposal | None:
        found = self.suffix.lookup(context, self.k_max)
        return found if sum(found.confidence) >= CASCADE_MIN_SCORE else None

    def drafts_with_model(self, context: list[int]) -> bool:
        return self._from_trees(context) is None

    def lockstep_draft(self, context: list[int]) -> DraftModelProposer | None:
        return self.draft if self.drafts_with_model(context) else None

    def sync_rows(self, context: list[int]) -> int:
        return self.draft.sync_rows(context) if self.drafts_with_model(context) else 0

    def reset(self) -> None:
        self.draft.reset()

    def propose(
        self, context: list[int], k: int, params: SamplingParams, rng: np.random.Generator, with_probs: bool = False
    ) -> Proposal:
        if (found := self._from_trees(context)) is not None:
            return Proposal(tokens=found.tokens[:k], probs=found.probs[:k], confidence=found.confidence[:k])
        return self.draft.propose(context, k, params, rng, with_probs)
