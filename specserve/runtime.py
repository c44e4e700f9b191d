"""Wires models, backends and proposers into something that generates: what the CLI, bench and server use."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from specserve import SpecserveError
from specserve.backends.base import Backend
from specserve.backends.calibrate import batch_seconds, window_seconds
from specserve.backends.choose import Choice, choose, exact_prefix, exact_window_sizes
from specserve.cache.prefix import PrefixCache
from specserve.engine.adaptive import AdaptiveK, BatchCosts, MachineSpeed, SharedAcceptance
from specserve.engine.loop import PREFILL_CHUNK, Generation
from specserve.engine.proposers import CascadeProposer, DraftModelProposer, NgramProposer, Proposer
from specserve.engine.sampling import SamplingParams
from specserve.engine.verify import ToleranceController
from specserve.models.fetch import resolve_model
from specserve.models.quantize import resolve_draft_spec
from specserve.models.registry import DEFAULT_TARGET
from specserve.models.tokenizer import Tokenizer, check_compatible

log = logging.getLogger("specserve.runtime")
BACKENDS = ("torch-q4", "torch-int8", "torch-int8-onednn", "llama.cpp")
DRAFT_METHODS = ("draft", "cascade", "ngram", "none")
MODEL_METHODS = ("draft", "cascade")  # methods that need the draft model
# `auto`: chosen per machine by measurement (backends/choose.py), among BACKENDS.
DEFAULT_TARGET_BACKEND = "auto"
DEFAULT_DRAFT_SPEC = "quantized:Q4_0/Q4_0"  # models/quantize.py: the registry's draft, requantized on first use
DEFAULT_DRAFT_BACKEND = "auto"
DEFAULT_K: int | str = "auto"  # adaptive draft length (engine/adaptive.py); an int fixes it
K_MAX = 8
REMOTE_K_MAX = 16  # with a network round trip per window, longer windows pay (adaptive k decides)
REMOTE_Q_TOP_K = 64  # a remote draft samples from its top 64 tokens: the sparse q it sends the verifier
# A shared machine changes phase: not only its speed but the relative cost of window sizes (adaptive.py,
# `MachineSpeed.drifted`). A runtime whose measured speed drifts that far measures its costs again, at most
# this often (it takes ~0.5 s of the models' time, which every running request waits for).
COST_REFRESH_MIN_S = 30.0
_DRAFT_PASS_ROWS = (1, 2, 32)  # draft passes measured: a drafted token, a window's first pass, a catch-up
_CALIBRATION_TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"


def load_backend(kind: str, path: Path, n_ctx: int, show_progress: bool = True) -> Backend:
    """A backend by name (not `auto`: `Runtime` resolves that, see backends/choose.py)."""
    if kind == "llama.cpp":
        from specserve.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, n_ctx=n_ctx)
    if kind == "torch-int8":
        from specserve.backends.torch_int8 import TorchInt8Backend

        return TorchInt8Backend(path, n_ctx=n_ctx, show_progress=show_progress)
    if kind == "torch-int8-onednn":
        from specserve.backends.torch_int8 import TorchInt8OnednnBackend

        return TorchInt8OnednnBackend(path, n_ctx=n_ctx, show_progress=show_progress)
    if kind == "torch-q4":
        from specserve.backends.torch_q4 import TorchQ4Backend

        return TorchQ4Backend(path, n_ctx=n_ctx, show_progress=show_progress)
    raise SpecserveError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class RuntimeConfig:
    target: str = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT_SPEC  # None: no draft model (n-gram or plain decoding only)
    target_backend: str = DEFAULT_TARGET_BACKEND
    draft_backend: str = DEFAULT_DRAFT_BACKEND
    n_ctx: int = 4096
    k: int | str = DEFAULT_K
    verifiers: tuple[str, ...] = ()  # HOST:PORT of remote verifier services: the target runs there (cluster/)
    auth_token: str | None = None  # sent to the verifiers
    tls_ca: str | None = None  # PEM CA that signed the verifiers' TLS certificates (None: plaintext)

    @classmethod
    def from_args(cls, args, with_draft: bool = True) -> RuntimeConfig:
        """From the model options the CLI's subcommands share (see cli._add_model_args)."""
        return cls(
            target=args.target,
            draft=args.draft if with_draft and args.draft not in ("none", "") else None,  # --draft none: no draft model
            target_backend=args.target_backend,
            draft_backend=args.draft_backend,
            n_ctx=args.n_ctx,
            k=getattr(args, "k", DEFAULT_K),
            verifiers=tuple(a for a in (getattr(args, "verifier", None) or "").split(",") if a),
            auth_token=getattr(args, "auth_token", None) or None,
            tls_ca=getattr(args, "tls_ca", None),
        )


class Runtime:
    def __init__(self, config: RuntimeConfig, show_progress: bool = True, target: Backend | None = None):
        """`target`: an already loaded target backend to share (e.g. the bench comparing drafts)."""
        self.config = config
        self.cost_refreshes = 0  # times `refresh_costs` measured again
        t0 = time.perf_counter()
        if config.verifiers:
            self._init_remote(show_progress)
            self.load_s = time.perf_counter() - t0
            return
        target_path = resolve_model(config.target, show_progress)
        self.tokenizer = Tokenizer(target_path)
        draft_path = None
        if config.draft:
            draft_path = resolve_draft_spec(config.draft, config.target, show_progress)
            check_compatible(self.tokenizer, Tokenizer(draft_path))
        self.choice: Choice | None = None  # what `auto` measured and picked (`specserve info`, the bench JSON)
        if (target is None and config.target_backend == "auto") or (draft_path and config.draft_backend == "auto"):
            self.choice = choose(target_path, draft_path, K_MAX, show_progress)
        if target is None:
            kind, path = self._resolve("target", config.target_backend, target_path)
            target = load_backend(kind, path, config.n_ctx, show_progress)
        self.target = target
        self.target_name = self.target.model_path.name
        # Windows of up to this many rows are exact on the target (None: any size, by construction).
        self.exact_window = None if self.target.batch_invariant else self._exact_window()
        self.k_max = K_MAX if self.exact_window is None else max(0, min(K_MAX, self.exact_window - 1))
        self.draft = None
        if draft_path:
            kind, path = self._resolve("draft", config.draft_backend, draft_path)
            self.draft = load_backend(kind, path, config.n_ctx, show_progress)
        self.methods = ["none", "ngram"] + (list(MODEL_METHODS) if self.draft is not None else [])
        self._target_prefixes = _prefix_cache(self.target, align=PREFILL_CHUNK)  # exact: whole prefill chunks
        self._draft_prefixes = _prefix_cache(self.draft)
        self._adaptive_templates, self.batch_costs = self._calibrate()
        self._costs_measured_at = time.monotonic()
        self.load_s = time.perf_counter() - t0

    def _resolve(self, role: str, kind: str, path: Path) -> tuple[str, Path]:
        """The backend and file for `role` ("target" or "draft"): as configured, or what `auto` picked."""
        if kind != "auto":
            return kind, path
        measured = self.choice.target if role == "target" else self.choice.draft
        if measured is None:
            tried = "; ".join(f"{m.label}: {m.error}" for m in getattr(self.choice, f"{role}s"))
            raise SpecserveError(f"no {role} backend runs on this machine ({tried})")
        return measured.backend, Path(measured.model)

    def _exact_window(self) -> int:
        """The largest window size up to which the target's windows are bitwise one-token steps: as `auto`
        measured it for this backend and file, else measured now."""
        chosen = self.choice.target if self.choice else None
        if chosen and chosen.backend == self.target.name and Path(chosen.model) == self.target.model_path:
            return chosen.exact_windows()
        return exact_prefix(exact_window_sizes(self.target, self.tokenizer, tuple(range(1, K_MAX + 2))))

    def _init_remote(self, show_progress: bool) -> None:
        """Front-end of remote verifiers (specserve/cluster): the draft and tokenizer here, the target there."""
        from specserve.cluster.router import ClientOptions, VerifierPool

        config = self.config
        local = resolve_draft_spec(config.draft, config.target, show_progress) if config.draft else None
        self.tokenizer = Tokenizer(local or resolve_model(config.target, show_progress))
        options = ClientOptions(auth_token=config.auth_token, tls_ca=config.tls_ca)
        self.target = VerifierPool(list(config.verifiers), self.tokenizer.digest, options)
        self.tokenizer.chat_template = self.target.chat_template or self.tokenizer.chat_template  # the target's
        self.target_name = self.target.model_name
        self.choice, self.exact_window = None, None  # the verifiers send only window sizes that are exact there
        self.draft = None
        if local:
            if config.draft_backend == "auto":
                self.choice = choose(None, local, K_MAX, show_progress)
            kind, path = self._resolve("draft", config.draft_backend, local)
            self.draft = load_backend(kind, path, config.n_ctx, show_progress)
        self.methods = ["none", "ngram"] + (["draft"] if self.draft is not None else [])
        # KV lives on the verifiers: no local prefix reuse, and batches are formed there, not planned here.
        self._target_prefixes, self.batch_costs = None, None
        self._draft_prefixes = _prefix_cache(self.draft)
        verify = self.target.window_cost_s  # measured by the verifier at start-up
        self.k_max = min(REMOTE_K_MAX, max(verify) - 1)
        self._adaptive_templates = self._templates(self.k_max, verify, self.tokenizer.encode(_CALIBRATION_TEXT))

    def _templates(self, k_max: int, verify: dict[int, float], context: list[int]) -> dict[str, AdaptiveK]:
        """Adaptive k per method, seeded with the verify window costs and a draft step and catch-up measured
        here (a first pass of 2 rows, one of 1 row per further token). All follow measured speeds of the
        target and the draft; each method's requests share one running acceptance estimate (the next
        request's start)."""
        verify_speed = MachineSpeed()
        verify = dict(verify)  # one table for the runtime's controllers, which refine it (not the caller's)

        def template(draft: dict[int, float]) -> AdaptiveK:
            draft_cost, draft_first, catch_up = _draft_costs(draft)
            return AdaptiveK(
                k_max,
                verify_cost_s=verify,
                draft_cost_s=draft_cost,
                draft_first_s=draft_first,
                catch_up_s=catch_up,
                shared=SharedAcceptance(),
                verify_speed=verify_speed,
                draft_speed=MachineSpeed(),  # per method: a cascade's draft passes differ from the draft's
            )

        templates = {"ngram": template({})}
        if self.draft is not None:
            draft = window_seconds(self.draft, context, _DRAFT_PASS_ROWS, repeats=3)
            templates["draft"], templates["cascade"] = template(draft), template(draft)
        return templates

    def _calibrate(self) -> tuple[dict[str, AdaptiveK], BatchCosts]:
        """Seed adaptive k with this machine's costs: every verify window size and a draft step for one
        sequence, and passes of many rows for batches of concurrent sequences."""
        context = self.tokenizer.encode(_CALIBRATION_TEXT)
        verify = window_seconds(self.target, context, tuple(range(1, self.k_max + 2)), repeats=3)
        templates = self._templates(self.k_max, verify, context)
        rows = (1, 2, 4, 8, 16, 32, 64)  # beyond: extrapolated (engine/adaptive.py)
        costs = BatchCosts(batch_seconds(self.target, context, rows, window=self.k_max + 1))
        if self.draft is not None:
            # llama.cpp runs a batch's sequences one after another: two points give its (linear) cost
            draft_rows = rows[:6] if self.draft.batch_invariant else rows[:2]
            costs.draft_s = batch_seconds(self.draft, context, draft_rows, window=1)
            costs.catch_up_s = templates["draft"].catch_up_s
            costs.draft_speed = templates["draft"].draft_speed  # kept up to date by single requests
        return templates, costs

    def refresh_costs(self) -> bool:
        """Measure the window costs adaptive k plans with again when the machine's speed has drifted from
        them (`MachineSpeed.drifted`), at most every COST_REFRESH_MIN_S: the issue's "cost table, measured at
        start-up and refreshed". Call it between steps, from the thread that runs them (it uses the models).
        Requests already running keep their draft costs until they end; the verify table is shared. Batch
        plans keep their tables (concurrent rows), which follow their speed factors as before."""
        if self.config.verifiers or time.monotonic() - self._costs_measured_at < COST_REFRESH_MIN_S:
            return False  # a remote verifier measures its own costs
        templates = self._adaptive_templates
        anchor = templates["ngram"]  # every template shares the verify table and speed
        drafts = [templates[m] for m in MODEL_METHODS if m in templates]
        if not anchor.verify_speed.drifted() and not any(t.draft_speed.drifted() for t in drafts):
            return False
        context = self.tokenizer.encode(_CALIBRATION_TEXT)
        verify = window_seconds(self.target, context, tuple(range(1, self.k_max + 2)), repeats=2)
        anchor.verify_cost_s.clear()
        anchor.verify_cost_s.update(verify)
        anchor.verify_speed.recalibrated()
        if drafts:
            draft = window_seconds(self.draft, context, _DRAFT_PASS_ROWS, repeats=2)
            for template in drafts:
                template.draft_cost_s, template.draft_first_s, template.catch_up_s = _draft_costs(draft)
                template.draft_speed.recalibrated()
            self.batch_costs.catch_up_s = drafts[0].catch_up_s
        self._costs_measured_at = time.monotonic()
        self.cost_refreshes += 1
        log.info("window costs measured again: %s", {k: round(1000 * v, 1) for k, v in verify.items()})
        return True

    def draft_length(self, method: str, k: int | str | None, greedy: bool = True) -> int | AdaptiveK:
        """A fixed k, or a fresh adaptive controller seeded with the calibrated costs (and the recent
        acceptance of greedy or of sampled requests)."""
        k = self.config.k if k is None else k
        if k == "auto":
            if method not in self._adaptive_templates:
                return 0
            adaptive = self._adaptive_templates[method].fresh(greedy)
            adaptive.round_trip_s = getattr(self.target, "round_trip_s", 0.0)  # remote verifiers: network time
            return adaptive
        if self.exact_window is not None and int(k) >= self.exact_window:
            log.info(
                "k=%s capped at %d: longer windows are not exact on %s", k, self.exact_window - 1, self.target.name
            )
            return self.exact_window - 1
        return int(k)

    def encode_prompt(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        if messages is not None:
            return self.tokenizer.encode(self.tokenizer.render_chat(messages), special=True)
        return self.tokenizer.encode(prompt or "", special=False)

    def generate(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        method: str = "draft",
        k: int | None = None,
        tolerance: float | ToleranceController | None = None,
    ) -> Generation:
        """A generation ready to iterate (or to batch with others). `tolerance` switches on the lossy
        acceptance rule (engine/verify.py); the default is exact verification."""
        if method not in DRAFT_METHODS:
            raise SpecserveError(f"unknown speculation method {method!r}; choose one of {', '.join(DRAFT_METHODS)}")
        if method not in self.methods:
            raise SpecserveError(f"speculation method {method!r} needs a draft model; none is loaded")
        if tolerance is not None and self.config.verifiers:
            raise SpecserveError("tolerance acceptance runs on a local target only, not through --verifier")
        target = self.target.new_sequence()  # each request has its own KV cache; concurrent ones batch together
        reused = 0
        if self._target_prefixes is not None:  # local target: reuse whole prefill chunks of an earlier prompt
            reused = self._target_prefixes.fork(prompt_tokens, target)
            self._target_prefixes.remember(prompt_tokens, target)
        proposer = self._proposer(method, prompt_tokens)
        return Generation(
            target,
            self.tokenizer.decode_bytes,
            self.tokenizer.stop_ids,
            prompt_tokens,
            params,
            proposer,
            self.draft_length(method, k, params.greedy) if proposer else 0,
            cached_prefix=reused,
            tolerance=tolerance,
            batch_costs=self.batch_costs,
        )

    def _proposer(self, method: str, prompt_tokens: list[int]) -> Proposer | None:
        if method == "ngram":
            return NgramProposer()
        if method in MODEL_METHODS:
            sequence = self.draft.new_sequence()
            reused = 0
            if self._draft_prefixes is not None:
                reused = self._draft_prefixes.fork(prompt_tokens, sequence)
                self._draft_prefixes.remember(prompt_tokens, sequence)
            q_top_k = REMOTE_Q_TOP_K if self.config.verifiers else 0  # a remote verifier gets q sparsely
            draft = DraftModelProposer(sequence, cached=prompt_tokens[:reused], q_top_k=q_top_k)
            return CascadeProposer(draft) if method == "cascade" else draft
        return None


def _prefix_cache(backend: Backend | None, align: int = 1) -> PrefixCache | None:
    """Recent sequences of `backend` to copy prompt prefixes from; none where it cannot copy KV between
    sequences (remembering them would only pin their memory: a llama.cpp context each)."""
    return PrefixCache(align=align) if backend is not None and backend.copies_prefix else None


def _draft_costs(measured: dict[int, float]) -> tuple[float, float | None, float]:
    """AdaptiveK's draft costs from passes of `_DRAFT_PASS_ROWS` rows (empty: no draft model): a drafted
    token, a window's first pass, and a catch-up per token (a prompt, or tokens decoded at k = 0)."""
    if not measured:
        return 0.0, None, 0.0
    return measured[1], measured[2], measured[32] / 32
