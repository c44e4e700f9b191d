"""Logit transforms shared by target and draft, so p and q are shaped alike (required for exactness)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from specserve.engine.grammar import Grammar


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): dividing logits by less overflows them.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # 0 = off; else tokens below min_p times the most likely one's probability are cut
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = ()  # end the reply at any of these, as at the end-of-sequence token
    ignore_eos: bool = False  # go on past the model's end-of-sequence tokens (max_tokens ends the reply)
    # Logit bias and penalties (`adjust_logits`), as OpenAI and vLLM define them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    reply_start: int = 0  # where the reply begins in the context: presence and frequency count the reply only
    grammar: Grammar | None = None  # the grammar the reply follows; its matcher tracks the reply (engine/grammar.py)
    # Report each emitted token's log-probability under the target with this many most likely alternatives
    # (None: none); speculation does not change them: the rows that verify a window are plain decoding's rows.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalizes(self) -> bool:
        penalties = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)
        return penalties or bool(self.logit_bias)

    @property
    def adjusts_logits(self) -> bool:
        return self.penalizes or self.grammar is not None


def adjust_logits(rows: np.ndarray, params: SamplingParams, context: Sequence[int], drafts: Sequence[int] = ()):
    """Rows of logits [n, V] as the request's grammar, penalties and logit bias shape them, row i after the
    context and drafts[:i]. Draft and target rows both go through here with the same history, so p and q
    stay shaped alike and verification stays exact. Rows are returned as they are when the request adjusts
    nothing."""
    if not params.adjusts_logits:
        return rows
    rows = np.array(rows, dtype=np.float32)
    if params.grammar is not None:  # what it forbids goes to -inf, which no penalty moves
        grammar = params.grammar
        allowed = grammar.masks(context[params.reply_start + grammar.consumed :], drafts, len(rows))
        rows[:, : grammar.n_vocab][~allowed] = -np.inf
        rows[:, grammar.n_vocab :] = -np.inf
    if params.penalizes:
        _penalize(rows, params, context, drafts)
    return rows


def _penalize(rows: np.ndarray, params: SamplingParams, context: Sequence[int], drafts: Sequence[int]) -> None:
    """In place, vLLM's definitions and order: the repetition penalty over prompt and reply (dividing
    positive logits, multiplying negative ones), frequency and presence penalties over the reply, the bias."""
    vocab = rows.shape[-1]
    counts = np.bincount(np.asarray(context[params.reply_start :], dtype=np.int64), minlength=vocab)[:vocab]
    counts = counts.astype(np.float32)
    in_context = np.zeros(vocab, dtype=bool)
    in_context[np.asarray(context, dtype=np.int64)] = True
    bias_tokens = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
    bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)
    for i, row in enumerate(rows):
        if i > 0:
            counts[drafts[i - 1]] += 1
            in_context[drafts[i - 1]] = True
        if params.repetition_penalty != 1.0:
            seen = row[in_context]
            row[in_context] = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        np.add.at(row, bias_tokens, bias)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Distribution actually sampled from: temperature, then top-k, then min-p, then top-p (nucleus),
    float64 (vLLM's order: min-p on the tempered distribution).

    Works on one row [V] or a batch [n, V]. Greedy callers use argmax on raw logits instead.
    """
    x = np.asarray(logits, dtype=np.float64) / max(params.temperature, 1e-6)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(axis=-1, keepdims=True), probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        keep = np.zeros(probs.shape, dtype=bool)
        for row, kept in zip(probs.reshape(-1, probs.shape[-1]), keep.reshape(-1, keep.shape[-1]), strict=True):
            kept[_nucleus(row, params.top_p)] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


_NUCLEUS_CANDIDATES = 1024  # tokens sorted first; a nucleus is rarely bigger, and then the search doubles


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest prefix, in order of falling probability (ties by index, as a stable sort),
    whose mass reaches top_p; the token crossing the line stays in. Sorts only the most likely candidates:
    a full sort of a 152k vocabulary costs more per row than a draft token."""
    size = probs.shape[-1]
    candidates = min(_NUCLEUS_CANDIDATES, size)
    while True:
        top = np.argpartition(-probs, candidates - 1)[:candidates] if candidates < size else np.arange(size)
        order = top[np.lexsort((top, -probs[top]))]
        ranked = probs[order]
        # a prefix of the full ranking: cumsum adds in order, so these sums equal a full sort's bit for bit
        kept = int(np.count_nonzero(np.cumsum(ranked) - ranked < top_p))
        # Exact when the line is crossed inside the candidates, above their lowest probability (a token tied
        # with the lowest may have been left out of them, and would rank before one of equal probability).
        if candidates == size or (kept < candidates and ranked[kept - 1] > ranked[-1]):
            return order[:kept]
        candidates = min(2 * candidates, size)


def top_probability(logits: np.ndarray, params: SamplingParams) -> float:
    """How sure the model is of its next token: the largest probability of one row of logits at the request's
    temperature (1 for greedy requests, whose temperature-0 distribution is a point mass), before top-k/top-p
    cut the tail. Cheap (one exp over the vocabulary), so the target reports it for every window."""
    row = np.asarray(logits, dtype=np.float32)
    temperature = 1.0 if params.greedy else params.temperature
    return float(1.0 / np.exp((row - row.max()) / temperature).sum())


def keep_top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Keep the k most likely tokens of a 1-D distribution, renormalized. A remote draft samples from this,
    so the sparse distribution it sends the verifier is exactly the one it drew from."""
    if k <= 0 or np.count_nonzero(probs) <= k:
        return probs
    keep = np.argpartition(probs, -k)[-k:]
    truncated = np.zeros_like(probs)
    truncated[keep] = probs[keep]
    return truncated / truncated.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a 1-D distribution."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """An emitted token's log-probability under the target, and the most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


def token_logprobs(rows: np.ndarray, tokens: list[int], params: SamplingParams, top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of tokens[i] under rows[i] of the target's logits, in the distribution the request
    samples from (temperature, top-k, top-p; tokens they cut are at -inf). A greedy request's is its
    temperature-0 limit, a point mass, so it reports the plain softmax (temperature 1) instead."""
    rows = np.asarray(rows[: len(tokens)], dtype=np.float64)
    if params.greedy:
        shifted = rows - rows.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    else:
        with np.errstate(divide="ignore"):
            logprobs = np.log(probabilities(rows, params))
    out = []
    for row, token in zip(logprobs, tokens, strict=True):
        top = np.argpartition(-row, top_n - 1)[:top_n] if top_n > 0 else np.array([], dtype=np.int64)
        top = top[np.lexsort((top, -row[top]))]
        alternatives = tuple((int(t), float(row[t])) for t in top)
        out.append(TokenLogprob(token=int(token), logprob=float(row[token]), top=alternatives))
    return out
