"""`specserve bench`: target-only vs speculative, side by side in one run, on the same prompts.

Configurations run interleaved per prompt, so a noisy neighbour slows all of them alike. Per-token latency
is a request's decode time divided by its tokens after the first (ms/token); mean and p90 are over requests.
Speed-ups are ratios of aggregate decode tokens/s against the *fastest* target-only configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import specserve
from specserve.bench.measure import COST_WINDOWS, run_generation, window_costs
from specserve.bench.worker import LlamaCppProcess
from specserve.engine.sampling import SamplingParams
from specserve.models.fetch import resolve_model
from specserve.models.registry import DEFAULT_DRAFT
from specserve.runtime import Runtime, RuntimeConfig

SAMPLED_TEMPERATURE = 0.8


@dataclass
class BenchConfig:
    """One column of the comparison: a decoding method on the int8 runtime, or plain llama.cpp in a worker."""

    label: str
    method: str = "none"
    k: int | str = 0
    worker: LlamaCppProcess | None = None
    runtime: Runtime | None = None  # another model pair (e.g. a quantized draft); default: the bench's
    target_memory: int = 0
    draft_memory: int = 0
    tolerance: float | None = None  # lossy rows: the tolerance delta

    def run(self, runtime: Runtime, ids: list[int], params: SamplingParams) -> dict:
        if self.worker is not None:
            return self.worker.generate(ids, params)
        runtime = self.runtime or runtime
        runtime.refresh_costs()  # between requests, as the server's scheduler does between steps
        return run_generation(runtime.generate(ids, params, method=self.method, k=self.k, tolerance=self.tolerance))


PROJECT_PROMPTS = Path(__file__).with_name("prompts.jsonl")  # ours: code, prose, random words, code edits


def public_prompts_path() -> Path:
    """The team's public set, where a checkout has it beside the project (../shared/prompts/public.jsonl)."""
    return Path(specserve.__file__).resolve().parents[2] / "shared" / "prompts" / "public.jsonl"


def prompt_files(spec: str | None) -> list[Path]:
    """`project` (the default: the set that ships with specserve), `public` (the team's set beside the
    checkout, when there is one) or file paths, comma-separated."""
    named = {"public": public_prompts_path(), "project": PROJECT_PROMPTS}
    return [named.get(part, Path(part)) for part in (spec or "project").split(",") if part]


def load_prompts(paths: Path | list[Path], limit: int) -> list[dict]:
    prompts = []
    for path in [paths] if isinstance(paths, Path) else paths:
        if not path.is_file():
            raise specserve.SpecserveError(f"prompt file {path} not found (use --prompts FILE)")
        prompts += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not limit:
        return prompts
    per_kind: Counter[str] = Counter()
    kept = []
    for prompt in prompts:
        if per_kind[prompt["kind"]] < limit:
            per_kind[prompt["kind"]] += 1
            kept.append(prompt)
    return kept


def _summarize(runs: list[dict]) -> dict:
    ms = [r["ms_per_token"] for r in runs]
    tokens = sum(r["tokens"] - 1 for r in runs)
    decode = sum(r["decode_s"] for r in runs)
    drafted = sum(r["drafted"] for r in runs)
    quality = {}
    if all("target_logprob" in r for r in runs):
        quality = {
            "same_as_target": round(float(np.mean([r["same_as_target"] for r in runs])), 3),
            "target_logprob": round(float(np.mean([r["target_logprob"] for r in runs])), 4),
        }
    return {
        **quality,
        "requests": len(runs),
        "ms_per_token_mean": round(float(np.mean(ms)), 2),
        "ms_per_token_p90": round(float(np.percentile(ms, 90)), 2),
        "tokens_per_s": round(tokens / decode, 2) if decode else 0.0,
        "acceptance_rate": round(sum(r["accepted"] for r in runs) / drafted, 3) if drafted else None,
        "tokens_per_pass": round(float(np.mean([r["tokens_per_pass"] for r in runs])), 2),
    }


def target_logprob(runtime: Runtime, prompt: list[int], tokens: list[int]) -> float:
    """Mean log-probability (temperature 1) of generated tokens under the target, teacher-forced: the
    quality measure of lossy (tolerance) rows next to exact ones."""
    if not tokens:
        return 0.0
    sequence = runtime.target.new_sequence()
    logits = sequence.eval(prompt + tokens, all_logits=True)[len(prompt) - 1 : -1]
    top = logits.max(axis=1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(np.mean(logprobs[np.arange(len(tokens)), tokens]))


def _runtime_with_draft(args: argparse.Namespace, runtime: Runtime, spec: str, backend: str) -> Runtime:
    """The bench's runtime when it already has this draft, else one sharing its target."""
    if (runtime.config.draft, runtime.config.draft_backend) == (spec, backend):
        return runtime
    config = RuntimeConfig.from_args(args)
    config.draft, config.draft_backend = spec, backend
    return Runtime(config, target=runtime.target)


def _draft_label(runtime: Runtime) -> str:
    return f"{runtime.config.draft} ({runtime.draft.name})"


def _configs(args: argparse.Namespace, runtime: Runtime, llama_target: LlamaCppProcess, console: Console):
    """The columns of the comparison. `--table seed` reproduces the seed's rows on our pair: baseline
    (target only), speculative with the plain draft, speculative + quantized draft, plus our cascade."""
    int8 = runtime.target.name
    target_mem = runtime.target.memory_bytes()
    baselines = [
        BenchConfig("target-only llama.cpp", worker=llama_target, target_memory=llama_target.memory),
        BenchConfig(f"target-only {int8}", target_memory=target_mem),
    ]

    def speculative(method: str, k: int | str, rt: Runtime, tolerance: float | None = None) -> BenchConfig:
        drafter = "n-gram" if method == "ngram" else _draft_label(rt)
        lossy = f", tolerance delta={tolerance:g} (lossy)" if tolerance is not None else ""
        label = f"spec {int8} + {'cascade ' if method == 'cascade' else ''}{drafter} k={k}{lossy}"
        draft_mem = rt.draft.memory_bytes() if method != "ngram" else 0
        return BenchConfig(label, method, k, None, rt, target_mem, draft_mem, tolerance)

    if args.table == "seed":
        console.print("loading the seed table's drafts ...")
        plain = _runtime_with_draft(args, runtime, DEFAULT_DRAFT, "torch-int8")
        backend = args.quantized_draft_backend
        quantized = [_runtime_with_draft(args, runtime, spec, backend) for spec in args.quantized_draft.split(",")]
        configs = [
            *baselines,
            speculative("draft", args.k, plain),
            *(speculative("draft", args.k, rt) for rt in quantized),
            speculative("cascade", args.k, quantized[0]),
        ]
    else:
        configs = [*baselines, speculative("draft", args.k, runtime), speculative("cascade", args.k, runtime)]
        configs.append(speculative("ngram", args.k, runtime))
        if args.fixed_k and args.k != args.fixed_k:
            configs.append(speculative("draft", args.fixed_k, runtime))
    # lossy, opt-in: rows that show what the speed costs in quality
    configs += [speculative("draft", args.k, runtime, tolerance=delta) for delta in args.tolerance]
    return configs


def run_bench(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prompts = load_prompts(prompt_files(args.prompts), args.limit)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    console.print("loading models and calibrating ...")
    runtime = Runtime(RuntimeConfig.from_args(args))
    tokenizer = runtime.tokenizer
    target_path = runtime.target.model_path
    # Plain llama.cpp runs in a worker process, alone, as a user of llama.cpp would run it.
    llama_target = LlamaCppProcess(target_path, args.n_ctx)
    configs = _configs(args, runtime, llama_target, console)
    probe = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": prompts[0]["prompt"]}]))
    console.print("measuring the backend cost table ...")
    costs = {
        f"llama.cpp {target_path.name}": llama_target.costs(probe),
        f"{runtime.target.name} {target_path.name}": window_costs(runtime.target, probe),
    }
    registry_draft = resolve_model(DEFAULT_DRAFT, show_progress=False)
    llama_draft = LlamaCppProcess(registry_draft, args.n_ctx)  # the registry's draft on llama.cpp, for reference
    costs[f"llama.cpp {registry_draft.name}"] = llama_draft.costs(probe)
    llama_draft_memory = llama_draft.memory
    llama_draft.close()  # the cost table is all it is needed for
    drafts = {id(rt.draft): rt.draft for rt in [runtime, *(c.runtime for c in configs if c.runtime)] if rt.draft}
    for draft in drafts.values():  # every draft a row uses, on the backend it runs on
        costs.setdefault(f"{draft.name} {draft.model_path.name}", window_costs(draft, probe))

    runs: list[dict] = []
    total = len(prompts) * len(modes) * len(configs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        for prompt in prompts:
            ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": prompt["prompt"]}]))
            for mode in modes:
                temperature = 0.0 if mode == "greedy" else SAMPLED_TEMPERATURE
                params = SamplingParams(temperature=temperature, seed=1, max_tokens=args.max_tokens)
                exact_tokens = None
                for config in configs:
                    result = config.run(runtime, ids, params)
                    result.update(config=config.label, mode=mode, kind=prompt["kind"], prompt=prompt["prompt"])
                    if config.worker is None and config.method == "none":
                        exact_tokens = result["token_ids"]  # the int8 target's own output: the quality reference
                    if args.tolerance and config.worker is None and exact_tokens is not None:
                        result["same_as_target"] = result["token_ids"] == exact_tokens
                        result["target_logprob"] = target_logprob(runtime, ids, result["token_ids"])
                    result["output"] = tokenizer.decode(result.pop("token_ids"))
                    runs.append(result)
                    progress.advance(task)

    summary: dict = {}
    for mode in modes:
        for kind in sorted({p["kind"] for p in prompts}) + ["all"]:
            rows = {}
            for config in configs:
                selected = [
                    r for r in runs if r["config"] == config.label and r["mode"] == mode and kind in (r["kind"], "all")
                ]
                if selected:
                    rows[config.label] = _summarize(selected)
                    rows[config.label]["target_memory"] = config.target_memory
                    rows[config.label]["draft_memory"] = config.draft_memory
            fastest_plain = max(rows[c.label]["tokens_per_s"] for c in configs if c.method == "none")
            for row in rows.values():
                row["speedup_vs_fastest_target_only"] = round(row["tokens_per_s"] / fastest_plain, 3)
            summary[f"{mode}/{kind}"] = rows

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "prompts": [str(p) for p in prompt_files(args.prompts)],
        "table": args.table,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "sampled_temperature": SAMPLED_TEMPERATURE,
        "cost_table": costs,
        # times a runtime measured its window costs again after the machine's speed drifted (per runtime)
        "cost_refreshes": {c.label: c.runtime.cost_refreshes for c in configs if c.runtime},
        "memory_bytes": {
            f"target {runtime.target.name} weights": runtime.target.memory_bytes(),
            f"draft {runtime.draft.name} weights": runtime.draft.memory_bytes(),
            "target llama.cpp weights": llama_target.memory,
            f"draft llama.cpp {registry_draft.name} weights": llama_draft_memory,
            "peak_rss": peak_rss,
        },
        "summary": summary,
        "runs": runs,
    }
    llama_target.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    from specserve.bench.plot import plot_report

    png = plot_report(report, out.with_suffix(".png"))
    console = Console(width=max(Console().width, 150))  # the tables are wide; do not wrap them into columns
    print_report(report, console)
    console.print(f"JSON: {out}   plot: {png}")
    return 0


def print_report(report: dict, console: Console) -> None:
    costs = Table(title="Backend cost: time to append k tokens, relative to 1 token (fastest of 5)")
    costs.add_column("backend / model")
    costs.add_column("1 token ms", justify="right")
    for k in COST_WINDOWS[1:]:
        costs.add_column(f"k={k}", justify="right")
    for name, row in report["cost_table"].items():
        costs.add_row(name, f"{row['ms_1']:.1f}", *(f"{row[f'k{k}']:.2f}" for k in COST_WINDOWS[1:]))
    console.print(costs)
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
            "speedup",
        ):
            table.add_column(col, justify="left" if col == "configuration" else "right")
        with_quality = any("target_logprob" in r for r in rows.values())
        if with_quality:  # tolerance rows: what the lossy rule costs
            table.add_column("same as target", justify="right")
            table.add_column("target log-prob", justify="right")
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
                f"{r['speedup_vs_fastest_target_only']:.2f}x",
                *quality,
            )
        console.print(table)
    mem = report["memory_bytes"]
    console.print("memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items()))
