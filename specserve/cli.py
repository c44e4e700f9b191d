"""`specserve` command line: generate, bench, loadtest, info, fetch, serve, verifier, ray."""

from __future__ import annotations

import argparse
import math
import os
import sys


def _share_cores_politely() -> None:
    """A front-end and a verifier on the same cores: OpenMP workers that spin while idle starve the other
    process's (docs/distributed.md has the measurement). libgomp reads this once, when it loads (with
    llama_cpp, imported below through the runtime), so it is set before any import."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


if any(a == "verifier" or a.startswith(("--verifier", "--wan")) for a in sys.argv[1:]):
    _share_cores_politely()

from specserve import SpecserveError  # noqa: E402
from specserve.config import (  # noqa: E402
    ABLATIONS,
    BACKENDS,
    DEFAULT_DRAFT_SPEC,
    DEFAULT_SPECULATION,
    DRAFT_CACHES,
    K_MAX,
    METHODS,
    MODEL_METHODS,
    N_CTX,
    SERVER_MAX_BATCH,
    SERVER_MAX_QUEUE,
    SERVER_SHUTDOWN_GRACE_S,
    STREAM_BUFFER_STEPS,
    VERIFIER_MAX_SESSIONS,
    EngineConfig,
    ServerConfig,
    VerifierConfig,
    check_tolerance,
    parse_k,
)
from specserve.engine.model import ContextOverflowError  # noqa: E402
from specserve.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS  # noqa: E402

SubParsers = argparse._SubParsersAction  # what `add_subparsers` returns: each command's function adds to it


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


def draft_length(text: str) -> int | str:
    """-k takes `auto` (adaptive) or a fixed number of draft tokens per target pass."""
    try:
        return parse_k(text)
    except SpecserveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str, known: list[str] | tuple[str, ...]) -> list[str]:
    """A comma-separated list of names, each one of `known`."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if unknown := sorted(set(names) - set(known)):
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def ablations(text: str) -> frozenset[str]:
    return frozenset(_names(text, ABLATIONS))


def speculation_methods(text: str) -> list[str]:
    return _names(text, [m for m in METHODS if m != "none"])


def engine_config(args: argparse.Namespace, with_draft: bool = True, **overrides) -> EngineConfig:
    """The engine configuration from the model options every subcommand has (`_add_model_args`)."""
    fields = {
        "target": args.target,
        "draft": args.draft if with_draft and args.draft not in ("none", "") else None,  # --draft none: no draft
        "target_backend": args.target_backend,
        "draft_backend": args.draft_backend,
        "requantize": args.requantize,
        "mlock": args.mlock,
        "n_ctx": args.n_ctx,
    }
    return EngineConfig(**(fields | overrides))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"registry name or GGUF path (default {DEFAULT_TARGET}); NAME@Q: its requantized copy (another model)",
    )
    p.add_argument(
        "--draft",
        default=DEFAULT_DRAFT_SPEC,
        help=f"draft model: name, GGUF path, quantized:Q (the registry's draft {DEFAULT_DRAFT} requantized, "
        f"BODY/HEAD types), self:Q (the target requantized), NAME@Q, none (default {DEFAULT_DRAFT_SPEC})",
    )
    backends = ("auto", *BACKENDS)
    p.add_argument(
        "--target-backend",
        choices=backends,
        default="auto",
        help="auto (default): the fastest exact one measured on this machine (`specserve info`)",
    )
    p.add_argument("--draft-backend", choices=backends, default="auto", help="auto (default) or one")
    p.add_argument(
        "--requantize",
        action="store_true",
        help="let auto serve a requantized copy of the target (Q4_0, int8) where clearly faster, and torch-q4 run "
        "one of a file whose types its kernels lack: another model, whose replies differ from the file's "
        "(default: the file's own weights)",
    )
    p.add_argument(
        "--mlock",
        action="store_true",
        help="keep the loaded weights in RAM, so that an idle server's cannot be paged out (hardware.md)",
    )
    p.add_argument("--n-ctx", type=positive_int, default=N_CTX, help=f"context window in tokens (default {N_CTX})")


def cmd_generate(args: argparse.Namespace) -> int:
    from specserve.engine.sampling import SamplingParams
    from specserve.runtime import open_runtime

    if args.max_tokens <= 0:
        raise SpecserveError("--max-tokens must be positive")
    if args.temperature < 0:
        raise SpecserveError("--temperature must be >= 0")
    delta = 1.0 if args.tolerance is None else args.tolerance
    if args.tolerance is not None or args.tolerance_target is not None:
        check_tolerance(delta, args.tolerance_target)
    runtime = open_runtime(engine_config(args, with_draft=args.method in MODEL_METHODS, k=args.k))
    if args.chat:
        tokens = runtime.encode_prompt(messages=[{"role": "user", "content": args.prompt}])
    else:
        tokens = runtime.encode_prompt(prompt=args.prompt)
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )
    tolerance = None
    if args.tolerance is not None or args.tolerance_target is not None:
        from specserve.engine.verify import tolerance_rule

        tolerance = tolerance_rule(delta, args.tolerance_target)
    generation = runtime.generate(tokens, params, method=args.method, k=args.k, tolerance=tolerance)
    for emitted in generation:
        sys.stdout.write(emitted.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{args.method}, k={args.k}, finish={generation.finish_reason}] {generation.stats.line()}", file=sys.stderr)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from specserve.models.fetch import ensure_model
    from specserve.models.quantize import resolve_draft_spec

    for name in args.models or [DEFAULT_TARGET, DEFAULT_DRAFT]:
        print(ensure_model(name))
    if not args.models:  # the default draft is the registry's, requantized
        print(resolve_draft_spec(DEFAULT_DRAFT_SPEC, DEFAULT_TARGET))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from specserve.bench.run import run_bench

    engine = engine_config(args, k=args.k)
    args.out = args.out or f"bench-out/{'served' if args.served else 'bench'}.json"
    if args.wan is not None:
        from specserve.bench.run import load_prompts, prompt_files
        from specserve.bench.wan import run_wan_bench

        prompts = load_prompts(prompt_files(args.prompts), args.limit)
        return run_wan_bench(args, engine, prompts)
    if args.served:
        from specserve.bench.served import run_served_bench

        return run_served_bench(args, engine)
    return run_bench(args, engine)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from specserve.backends.choose import choose
    from specserve.info import check_backends, collect, model_summary, print_info
    from specserve.models.quantize import resolve_draft_spec, resolve_target_spec

    console = Console(width=max(Console().width, 140))  # the cost tables are wide: do not wrap them
    if args.check:
        model = resolve_draft_spec(DEFAULT_DRAFT_SPEC, DEFAULT_TARGET)  # the smallest of the default models
        failures = check_backends(model, BACKENDS, console)
        if failures:
            raise SpecserveError(f"{failures} backend(s) failed a one-token eval on this CPU (above)")
        return 0
    target = resolve_target_spec(args.target)
    draft = resolve_draft_spec(args.draft, args.target) if args.draft not in ("none", "") else None
    choice = choose(target, draft, K_MAX, again=args.remeasure, requantize=args.requantize)
    info = collect(choice)
    info["models"] = {"target": model_summary(target)} | ({"draft": model_summary(draft)} if draft else {})
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_info(info, choice, console)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from specserve.bench.loadtest import run_loadtest

    return run_loadtest(args)


def server_config(args: argparse.Namespace) -> ServerConfig:
    engine = engine_config(
        args,
        k=args.k,
        verifiers=tuple(a for a in (args.verifier or "").split(",") if a),
        auth_token=args.auth_token or None,
        tls_ca=args.tls_ca,
        draft_cache=args.draft_cache or ("per-user" if args.api_key else "global"),
        verifier_wait_s=math.inf,
    )
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        cache_url=args.cache_url,
        api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name or ()),
        strict_model_name=args.strict_model_name,
        cors_origins=tuple(args.cors_origins or ()),
        metrics_need_key=args.metrics_need_key,
        request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace,
        stream_buffer=args.stream_buffer,
        speculation=args.speculation,
        stay_up_on_failure=args.stay_up_on_failure,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from specserve.server.app import serve

    return serve(server_config(args))


def cmd_verifier(args: argparse.Namespace) -> int:
    from specserve.cluster.verifier.service import serve_verifier

    config = VerifierConfig(
        engine=engine_config(args, with_draft=False),
        listen=args.listen,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        auth_token=args.auth_token or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
    )
    return serve_verifier(config)


def cmd_ray(args: argparse.Namespace) -> int:
    from specserve.cluster import ray_deploy

    if args.action == "up":
        verifier = VerifierConfig(engine=engine_config(args, with_draft=False), auth_token=args.auth_token or None)
        engine = engine_config(args, auth_token=args.auth_token or None, verifier_wait_s=math.inf)
        # under Ray the front-end actor stays up on a failed load: its /health says why
        frontend = ServerConfig(engine=engine, host=args.host, port=args.port, stay_up_on_failure=True)
        return ray_deploy.ray_up(args, verifier, frontend)
    return {"status": ray_deploy.ray_status, "down": ray_deploy.ray_down}[args.action](args)


def _add_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--auth-token",
        default=os.environ.get("SPECSERVE_AUTH_TOKEN") or None,
        help="shared secret on verifier connections (env SPECSERVE_AUTH_TOKEN)",
    )


def _generate_parser(sub: SubParsers) -> None:
    gen = sub.add_parser("generate", help="generate text for one prompt, streaming")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--method",
        "--draft-method",
        dest="method",
        choices=METHODS,
        default=DEFAULT_SPECULATION,
        help="draft: small model; cascade: n-gram guesses checked by the draft model; ngram: prompt lookup; "
        "suffix: suffix trees over the prompt and earlier replies; suffix-draft: suffix, else the draft model; "
        "none: plain decoding",
    )
    gen.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="DELTA",
        help="LOSSY: accept drafts the target finds at most DELTA nats less likely than the draft",
    )
    gen.add_argument(
        "--tolerance-target",
        type=float,
        default=None,
        metavar="RATE",
        help="LOSSY: calibrate the tolerance delta online to hold this acceptance rate",
    )
    gen.add_argument("-k", type=draft_length, default="auto", help="draft tokens per target pass, or auto")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)


def _info_parser(sub: SubParsers) -> None:
    info = sub.add_parser("info", help="this CPU, the libraries, the backends measured here and the one `auto` picks")
    info.add_argument("--json", action="store_true", help="print the report as JSON (as the bench JSON has it)")
    info.add_argument("--check", action="store_true", help="one real token on every backend, each in its own process")
    info.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the backends again, replacing the cached table (e.g. one measured while the machine was busy)",
    )
    _add_model_args(info)
    info.set_defaults(func=cmd_info)


def _fetch_parser(sub: SubParsers) -> None:
    fetch = sub.add_parser("fetch", help="fetch, assemble and verify registered models")
    fetch.add_argument("models", nargs="*", help="registry names (" + ", ".join(MODELS) + "); default: the pair")
    fetch.set_defaults(func=cmd_fetch)


def _bench_parser(sub: SubParsers) -> None:
    bench = sub.add_parser("bench", help="benchmark target-only vs speculative, side by side")
    bench.add_argument(
        "--prompts", default=None, help="project (default: the set in the package), public (../shared) or JSONL files"
    )
    bench.add_argument("--table", choices=("default", "seed"), default="default", help="seed: the seed paper's rows")
    bench.add_argument(
        "--quantized-draft",
        default=DEFAULT_DRAFT_SPEC,
        help="drafts of the seed table's quantized rows, comma-separated (e.g. quantized:Q4_0/Q4_0,quantized:Q2_K,"
        "self:Q2_K); the first also drives the cascade row",
    )
    bench.add_argument("--quantized-draft-backend", choices=BACKENDS, default="llama.cpp")
    bench.add_argument(
        "--tolerance",
        type=lambda t: [float(x) for x in t.split(",") if x],
        default=[],
        metavar="D1,D2",
        help="add lossy tolerance rows with these deltas, with their quality cost (same-as-target rate, log-prob)",
    )
    bench.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="skip the fidelity table (each target variant's agreement with llama.cpp on the model's file)",
    )
    bench.add_argument("--limit", type=int, default=0, help="use only the first N prompts of each kind")
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("-k", type=draft_length, default="auto", help="draft length of the speculative rows")
    bench.add_argument(
        "--ablate",
        type=ablations,
        default=frozenset(),
        metavar="NAME[,NAME]",
        help="add a row per adaptive-k refinement switched off (" + ", ".join(ABLATIONS) + "; engine/policy.py)",
    )
    bench.add_argument(
        "--ablate-methods",
        type=speculation_methods,
        default=["draft"],
        metavar="METHOD[,METHOD]",
        help="the drafters the --ablate rows run (default draft; e.g. draft,suffix)",
    )
    bench.add_argument("--fixed-k", type=int, default=4, help="also run the draft model at this fixed k (0: skip)")
    bench.add_argument(
        "--constrained",
        action="store_true",
        help="add rows under a JSON-object grammar (response_format json_object): target-only and the draft",
    )
    bench.add_argument("--modes", default="greedy,sampled", help="greedy, sampled or both")
    bench.add_argument(
        "--out", default=None, help="JSON report, the PNG beside it (default bench-out/bench.json, or served.json)"
    )
    bench.add_argument(
        "--wan",
        default=None,
        metavar="RTT_MS[,RTT_MS...]",
        help="remote target per token vs local draft + remote verifier at these round-trip times (bench-out/wan.*)",
    )
    bench.add_argument("--verifier", default=None, help="with --wan: use this verifier (default: start one here)")
    bench.add_argument(
        "--served",
        action="store_true",
        help="the headline: `specserve serve` (defaults) against llama.cpp's llama-server, plain and with its own "
        "speculation, over HTTP with the openai client (bench-out/served.*)",
    )
    bench.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="with --served: the binary (default: `make llama-server`'s)",
    )
    bench.add_argument(
        "--served-methods",
        type=speculation_methods,
        default=[],
        metavar="METHOD[,METHOD]",
        help="with --served: rows of these speculation methods on the same server too (e.g. suffix-draft)",
    )
    bench.add_argument(
        "--served-requantized",
        action="store_true",
        help="with --served: a row of a second `specserve serve` on the target's Q4_0 copy (another model)",
    )
    _add_model_args(bench)
    bench.set_defaults(func=cmd_bench)


def _loadtest_parser(sub: SubParsers) -> None:
    load = sub.add_parser("loadtest", help="concurrent streaming clients against a server, speculative vs plain")
    load.add_argument("--url", default=None, help="server base URL (default: start one on the default models)")
    load.add_argument(
        "--concurrency", type=lambda t: [positive_int(x) for x in t.split(",")], default=[1, 4, 16], help="e.g. 1,4,16"
    )
    load.add_argument("--methods", default="draft,none", help="speculation methods to compare")
    load.add_argument("--rounds", type=positive_int, default=3, help="requests each client streams in turn")
    load.add_argument("--max-tokens", type=positive_int, default=64)
    load.add_argument("--prompts", default=None, help="project (default), public or JSONL files of {kind, prompt}")
    load.add_argument(
        "--max-batch", type=positive_int, default=None, help="the started server's (default: the most clients)"
    )
    load.add_argument(
        "--max-queue", type=positive_int, default=SERVER_MAX_QUEUE, help=f"the started server's ({SERVER_MAX_QUEUE})"
    )
    load.add_argument(
        "--soak",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="instead: the first level's clients stream this long while the server is watched for leaks",
    )
    load.add_argument("--out", default="bench-out/loadtest.json", help="JSON report; the PNG goes beside it")
    load.set_defaults(func=cmd_loadtest)


def _serve_parser(sub: SubParsers) -> None:
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("-k", type=draft_length, default="auto", help="default draft length, or auto")
    serve.add_argument(
        "--speculation",
        choices=METHODS,
        default=DEFAULT_SPECULATION,
        help="the method of requests that name none in their `speculation` field, as standard clients do "
        f"(default {DEFAULT_SPECULATION}: the served bench's pick; without a draft model a model-free one runs)",
    )
    serve.add_argument(
        "--max-batch",
        type=positive_int,
        default=SERVER_MAX_BATCH,
        help=f"requests decoded together (default {SERVER_MAX_BATCH})",
    )
    serve.add_argument(
        "--max-queue",
        type=positive_int,
        default=SERVER_MAX_QUEUE,
        help=f"requests waiting for a batch slot before 429 (default {SERVER_MAX_QUEUE})",
    )
    serve.add_argument(
        "--request-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="a request still running after this ends with finish_reason length (default: none)",
    )
    serve.add_argument(
        "--stream-buffer",
        type=positive_int,
        default=STREAM_BUFFER_STEPS,
        metavar="STEPS",
        help="a stream whose client has this many steps of output unread is cancelled, its slot freed "
        f"(default {STREAM_BUFFER_STEPS})",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=SERVER_SHUTDOWN_GRACE_S,
        metavar="SECONDS",
        help=f"on SIGTERM: running requests may finish this long, new ones 503 (default {SERVER_SHUTDOWN_GRACE_S:g})",
    )
    serve.add_argument(
        "--cache-url",
        default=os.environ.get("SPECSERVE_CACHE_URL") or None,
        help="response cache: redis://host:port/db (default: in-process LRU; env SPECSERVE_CACHE_URL)",
    )
    serve.add_argument(
        "--verifier",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="run the target on these `specserve verifier` services; only the draft runs here",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SPECSERVE_API_KEY") or None,
        help="require the key (`Authorization: Bearer KEY` or `x-api-key: KEY`) on every route that runs or "
        "reveals the model (env SPECSERVE_API_KEY; /health and the web page's files stay open)",
    )
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="the names the model answers to, the first given in replies (default: the file's name)",
    )
    serve.add_argument(
        "--strict-model-name",
        action="store_true",
        help="refuse (404) requests naming another model (default: the one model answers any name)",
    )
    serve.add_argument(
        "--cors-origins",
        nargs="+",
        metavar="ORIGIN",
        help="origins whose pages may call the API (`*`: any; default: none, same origin only)",
    )
    serve.add_argument("--metrics-need-key", action="store_true", help="with --api-key: /metrics requires it too")
    serve.add_argument(
        "--stay-up-on-failure",
        action="store_true",
        help="when the models fail to load, keep answering /health with the reason (for a supervisor) instead "
        "of exiting 1",
    )
    serve.add_argument(
        "--draft-cache",
        choices=DRAFT_CACHES,
        default=None,
        help="which earlier replies suffix drafting may draw on: those of requests with the same `user` "
        "(the default with --api-key), of all requests (the default without), or none (the request's own "
        "prompt and reply only)",
    )
    _add_auth_args(serve)
    serve.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect to the verifiers over TLS")
    _add_model_args(serve)
    serve.set_defaults(func=cmd_serve)


def _verifier_parser(sub: SubParsers) -> None:
    verifier = sub.add_parser("verifier", help="serve the target model to remote front-ends (gRPC)")
    verifier.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="default 127.0.0.1:50051")
    verifier.add_argument(
        "--max-sessions", type=positive_int, default=VERIFIER_MAX_SESSIONS, help="KV caches kept (LRU eviction)"
    )
    verifier.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session expires")
    _add_auth_args(verifier)
    verifier.add_argument("--tls-cert", default=None, help="PEM certificate: serve over TLS (with --tls-key)")
    verifier.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    verifier.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (HTTP /metrics)"
    )
    _add_model_args(verifier)
    verifier.set_defaults(func=cmd_verifier)


def _ray_parser(sub: SubParsers) -> None:
    ray = sub.add_parser("ray", help="verifier replicas and a front-end as Ray actors (Ray places and restarts them)")
    ray.add_argument("action", choices=("up", "status", "down"))
    ray.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    ray.add_argument("--replicas", type=positive_int, default=2, help="verifier replicas (default 2)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica (default 1)")
    ray.add_argument("--host", default="127.0.0.1", help="address the actors listen on")
    ray.add_argument("--port", type=int, default=8000, help="front-end HTTP port")
    ray.add_argument("--verifier-port", type=int, default=0, help="first verifier port (default: free ports)")
    ray.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for actors to load")
    _add_auth_args(ray)
    _add_model_args(ray)
    ray.set_defaults(func=cmd_ray)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one function per command adds its subparser."""
    parser = argparse.ArgumentParser(prog="specserve", description="Lossless speculative decoding on CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _generate_parser,
        _info_parser,
        _fetch_parser,
        _bench_parser,
        _loadtest_parser,
        _serve_parser,
        _verifier_parser,
        _ray_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ContextOverflowError as exc:
        print(f"specserve: error: context overflow: {exc}", file=sys.stderr)
    except SpecserveError as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("specserve: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
