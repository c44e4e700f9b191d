"""`specserve loadtest`: concurrent streaming clients against a real server, speculative vs plain.

For each concurrency level (default 1, 4, 16) and each speculation method, that many clients stream chat
completions at once through the official `openai` client. Per request we record time to first token and
TPOT (time per output token after the first); aggregate tokens/s is completion tokens over wall time. A
request the server turns away (429, more clients than `--max-batch` + `--max-queue`) is retried after its
`Retry-After`; the retries are counted, and its time to first token counts from its first try.
Both methods of a level stream the same prompts, one method after the other, and which goes first
alternates per level. Each request carries a distinct seed, which keeps it out of the response cache (greedy
output does not depend on the seed).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import openai
from rich.console import Console
from rich.table import Table

from specserve.bench.run import load_prompts, prompt_files
from specserve.bench.served import ServerProcess, open_stream, specserve_server
from specserve.bench.soak import run_soak

_COLUMNS = (
    "clients",
    "method",
    "tokens_per_s",
    "speedup_vs_none",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "retried_429",
)


async def _one_stream(client: openai.AsyncOpenAI, prompt: str, method: str, max_tokens: int, seed: int) -> dict:
    """One streamed request, retried after the server's Retry-After while it answers 429 (busy)."""
    retried, start = 0, time.perf_counter()
    while True:
        try:
            return {**await _stream_once(client, prompt, method, max_tokens, seed, start), "retried_429": retried}
        except openai.RateLimitError as exc:
            retried += 1
            await asyncio.sleep(float(exc.response.headers.get("retry-after", 1)))


async def _stream_once(
    client: openai.AsyncOpenAI, prompt: str, method: str, max_tokens: int, seed: int, start: float
) -> dict:
    arrivals: list[float] = []
    completion_tokens = 0
    stream = await open_stream(client, prompt, method, max_tokens, seed)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
        if chunk.usage:
            completion_tokens = chunk.usage.completion_tokens
    tpot = (arrivals[-1] - arrivals[0]) / (completion_tokens - 1) if completion_tokens > 1 and arrivals else 0.0
    return {"ttft_s": arrivals[0] if arrivals else None, "tpot_s": tpot, "tokens": completion_tokens}


async def _level(
    base_url: str, prompts: list[str], method: str, clients: int, rounds: int, max_tokens: int, seed0: int
) -> dict:
    """`clients` concurrent clients, each streaming `rounds` requests one after another."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)

    async def one_client(c: int) -> list[dict]:
        runs = []
        for r in range(rounds):
            # every method of a level gets the same prompts (a different set once made `draft` look 60-930 ms
            # slower to its first token: other prompts, other prefill); only the seed is new
            prompt = prompts[(c * rounds + r) % len(prompts)]
            seed = seed0 + c * rounds + r
            runs.append(await _one_stream(client, prompt, method, max_tokens, seed))
        return runs

    start = time.perf_counter()
    runs = [run for per_client in await asyncio.gather(*map(one_client, range(clients))) for run in per_client]
    wall = time.perf_counter() - start
    await client.close()
    tpot_ms = [r["tpot_s"] * 1000 for r in runs if r["tokens"] > 1]
    ttft_ms = [r["ttft_s"] * 1000 for r in runs if r["ttft_s"] is not None]
    return {
        "clients": clients,
        "method": method,
        "requests": len(runs),
        "tokens_per_s": round(sum(r["tokens"] for r in runs) / wall, 2),
        "ttft_ms_p50": round(float(np.percentile(ttft_ms, 50)), 1),
        "ttft_ms_p99": round(float(np.percentile(ttft_ms, 99)), 1),
        "tpot_ms_p50": round(float(np.percentile(tpot_ms, 50)), 1),
        "tpot_ms_p99": round(float(np.percentile(tpot_ms, 99)), 1),
        "retried_429": sum(r["retried_429"] for r in runs),
        "wall_s": round(wall, 2),
    }


def start_server(args) -> tuple[ServerProcess, str]:
    """A `specserve serve` on a free loopback port, for a self-contained run."""
    max_batch = str(args.max_batch or max(args.concurrency))
    server = specserve_server(extra=("--max-batch", max_batch, "--max-queue", str(args.max_queue)))
    return server, server.base


def run_loadtest(args) -> int:
    """The concurrency sweep, or with `--soak MINUTES` the leak watch (bench/soak.py), against `--url` or a
    server started here."""
    proc, base = None, args.url
    if base is None:
        Console().print("starting a server on the default models ...")
        proc, base = start_server(args)
    try:
        return run_soak(args, base) if args.soak else _sweep(args, base)
    finally:
        if proc is not None:
            proc.stop()


def _sweep(args, base: str) -> int:
    console = Console()
    prompts = [p["prompt"] for p in load_prompts(prompt_files(args.prompts), 0)]
    methods = args.methods.split(",")
    results = []
    seed = 0
    for level, clients in enumerate(args.concurrency):
        # alternate which method goes first, so that neither always runs on a freshly idle machine
        for method in methods if level % 2 == 0 else methods[::-1]:
            console.print(f"{clients} concurrent streams, speculation {method} ...")
            results.append(asyncio.run(_level(base, prompts, method, clients, args.rounds, args.max_tokens, seed)))
            seed += clients * args.rounds
    for row in results:
        plain = next(r for r in results if r["clients"] == row["clients"] and r["method"] == "none")
        row["speedup_vs_none"] = (
            round(row["tokens_per_s"] / plain["tokens_per_s"], 2) if plain["tokens_per_s"] else None
        )
    table = Table(title=f"loadtest: {args.max_tokens} tokens per stream, {base}")
    for column in _COLUMNS:
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(*(str(row[c]) for c in _COLUMNS))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"max_tokens": args.max_tokens, "results": results}, indent=2))
    _plot(results, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, tpot) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in sorted({r["method"] for r in results}):
        rows = [r for r in results if r["method"] == method]
        clients = [r["clients"] for r in rows]
        rate.plot(clients, [r["tokens_per_s"] for r in rows], marker="o", label=method)
        tpot.plot(clients, [r["tpot_ms_p50"] for r in rows], marker="o", label=f"{method} p50")
        tpot.plot(clients, [r["tpot_ms_p99"] for r in rows], marker="x", linestyle="--", label=f"{method} p99")
    rate.set_xscale("log", base=2)
    tpot.set_xscale("log", base=2)
    rate.set_xlabel("concurrent streams")
    tpot.set_xlabel("concurrent streams")
    rate.set_ylabel("aggregate tokens/s")
    tpot.set_ylabel("ms per output token (per request)")
    rate.legend()
    tpot.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
