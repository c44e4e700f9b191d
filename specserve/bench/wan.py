"""`specserve bench --wan 0,10,50,100`: the cross-region experiment, side by side in one run.

Per round-trip time, on the same prompts, interleaved per prompt (greedy):
  baseline        the front-end calls the remote target for every token (k = 0: one round trip per token)
  disaggregated   draft model here, verifier remote, adaptive k with the round trip in its cost model
  + pipelined     the same, drafting the next window while the current one is verified (cluster/client/pipeline.py)

The verifier is a real `specserve verifier` process on loopback (started here unless --verifier is given),
reached over real gRPC. WAN latency is injected by a gRPC client interceptor (`Delay`): every message is
held RTT/2 before it is sent and every reply RTT/2 after it arrives (no tc netem).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specserve import SpecserveError
from specserve.bench.measure import run_generation, summarize
from specserve.cluster.client.pipeline import PipelinedDrafter
from specserve.config import EngineConfig
from specserve.engine.sampling import SamplingParams
from specserve.runtime import RemoteRuntime

SHIM = "delay interceptor on the gRPC client (each message held RTT/2 in each direction)"
BASELINE = "baseline: remote target per token (k=0)"
DISAGGREGATED = "disaggregated: local draft, k=auto"
PIPELINED = "disaggregated + pipelined drafting"
CONFIGS = ((BASELINE, "none"), (DISAGGREGATED, "draft"), (PIPELINED, "draft"))


class Delay(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A WAN's latency on a gRPC client: each message leaves `one_way_s` after it is sent (messages sent
    together stay together, as on a link) and each reply is handed over `one_way_s` after it arrives. The
    health checks' calls pass through it too, so the pool's measured round trip includes it."""

    def __init__(self) -> None:
        self.one_way_s = 0.0

    def intercept_unary_unary(self, continuation, client_call_details, request):
        time.sleep(self.one_way_s)
        response = continuation(client_call_details, request)
        try:
            response.result()  # wait for the reply, then hold it
        except grpc.RpcError:
            return response  # a failed call fails at once, as it would over the WAN after its round trip
        time.sleep(self.one_way_s)
        return response

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return _DelayedReplies(continuation(client_call_details, self._held(request_iterator)), self)

    def _held(self, requests):
        """The requests, each released `one_way_s` after the caller produced it (a reader thread takes them
        as they come, so one message's wait does not add to the next's)."""
        sent: queue.Queue = queue.Queue()

        def take() -> None:
            for message in requests:
                sent.put((message, time.perf_counter()))
            sent.put(None)

        threading.Thread(target=take, name="wan-delay", daemon=True).start()
        while (item := sent.get()) is not None:
            message, at = item
            if (wait := at + self.one_way_s - time.perf_counter()) > 0:
                time.sleep(wait)
            yield message


class _DelayedReplies:
    """A stream call whose replies are handed over `one_way_s` late; everything else is the call's."""

    def __init__(self, call, delay: Delay):
        self._call, self._delay = call, delay

    def __iter__(self):
        return self

    def __next__(self):
        reply = next(self._call)
        time.sleep(self._delay.one_way_s)
        return reply

    def __getattr__(self, name: str):
        return getattr(self._call, name)


def parse_rtts(text: str) -> list[float]:
    try:
        rtts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecserveError(f"--wan takes round-trip times in ms, e.g. 0,10,50,100; got {text!r}") from None
    if not rtts or any(r < 0 for r in rtts):
        raise SpecserveError(f"--wan takes round-trip times >= 0 in ms; got {text!r}")
    return rtts


def start_local_verifier(args: argparse.Namespace, console: Console) -> tuple[subprocess.Popen, str]:
    """A verifier process on a free loopback port, with the bench's target options."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    log = tempfile.NamedTemporaryFile(prefix="specserve-verifier-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "specserve.cli", "verifier", "--listen", address, "--n-ctx", str(args.n_ctx)]
    command += ["--target", args.target, "--target-backend", args.target_backend]
    command += ["--requantize"] if args.requantize else []
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    console.print(f"starting a verifier on {address} (log {log.name}) ...")
    while "listening on" not in Path(log.name).read_text(errors="replace"):
        if proc.poll() is not None:
            raise SpecserveError(f"the verifier exited; see {log.name}")
        time.sleep(0.5)
    return proc, address


def run_wan_bench(args: argparse.Namespace, engine: EngineConfig, prompts: list[dict]) -> int:
    console = Console(stderr=True)
    rtts = parse_rtts(args.wan)
    proc, runtime = None, None
    address = args.verifier
    if not address:
        proc, address = start_local_verifier(args, console)
    try:
        delay = Delay()
        runtime = RemoteRuntime(dataclasses.replace(engine, verifiers=tuple(address.split(","))), interceptors=(delay,))
        pool = runtime.pool
        tokenizer = runtime.tokenizer
        runs: list[dict] = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("WAN bench", total=len(rtts) * len(prompts) * len(CONFIGS))
            for rtt in rtts:
                delay.one_way_s = rtt / 2000
                pool.check_now()  # the round trip adaptive k plans with, at this delay
                for prompt in prompts:
                    ids = tokenizer.encode(tokenizer.render_chat(prompt["messages"]))
                    params = SamplingParams(max_tokens=args.max_tokens)
                    for label, method in CONFIGS:
                        generation = runtime.generate(ids, params, method=method, k=args.k)
                        if label == PIPELINED:
                            generation.proposer = PipelinedDrafter(generation.proposer)
                        result = run_generation(generation)
                        if label == PIPELINED:
                            result["pipeline_hits"] = generation.proposer.hits
                            result["pipeline_misses"] = generation.proposer.misses
                        result.update(rtt_ms=rtt, config=label, kind=prompt["kind"], prompt=prompt["prompt"])
                        result["output"] = tokenizer.decode(result.pop("token_ids"))
                        runs.append(result)
                        progress.advance(task)
    finally:
        if runtime is not None:
            runtime.pool.close()  # stop health checks before the verifier goes away
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    baseline = {(r["rtt_ms"], r["prompt"]): r["output"] for r in runs if r["config"] == BASELINE}
    mismatches = [
        (r["rtt_ms"], r["config"], r["prompt"][:40]) for r in runs if r["output"] != baseline[r["rtt_ms"], r["prompt"]]
    ]
    summary: dict = {}
    for kind in sorted({p["kind"] for p in prompts}) + ["all"]:
        for rtt in rtts:
            rows = {}
            for label, _ in CONFIGS:
                chosen = [r for r in runs if r["rtt_ms"] == rtt and r["config"] == label]
                rows[label] = summarize([r for r in chosen if kind in (r["kind"], "all")])
            base = rows[BASELINE]["ms_per_token_mean"]
            for label in (DISAGGREGATED, PIPELINED):
                rows[label]["speedup"] = round(base / rows[label]["ms_per_token_mean"], 2)
            of_kind = [r for r in chosen if kind in (r["kind"], "all")]
            hits = sum(r.get("pipeline_hits", 0) for r in of_kind)
            tries = hits + sum(r.get("pipeline_misses", 0) for r in of_kind)
            rows[PIPELINED]["pipeline_hit_rate"] = round(hits / tries, 2) if tries else None
            summary[f"{kind}/{rtt:g}"] = rows
    report = {
        "latency_injection": SHIM,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "prompts": str(args.prompts or "public set"),
        "max_tokens": args.max_tokens,
        "rtts_ms": rtts,
        "verifier": "started by the bench on loopback" if proc is not None else address,
        "greedy_outputs_identical": not mismatches,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    if out.name == "bench.json":  # the default of plain `specserve bench`: keep that report
        out = out.with_name("wan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = plot_wan(report, out.with_suffix(".png"))
    print_wan(report, Console(width=200))  # the side-by-side table is wide
    if mismatches:
        Console().print(f"[red]greedy outputs differ between baseline and disaggregated: {mismatches}[/red]")
    Console().print(f"JSON: {out}   plot: {png}")
    return 0 if not mismatches else 1


def print_wan(report: dict, console: Console) -> None:
    kinds = sorted({key.split("/")[0] for key in report["summary"]})
    for kind in kinds:
        table = Table(title=f"{kind}: per-token latency, greedy, {report['max_tokens']} tokens  [{SHIM}]")
        columns = ["RTT ms", "baseline mean", "p90", "disagg. mean", "p90", "speedup", "acceptance", "mean k"]
        columns += ["pipelined mean", "p90", "speedup", "pipeline hits"]
        for col in columns:
            table.add_column(col, justify="right")
        for rtt in report["rtts_ms"]:
            rows = report["summary"][f"{kind}/{rtt:g}"]
            base, spec, piped = rows[BASELINE], rows[DISAGGREGATED], rows[PIPELINED]
            acc = "-" if spec["acceptance_rate"] is None else f"{spec['acceptance_rate']:.2f}"
            hits = "-" if piped["pipeline_hit_rate"] is None else f"{piped['pipeline_hit_rate']:.2f}"
            table.add_row(
                f"{rtt:g}",
                f"{base['ms_per_token_mean']:.1f}",
                f"{base['ms_per_token_p90']:.1f}",
                f"{spec['ms_per_token_mean']:.1f}",
                f"{spec['ms_per_token_p90']:.1f}",
                f"{spec['speedup']:.2f}x",
                acc,
                f"{spec['mean_k']:.1f}",
                f"{piped['ms_per_token_mean']:.1f}",
                f"{piped['ms_per_token_p90']:.1f}",
                f"{piped['speedup']:.2f}x",
                hits,
            )
        console.print(table)


def plot_wan(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({key.split("/")[0] for key in report["summary"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for label, _ in CONFIGS:
            means = [report["summary"][f"{kind}/{rtt:g}"][label]["ms_per_token_mean"] for rtt in report["rtts_ms"]]
            ax.plot(report["rtts_ms"], means, marker="o", label=label)
        for rtt in report["rtts_ms"]:
            spec = report["summary"][f"{kind}/{rtt:g}"][DISAGGREGATED]
            point = (rtt, spec["ms_per_token_mean"])
            ax.annotate(f"{spec['speedup']:.2f}x", point, textcoords="offset points", xytext=(0, -14), ha="center")
        ax.set_xlabel("round-trip time, ms (delay interceptor)")
        ax.set_ylabel("ms per token (mean)")
        ax.set_title(f"{kind} prompts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
