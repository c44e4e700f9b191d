"""Wires models, backends and proposers into something that generates: what the CLI, bench and server use.

`open_runtime(config)` gives a `LocalRuntime` (the target in this process) or, with `config.verifiers`, a
`RemoteRuntime` (the target on verifier services, specserve/cluster; the draft here). Both hand out
`Generation`s on a `TargetSession`, planned by one `DraftLengthPolicy` per runtime (engine/policy.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from specserve import SpecserveError
from specserve.backends import load_backend
from specserve.backends.choose import Choice, choose, exact_prefix, exact_window_sizes, measured_while_busy
from specserve.config import (
    DEFAULT_DRAFT_SPEC,
    K_MAX,
    METHODS,
    MODEL_METHODS,
    PREFILL_CHUNK,
    REMOTE_K_MAX,
    REMOTE_Q_TOP_K,
    EngineConfig,
)
from specserve.engine.costs import CALIBRATION_TEXT, DRAFT_ROWS, CostModel, PassCost, calibrate, measure_rows
from specserve.engine.grammar import Grammar
from specserve.engine.loop import PLAIN_DECODING, Generation, Speculation
from specserve.engine.model import Model
from specserve.engine.policy import AdaptiveK, DraftLengthPolicy, FixedK
from specserve.engine.prefix import PrefixCache
from specserve.engine.proposers import CascadeProposer, DraftModelProposer, NgramProposer, Proposer
from specserve.engine.sampling import SamplingParams
from specserve.engine.suffix import SuffixCache, SuffixCascade, SuffixProposer
from specserve.engine.target import LocalTarget, TargetSession
from specserve.engine.verify import ToleranceController
from specserve.models.fetch import ModelError
from specserve.models.quantize import resolve_draft_spec, resolve_target_spec, weights_in_words
from specserve.models.tokenizer import Tokenizer, check_compatible

log = logging.getLogger("specserve.runtime")


class Runtime(ABC):
    """What both kinds share: the tokenizer, the draft model, the methods and the draft-length policy."""

    config: EngineConfig
    tokenizer: Tokenizer
    draft: Model | None
    choice: Choice | None  # what `auto` measured and picked (`specserve info`, the bench JSON)
    target_name: str
    target_backend: str  # where the target runs: its backend here, or the verifiers it runs on
    target_weights: str  # in words: the file's own weights, or which requantized copy (`weights_in_words`)
    k_max: int  # the most drafts an adaptive window may hold here
    k_limit: int  # ... and a fixed k: windows beyond are not exact on the target
    exact_window: int | None  # windows up to this many rows are exact on the target (None: any size)
    policy: AdaptiveK | None  # adaptive k, shared by the runtime's requests (None: nothing can draft)
    n_ctx: int  # tokens of context a request may use: prompt and reply
    load_s: float
    suffixes: SuffixCache  # recent replies, which suffix drafting draws on (engine/suffix.py)

    @property
    def methods(self) -> list[str]:
        return ["none", "ngram", "suffix"] + (list(MODEL_METHODS) if self.draft is not None else [])

    def summary(self) -> dict:
        """What a client may show about this server (`GET /v1/specserve/info`, the web page)."""
        from specserve import hardware, kernels

        return {
            "model": self.target_name,
            "target_backend": self.target_backend,
            "target_weights": self.target_weights,
            "draft": self.draft.model_path.name if self.draft is not None else None,
            "draft_backend": self.draft.name if self.draft is not None else None,
            "draft_weights": self.draft_weights,
            "specserve_kernels": kernels.ops().isa(),
            "auto": self.choice.reason if self.choice is not None else None,
            "methods": self.methods,
            "k_max": self.k_max,
            "k_limit": self.k_limit,
            "n_ctx": self.n_ctx,
            "draft_cache": self.config.draft_cache,
            "cpu": hardware.cpu_model(),
            "isa": hardware.isa(),
        }

    def _resolve(self, role: str, kind: str, path: Path) -> tuple[str, Path]:
        """The backend and file for `role` ("target" or "draft"): as configured, or what `auto` picked."""
        if kind != "auto":
            return kind, path
        measured = self.choice.target if role == "target" else self.choice.draft
        if measured is None:
            tried = "; ".join(
                f"{m.label}: {m.error}" for m in (self.choice.targets if role == "target" else self.choice.drafts)
            )
            raise SpecserveError(f"no {role} backend runs on this machine ({tried})")
        return measured.backend, Path(measured.model)

    @property
    def draft_weights(self) -> str | None:
        """The draft's weights in words (a requantized copy is fine there: the target decides every token)."""
        return weights_in_words(self.draft.model_path, self.draft.converted_to) if self.draft is not None else None

    def _lock_weights(self) -> None:
        """After loading: the weights stay in RAM (`EngineConfig.mlock`), or a warning says why not."""
        from specserve import hardware

        if self.config.mlock and (reason := hardware.lock_memory()) is not None:
            log.warning("--mlock: the weights may be paged out while idle: %s", reason)

    def _load_draft(self, path: Path | None, show_progress: bool) -> None:
        self.draft = None
        if path is not None:
            kind, file = self._resolve("draft", self.config.draft_backend, path)
            self.draft = load_backend(kind, file, self.config.n_ctx, show_progress, requantize=True)
        self._draft_prefixes = _prefix_cache(self.draft)

    def refresh_costs(self, wanted: Callable[[], bool] = lambda: False) -> bool:
        """Measure the cost tables again if the machine's speed has drifted from them (engine/costs.py);
        given up as soon as `wanted()`: a request came."""
        return self.policy is not None and self.policy.costs.refresh(wanted)

    @property
    def cost_refreshes(self) -> int:
        return self.policy.costs.refreshes if self.policy is not None else 0

    def draft_length(self, method: str, k: int | str | None = None) -> DraftLengthPolicy:
        """The policy for a request: adaptive (`auto`) or a fixed k, capped at the exact window sizes."""
        k = self.config.k if k is None else k
        if method == "none":
            return PLAIN_DECODING
        if k == "auto":
            return self.policy or PLAIN_DECODING
        k = int(k)
        if k > self.k_limit:
            log.info("k=%d capped at %d: longer windows are not exact on %s", k, self.k_limit, self.target_name)
        return FixedK(min(k, self.k_limit))

    def encode_prompt(
        self, prompt: str | None = None, messages: list[dict] | None = None, tools: list[dict] | None = None
    ) -> list[int]:
        if messages is not None:
            return self.tokenizer.encode(self.tokenizer.render_chat(messages, tools), special=True)
        return self.tokenizer.encode(prompt or "", special=False)

    def unavailable(self) -> str | None:
        """Why no request can run now (a remote target with every verifier down), or None."""
        return None

    @abstractmethod
    def new_target_session(
        self, prompt_tokens: list[int], trace_context: dict[str, str] | None = None
    ) -> TargetSession:
        """A fresh target session for a request (holding the prompt's prefix when it can reuse one).
        `trace_context`: the request's W3C trace context, for a remote target's spans to join."""

    def generate(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        method: str = "draft",
        k: int | str | None = None,
        tolerance: ToleranceController | None = None,
        user: str | None = None,
        logprobs: int | None = None,
        grammar: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Generation:
        """A generation ready to iterate (or to batch with others). `tolerance` switches on the lossy
        acceptance rule (engine/verify.py); the default is exact verification. `user`: the request's
        tenant, whose earlier replies suffix drafts may come from (`EngineConfig.draft_cache`). `logprobs`:
        report the target's log-probability of each token with this many alternatives (`Generation`).
        `grammar`: an llguidance grammar the reply must follow (engine/grammar.py). `trace_context`: the
        request's W3C trace context (a remote verifier's spans join its trace)."""
        if method not in METHODS:
            raise SpecserveError(f"unknown speculation method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in self.methods:
            raise SpecserveError(f"speculation method {method!r} needs a draft model; none is loaded")
        if tolerance is not None and self.config.verifiers:
            raise SpecserveError("tolerance acceptance runs on a local target only, not through --verifier")
        if (params.adjusts_logits or grammar is not None) and self.config.verifiers:
            raise SpecserveError(
                "penalties, logit_bias and grammars apply on a local target only, not yet through --verifier"
            )
        if logprobs is not None and self.config.verifiers:
            raise SpecserveError("logprobs are reported by a local target only, not yet through --verifier")
        if grammar is not None:
            params = dataclasses.replace(params, grammar=Grammar(self.tokenizer.guidance, grammar))
        if logprobs is not None:
            params = dataclasses.replace(params, logprobs=logprobs)
        proposer = self._proposer(method, prompt_tokens, user)
        speculation = None
        if proposer is not None:
            speculation = Speculation(proposer=proposer, policy=self.draft_length(method, k), tolerance=tolerance)
        return Generation(
            target=self.new_target_session(prompt_tokens, trace_context),
            tokenizer=self.tokenizer,
            prompt=prompt_tokens,
            params=params,
            speculation=speculation,
        )

    def suffix_scope(self, user: str | None) -> str | None:
        """The tree of earlier replies a request of `user` drafts from and adds to (None: none)."""
        mode = self.config.draft_cache
        if mode == "global":
            return ""
        if mode == "per-user" and user:
            return f"user:{user}"
        return None  # "off", or a request that names no user: its own prompt and reply only

    def _suffix(self, prompt_tokens: list[int], user: str | None) -> SuffixProposer:
        scope = self.suffix_scope(user)
        return SuffixProposer(prompt_tokens, self.suffixes.open(scope) if scope is not None else None)

    def _proposer(self, method: str, prompt_tokens: list[int], user: str | None = None) -> Proposer | None:
        if method == "ngram":
            return NgramProposer()
        if method == "suffix":
            return self._suffix(prompt_tokens, user)
        if method not in MODEL_METHODS:
            return None
        sequence = self.draft.new_sequence()
        reused = 0
        if self._draft_prefixes is not None:
            reused = self._draft_prefixes.fork(prompt_tokens, sequence)
            self._draft_prefixes.remember(prompt_tokens, sequence)
        q_top_k = REMOTE_Q_TOP_K if self.config.verifiers else 0  # a remote verifier gets q sparsely
        draft = DraftModelProposer(sequence, cached=prompt_tokens[:reused], q_top_k=q_top_k)
        if method == "suffix-draft":
            return SuffixCascade(self._suffix(prompt_tokens, user), draft, self.k_max)
        return CascadeProposer(draft) if method == "cascade" else draft


class LocalRuntime(Runtime):
    """The target and the draft in this process."""

    target: Model

    def __init__(self, config: EngineConfig, show_progress: bool = True, target: Model | None = None):
        """`target`: an already loaded target model to share (e.g. the bench comparing drafts)."""
        t0 = time.perf_counter()
        self.config = config
        self.suffixes = SuffixCache()
        target_path = resolve_target_spec(config.target, show_progress)
        self.tokenizer = Tokenizer(target_path)
        draft_path = None
        if config.draft:
            draft_path = resolve_draft_spec(config.draft, config.target, show_progress)
            try:
                check_compatible(self.tokenizer, Tokenizer(draft_path))
            except ModelError as exc:
                if config.draft != DEFAULT_DRAFT_SPEC:  # a draft asked for by name: its mismatch is an error
                    raise
                # the default draft beside a target of another family: draft without a model instead
                log.warning("the default draft cannot draft for this target, which drafts model-free: %s", exc)
                draft_path = None
        self.choice = None
        if (target is None and config.target_backend == "auto") or (draft_path and config.draft_backend == "auto"):
            self.choice = choose(target_path, draft_path, K_MAX, show_progress, requantize=config.requantize)
        self._load(target, target_path, draft_path, show_progress)
        if self._runs_auto_target() and measured_while_busy(self.choice, self.policy.costs.target.table[1]):
            log.warning(
                "auto's cached measurements of this machine look taken while it was busy (%s: %.1f ms for one "
                "row then, %.1f ms now); measuring the backends again",
                self.choice.target.label,
                1000 * self.choice.target.seconds[1],
                1000 * self.policy.costs.target.table[1],
            )
            before = self.choice
            self.choice = choose(
                target_path, draft_path, K_MAX, show_progress, again=True, requantize=config.requantize
            )
            if _picks(self.choice) != _picks(before):
                log.warning("auto picks again: %s", self.choice.reason)
                self._load(target, target_path, draft_path, show_progress)
        self._lock_weights()
        self.load_s = time.perf_counter() - t0

    def _runs_auto_target(self) -> bool:
        picked = self.choice.target if self.choice is not None else None
        return picked is not None and (picked.backend, Path(picked.model)) == (self.target.name, self.target.model_path)

    def _load(self, target: Model | None, target_path: Path, draft_path: Path | None, show_progress: bool) -> None:
        """Load the models (`target` if given, else as configured or picked) and measure their costs."""
        config = self.config
        if target is None:
            kind, path = self._resolve("target", config.target_backend, target_path)
            target = load_backend(kind, path, config.n_ctx, show_progress, requantize=config.requantize)
        self.target = target
        self.target_name, self.n_ctx = target.model_path.name, target.n_ctx
        self.target_backend = target.name
        self.target_weights = weights_in_words(target.model_path, target.converted_to)
        self.exact_window = None if target.batch_invariant else self._exact_window()
        self.k_max = K_MAX if self.exact_window is None else max(0, min(K_MAX, self.exact_window - 1))
        self.k_limit = REMOTE_K_MAX if self.exact_window is None else self.exact_window - 1
        self._load_draft(draft_path, show_progress)
        self._target_prefixes = _prefix_cache(target, align=PREFILL_CHUNK)  # exact: whole prefill chunks
        context = self.tokenizer.encode(CALIBRATION_TEXT)
        costs = calibrate(target, self.draft, context, self.k_max)
        self.policy = AdaptiveK(costs, self.k_max, config.ablate)

    def ablated(self, features: frozenset[str]) -> LocalRuntime:
        """This runtime's models with a policy of its own, calibrated afresh, without `features`
        (engine/policy.py): the bench's ablation rows."""
        clone = copy.copy(self)
        clone.config = dataclasses.replace(self.config, ablate=features)
        costs = calibrate(self.target, self.draft, self.tokenizer.encode(CALIBRATION_TEXT), self.k_max)
        clone.policy = AdaptiveK(costs, self.k_max, features)
        return clone

    def _exact_window(self) -> int:
        """The largest window size up to which the target's windows are bitwise one-token steps: as `auto`
        measured it for this backend and file, else measured now."""
        chosen = self.choice.target if self.choice else None
        if chosen and chosen.backend == self.target.name and Path(chosen.model) == self.target.model_path:
            return chosen.exact_windows()
        return exact_prefix(exact_window_sizes(self.target, self.tokenizer, tuple(range(1, K_MAX + 2))))

    def new_target_session(
        self, prompt_tokens: list[int], trace_context: dict[str, str] | None = None
    ) -> TargetSession:
        sequence = self.target.new_sequence()  # each request has its own KV cache; concurrent ones batch together
        if self._target_prefixes is not None:  # reuse whole prefill chunks of an earlier prompt
            self._target_prefixes.fork(prompt_tokens, sequence)
            self._target_prefixes.remember(prompt_tokens, sequence)
        return LocalTarget(sequence)


class RemoteRuntime(Runtime):
    """Front-end of remote verifiers (specserve/cluster): the draft and tokenizer here, the target there."""

    def __init__(
        self,
        config: EngineConfig,
        show_progress: bool = True,
        on_wait: Callable[[str], None] | None = None,
        *,
        interceptors: tuple = (),
    ):
        """`on_wait`: told why, while no verifier answers yet (for up to `config.verifier_wait_s`);
        `interceptors`: gRPC client interceptors on the verifiers' channels."""
        from specserve.cluster.client.router import ClientOptions, VerifierPool

        t0 = time.perf_counter()
        self.config = config
        self.suffixes = SuffixCache()
        local = resolve_draft_spec(config.draft, config.target, show_progress) if config.draft else None
        self.tokenizer = Tokenizer(local or resolve_target_spec(config.target, show_progress))
        options = ClientOptions(
            auth_token=config.auth_token,
            tls_ca=config.tls_ca,
            wait_s=config.verifier_wait_s,
            on_wait=on_wait,
            interceptors=interceptors,
        )
        self.pool = VerifierPool(list(config.verifiers), self.tokenizer.digest, options)
        self.tokenizer.chat_template = self.pool.chat_template or self.tokenizer.chat_template  # the target's
        self.target_name, self.n_ctx = self.pool.model_name, self.pool.n_ctx
        self.target_backend = f"verifiers {', '.join(config.verifiers)}"
        self.target_weights = self.pool.weights
        self.exact_window = None  # the verifiers report only window sizes that are exact there
        self.choice = None
        if local and config.draft_backend == "auto":
            self.choice = choose(None, local, K_MAX, show_progress)
        self._load_draft(local, show_progress)
        verify = self.pool.window_cost_s  # measured by the verifier at start-up
        self.k_max = self.k_limit = min(config.k_max, max(verify) - 1)
        draft = None
        if self.draft is not None:
            # one sequence at a time: batches form on the verifiers
            table = measure_rows(self.draft.new_sequence(), self.tokenizer.encode(CALIBRATION_TEXT), DRAFT_ROWS)
            draft = PassCost(table, batches_sequences=False)
        # KV lives on the verifiers: no local prefix reuse; windows are planned one request at a time
        self.policy = AdaptiveK(
            CostModel(PassCost(dict(verify), batches_sequences=False), draft), self.k_max, config.ablate
        )
        self._lock_weights()
        self.load_s = time.perf_counter() - t0

    def unavailable(self) -> str | None:
        return self.pool.unavailable()

    @property
    def methods(self) -> list[str]:
        # the cascades are local only: the n-gram cascade's q is not sparse; the suffix one is untried remotely
        return ["none", "ngram", "suffix"] + (["draft"] if self.draft is not None else [])

    def new_target_session(
        self, prompt_tokens: list[int], trace_context: dict[str, str] | None = None
    ) -> TargetSession:
        from specserve.cluster.client.remote import RemoteTarget

        return RemoteTarget(self.pool, trace_context)


def open_runtime(
    config: EngineConfig,
    show_progress: bool = True,
    target: Model | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Runtime:
    """A runtime for `config`: remote when it names verifiers, else local (sharing `target` if given).
    `on_wait`: told why while it waits for a first verifier (`RemoteRuntime`)."""
    if config.verifiers:
        return RemoteRuntime(config, show_progress, on_wait)
    return LocalRuntime(config, show_progress, target)


def _picks(choice: Choice) -> tuple:
    """What a choice loads: the (backend, file) of its target and of its draft."""
    return tuple((m.backend, m.model) if m is not None else None for m in (choice.target, choice.draft))


def _prefix_cache(model: Model | None, align: int = 1) -> PrefixCache | None:
    """Recent sequences of `model` to copy prompt prefixes from; none where it cannot copy KV between
    sequences (remembering them would only pin their memory: a llama.cpp context each)."""
    return PrefixCache(align=align) if model is not None and model.copies_prefix else None
