"""The target model's side of a generation: append tokens to its KV cache, verify draft windows, roll back.

A `TargetSession` is what the loop talks to. `LocalTarget` runs the target in this process on a backend
sequence; a remote one (specserve/cluster) sends the same windows to a verifier service, which runs
`LocalTarget`s there. Either way one call is one target pass:

    append   tokens not yet in the target's cache: a prompt chunk, or the pending token of the last step
    drafts   draft tokens to verify after them (with the distributions they were drawn from)
    -> Verdict (accepted drafts + the target's own next token), with the cache rolled back to match;
       None for a prompt chunk that is not the last (nothing to predict yet)

Sessions of one local model are evaluated together in one batched pass (`target_pass`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from specserve.engine.model import Backend
from specserve.engine.sampling import SamplingParams, adjust_logits, token_logprobs, top_probability
from specserve.engine.verify import Verdict, verify, verify_tolerance


@dataclass
class Window:
    append: list[int]
    drafts: list[int]
    probs: list[np.ndarray | None]  # per draft token: the distribution it was drawn from (None: point mass)
    predict: bool  # False for a prompt chunk that is not the last: no verdict wanted
    params: SamplingParams
    rng: np.random.Generator
    tolerance: float | None = None  # lossy opt-in: verify with this delta instead of exactly (engine/verify.py)
    with_confidence: bool = True  # report `Verdict.confidence` (adaptive k reads it; plain decoding skips its cost)
    logprobs: int | None = None  # report `Verdict.logprobs` with this many most likely alternatives (None: not)
    context: Sequence[int] = ()  # the tokens before the window's first prediction (penalties count them)


class TargetSession(Protocol):
    n_ctx: int
    batch_key: object  # sessions with equal keys can share one pass (`run_many`)
    round_trip_s: float  # network seconds a window spends travelling (0 for a local target)

    @property
    def n_past(self) -> int:
        """Tokens in the target's cache (prompt and accepted tokens, without the pending one)."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None:
        """The generation is over: release what the session holds elsewhere (a verifier's KV cache)."""
        ...

    @staticmethod
    def run_many(sessions: list[TargetSession], windows: list[Window]) -> list[Verdict | None]:
        """One pass for windows of several sessions that share a batch key."""
        ...


def run_windows(sessions: list[TargetSession], windows: list[Window]) -> list[Verdict | None]:
    """Run every window, one `run_many` call per group of sessions that can share a pass."""
    groups: dict[object, list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.batch_key, []).append(i)
    verdicts: list[Verdict | None] = [None] * len(sessions)
    for members in groups.values():
        first = sessions[members[0]]
        results = first.run_many([sessions[i] for i in members], [windows[i] for i in members])
        for i, verdict in zip(members, results, strict=True):
            verdicts[i] = verdict
    return verdicts


class LocalTarget:
    """The target on a backend sequence in this process."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.n_ctx = backend.n_ctx
        self.batch_key = backend.weights  # sequences of one model share a forward pass
        self.round_trip_s = 0.0

    @property
    def n_past(self) -> int:
        return self.backend.n_past

    def reset(self) -> None:
        self.backend.reset()

    def close(self) -> None:
        # A backend that copies prefixes keeps its KV for later prompts (cache/prefix.py); any other frees
        # it now rather than when the generation is collected (a cancelled request's may live on in a
        # traceback until the cyclic collector runs), so a llama.cpp context goes back to its pool at once.
        if not self.backend.copies_prefix:
            self.backend.reset()

    @staticmethod
    def run_many(sessions: list[LocalTarget], windows: list[Window]) -> list[Verdict | None]:
        return target_pass(sessions, windows)


def target_pass(sessions: list[LocalTarget], windows: list[Window]) -> list[Verdict | None]:
    """One batched target pass over several sessions of one model: evaluate each window, verify its drafts
    against the rows that predict them, roll each cache back to what was accepted."""
    work = [(s.backend, w.append + w.drafts, bool(w.drafts)) for s, w in zip(sessions, windows, strict=True)]
    logits = sessions[0].backend.eval_batch(work)
    verdicts: list[Verdict | None] = []
    for session, window, rows in zip(sessions, windows, logits, strict=True):
        if not window.predict:
            verdicts.append(None)
            continue
        kept = session.n_past - len(window.drafts)  # cache length with every draft rejected
        rows = rows[-(len(window.drafts) + 1) :]  # the rows after the last appended token and each draft
        rows = adjust_logits(rows, window.params, window.context, window.drafts)
        if window.tolerance is None:
            verdict = verify(rows, window.drafts, window.probs, window.params, window.rng)
        else:
            verdict = verify_tolerance(rows, window.drafts, window.probs, window.params, window.tolerance, window.rng)
        session.backend.truncate(kept + verdict.accepted)  # KV rollback of the rejected drafts
        if window.with_confidence:
            verdict = replace(verdict, confidence=top_probability(rows[0], window.params))
        if window.logprobs is not None:  # the rows of the emitted tokens: accepted drafts and the target's
            emitted = [*window.drafts[: verdict.accepted], verdict.next_token]
            logprobs = token_logprobs(rows, emitted, window.params, window.logprobs)
            verdict = replace(verdict, logprobs=tuple(logprobs))
        verdicts.append(verdict)
    return verdicts
