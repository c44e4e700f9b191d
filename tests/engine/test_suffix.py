"""Suffix-tree drafting: what the trees propose, which replies a request may draw on, and the cache's bound.

The trees are Arctic Inference's (engine/suffix.py); these tests pin down how specserve uses them. That the
drafts keep output exact is the verifier's job for any point-mass draft (test_verify.py) and is checked on
the real model pair in test_equivalence.py."""

from types import SimpleNamespace

import numpy as np

from specserve.config import EngineConfig
from specserve.engine.proposers import DraftModelProposer
from specserve.engine.sampling import SamplingParams
from specserve.engine.suffix import SuffixCache, SuffixCascade, SuffixProposer
from specserve.runtime import Runtime
from tests.support.table_model import TableModel

GREEDY = SamplingParams()
RNG = np.random.default_rng(0)
QUOTED = list(range(100, 130))  # e.g. a function the prompt quotes


def test_drafts_what_followed_the_context_in_the_prompt_as_point_masses():
    proposer = SuffixProposer([1, 2, *QUOTED, 3])
    proposal = proposer.propose([1, 2, *QUOTED, 3, *QUOTED[:12]], 8, GREEDY, RNG)
    assert proposal.tokens == QUOTED[12:20]  # the quoted text goes on
    assert proposal.probs == [None] * 8  # point masses: verification accepts x with probability p(x)
    assert all(0 < c <= 1 for c in proposal.confidence)
    assert not proposer.drafts_with_model([1, 2]) and proposer.sync_rows([1, 2]) == 0


def test_a_draft_is_at_most_as_long_as_its_match():
    proposer = SuffixProposer([*QUOTED, 7])
    assert len(proposer.propose([*QUOTED, 7, *QUOTED[:3]], 8, GREEDY, RNG).tokens) == 3
    assert proposer.propose([*QUOTED, 7, 999], 8, GREEDY, RNG).tokens == []  # unseen: nothing to draft


def test_the_reply_so_far_is_drafted_from_too():
    proposer = SuffixProposer([5, 6])
    context = [5, 6, *QUOTED]  # the reply wrote QUOTED once ...
    proposer.propose(context, 4, GREEDY, RNG)
    again = [*context, 1, *QUOTED[:10]]  # ... and starts to restate it
    assert proposer.propose(again, 4, GREEDY, RNG).tokens == QUOTED[10:14]


def _reply(cache: SuffixCache, scope: str, tokens: list[int]) -> None:
    proposer = SuffixProposer([1], cache.open(scope))
    proposer.propose([1, *tokens], 1, GREEDY, RNG)  # the reply enters the trees as the request drafts


def test_earlier_replies_of_the_same_scope_only():
    cache = SuffixCache()
    _reply(cache, "user:alice", QUOTED)
    context = [2, *QUOTED[:10]]
    assert SuffixProposer([2], cache.open("user:alice")).propose(context, 4, GREEDY, RNG).tokens == QUOTED[10:14]
    assert SuffixProposer([2], cache.open("user:bob")).propose(context, 4, GREEDY, RNG).tokens == []
    assert SuffixProposer([2]).propose(context, 4, GREEDY, RNG).tokens == []  # no scope: its own text only


def test_the_cache_drops_the_oldest_replies_beyond_its_bound():
    cache = SuffixCache(max_tokens=50)
    _reply(cache, "", QUOTED)
    newer = list(range(200, 240))
    _reply(cache, "", newer)
    assert cache.tokens == len(newer)  # the first reply is gone

    def lookup(context: list[int]) -> list[int]:  # its prompt is the context: it adds no reply tokens
        return SuffixProposer(context, cache.open("")).propose(context, 4, GREEDY, RNG).tokens

    assert lookup([2, *QUOTED[:10]]) == []
    assert lookup([2, *newer[:10]]) == newer[10:14]
    assert cache.memory_bytes() > 0


def test_scopes_follow_the_draft_cache_setting():
    def scope(mode: str, user: str | None) -> str | None:
        return Runtime.suffix_scope(SimpleNamespace(config=EngineConfig(draft_cache=mode)), user)

    assert scope("global", "alice") == scope("global", None) == ""
    assert scope("per-user", "alice") == "user:alice" != scope("per-user", "bob")
    assert scope("per-user", None) is None  # an anonymous request shares with nobody
    assert scope("off", "alice") is None


def test_cascade_drafts_from_the_tree_when_it_can_else_with_the_draft_model():
    model = TableModel()  # 5 tokens of vocabulary
    quoted = [1, 2, 3, 4, 1, 3, 2, 4, 4, 3, 1, 1]
    cascade = SuffixCascade(SuffixProposer([0, *quoted]), DraftModelProposer(model.new_sequence()), k_max=4)
    found = [0, *quoted, 0, *quoted[:6]]
    assert not cascade.drafts_with_model(found) and cascade.sync_rows(found) == 0
    assert cascade.propose(found, 3, GREEDY, RNG).tokens == quoted[6:9] and model.passes == 0
    unseen = [*found, 0, 0, 0]  # "0 0" is new: the trees' best guess (after "0") scores below the cut
    assert cascade.drafts_with_model(unseen) and cascade.sync_rows(unseen) == len(unseen)
    drafted = cascade.propose(unseen, 3, GREEDY, RNG)
    assert len(drafted.tokens) == 3 and model.passes > 0
