"""The speculative decoding loop, top to bottom.

    prefill the prompt on the target (in chunks) -> first token
    repeat:
        proposer drafts k tokens (with the distributions it drew them from)
        target evaluates [pending token, d1..dk] in ONE pass -> k+1 rows of logits
        verify: accept a prefix of the drafts, plus one correction/bonus token from the target
        roll the target's KV back to the accepted length (the proposer re-syncs itself by prefix)
        emit the tokens, checking EOS / stop strings / max_tokens / context length

The target pass, verification and rollback are one call to the generation's `TargetSession`
(engine/target.py): in this process, or on a remote verifier service (specserve/cluster).

`step(generations)` runs one such iteration for several requests at once: their draft steps run in
lockstep batches and their windows share one target pass (backends are batch-invariant, so each request
gets exactly what it would get alone). Iterating a single `Generation` is `step([self])` until done.

With k = 0 (or no proposer) each step is exactly plain decoding: one token per target pass. k comes from the
generation's `DraftLengthPolicy` (engine/policy.py): fixed, or planned per step for the whole batch from
measured acceptance (engine/acceptance.py) and measured costs (engine/costs.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from specserve.config import PREFILL_CHUNK
from specserve.engine.model import ContextOverflowError, TokenText
from specserve.engine.policy import DraftLengthPolicy, FixedK, WindowRecord
from specserve.engine.proposers import DraftRequest, Proposal, Proposer, propose_batch
from specserve.engine.sampling import SamplingParams, TokenLogprob
from specserve.engine.stats import GenerationStats
from specserve.engine.stops import TextStream
from specserve.engine.target import TargetSession, Window, run_windows
from specserve.engine.verify import ToleranceController, Verdict

PLAIN_DECODING = FixedK(0)  # the policy of a generation without a drafter (stateless: shared)
# Prompt tokens go in chunks of PREFILL_CHUNK per pass: a fixed size (not one that depends on who else is
# running) keeps a request's numerics the same alone or batched, and bounds how long a new prompt stalls others.
log = logging.getLogger("specserve.loop")


@dataclass(frozen=True, kw_only=True)
class WindowTrace:
    """The verify window a token came out of, and its step's times (all generations of the step)."""

    index: int  # the generation's verify windows so far (0: the prompt's last chunk)
    drafted: int
    accepted: int
    draft_s: float
    verify_s: float


@dataclass(frozen=True, kw_only=True)
class Emitted:
    token: int | None  # None: only releases text held back until the end
    text: str  # text released with this token (held-back text comes out with later tokens)
    from_draft: bool  # accepted draft token (True) or produced by the target itself (False)
    logprob: TokenLogprob | None = None  # the target's, when the generation asked for them
    window: WindowTrace | None = None


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """How a generation drafts and what it accepts. A generation without one decodes plainly."""

    proposer: Proposer
    policy: DraftLengthPolicy  # the draft length per window, shared by a runtime's generations so that
    # concurrent ones are planned as one batch (engine/policy.py)
    tolerance: ToleranceController | None = None  # the lossy opt-in rule instead of exact verification


@dataclass(frozen=True, kw_only=True)
class Step:
    """One iteration's output and its phases' boundaries (`time.perf_counter()` values)."""

    events: list[list[Emitted]]  # per generation, in order
    started: float
    drafted: float
    verified: float
    accepted: float


def step(generations: list[Generation]) -> Step:
    """One iteration for each (unfinished) generation: draft, one shared target pass, verify, emit."""
    t0 = time.perf_counter()
    slots = [g.slot() for g in generations]
    planned = _plan(generations, slots)
    requests = [g.draft_request(slot, k) for g, slot, k in zip(generations, slots, planned, strict=True)]
    try:
        proposals = propose_batch(requests)
    except Exception:  # the draft side failed: carry on without it; the target alone gives the same output
        log.exception("drafting failed; %d requests continue with target-only decoding (k=0)", len(generations))
        proposals = [g.without_draft_model() for g in generations]
    t1 = time.perf_counter()
    windows = [g.open_window(p) for g, p in zip(generations, proposals, strict=True)]
    verdicts = run_windows([g.target for g in generations], windows)
    t2 = time.perf_counter()
    results = [g.result(s, w, v) for g, s, w, v in zip(generations, slots, windows, verdicts, strict=True)]
    for policy in {id(g.policy): g.policy for g in generations}.values():
        policy.observe(results, t1 - t0, t2 - t1)
    events = [g.close_window(v, t1 - t0, t2 - t1) for g, v in zip(generations, verdicts, strict=True)]
    return Step(events=events, started=t0, drafted=t1, verified=t2, accepted=time.perf_counter())


def _plan(generations: list[Generation], slots: list[WindowRecord]) -> list[int]:
    """Draft lengths for one step. Generations that share a policy are planned together; the rows of the
    others (prefill chunks, other policies' windows at their most) count as rows of the same pass."""
    planned = [0] * len(generations)
    groups: dict[int, list[int]] = {}
    rows = 0
    for i, (g, slot) in enumerate(zip(generations, slots, strict=True)):
        if g.prefilling:
            rows += min(PREFILL_CHUNK, len(g.prompt) - g.prefilled)
        else:
            rows += 1 + slot.limit
            groups.setdefault(id(g.policy), []).append(i)
    for members in groups.values():
        own = [slots[i] for i in members]
        other_rows = rows - sum(1 + slot.limit for slot in own)
        for i, k in zip(members, generations[members[0]].policy.plan(own, other_rows), strict=True):
            planned[i] = k
    return planned


class Generation:
    """One request on its own target sequence. Iterate it (or pass it to `step` with others) to run the
    loop; `stats`, `finish_reason` and `text` follow its progress."""

    def __init__(
        self,
        *,
        target: TargetSession,
        tokenizer: TokenText,
        prompt: list[int],
        params: SamplingParams,
        speculation: Speculation | None = None,
    ):
        """`target`: a session opened for this prompt; the prefix of it already in its cache
        (`cached_prefix`) is not evaluated again, and a session holding none is reset first. Proposers sync
        themselves to the context. Without a `speculation` (or with a policy whose k is 0) it is plain
        decoding."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= target.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the context holds {target.n_ctx} including the reply"
            )
        if params.adjusts_logits:  # penalties count the reply from here
            params = replace(params, reply_start=len(prompt))
        self.target, self.prompt, self.params = target, prompt, params
        speculating = speculation is not None and speculation.policy.k_max > 0
        self.policy = speculation.policy if speculating else PLAIN_DECODING
        self.proposer = speculation.proposer if speculating else None
        self.tolerance = speculation.tolerance if speculating else None
        self.draft_state = self.policy.start(self.proposer.name, params.greedy) if self.proposer is not None else None
        self.stop_ids = (frozenset() if params.ignore_eos else tokenizer.stop_ids) | frozenset(params.stop_token_ids)
        self.tokens: list[int] = []  # emitted tokens
        self.context = list(prompt)  # prompt + emitted tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        self._text = TextStream(tokenizer.decode_bytes, params.stop)
        self._rng = np.random.default_rng(params.seed)
        self._start: float | None = None
        self._prefilled = target.cached_prefix  # prompt tokens in the target's KV cache
        self.stats.prefix_reused = target.cached_prefix
        self._proposal = Proposal(tokens=[], probs=[])

    @property
    def text(self) -> str:
        return self._text.released_text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the reply (None: it ended otherwise, or goes on)."""
        return self._text.matched

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Emitted]:
        while not self.done:
            yield from step([self]).events[0]

    # --- one step, in three phases (see `step`) ---

    @property
    def prefilling(self) -> bool:
        return self._prefilled < len(self.prompt)

    @property
    def prefilled(self) -> int:
        return self._prefilled

    @property
    def remaining(self) -> int:
        """Tokens the reply may still produce (max_tokens allowing)."""
        return self.params.max_tokens - len(self.tokens)

    def slot(self) -> WindowRecord:
        """The next window as the policy plans it (while the prompt is prefilled: one of no drafts)."""
        if self.prefilling:
            return WindowRecord(state=self.draft_state, remaining=self.remaining, round_trip_s=self.target.round_trip_s)
        room = self.target.n_ctx - self.target.n_past - 1  # window slots left after the pending token
        limit = max(0, min(self.policy.k_max, room, self.remaining - 1)) if self.proposer is not None else 0
        # Tokens the draft must evaluate before it drafts again, the prompt too when it has not drafted yet:
        # a draft that starts and then finds nothing to accept has paid for the prompt for nothing.
        sync = self.proposer.sync_rows(self.context) if self.proposer is not None else 0
        uses_model = self.proposer is not None and self.proposer.drafts_with_model(self.context)
        return WindowRecord(
            state=self.draft_state,
            limit=limit,
            uses_model=uses_model,
            sync_rows=sync,
            remaining=self.remaining,
            round_trip_s=self.target.round_trip_s,
        )

    def draft_request(self, slot: WindowRecord, k: int) -> DraftRequest:
        """Phase 1: what to draft now: k as planned (0 while prefilling and for plain decoding)."""
        if self._start is None:
            self._start = time.perf_counter()
            if self._prefilled == 0:
                self.target.reset()
        if self.prefilling:
            return DraftRequest(proposer=None, context=self.context, k=0, params=self.params, rng=self._rng)
        self.stats.chosen_k.append(k)
        min_confidence = self.policy.min_confidence(slot) if k else 0.0
        # Tolerance needs the draft's probability of each token even when drafting greedily.
        return DraftRequest(
            proposer=self.proposer,
            context=self.context,
            k=k,
            params=self.params,
            rng=self._rng,
            with_probs=self.tolerance is not None,
            min_confidence=min_confidence,
        )

    def open_window(self, proposal: Proposal) -> Window:
        """Phase 2: what the target pass appends and verifies for this generation."""
        with_confidence = self.draft_state is not None  # only a policy with state reads the target's confidence
        if self.prefilling:
            chunk = self.prompt[self._prefilled : self._prefilled + PREFILL_CHUNK]
            last = self._prefilled + len(chunk) == len(self.prompt)
            return Window(
                append=chunk,
                drafts=[],
                probs=[],
                predict=last,
                params=self.params,
                rng=self._rng,
                with_confidence=with_confidence,
                context=self.context,
            )
        if (grammar := self.params.grammar) is not None and proposal.tokens:  # a forbidden draft is rejected:
            keep = grammar.valid_prefix(proposal.tokens)  # do not verify it (point-mass drafters propose them)
            proposal = Proposal(
                tokens=proposal.tokens[:keep], probs=proposal.probs[:keep], confidence=proposal.confidence[:keep]
            )
        self._proposal = proposal
        delta = self.tolerance.delta if self.tolerance is not None else None
        return Window(
            append=[self.context[-1]],
            drafts=proposal.tokens,
            probs=proposal.probs,
            predict=True,
            params=self.params,
            rng=self._rng,
            tolerance=delta,
            with_confidence=with_confidence,
            context=self.context,
        )

    def result(self, slot: WindowRecord, window: Window, verdict: Verdict | None) -> WindowRecord:
        """What the policy learns from this generation's part of the step: its record, with the outcome."""
        rows = len(window.append) + len(window.drafts)
        if verdict is None:
            return replace(slot, rows=rows)
        drafted = len(window.drafts)
        return replace(
            slot,
            rows=rows,
            drafted=drafted,
            accepted=verdict.accepted,
            expected_accepted=verdict.expected_accepted,
            draft_confidence=tuple(self._proposal.confidence) if drafted else (),
            target_confidence=verdict.confidence,
        )

    def close_window(self, verdict: Verdict | None, draft_s: float, verify_s: float) -> list[Emitted]:
        """Phase 3: take the target's verdict on the window, emit."""
        stats = self.stats
        if self.prefilling:
            self._prefilled += min(PREFILL_CHUNK, len(self.prompt) - self._prefilled)
            if verdict is None:
                return []
            stats.prefill_s = time.perf_counter() - self._start
            window = WindowTrace(index=0, drafted=0, accepted=0, draft_s=draft_s, verify_s=verify_s)
            return self._accept([], verdict, window)
        drafted = self._proposal.tokens
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        stats.record_window(len(drafted), verdict.accepted)
        if self.tolerance is not None:
            self.tolerance.observe(len(drafted), verdict.accepted)
        return self._accept(
            drafted[: verdict.accepted],
            verdict,
            WindowTrace(
                index=len(stats.windows),
                drafted=len(drafted),
                accepted=verdict.accepted,
                draft_s=draft_s,
                verify_s=verify_s,
            ),
        )

    def stop(self, reason: str) -> list[Emitted]:
        """End the reply where it is (a deadline passed): the text held back for stop strings comes out."""
        if self.finish_reason is not None:
            return []
        self.finish_reason = reason
        self.stats.total_s = time.perf_counter() - self._start if self._start is not None else 0.0
        self.target.close()
        tail = self._text.finish()
        return [Emitted(token=None, text=tail, from_draft=False)] if tail else []

    def without_draft_model(self) -> Proposal:
        """After a draft failure: no drafts in this step, and no draft model from now on (k = 0)."""
        if self._prefilled >= len(self.prompt) and self.stats.chosen_k:
            self.stats.chosen_k[-1] = 0  # this step drafts nothing after all
        if self.proposer is not None and self.proposer.uses_model:
            self.proposer = None
        return Proposal(tokens=[], probs=[])

    # --- emitting ---

    def _accept(self, accepted_drafts: list[int], verdict: Verdict, window: WindowTrace) -> list[Emitted]:
        """Emit accepted drafts and the target's token, up to the first stop condition."""
        out: list[Emitted] = []
        next_token = verdict.next_token
        tokens = [*accepted_drafts, next_token]
        logprobs = verdict.logprobs or (None,) * len(tokens)
        for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            self.stats.generated += 1
            text = self._text.push(token)
            out.append(
                Emitted(token=token, text=text, from_draft=i < len(accepted_drafts), logprob=logprob, window=window)
            )
            if self._text.stopped:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                break
        self.context.extend([*accepted_drafts, next_token])
        if self.params.grammar is not None and self.finish_reason is None:
            self.params.grammar.commit([*accepted_drafts, next_token])
        if self.finish_reason is None and self.target.n_past >= self.target.n_ctx:
            self.finish_reason = "length"  # no room for the pending token
        if self.finish_reason is not None:
            self.stats.total_s = time.perf_counter() - self._start
            self.target.close()
            if tail := self._text.finish():
                out.append(Emitted(token=None, text=tail, from_draft=False))  # held back for a possible stop string
        return out
