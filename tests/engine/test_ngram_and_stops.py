import numpy as np

from specserve.engine.proposers import NgramProposer
from specserve.engine.sampling import SamplingParams
from specserve.engine.stops import TextStream


def test_ngram_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(max_n=3)
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert proposer.lookup(context, 3) == [7, 8, 5]  # latest earlier occurrence of [1, 2, 3]
    assert proposer.lookup(context, 10) == [7, 8, 5, 1, 2, 3]  # runs up to the end of the context
    assert proposer.lookup([4, 5, 6], 3) == []
    proposal = proposer.propose(context, 2, SamplingParams(), np.random.default_rng(0))
    assert proposal.tokens == [7, 8] and proposal.probs == [None, None]


def test_ngram_falls_back_to_shorter_patterns():
    assert NgramProposer(max_n=3).lookup([5, 6, 1, 2, 4, 2], 2) == [4, 2]


PIECES = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"\n\n", 5: b"EN", 6: b"D", 7: b"\xe2\x82", 8: b"\xac!"}


def _stream(tokens, stop=()):
    stream = TextStream(lambda ids: b"".join(PIECES[i] for i in ids), stop)
    out = "".join(stream.push(t) for t in tokens if not stream.stopped)
    return out + stream.finish(), stream


def test_no_text_past_a_stop_string_split_over_tokens():
    text, stream = _stream([0, 1, 5, 6, 2, 3], stop=("END",))
    assert text == "Hello" and stream.stopped


def test_text_that_only_looked_like_a_stop_string_is_released():
    text, stream = _stream([0, 5, 1], stop=("END",))
    assert text == "HelENlo" and not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    text, _ = _stream([0, 1, 2, 4, 3, 5, 6], stop=("END", "\n\n"))
    assert text == "Hello wor"


def test_utf8_split_across_tokens_is_held_until_complete():
    stream = TextStream(lambda ids: b"".join(PIECES[i] for i in ids))
    assert stream.push(7) == ""  # first two bytes of the euro sign
    assert stream.push(8) == "\u20ac!"
