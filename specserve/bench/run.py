"""`specserve bench`: target-only vs speculative, side by side in one run, on the same prompts.

Configurations run interleaved per prompt, so a noisy neighbour slows all of them alike. Per-token latency
is a request's decode time divided by its tokens after the first (ms/token); mean and p90 are over requests.
Speed-ups are ratios of aggregate decode tokens/s against plain llama.cpp on the model's own file, alone in
its own process: what a user would run instead. Plain llama.cpp on the Q4_0 requantization (what
`--requantize` may serve) is a row too, so the table separates what requantizing gives from what speculation
gives.

Fidelity: a faster target that is a requantization is a slightly different model. Per target variant `auto`
measured (with `--requantize`, the copies among them), the
report gives its top-1 agreement with llama.cpp on the model's file, teacher-forced on that baseline's own
output for every prompt of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import specserve
from specserve.bench.measure import cost_table, run_generation, summarize, window_costs
from specserve.bench.worker import BackendProcess
from specserve.config import MODEL_METHODS, EngineConfig
from specserve.engine.grammar import json_schema_grammar
from specserve.engine.sampling import SamplingParams
from specserve.engine.verify import ToleranceController
from specserve.models.quantize import resolve_target_spec
from specserve.models.registry import DEFAULT_DRAFT
from specserve.runtime import LocalRuntime

SAMPLED_TEMPERATURE = 0.8


@dataclass(kw_only=True)
class BenchConfig:
    """One column of the comparison: a decoding method on the bench's runtime, or plain decoding in a worker."""

    label: str
    method: str = "none"
    k: int | str = 0
    worker: BackendProcess | None = None
    runtime: LocalRuntime | None = None  # another model pair (e.g. a quantized draft); default: the bench's
    target_memory: int = 0
    draft_memory: int = 0
    tolerance: float | None = None  # lossy rows: the tolerance delta
    grammar: str | None = None  # constrained rows: the grammar every reply follows

    def run(self, runtime: LocalRuntime, ids: list[int], params: SamplingParams, mode: str) -> dict:
        if self.worker is not None:
            return self.worker.generate(ids, params)
        runtime = self.runtime or runtime
        runtime.refresh_costs()  # between requests, as the server does when idle
        # Suffix drafts come from this row's earlier replies in this mode (the bench runs per-user scopes):
        # from other prompts, never from another row's reply to the same prompt.
        scope = f"{self.label}/{mode}"
        tolerance = ToleranceController(delta=self.tolerance) if self.tolerance is not None else None
        generation = runtime.generate(
            ids, params, method=self.method, k=self.k, tolerance=tolerance, user=scope, grammar=self.grammar
        )
        return run_generation(generation)


PROJECT_PROMPTS = Path(__file__).with_name("prompts.jsonl")  # ours: code, prose, random words, code edits
# text quoted back, restated or replayed: a file with one change, multi-turn refinement, JSON/YAML reshaping,
# a tool loop (what suffix drafting is for)
REPETITIVE_PROMPTS = Path(__file__).with_name("prompts-repetitive.jsonl")


def public_prompts_path() -> Path:
    """The team's public set, where a checkout has it beside the project (../shared/prompts/public.jsonl)."""
    return Path(specserve.__file__).resolve().parents[2] / "shared" / "prompts" / "public.jsonl"


def prompt_files(spec: str | None) -> list[Path]:
    """`project` (the default: the set that ships with specserve), `repetitive` (ours too), `public` (the
    team's set beside the checkout, when there is one) or file paths, comma-separated."""
    named = {"public": public_prompts_path(), "project": PROJECT_PROMPTS, "repetitive": REPETITIVE_PROMPTS}
    return [named.get(part, Path(part)) for part in (spec or "project").split(",") if part]


def load_prompts(paths: Path | list[Path], limit: int) -> list[dict]:
    """Prompts of JSONL files, each with its `kind` and either a `prompt` (one user message) or the chat
    `messages`; both come out, `prompt` then naming the conversation by its last message."""
    prompts = []
    for path in [paths] if isinstance(paths, Path) else paths:
        if not path.is_file():
            raise specserve.SpecserveError(f"prompt file {path} not found (use --prompts FILE)")
        for line in path.read_text().splitlines():
            if line.strip():
                prompt = json.loads(line)
                prompt.setdefault("messages", [{"role": "user", "content": prompt.get("prompt", "")}])
                prompt.setdefault("prompt", prompt["messages"][-1]["content"])
                prompts.append(prompt)
    if not limit:
        return prompts
    per_kind: Counter[str] = Counter()
    kept = []
    for prompt in prompts:
        if per_kind[prompt["kind"]] < limit:
            per_kind[prompt["kind"]] += 1
            kept.append(prompt)
    return kept


def target_logprob(runtime: LocalRuntime, prompt: list[int], tokens: list[int]) -> float:
    """Mean log-probability (temperature 1) of generated tokens under the target, teacher-forced: the
    quality measure of lossy (tolerance) rows next to exact ones."""
    if not tokens:
        return 0.0
    sequence = runtime.target.new_sequence()
    logits = sequence.eval(prompt + tokens, all_logits=True)[len(prompt) - 1 : -1]
    top = logits.max(axis=1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(np.mean(logprobs[np.arange(len(tokens)), tokens]))


def _runtime_with(runtime: LocalRuntime, **changes) -> LocalRuntime:
    """The bench's runtime when it already has this configuration, else one sharing its target."""
    config = dataclasses.replace(runtime.config, **changes)
    return runtime if config == runtime.config else LocalRuntime(config, target=runtime.target)


def _draft_label(runtime: LocalRuntime) -> str:
    return f"{runtime.config.draft} ({runtime.draft.name})"


BASELINE = "plain llama.cpp, model's file"  # what speed-ups are relative to


def _configs(args: argparse.Namespace, runtime: LocalRuntime, workers: dict[str, BackendProcess], console: Console):
    """The columns of the comparison. `--table seed` reproduces the seed's rows on our pair: baseline
    (target only), speculative with the plain draft, speculative + quantized draft, plus our cascade."""
    target = runtime.target.name
    target_mem = runtime.target.memory_bytes()
    baselines = [
        BenchConfig(label=label, worker=worker, target_memory=worker.memory) for label, worker in workers.items()
    ] + [BenchConfig(label=f"target-only {target}", target_memory=target_mem)]

    def speculative(method: str, k: int | str, rt: LocalRuntime, tolerance: float | None = None) -> BenchConfig:
        drafter = {
            "ngram": "n-gram",
            "suffix": "suffix trees",
            "cascade": f"cascade {_draft_label(rt)}",
            "suffix-draft": f"suffix trees, else {_draft_label(rt)}",
        }.get(method, _draft_label(rt))
        lossy = f", tolerance delta={tolerance:g} (lossy)" if tolerance is not None else ""
        label = f"spec {target} + {drafter} k={k}{lossy}"
        draft_mem = rt.draft.memory_bytes() if method in MODEL_METHODS else 0
        return BenchConfig(
            label=label,
            method=method,
            k=k,
            runtime=rt,
            target_memory=target_mem,
            draft_memory=draft_mem,
            tolerance=tolerance,
        )

    if args.table == "seed":
        console.print("loading the seed table's drafts ...")
        plain = _runtime_with(runtime, draft=DEFAULT_DRAFT, draft_backend="torch-int8")
        backend = args.quantized_draft_backend
        quantized = [
            _runtime_with(runtime, draft=spec, draft_backend=backend) for spec in args.quantized_draft.split(",")
        ]
        configs = [
            *baselines,
            speculative("draft", args.k, plain),
            *(speculative("draft", args.k, rt) for rt in quantized),
            speculative("cascade", args.k, quantized[0]),
        ]
    else:
        methods = ("draft", "cascade", "ngram", "suffix", "suffix-draft")
        configs = [*baselines, *(speculative(method, args.k, runtime) for method in methods)]
        if args.fixed_k and args.k != args.fixed_k:
            configs.append(speculative("draft", args.fixed_k, runtime))
        for feature in sorted(args.ablate):  # what each adaptive-k refinement is worth, per drafter asked for
            ablated = runtime.ablated(frozenset({feature}))
            for method in args.ablate_methods:
                row = speculative(method, "auto", ablated)
                configs.append(dataclasses.replace(row, label=f"{row.label} without {feature}"))
    # lossy, opt-in: rows that show what the speed costs in quality
    configs += [speculative("draft", args.k, runtime, tolerance=delta) for delta in args.tolerance]
    if args.constrained:  # what a grammar costs, and what speculation still buys under one
        json_object = json_schema_grammar({"type": "object"})
        plain = BenchConfig(label=f"target-only {target}, JSON grammar", target_memory=target_mem, grammar=json_object)
        row = speculative("draft", args.k, runtime)
        configs += [plain, dataclasses.replace(row, label=f"{row.label}, JSON grammar", grammar=json_object)]
    return configs


def fidelity(runtime: LocalRuntime, runs: list[dict], prompts: dict[str, list[int]], n_ctx: int) -> dict:
    """Per target variant (the bench's target and every other one `auto` measured here, each loaded in a
    process of its own, one at a time): the share of positions where its greedy choice is the token plain
    llama.cpp on the model's file chose, over that baseline's outputs (teacher-forced, so one early
    difference does not decide the rest). llama.cpp on the model's file is a row too: teacher-forced it
    evaluates whole outputs as one window, which rounds differently from the steps it chose them in, so its
    agreement is the floor that kernel noise alone gives."""
    reference = [(prompts[r["prompt"]], r["token_ids"]) for r in runs if r["config"] == BASELINE and r["token_ids"]]
    total = sum(len(tokens) for _, tokens in reference)
    local = runtime.target.new_sequence()

    def local_argmax(ids: list[int], tokens: list[int]) -> list[int]:
        local.reset()
        return np.argmax(local.eval(ids + tokens, all_logits=True)[len(ids) - 1 : -1], axis=-1).tolist()

    def agreement(argmax) -> dict:
        agree = sum(a == b for ids, tokens in reference for a, b in zip(argmax(ids, tokens), tokens, strict=True))
        return {"top1_agreement": round(agree / max(total, 1), 4), "tokens": total}

    result = {f"{runtime.target.name} {runtime.target.model_path.name}": agreement(local_argmax)}
    for m in runtime.choice.targets if runtime.choice else []:
        if not m.usable or (m.backend, Path(m.model)) == (runtime.target.name, runtime.target.model_path):
            continue
        try:
            worker = BackendProcess(m.backend, Path(m.model), n_ctx)
        except specserve.SpecserveError as exc:
            result[m.label] = {"error": str(exc)}
            continue
        try:
            result[worker.label] = agreement(worker.argmax)
        except specserve.SpecserveError as exc:
            result[worker.label] = {"error": str(exc)}
        finally:
            worker.close()
    return result


def run_bench(args: argparse.Namespace, engine: EngineConfig) -> int:
    from specserve.backends.torch_q4 import HEAD_AND_BODY
    from specserve.info import collect
    from specserve.models.quantize import quantized_model

    console = Console(stderr=True)
    prompts = load_prompts(prompt_files(args.prompts), args.limit)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    console.print("loading models and calibrating ...")
    runtime = LocalRuntime(dataclasses.replace(engine, draft_cache="per-user"))  # a scope per row (BenchConfig)
    tokenizer = runtime.tokenizer
    target_path = resolve_target_spec(args.target)
    # Plain llama.cpp runs in worker processes, alone, as a user of llama.cpp would run it.
    workers = {
        BASELINE: BackendProcess("llama.cpp", target_path, args.n_ctx),
        "plain llama.cpp, Q4_0 requantized": BackendProcess(
            "llama.cpp", quantized_model(target_path, HEAD_AND_BODY), args.n_ctx
        ),
    }
    configs = _configs(args, runtime, workers, console)
    probe = tokenizer.encode(tokenizer.render_chat(prompts[0]["messages"]))
    console.print("measuring the backend cost table ...")
    costs = {worker.label: worker.costs(probe) for worker in workers.values()}
    target = runtime.target
    costs[f"{target.name} {target.model_path.name}"] = window_costs(target.new_sequence(), probe)
    drafts = {id(rt.draft): rt.draft for rt in [runtime, *(c.runtime for c in configs if c.runtime)] if rt.draft}
    for draft in drafts.values():  # every draft a row uses, on the backend it runs on
        costs.setdefault(f"{draft.name} {draft.model_path.name}", window_costs(draft.new_sequence(), probe))

    runs: list[dict] = []
    encoded: dict[str, list[int]] = {}
    total = len(prompts) * len(modes) * len(configs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        for prompt in prompts:
            ids = tokenizer.encode(tokenizer.render_chat(prompt["messages"]))
            encoded[prompt["prompt"]] = ids
            for mode in modes:
                temperature = 0.0 if mode == "greedy" else SAMPLED_TEMPERATURE
                params = SamplingParams(temperature=temperature, seed=1, max_tokens=args.max_tokens)
                exact_tokens = None
                for config in configs:
                    result = config.run(runtime, ids, params, mode)
                    result.update(config=config.label, mode=mode, kind=prompt["kind"], prompt=prompt["prompt"])
                    if config.worker is None and config.method == "none":
                        exact_tokens = result["token_ids"]  # the target's own output: the quality reference
                    if args.tolerance and config.worker is None and exact_tokens is not None:
                        result["same_as_target"] = result["token_ids"] == exact_tokens
                        result["target_logprob"] = target_logprob(runtime, ids, result["token_ids"])
                    result["output"] = tokenizer.decode(result["token_ids"])
                    runs.append(result)
                    progress.advance(task)
    memory = {label: worker.memory for label, worker in workers.items()}
    for worker in workers.values():
        worker.close()

    agreement = {}
    if args.fidelity:
        console.print("measuring each target variant's agreement with llama.cpp on the model's file ...")
        greedy = [r for r in runs if r["mode"] == "greedy"] or runs
        agreement = fidelity(runtime, greedy, encoded, args.n_ctx)
    for run in runs:
        run.pop("token_ids")

    summary: dict = {}
    for mode in modes:
        for kind in sorted({p["kind"] for p in prompts}) + ["all"]:
            rows = {}
            for config in configs:
                selected = [
                    r for r in runs if r["config"] == config.label and r["mode"] == mode and kind in (r["kind"], "all")
                ]
                if selected:
                    rows[config.label] = summarize(selected)
                    rows[config.label]["target_memory"] = config.target_memory
                    rows[config.label]["draft_memory"] = config.draft_memory
            for row in rows.values():
                row["speedup_vs_llamacpp"] = round(row["tokens_per_s"] / rows[BASELINE]["tokens_per_s"], 3)
            summary[f"{mode}/{kind}"] = rows

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "machine": collect(runtime.choice),
        "commit": git_commit(),
        "prompts": [str(p) for p in prompt_files(args.prompts)],
        "table": args.table,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "sampled_temperature": SAMPLED_TEMPERATURE,
        "backends": {"target": costs_label(runtime.target), "draft": costs_label(runtime.draft)},
        "cost_table": costs,
        "fidelity": agreement,
        # times a runtime measured its window costs again after the machine's speed drifted (per runtime)
        "cost_refreshes": {c.label: c.runtime.cost_refreshes for c in configs if c.runtime},
        "memory_bytes": {
            f"target {runtime.target.name} weights": runtime.target.memory_bytes(),
            f"draft {runtime.draft.name} weights": runtime.draft.memory_bytes() if runtime.draft else 0,
            f"suffix trees ({runtime.suffixes.tokens} reply tokens)": runtime.suffixes.memory_bytes(),
            **{f"{label} weights": value for label, value in memory.items()},
            "peak_rss": peak_rss,
        },
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    from specserve.bench.plot import plot_report

    png = plot_report(report, out.with_suffix(".png"))
    console = Console(width=max(Console().width, 150))  # the tables are wide; do not wrap them into columns
    print_report(report, console)
    console.print(f"JSON: {out}   plot: {png}")
    return 0


def costs_label(backend) -> str | None:
    return f"{backend.name} {backend.model_path.name}" if backend is not None else None


def git_commit() -> str | None:
    import subprocess

    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def print_report(report: dict, console: Console) -> None:
    title = "Backend cost: time to append k tokens, relative to 1 token (fastest of 5)"
    console.print(cost_table(title, report["cost_table"]))
    for key, rows in report["summary"].items():
        table = Table(title=f"{key}  ({report['max_tokens']} new tokens, k={report['k']})")
        for col in (
            "configuration",
            "ms/token mean",
            "ms/token p90",
            "tokens/s",
            "acceptance",
            "tokens/pass",
            "draft GiB",
            "target GiB",
            "vs llama.cpp",
        ):
            # numbers and their headers never wrap; the configuration column takes what is left
            table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=col != "configuration")
        with_quality = any("target_logprob" in r for r in rows.values())
        if with_quality:  # tolerance rows: what the lossy rule costs
            table.add_column("same as target", justify="right", no_wrap=True)
            table.add_column("target log-prob", justify="right", no_wrap=True)
        for label, r in rows.items():
            quality = [f"{r['same_as_target']:.0%}", f"{r['target_logprob']:.3f}"] if "target_logprob" in r else []
            quality = quality or (["-", "-"] if with_quality else [])
            acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            table.add_row(
                label,
                f"{r['ms_per_token_mean']:.1f}",
                f"{r['ms_per_token_p90']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                acc,
                f"{r['tokens_per_pass']:.2f}",
                f"{r['draft_memory'] / 2**30:.2f}" if r["draft_memory"] else "-",
                f"{r['target_memory'] / 2**30:.2f}",
                f"{r['speedup_vs_llamacpp']:.2f}x",
                *quality,
            )
        console.print(table)
    if report.get("fidelity"):
        table = Table(title="Fidelity: top-1 agreement with llama.cpp on the model's file (teacher-forced)")
        table.add_column("target variant")
        table.add_column("agreement", justify="right")
        table.add_column("tokens", justify="right")
        for label, row in report["fidelity"].items():
            if "error" in row:
                table.add_row(label, f"[red]{row['error']}[/red]", "")
            else:
                table.add_row(label, f"{row['top1_agreement']:.1%}", str(row["tokens"]))
        console.print(table)
    cpu = report["machine"]["cpu"]
    console.print(f"CPU: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['isa'])}; backends {report['backends']}")
    mem = report["memory_bytes"]
    console.print("memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items()))
