"""The target model's side of a generation: append tokens to its KV cache, verify draft windows, roll back.

A `TargetSession` is what the loop talks to. `LocalTarget` runs the target in this process on a sequence
of a model; a remote one (specserve/cluster) sends the same windows to a verifier service, which runs
`LocalTarget`s there. Either way one call is one target pass:

    append   tokens not yet in the target's cache: a prompt chunk, or the pending token of the last step
    drafts   draft tokens to verify after them (with the distributions they were drawn from)
    -> Verdict (accepted drafts + the target's own next token), with the cache rolled back to match;
       None for a prompt chunk that is not the last (nothing to predict yet)

A session's `verifier` runs the windows of all its sessions together (`Verifier.run`): a `LocalVerifier`
in one batched pass of its model, a remote one by sending every window before waiting for any verdict.
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from specserve.engine.model import Model, Sequence
from specserve.engine.sampling import SamplingParams, adjust_logits, token_logprobs, top_probability
from specserve.engine.verify import Verdict, target_choice, tolerated_prefix, verify


@dataclass(kw_only=True)
class Window:
    append: list[int]
    drafts: list[int]
    probs: list[np.ndarray | None]  # per draft token: the distribution it was drawn from (None: point mass)
    predict: bool  # False for a prompt chunk that is not the last: no verdict wanted
    params: SamplingParams
    rng: np.random.Generator
    tolerance: float | None = None  # lossy opt-in: verify with this delta instead of exactly (engine/verify.py)
    with_confidence: bool = True  # report `Verdict.confidence` (adaptive k reads it; plain decoding skips its cost)
    # the tokens before the window's first prediction (penalties count them)
    context: collections.abc.Sequence[int] = ()


class Verifier(Protocol):
    """Runs target passes for its sessions. Sessions whose verifiers compare equal share one `run`."""

    def run(self, sessions: list[TargetSession], windows: list[Window]) -> list[Verdict | None]:
        """One window per session, evaluated together; a verdict per window (None for a prompt chunk that
        is not the last), each session's cache rolled back to what was accepted."""
        ...


class TargetSession(Protocol):
    n_ctx: int
    cached_prefix: int  # prompt tokens already in the cache when the session was opened (prefix reuse)
    verifier: Verifier  # what runs its windows, together with those of other sessions on the same verifier
    round_trip_s: float  # network seconds a window spends travelling (0 for a local target)

    @property
    def n_past(self) -> int:
        """Tokens in the target's cache (prompt and accepted tokens, without the pending one)."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None:
        """The generation is over: release what the session holds elsewhere (a verifier's KV cache)."""
        ...


def run_windows(sessions: list[TargetSession], windows: list[Window]) -> list[Verdict | None]:
    """Run every window, one `Verifier.run` per group of sessions on the same verifier."""
    groups: dict[Verifier, list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.verifier, []).append(i)
    verdicts: list[Verdict | None] = [None] * len(sessions)
    for verifier, members in groups.items():
        results = verifier.run([sessions[i] for i in members], [windows[i] for i in members])
        for i, verdict in zip(members, results, strict=True):
            verdicts[i] = verdict
    return verdicts


@dataclass(frozen=True)
class LocalVerifier:
    """The target model in this process: the sessions' windows go through one batched pass (`target_pass`)."""

    model: Model  # equal verifiers: the same model (compared by identity)

    def run(self, sessions: list[LocalTarget], windows: list[Window]) -> list[Verdict | None]:
        return target_pass(sessions, windows)


class LocalTarget:
    """The target on a sequence of a model in this process. Tokens the sequence already holds are a prefix of
    the prompt it is opened for (engine/prefix.py copied them there)."""

    def __init__(self, sequence: Sequence):
        self.sequence = sequence
        self.cached_prefix = sequence.n_past
        self.n_ctx = sequence.model.n_ctx
        self.verifier = LocalVerifier(sequence.model)
        self.round_trip_s = 0.0

    @property
    def n_past(self) -> int:
        return self.sequence.n_past

    def reset(self) -> None:
        self.sequence.reset()

    def close(self) -> None:
        # A model that copies prefixes keeps the sequence's KV for later prompts (engine/prefix.py); any other
        # frees it now rather than when the generation is collected (a cancelled request's may live on in a
        # traceback until the cyclic collector runs), so a llama.cpp context goes back to its pool at once.
        if not self.sequence.model.copies_prefix:
            self.sequence.reset()


def target_pass(sessions: list[LocalTarget], windows: list[Window]) -> list[Verdict | None]:
    """One batched target pass over several sessions of one model: evaluate each window, verify its drafts
    against the rows that predict them, roll each cache back to what was accepted."""
    work = [(s.sequence, w.append + w.drafts, bool(w.drafts)) for s, w in zip(sessions, windows, strict=True)]
    logits = sessions[0].sequence.model.eval_batch(work)
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
            accepted = tolerated_prefix(rows, window.drafts, window.probs, window.params, delta=window.tolerance)
            verdict = Verdict(accepted=accepted, next_token=target_choice(rows[accepted], window.params, window.rng))
        session.sequence.truncate(kept + verdict.accepted)  # KV rollback of the rejected drafts
        if window.with_confidence:
            verdict = replace(verdict, confidence=top_probability(rows[0], window.params))
        if window.params.logprobs is not None:  # the rows of the emitted tokens: accepted drafts and the target's
            emitted = [*window.drafts[: verdict.accepted], verdict.next_token]
            logprobs = token_logprobs(rows, emitted, window.params, window.params.logprobs)
            verdict = replace(verdict, logprobs=tuple(logprobs))
        verdicts.append(verdict)
    return verdicts
