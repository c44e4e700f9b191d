"""`specserve bench --served`: what users run, side by side over HTTP, in one run.

On loopback, one after another: llama.cpp's own `llama-server` (built from the llama.cpp source the project
pins: `make llama-server`) on the model's own file, plain, with the same draft model (`--spec-type
draft-simple`) and with n-gram drafting (`--spec-type ngram-simple`, `ngram-map-k`); then `specserve serve`
with its default settings (but the bench's `--target`, `--draft` and backends, which the engine in this
process runs too); with `--served-requantized`, a second `specserve serve` on the target's Q4_0 copy
(`--target FILE@Q4_0/Q4_0`: another model, so its replies are not the file's; its row says so); last, the
engine in this process. Each server is up alone while every prompt goes to its rows through the official
`openai` client, streaming, then stops: nothing else runs beside the one measured (an idle specserve
re-measures its cost tables when its speed seems to drift, which a neighbour's work makes it seem), and
no server waits idle while its memory is paged out (DAMON `pageout` of pages idle a minute, on some cloud
VMs). The price is drift between phases: a slower spell
of the machine hits one server's phase, not all rows alike.

Per request: time to first token (TTFT) and decode ms/token after it, (t_last - t_first) / (tokens - 1).
TTFT compares only in the first mode: each prompt comes again in the second, and llama-server keeps its
slot's last prompt in its KV cache (specserve reuses cached prefixes in whole prefill chunks of 128 tokens).
Speed-ups are ratios of decode ms/token (over all tokens of a kind) to plain llama-server's. Greedy replies
are compared with plain llama-server's and with the target's own (specserve's target decoding alone, the
reply every exact row must give).

Beside the servers, the engine in this process (`Runtime.generate`, the server's default method and plain):
the served path should cost nothing over it. Rows of other methods on the same server (`--served-methods`)
show which default a server should have (`specserve serve --speculation`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specserve import SpecserveError
from specserve.config import N_CTX, EngineConfig
from specserve.engine.sampling import SamplingParams
from specserve.runtime import Runtime

SAMPLED_TEMPERATURE = 0.8
BASELINE = "llama-server"  # plain decoding on the model's own file: what speed-ups are relative to
TARGET_OWN = "engine in-process, plain"  # the target's own output
COPY = "specserve serve, target's Q4_0 copy (another model)"
START_TIMEOUT_S = 1800.0  # the first `specserve serve` on a machine measures the backends (`auto`) first


def default_llama_server() -> Path:
    """Where `make llama-server` puts the binary, keyed like the llama-cpp-python wheel (version, flags, ISA)."""
    import llama_cpp

    from specserve.hardware import llama_key
    from specserve.models.fetch import cache_dir

    return cache_dir() / "llama-server" / llama_key(llama_cpp.__version__) / "bin" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started here on a loopback port, up once `/health` answers 200; its output in a log file."""

    def __init__(self, *, name: str, command: list[str], port: int, timeout_s: float = START_TIMEOUT_S):
        self.name, self.command = name, command
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"{name.replace(' ', '-')}-", suffix=".log")[1])
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.process.poll() is not None:
                raise SpecserveError(f"{name} exited during start-up (code {self.process.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise SpecserveError(f"{name} did not become healthy in {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def specserve_server(*, extra: tuple[str, ...] = (), name: str = "specserve serve") -> ServerProcess:
    """`specserve serve` with its defaults (and `extra` options) on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "specserve.cli", "serve", "--port", str(port), *extra]
    return ServerProcess(name=name, command=command, port=port)


def llama_server(*, binary: Path, model: Path, extra: list[str], name: str) -> ServerProcess:
    """llama-server on `model` as its users run it: every core, the GGUF's own chat template (`--jinja`:
    without it llama-server renders a ChatML of its own, another prompt), specserve's context size."""
    port = free_port()
    threads = str(os.cpu_count() or 1)
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", threads]
    command += ["-tb", threads, "-c", str(N_CTX), "--jinja", *extra]
    return ServerProcess(name=name, command=command, port=port, timeout_s=300)


@dataclass(frozen=True, kw_only=True)
class Row:
    """One column of the comparison: the request fields a server gets (its phase says which server), or the
    engine in this process."""

    label: str
    method: str | None = None  # specserve's speculation method (None: the server's default)
    extra_body: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One server, up alone while its rows run: `start` brings it up; `rows` gives them, from its
    `/v1/specserve/info` (None: not a specserve server)."""

    name: str
    start: Callable[[], ServerProcess]
    rows: Callable[[dict | None], list[Row]]


@dataclass(frozen=True, kw_only=True)
class Request:
    messages: list[dict]
    max_tokens: int
    temperature: float
    seed: int


def _stream(client: openai.OpenAI, model: str, request: Request, extra_body: dict) -> dict:
    """One streamed chat completion: its text, tokens, TTFT, decode time and the server's draft counts."""
    start = time.perf_counter()
    first = None
    pieces: list[str] = []
    tokens = drafted = accepted = 0
    stream = client.chat.completions.create(
        model=model,
        messages=request.messages,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=1.0,
        seed=request.seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        extra = chunk.model_extra or {}
        if timings := extra.get("timings"):  # llama-server's
            drafted, accepted = timings.get("draft_n", drafted), timings.get("draft_n_accepted", accepted)
        if speculative := extra.get("speculative"):  # specserve's
            drafted, accepted = speculative["drafted"], speculative["accepted"]
    end = time.perf_counter()
    first = first or end
    return {
        "text": "".join(pieces),
        "tokens": tokens,
        "ttft_s": first - start,
        "decode_s": end - first,
        "drafted": drafted,
        "accepted": accepted,
    }


def _in_process(runtime: Runtime, method: str, request: Request) -> dict:
    """The same request on the engine in this process, timed as the client times a stream."""
    runtime.refresh_costs()  # between requests, as the server does when idle
    start = time.perf_counter()
    ids = runtime.encode_prompt(messages=request.messages)
    params = SamplingParams(temperature=request.temperature, seed=request.seed, max_tokens=request.max_tokens)
    generation = runtime.generate(ids, params, method=method)
    first = None
    pieces = []
    for emitted in generation:
        if emitted.text:
            first = first or time.perf_counter()
            pieces.append(emitted.text)
    end = time.perf_counter()
    first = first or end
    s = generation.stats
    return {
        "text": "".join(pieces),
        "tokens": s.generated,
        "ttft_s": first - start,
        "decode_s": end - first,
        "drafted": s.drafted,
        "accepted": s.accepted,
    }


def _ms_per_token(runs: list[dict]) -> float:
    tokens = sum(max(r["tokens"] - 1, 0) for r in runs)
    return 1000 * sum(r["decode_s"] for r in runs) / tokens if tokens else float("nan")


def summarize(runs: list[dict], baseline: list[dict]) -> dict:
    """One row of a table: `runs` of one row, mode and kind; `baseline`: plain llama-server's of the same."""
    ms = _ms_per_token(runs)
    drafted = sum(r["drafted"] for r in runs)
    row = {
        "requests": len(runs),
        "decode_ms_per_token": round(ms, 2),
        "tokens_per_s": round(1000 / ms, 2),
        "ttft_ms_p50": round(1000 * float(np.median([r["ttft_s"] for r in runs])), 1),
        "speedup": round(_ms_per_token(baseline) / ms, 3),
        "acceptance": round(sum(r["accepted"] for r in runs) / drafted, 3) if drafted else None,
    }
    if all("same_as_target" in r for r in runs):  # greedy
        row["same_as_llama_server"] = sum(r["same_as_llama_server"] for r in runs)
        row["same_as_target"] = sum(r["same_as_target"] for r in runs)
    return row


# the samplers as alike as the servers allow: llama-server samples with top-k 40 and min-p 0.05 by default
PEER_FIELDS = {"top_k": 0, "min_p": 0.0}


def _our_rows(default_method: str, methods: list[str]) -> list[Row]:
    """`specserve serve`'s rows: its default method, the others asked for, and plain decoding."""
    rows = [Row(label=f"specserve serve ({default_method})", extra_body={"top_k": 0})]
    for method in [m for m in methods if m != default_method] + ["none"]:
        label = "specserve serve, plain" if method == "none" else f"specserve serve ({method})"
        rows.append(Row(label=label, method=method, extra_body={"top_k": 0, "speculation": {"method": method}}))
    return rows


def run_served_bench(args: argparse.Namespace, engine: EngineConfig) -> int:
    from specserve.bench.run import git_commit, load_prompts, prompt_files
    from specserve.info import collect
    from specserve.models.fetch import resolve_model
    from specserve.models.quantize import resolve_target_spec
    from specserve.models.registry import DEFAULT_DRAFT
    from specserve.runtime import LocalRuntime

    console = Console(stderr=True)
    binary = Path(args.llama_server) if args.llama_server else default_llama_server()
    if not binary.is_file():
        raise SpecserveError(f"no llama-server at {binary}: build it with `make llama-server`, or give --llama-server")
    prompts = load_prompts(prompt_files(args.prompts), args.limit)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    target, draft = resolve_target_spec(engine.target), resolve_model(DEFAULT_DRAFT)
    models = ("--target", engine.target, "--draft", engine.draft or "none", *(["--requantize"] * engine.requantize))
    backends = ("--target-backend", engine.target_backend, "--draft-backend", engine.draft_backend)
    peer_options = {
        BASELINE: [],
        "llama-server draft-simple": ["-md", str(draft), "--spec-type", "draft-simple"],
        "llama-server ngram-simple": ["--spec-type", "ngram-simple"],
        "llama-server ngram-map-k": ["--spec-type", "ngram-map-k"],
    }
    phases = [
        Phase(
            name=name,
            start=lambda name=name, extra=extra: llama_server(binary=binary, model=target, extra=extra, name=name),
            rows=lambda info, name=name: [Row(label=name, extra_body=PEER_FIELDS)],
        )
        for name, extra in peer_options.items()
    ]
    phases.append(
        Phase(
            name="specserve serve (its defaults, with the bench's models and backends)",
            start=lambda: specserve_server(extra=(*models, *backends)),
            rows=lambda info: _our_rows(info["speculation"], args.served_methods),
        )
    )
    if args.served_requantized:
        copy_models = ("--target", f"{engine.target}@Q4_0/Q4_0", *models[2:], "--draft-backend", engine.draft_backend)
        phases.append(
            Phase(
                name="specserve serve on the target's Q4_0 copy",
                start=lambda: specserve_server(extra=copy_models, name=COPY),
                rows=lambda info: [Row(label=f"{COPY} ({info['speculation']})", extra_body={"top_k": 0})],
            )
        )
    runs: list[dict] = []
    labels: list[str] = []
    commands: dict[str, list[str]] = {}
    info: dict = {}
    for phase in phases:  # one server up at a time: none waits idle beside the one measured
        console.print(f"starting {phase.name} ...")
        server = phase.start()
        try:
            commands[server.name] = server.command
            answers = httpx.get(f"{server.base}/v1/specserve/info", timeout=10)
            served = answers.json() if answers.status_code == 200 else None
            info = info or served or {}
            rows = phase.rows(served)
            runs += _run(args, prompts, modes, rows, _client(server), console)
            labels += [row.label for row in rows]
        finally:
            server.stop()
    console.print("loading the engine in this process ...")
    runtime = LocalRuntime(engine)
    rows = [Row(label=f"engine in-process ({info['speculation']})", method=info["speculation"])]
    rows.append(Row(label=TARGET_OWN, method="none"))
    runs += _run(args, prompts, modes, rows, runtime, console)
    labels += [row.label for row in rows]
    _compare_replies(runs)
    report = {
        "kind": "served",
        "commit": git_commit(),
        "machine": collect(runtime.choice),
        "prompts": [str(p) for p in prompt_files(args.prompts)],
        "max_tokens": args.max_tokens,
        "sampled_temperature": SAMPLED_TEMPERATURE,
        "servers": commands,
        "specserve": info,
        "cost_table": _costs(runtime, prompts[0]["messages"]),
        "summary": _summary(runs, labels, modes, prompts),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = plot_served(report, out.with_suffix(".png"))
    print_served(report, Console(width=max(Console().width, 150)))
    console.print(f"JSON: {out}   plot: {png}")
    return 0


def _client(server: ServerProcess) -> tuple[openai.OpenAI, str]:
    """An openai client of `server` and the model it names, after one warm-up request."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=1800)
    model = client.models.list().data[0].id
    warm_up = Request(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0.0, seed=0)
    _stream(client, model, warm_up, {})
    return client, model


def _run(
    args,
    prompts: list[dict],
    modes: list[str],
    rows: list[Row],
    answerer: tuple[openai.OpenAI, str] | Runtime,
    console: Console,
) -> list[dict]:
    """Every prompt in every mode on `rows`, answered by one server (its client) or the engine here."""
    runs = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(prompts) * len(modes) * len(rows))
        for number, prompt in enumerate(prompts):
            for mode in modes:
                for position, row in enumerate(rows):
                    # greedy: a seed of its own per request keeps specserve's response cache out of it (greedy
                    # output does not depend on the seed); sampled: one seed per prompt
                    request = Request(
                        messages=prompt["messages"],
                        max_tokens=args.max_tokens,
                        temperature=0.0 if mode == "greedy" else SAMPLED_TEMPERATURE,
                        seed=1000 * number + position if mode == "greedy" else number,
                    )
                    if isinstance(answerer, Runtime):
                        result = _in_process(answerer, row.method, request)
                    else:
                        result = _stream(*answerer, request, row.extra_body)
                    runs.append({**result, "row": row.label, "mode": mode, "kind": prompt["kind"], "prompt": number})
                    progress.advance(task)
    return runs


def _compare_replies(runs: list[dict]) -> None:
    """Each greedy reply marked as equal, or not, to plain llama-server's and to the target's own."""
    texts = {(r["row"], r["prompt"]): r["text"] for r in runs if r["mode"] == "greedy"}
    for r in runs:
        if r["mode"] == "greedy":
            r["same_as_llama_server"] = r["text"] == texts[BASELINE, r["prompt"]]
            r["same_as_target"] = r["text"] == texts[TARGET_OWN, r["prompt"]]


def _summary(runs: list[dict], labels: list[str], modes: list[str], prompts: list[dict]) -> dict:
    summary = {}
    for mode in modes:
        for kind in sorted({p["kind"] for p in prompts}) + ["all"]:
            selected = [r for r in runs if r["mode"] == mode and kind in (r["kind"], "all")]
            baseline = [r for r in selected if r["row"] == BASELINE]
            summary[f"{mode}/{kind}"] = {
                label: summarize([r for r in selected if r["row"] == label], baseline) for label in labels
            }
    return summary


def _costs(runtime: Runtime, messages: list[dict]) -> dict:
    """The engine's cost tables here: time to append k tokens relative to one, target and draft."""
    from specserve.bench.measure import window_costs

    probe = runtime.encode_prompt(messages=messages)
    models = [m for m in (runtime.target, runtime.draft) if m is not None]
    return {f"{m.name} {m.model_path.name}": window_costs(m.new_sequence(), probe) for m in models}


def print_served(report: dict, console: Console) -> None:
    from specserve.bench.measure import cost_table

    console.print(cost_table("Engine cost: time to append k tokens, relative to 1 token", report["cost_table"]))
    for key, rows in report["summary"].items():
        greedy = key.startswith("greedy")
        table = Table(title=f"{key}: decode speed over HTTP ({report['max_tokens']} new tokens), vs plain llama-server")
        columns = ["row", "ms/token", "tokens/s", "TTFT p50 ms", "acceptance", "vs llama-server"]
        columns += ["= llama-server", "= target's own"] if greedy else []
        for column in columns:
            table.add_column(column, justify="left" if column == "row" else "right", no_wrap=column != "row")
        for label, r in rows.items():
            cells = [
                label,
                f"{r['decode_ms_per_token']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['ttft_ms_p50']:.0f}",
                "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                f"{r['speedup']:.2f}x",
            ]
            if greedy:
                cells += [f"{r['same_as_llama_server']}/{r['requests']}", f"{r['same_as_target']}/{r['requests']}"]
            table.add_row(*cells)
        console.print(table)
    cpu = report["machine"]["cpu"]
    console.print(f"CPU: {cpu['model']} ({cpu.get('family_model', '?')}), {cpu['cores']} cores, {' '.join(cpu['isa'])}")
    console.print(
        f"specserve: target {report['specserve']['target_backend']} {report['specserve']['model']}, "
        f"draft {report['specserve']['draft_backend']} {report['specserve']['draft']}, "
        f"default speculation {report['specserve']['speculation']}"
    )


def plot_served(report: dict, path: Path) -> Path:
    """Speed-up over plain llama-server per row and prompt kind, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({key.split("/")[0] for key in report["summary"]}, key=["greedy", "sampled"].index)
    fig, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 5.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        groups = [key for key in report["summary"] if key.startswith(f"{mode}/")]
        labels = list(report["summary"][groups[0]])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [report["summary"][g][label]["speedup"] for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, values, width, label=label)
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [g.split("/")[1] for g in groups])
        ax.set_ylabel("decode speed vs plain llama-server (higher is faster)")
        ax.set_title(f"{mode}, {report['max_tokens']} new tokens, over HTTP")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 2 if len(modes) == 1 else 4  # the labels are long: two columns fit one panel's width
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    cpu = report["machine"]["cpu"]
    where = f"{cpu['model']} ({cpu.get('family_model', '?')}), {cpu['cores']} cores"
    fig.suptitle(f"specserve serve vs llama-server, {where}", fontsize=10)
    legend_rows = -(-len(labels) // columns)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def open_stream(client: openai.AsyncOpenAI, prompt: str, method: str, max_tokens: int, seed: int, **options):
    """A streamed chat completion of one user prompt with the given speculation method; `options`: more
    fields of the request (temperature, stop, ...)."""
    return await client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        seed=seed,
        extra_body={"speculation": {"method": method}},
        **options,
    )
