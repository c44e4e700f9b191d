"""`specserve loadtest --soak MINUTES`: streaming clients for a long while, watching the server for leaks.

The first `--concurrency` level of clients stream chat completions without pause for MINUTES, each cycling
through a mix of requests (`MIX`): greedy and sampled, with stop strings, repeats of one greedy request (the
response cache answers them), clients that leave mid-stream and clients that give up before their first
token (the server must cancel both and free their sequences). Every `SAMPLE_EVERY_S` the server's own
`/metrics` give its resident memory, open file descriptors, active sequences, queue depth, cache hits and
errors logged, so it works against any server (`--url`).

Verdict (exit 1 when it fails): no request failed and the server logged no error; once the clients are gone,
no sequence is active, none waits, and the server holds no more file descriptors than before the load;
resident memory after the warm-up (the first `WARM_UP_SHARE` of the run, where caches and allocators fill)
grew by at most `RSS_GROWTH_LIMIT` — the bounded caches (response, prefix, suffix trees) must stop growing.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from specserve.bench.run import load_prompts, prompt_files
from specserve.bench.served import open_stream

# What request n of client c is: MIX[(c + n) % len(MIX)]
MIX = ("greedy", "sampled", "stop", "repeat", "abandon", "sampled", "cancel", "greedy")
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
STOP = ["\n\n", "```"]
ABANDON_AFTER_CHUNKS = 2
CANCEL_AFTER_S = 0.2  # a "cancel" client gives up this soon: in the queue or the prompt's prefill
REPEATED_PROMPTS = 3  # "repeat" requests ask one of these few greedy questions again and again
SAMPLE_EVERY_S = 5.0
SETTLE_S = 30.0  # after the load: how long the server may take to drop the last cancelled sequences
WARM_UP_SHARE = 0.25
RSS_GROWTH_LIMIT = 0.05
FD_SLACK = 2  # descriptors that may come and go on their own (a log rotation, a metrics scrape's socket)
_SAMPLED = {
    "process_resident_memory_bytes": "rss_bytes",
    "process_open_fds": "open_fds",
    "specserve_active_sequences": "active",
    "specserve_queue_depth": "waiting",
    "specserve_cache_hits_total": "cache_hits",
    "specserve_logged_errors_total": "logged_errors",
}


async def _sample(http: httpx.AsyncClient, start: float) -> dict:
    text = (await http.get("/metrics")).text
    sample = {"t_s": round(time.monotonic() - start, 1)}
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name in _SAMPLED:
                sample[_SAMPLED[metric.name]] = metric.value
    return sample


async def _request(client: openai.AsyncOpenAI, prompt: str, method: str, max_tokens: int, seed: int, kind: str):
    """One request of the mix; returns how it ended: completed, abandoned or cancelled."""
    options = {"sampled": SAMPLED, "stop": {"stop": STOP}}.get(kind, {})
    seed = 0 if kind == "repeat" else seed  # the same request each time: after the first, the response cache's
    stream, chunks = None, 0
    try:
        async with asyncio.timeout(CANCEL_AFTER_S if kind == "cancel" else None):
            stream = await open_stream(client, prompt, method, max_tokens, seed, **options)
            async for _ in stream:
                chunks += 1
                if kind == "abandon" and chunks == ABANDON_AFTER_CHUNKS:
                    return "abandoned"
    except TimeoutError:
        return "cancelled"
    finally:
        if stream is not None:
            await stream.close()  # done with, or left: a connection that goes is a client the server sees leave
    return "completed"


async def _soak(base: str, prompts: list[str], method: str, clients: int, seconds: float, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    counts = {"completed": 0, "abandoned": 0, "cancelled": 0, "failed": 0, "retried_429": 0}
    failures: list[str] = []
    samples: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        start = time.monotonic()
        samples.append(await _sample(http, start))
        stop_at = start + seconds

        async def one_client(c: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                kind = MIX[(c + n) % len(MIX)]
                prompt = prompts[(c + n * clients) % (REPEATED_PROMPTS if kind == "repeat" else len(prompts))]
                try:
                    counts[await _request(client, prompt, method, max_tokens, c + n * clients, kind)] += 1
                except openai.RateLimitError as exc:
                    counts["retried_429"] += 1
                    await asyncio.sleep(float(exc.response.headers.get("retry-after", 1)))
                    continue
                except openai.APIError as exc:
                    counts["failed"] += 1
                    failures.append(str(exc)[:300])
                n += 1

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(SAMPLE_EVERY_S)
                samples.append(await _sample(http, start))

        await asyncio.gather(sampler(), *map(one_client, range(clients)))
        await client.close()
        # the clients are gone: wait for the server to drop what they left, then take the last sample
        settle_by = time.monotonic() + SETTLE_S
        while True:
            last = await _sample(http, start)
            quiet = last["active"] == 0 and last["waiting"] == 0 and last["open_fds"] <= samples[0]["open_fds"]
            if quiet or time.monotonic() > settle_by:
                break
            await asyncio.sleep(1)
        samples.append(last)
    return {**counts, "failures": failures[:10], "samples": samples}


def verdict(report: dict) -> list[str]:
    """What the soak found wrong (empty: it passed)."""
    samples = report["samples"]
    first, last = samples[0], samples[-1]
    warm = next(s for s in samples if s["t_s"] >= WARM_UP_SHARE * report["seconds"])
    problems = []
    if report["failed"]:
        problems.append(f"{report['failed']} requests failed: {report['failures'][:3]}")
    if last.get("logged_errors", 0) > first.get("logged_errors", 0):
        problems.append(f"the server logged {last['logged_errors'] - first['logged_errors']:.0f} errors")
    if last["active"] or last["waiting"]:
        problems.append(f"after the load {last['active']:.0f} sequences active, {last['waiting']:.0f} waiting")
    if last["open_fds"] > first["open_fds"] + FD_SLACK:
        problems.append(f"open file descriptors {first['open_fds']:.0f} before the load, {last['open_fds']:.0f} after")
    if last["rss_bytes"] > warm["rss_bytes"] * (1 + RSS_GROWTH_LIMIT):
        growth = (last["rss_bytes"] - warm["rss_bytes"]) / 2**20
        problems.append(f"resident memory grew {growth:.0f} MiB after the warm-up (limit {RSS_GROWTH_LIMIT:.0%})")
    if report["completed"] == 0:
        problems.append("no request completed")
    return problems


def run_soak(args, base: str) -> int:
    console = Console()
    prompts = [p["prompt"] for p in load_prompts(prompt_files(args.prompts), 0)]
    method, clients, seconds = args.methods.split(",")[0], args.concurrency[0], args.soak * 60
    console.print(f"soak: {clients} clients, speculation {method}, {args.soak:g} min against {base} ...")
    report = asyncio.run(_soak(base, prompts, method, clients, seconds, args.max_tokens))
    report.update(clients=clients, method=method, seconds=seconds, max_tokens=args.max_tokens)
    report["problems"] = problems = verdict(report)
    samples = report["samples"]
    table = Table(title=f"soak: {clients} clients, {method}, {args.soak:g} min, {base}")
    for column in ("t_s", "rss_mib", "open_fds", "active", "waiting"):
        table.add_column(column, justify="right")
    for s in samples[:: max(1, len(samples) // 12)] + [samples[-1]]:
        row = (s["t_s"], s["rss_bytes"] / 2**20, s["open_fds"], s["active"], s["waiting"])
        table.add_row(*(f"{v:.0f}" for v in row))
    console.print(table)
    report["cache_hits"] = samples[-1].get("cache_hits", 0) - samples[0].get("cache_hits", 0)
    counts = ("completed", "abandoned", "cancelled", "failed", "retried_429", "cache_hits")
    counts = ", ".join(f"{k} {report[k]:g}" for k in counts)
    console.print(f"requests: {counts}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    _plot(report, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    for problem in problems:
        console.print(f"[red]soak failed: {problem}[/red]")
    if not problems:
        console.print("[green]soak passed: nothing leaked[/green]")
    return 1 if problems else 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    fig, (memory, counts) = plt.subplots(1, 2, figsize=(11, 4.2))
    memory.plot(minutes, [s["rss_bytes"] / 2**20 for s in samples], marker=".")
    memory.axvline(WARM_UP_SHARE * report["seconds"] / 60, color="grey", linestyle=":", label="end of warm-up")
    memory.set_xlabel("minutes")
    memory.set_ylabel("server resident memory (MiB)")
    memory.legend()
    for key in ("open_fds", "active", "waiting"):
        counts.plot(minutes, [s[key] for s in samples], marker=".", label=key)
    counts.set_xlabel("minutes")
    counts.legend()
    fig.suptitle(f"soak: {report['clients']} clients, {report['method']}, {report['max_tokens']} tokens per stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
