"""Constrained replies: a grammar the reply must follow (JSON schema, regex, Lark), with llguidance's matcher.

A `Grammar` is one request's: its matcher has consumed the reply so far. Speculation stays exact under it
because every distribution is masked the same way for the same history (`sampling.adjust_logits`): the
draft's row for its j-th token after the matcher has also read drafts 1..j-1, the target's row i of a
window after drafts 1..i. Either reads them only on trial and rolls them back; after verification the
generation commits what was accepted. A token the grammar forbids has p = 0 under the masked target, so a
point-mass draft of it (n-gram, suffix) is always rejected; such drafts are cut before they are verified.

llguidance over xgrammar: llguidance's wheel has no dependencies and builds its tokenizer from llama.cpp's
vocabulary; xgrammar's pulls in transformers and triton (hundreds of MB) for what it does here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark


class GrammarError(ValueError):
    """A grammar (or schema, or regex) that cannot be compiled."""


def json_schema_grammar(schema: dict) -> str:
    return LLMatcher.grammar_from_json_schema(schema)


def regex_grammar(regex: str) -> str:
    return LLMatcher.grammar_from_regex(regex)


def lark_grammar(lark: str) -> str:
    return LLMatcher.grammar_from_lark(lark)


def gbnf_grammar(gbnf: str) -> str:
    """A grammar in llama.cpp's GBNF, or in Lark (llguidance tells them apart by Lark's `start:` rule)."""
    try:
        lark = any_to_lark(gbnf)
    except GbnfToLarkError as exc:
        raise GrammarError(f"grammar: {exc}") from None
    return LLMatcher.grammar_from_lark(lark)


def choice_grammar(choices: Sequence[str]) -> str:
    """The reply is exactly one of these strings."""
    return LLMatcher.grammar_from_regex("|".join(f"({re.escape(choice)})" for choice in choices))


class Grammar:
    """One request's grammar and where its reply is in it."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str):
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(error)
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.n_vocab = tokenizer.vocab_size
        self.stop_ids = list(tokenizer.eos_tokens)
        self.consumed = 0  # reply tokens committed

    def masks(self, pending: Sequence[int], drafts: Sequence[int], rows: int) -> np.ndarray:
        """Allowed tokens [rows, n_vocab] after the committed reply and `pending` (tokens past it, not
        committed: the draft's own tokens so far), then for row i after drafts[:i] as well. Past a token the
        grammar does not take (a draft of it, or anything after the reply's end) rows repeat the last one:
        no verification reads that far, since the target rejects such a draft or the reply has ended."""
        tried = [*pending, *drafts[: rows - 1]]
        valid = self.matcher.validate_tokens(tried) if tried else 0
        read = min(valid, len(pending))
        self.matcher.consume_tokens(tried[:read])
        out = np.empty((rows, self.n_vocab), dtype=bool)
        out[0] = self._allowed()
        for i in range(1, rows):
            if read == len(pending) + i - 1 and read < valid:
                self.matcher.consume_token(tried[read])
                read += 1
                out[i] = self._allowed()
            else:
                out[i] = out[i - 1]
        self.matcher.rollback(read)
        return out

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of these tokens the grammar allows in a row after the committed reply."""
        return self.matcher.validate_tokens(list(tokens)) if tokens else 0

    def commit(self, tokens: Sequence[int]) -> None:
        """The reply went on with these tokens (a stop token ends it: nothing to read)."""
        if tokens and not self.matcher.consume_tokens(list(tokens)):
            raise GrammarError(f"the reply left the grammar: {self.matcher.get_error()}")
        self.consumed += len(tokens)

    def _allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)
        if not allowed.any():  # past the end of the reply: only its end (no row may be all -inf)
            allowed[self.stop_ids] = True
        return allowed
