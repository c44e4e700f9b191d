"""Every limit and default of specserve, once, and the configurations built from them.

The CLI builds these objects; the engine, the HTTP schemas, the verifier service and the Ray deployment read
them. This module imports nothing heavy (no model code), so `specserve --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve import SpecserveError
from specserve.models.registry import DEFAULT_TARGET

BACKENDS = ("torch-q4", "torch-int8", "torch-int8-onednn", "llama.cpp")  # `auto` chooses among these
METHODS = ("draft", "cascade", "ngram", "suffix", "suffix-draft", "none")  # speculation methods
MODEL_METHODS = ("draft", "cascade", "suffix-draft")  # the methods that need the draft model
# What a server runs for requests that name no method (standard clients never do): the served bench's choice
# (docs/benchmarks/2026-12-06-amd-zen3-served.md): suffix trees where the reply repeats text, else the draft.
DEFAULT_SPECULATION = "suffix-draft"
# which replies a request's suffix drafts may come from (engine/suffix.py): those of requests with the same
# `user`, of every request, or its own prompt and reply only
DRAFT_CACHES = ("per-user", "global", "off")
DEFAULT_DRAFT_SPEC = "quantized:Q4_0/Q4_0"  # models/quantize.py: the registry's draft, requantized on first use
N_CTX = 4096  # tokens of context per sequence
K_MAX = 8  # most draft tokens per window with a local target
REMOTE_K_MAX = 16  # ... with a remote one: a network round trip per window makes longer windows pay
REMOTE_Q_TOP_K = 64  # a remote draft samples from its top 64 tokens: the sparse q it sends the verifier
PREFILL_CHUNK = 128  # prompt tokens per prefill pass (engine/loop.py says why it is fixed)
SERVER_MAX_BATCH = 8  # requests the HTTP server decodes together
SERVER_MAX_QUEUE = 64  # requests waiting for a batch slot before 429
STREAM_BUFFER_STEPS = 256  # steps of output a stream may leave unread before it is cancelled
SERVER_SHUTDOWN_GRACE_S = 30.0  # on SIGTERM, running requests finish within this, new ones get 503
VERIFIER_MAX_BATCH = 16  # windows of all clients in one verifier target pass
VERIFIER_MAX_SESSIONS = 64
TOLERANCE_MAX_DELTA = 50.0  # nats: beyond it the lossy rule accepts every draft
# adaptive-k refinements `--ablate` can switch off (engine/policy.py says what each does)
ABLATIONS = ("shared-prior", "confidence", "catch-up", "probes", "draft-p-min", "row-cost", "speed", "cost-refresh")


def parse_k(value: int | str) -> int | str:
    """A draft length as a user gives it: `auto` (adaptive, up to the runtime's k_max) or 0..REMOTE_K_MAX."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise SpecserveError(f"k takes 'auto' or a number, got {value!r}") from None
    if not 0 <= k <= REMOTE_K_MAX:
        raise SpecserveError(f"k must be between 0 and {REMOTE_K_MAX}, got {k}")
    return k


def check_tolerance(delta: float, target_acceptance: float | None) -> None:
    """The lossy tolerance rule's parameters (engine/verify.py), checked once for the CLI and the API."""
    if not 0.0 <= delta <= TOLERANCE_MAX_DELTA:
        raise SpecserveError(f"tolerance delta must be in [0, {TOLERANCE_MAX_DELTA:g}] nats, got {delta}")
    if target_acceptance is not None and not 0.0 < target_acceptance <= 1.0:
        raise SpecserveError(f"tolerance target acceptance must be in (0, 1], got {target_acceptance}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The models, their backends and the draft length: what a runtime loads and how it drafts."""

    target: str = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT_SPEC  # None: no draft model (n-gram or plain decoding only)
    target_backend: str = "auto"  # auto: the fastest exact backend measured here (backends/choose/)
    draft_backend: str = "auto"
    # `auto` may pick a requantized copy of the target (Q4_0, int8) where clearly faster, and torch-q4 may run
    # one of a file whose types its kernels lack: another model, so only when the user asks (`--requantize`)
    requantize: bool = False
    # keep the loaded weights in RAM (`hardware.lock_memory`): a kernel that reclaims idle file pages (memory
    # pressure, or DAMON's proactive `pageout` some cloud VMs run) would otherwise fault them back in mid-reply.
    # Off by default: it locks every page mapped (libraries too, ~2.8 GB for the default pair) and costs a
    # second a load, and on the machines measured an idle server's weights were not paged out (hardware.md)
    mlock: bool = False
    n_ctx: int = N_CTX
    k: int | str = "auto"
    verifiers: tuple[str, ...] = ()  # HOST:PORT of remote verifier services: the target runs there (cluster/)
    auth_token: str | None = None  # sent to the verifiers
    tls_ca: str | None = None  # PEM CA that signed the verifiers' TLS certificates (None: plaintext)
    # How long to keep trying when no verifier answers yet (a server: for as long as it runs, since verifiers
    # that start with it take a while to load their model; a one-shot command: not at all)
    verifier_wait_s: float = 0.0
    # adaptive-k features switched off, for the bench's ablation rows (engine/policy.py says what each does)
    ablate: frozenset[str] = frozenset()
    draft_cache: str = "global"  # one of DRAFT_CACHES

    def __post_init__(self) -> None:
        for role, kind in (("target", self.target_backend), ("draft", self.draft_backend)):
            if kind != "auto" and kind not in BACKENDS:
                raise SpecserveError(f"unknown {role} backend {kind!r}; choose auto or one of {', '.join(BACKENDS)}")
        if self.n_ctx < 16:
            raise SpecserveError(f"the context must hold at least 16 tokens, got {self.n_ctx}")
        object.__setattr__(self, "k", parse_k(self.k))
        if self.draft_cache not in DRAFT_CACHES:
            raise SpecserveError(f"unknown draft cache {self.draft_cache!r}; choose one of {', '.join(DRAFT_CACHES)}")
        if unknown := set(self.ablate) - set(ABLATIONS):
            raise SpecserveError(f"unknown --ablate {', '.join(sorted(unknown))}; choose from {', '.join(ABLATIONS)}")

    @property
    def k_max(self) -> int:
        return REMOTE_K_MAX if self.verifiers else K_MAX


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = SERVER_MAX_BATCH
    max_queue: int = SERVER_MAX_QUEUE
    cache_url: str | None = None  # redis://host:port/db; None: an in-process LRU
    api_key: str | None = None  # required on every route that runs or reveals the model (None: open)
    # The names the model is served under (the first is the one replies give); none: the file's name.
    served_model_names: tuple[str, ...] = ()
    # Refuse (404) a request naming another model; by default one model answers every name, as llama-server
    # does, so tools with a fixed model name (Copilot, Claude Code, scripts for gpt-4o) can use the server.
    strict_model_name: bool = False
    cors_origins: tuple[str, ...] = ()  # origins a browser may call the API from ("*": any); none: same origin
    metrics_need_key: bool = False  # /metrics behind the API key too (/health stays open)
    request_timeout_s: float | None = None  # a request running longer ends with finish_reason "length"
    shutdown_grace_s: float = SERVER_SHUTDOWN_GRACE_S  # on SIGTERM: how long running requests may finish
    stream_buffer: int = STREAM_BUFFER_STEPS  # a client this far behind its stream is not reading: cancel it
    speculation: str = DEFAULT_SPECULATION  # the method of requests that name none
    # A failed model load ends the process (exit 1) unless this asks it to stay up answering /health "failed"
    # (for supervisors that read the reason there rather than in the log).
    stay_up_on_failure: bool = False

    def __post_init__(self) -> None:
        if self.speculation not in METHODS:
            raise SpecserveError(f"unknown speculation method {self.speculation!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True, kw_only=True)
class VerifierConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(draft=None))
    listen: str = "127.0.0.1:50051"
    max_sessions: int = VERIFIER_MAX_SESSIONS
    idle_timeout_s: float = 300.0
    max_batch: int = VERIFIER_MAX_BATCH
    auth_token: str | None = None  # required of the front-ends
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on this port (None: none)

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise SpecserveError(f"--metrics-port takes a port number, got {self.metrics_port}")
        if ":" not in self.listen:
            raise SpecserveError(f"--listen takes HOST:PORT, got {self.listen!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SpecserveError("TLS needs both --tls-cert and --tls-key")
