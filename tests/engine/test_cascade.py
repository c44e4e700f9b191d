"""The cascade drafter (n-gram -> draft model) proposes exactly what the draft model alone would sample,
with the draft's distribution as q, so the target's rejection sampling stays exact.

The draft model here is a small table model (next-token logits depend on the last token), a real backend
implementation of the protocol rather than a stand-in for the proposer under test."""

import numpy as np

from specserve.engine.proposers import CascadeProposer, DraftModelProposer, NgramProposer
from specserve.engine.sampling import SamplingParams, probabilities
from tests.support.table_model import TABLE, TableModel, V


def _proposals(proposer_factory, context, k, n, seed):
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=1.0)
    return [proposer_factory().propose(context, k, params, rng) for _ in range(n)]


def test_cascade_samples_like_the_draft_model_and_reports_its_q():
    context = [0, 1, 2, 3, 0, 1]  # the n-gram lookup guesses 2, 3, 0 (what followed "0 1" before)
    cascade = _proposals(
        lambda: CascadeProposer(DraftModelProposer(TableModel().new_sequence()), NgramProposer()), context, 3, 6000, 1
    )
    alone = _proposals(lambda: DraftModelProposer(TableModel().new_sequence()), context, 3, 6000, 2)
    for position in range(3):
        prefix_counts: dict[tuple, np.ndarray] = {}
        for label, runs in (("cascade", cascade), ("alone", alone)):
            counts = np.zeros(V)
            for p in runs:
                if p.tokens[:position] == [2, 3, 0][:position]:  # condition on the guessed prefix
                    counts[p.tokens[position]] += 1
            prefix_counts[label] = counts / counts.sum()
        tv = 0.5 * np.abs(prefix_counts["cascade"] - prefix_counts["alone"]).sum()
        assert tv < 0.05, (position, prefix_counts)
    for p in cascade[:50]:
        last = context[-1]
        for token, q in zip(p.tokens, p.probs, strict=True):
            assert np.allclose(q, probabilities(TABLE[last], SamplingParams(temperature=1.0)))
            last = token


def test_cascade_greedy_equals_draft_greedy_and_uses_fewer_draft_passes():
    context = [1, 2, 0, 1, 2, 0, 1]  # the n-gram guesses 2, 0, 1: the table's own argmax chain from 1
    greedy = SamplingParams()
    rng = np.random.default_rng(0)
    cascade_model, alone_model = TableModel(), TableModel()
    cascade_seq, alone_seq = cascade_model.new_sequence(), alone_model.new_sequence()
    for seq in cascade_seq, alone_seq:  # drafting every step: the draft has seen all but the last token
        seq.tokens = context[:-1]
    cascade_draft = DraftModelProposer(cascade_seq, cached=context[:-1])
    cascade = CascadeProposer(cascade_draft, NgramProposer()).propose(context, 4, greedy, rng)
    alone = DraftModelProposer(alone_seq, cached=context[:-1]).propose(context, 4, greedy, rng)
    assert cascade.tokens == alone.tokens == [2, 0, 1, 2]
    assert (cascade_model.passes, alone_model.passes) == (1, 4)  # guess checked in one pass, plus the bonus

    # A draft that must first catch up (on a prompt) does so without logits: one more pass, no LM head rows
    fresh_model = TableModel()
    fresh = CascadeProposer(DraftModelProposer(fresh_model.new_sequence()), NgramProposer()).propose(
        context, 4, greedy, rng
    )
    assert fresh.tokens == cascade.tokens and fresh_model.passes == 2
