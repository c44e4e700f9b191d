"""A server process's life: a per-request deadline, and SIGTERM draining the running streams before exit 0.
The small SmolLM2 model on llama.cpp keeps it quick; what is tested is the server, not the model."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.ports import free_port
from tests.support.servers import start_server, stop_server

pytestmark = pytest.mark.small_model
SMALL = ("--target", "smollm2-135m", "--target-backend", "llama.cpp", "--draft", "none")
TIMEOUT_S = 3.0


@pytest.fixture
def server(request, smollm2_path):
    """A server with the test's own options (`@pytest.mark.parametrize("server", [...], indirect=True)`)."""
    proc, base, _ = start_server(*SMALL, *request.param)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("server", [("--request-timeout", str(TIMEOUT_S))], indirect=True)
def test_a_request_past_its_deadline_ends_as_length_and_frees_its_slot(server, smollm2_path):
    from specserve.models.tokenizer import Tokenizer

    _, base = server
    never_stop = {str(t): -100 for t in Tokenizer(smollm2_path).stop_ids}  # 1800 tokens would take ~10 s
    start = time.perf_counter()
    reply = client(base).completions.create(
        model=None, prompt="Once upon a time", max_tokens=1800, temperature=0.8, seed=1, logit_bias=never_stop
    )
    elapsed = time.perf_counter() - start
    assert reply.choices[0].finish_reason == "length" and 0 < reply.usage.completion_tokens < 1800
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 10
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0


@pytest.mark.parametrize("server", [("--stream-buffer", "16")], indirect=True)
def test_a_client_that_stops_reading_is_cancelled_and_stalls_nobody(server, smollm2_path):
    import json
    from urllib.parse import urlparse

    from specserve.models.tokenizer import Tokenizer

    _, base = server
    never_stop = {str(t): -100 for t in Tokenizer(smollm2_path).stop_ids}
    body = json.dumps(
        {
            "prompt": "Once upon a time",
            "max_tokens": 1800,
            "stream": True,
            "seed": 1,
            "logprobs": 5,
            "logit_bias": never_stop,
        }
    ).encode()
    url = urlparse(base)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    reader.connect((url.hostname, url.port))
    reader.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )  # ... and never reads: the kernel's and the server's buffers fill, then its queue of steps
    try:
        # another stream meanwhile runs to its end, undelayed by the one nobody reads
        other = client(base).completions.create(
            model=None, prompt="The sea is", max_tokens=32, seed=2, logit_bias=never_stop
        )
        assert other.usage.completion_tokens == 32
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = httpx.get(f"{base}/metrics").text
            stalled = [line for line in metrics.splitlines() if line.startswith("specserve_stalled_streams_total")]
            if stalled and float(stalled[0].split()[1]) >= 1 and httpx.get(f"{base}/health").json()["in_flight"] == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the unread stream was not cancelled: {stalled}, {httpx.get(f'{base}/health').json()}")
        received = b""  # reading again, the client hears why its stream ended
        reader.settimeout(30)
        while b"data: [DONE]" not in received:
            received += reader.recv(1 << 16) or pytest.fail(f"connection closed: {received[-500:]!r}")
        assert b"steps unread" in received.rsplit(b"data: ", 2)[-2]
    finally:
        reader.close()
    assert client(base).completions.create(model=None, prompt="Hi", max_tokens=4).usage.completion_tokens == 4


def test_a_model_that_cannot_load_ends_the_server_with_one_line_that_names_the_fix(yarn_model):
    """Not under a supervisor, a server whose models fail to load exits 1 (here: a backend that does not run
    the file's rope scaling) rather than answering 503 for ever."""
    port = free_port()
    command = [sys.executable, "-m", "specserve.cli", "serve", "--port", str(port), "--target", str(yarn_model)]
    command += ["--target-backend", "torch-q4", "--draft", "none"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("specserve: error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert "'yarn'" in errors[0] and "--target-backend llama.cpp" in errors[0]
    assert "Traceback" not in done.stderr  # a reason, not a stack


def test_asked_to_stay_up_a_failed_server_says_why_on_health(yarn_model):
    proc, base, _ = start_server(
        "--target",
        str(yarn_model),
        "--target-backend",
        "torch-q4",
        "--draft",
        "none",
        "--stay-up-on-failure",
        healthy=False,
    )
    try:
        deadline = time.time() + 300
        while (health := httpx.get(f"{base}/health")).json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.25)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "--target-backend llama.cpp" in health.json()["error"] and proc.poll() is None
    finally:
        stop_server(proc)


@pytest.mark.models  # the default draft (Qwen) beside a SmolLM2 target
def test_a_target_of_another_family_without_a_draft_serves_with_a_model_free_drafter(smollm2_path):
    proc, base, _ = start_server("--target", "smollm2-135m", "--target-backend", "llama.cpp")
    try:
        info = httpx.get(f"{base}/v1/specserve/info").json()
        assert info["draft"] is None, info
        reply = client(base).chat.completions.create(
            model=None,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=8,
            extra_body={"speculation": {"method": "draft"}},  # asks for the draft model this server has not got
        )
        assert reply.usage.completion_tokens == 8 and reply.choices[0].message.content
    finally:
        stop_server(proc)


@pytest.mark.models
def test_a_llama_target_serves_with_speculation_from_its_requantized_copy(smollm2_path):
    """Bring your own model: SmolLM2 (Llama architecture, Q4_1) on specserve's kernels as the file is, its Q4_0
    requantization as the draft; the speculative greedy reply is the plain one."""
    proc, base, _ = start_server(
        *("--target", "smollm2-135m", "--draft", "smollm2-135m@Q4_0"),
        *("--target-backend", "torch-q4", "--draft-backend", "torch-q4", "--mlock"),
    )
    try:
        info = httpx.get(f"{base}/v1/specserve/info").json()
        assert info["target_backend"] == "torch-q4" and info["draft"], info
        # the target as the user chose it; the draft a copy, said so (it changes no reply: the target decides)
        assert info["target_weights"] == f"the file's own weights ({smollm2_path.name})", info
        assert info["draft_weights"].startswith("a requantized copy") and "to Q4_0" in info["draft_weights"], info
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["weights"] == info["target_weights"]
        # `--mlock`: the weights stay in RAM, an idle server's cannot be paged out
        status = Path(f"/proc/{proc.pid}/status").read_text()
        locked_kb = int(next(line for line in status.splitlines() if line.startswith("VmLck:")).split()[1])
        assert locked_kb * 1024 > smollm2_path.stat().st_size, status
        replies = {
            method: client(base).chat.completions.create(
                model=None,
                messages=[{"role": "user", "content": "List the first ten prime numbers, one per line."}],
                max_tokens=48,
                temperature=0,
                seed=seed,  # another key of the response cache, which would answer the second from the first
                extra_body={"speculation": {"method": method, "k": 4}},
            )
            for seed, method in enumerate(("none", "draft"))
        }
        assert replies["draft"].model_extra["speculative"]["drafted"] > 0
        assert replies["none"].model_extra["speculative"]["drafted"] == 0
        assert replies["draft"].choices[0].message.content == replies["none"].choices[0].message.content
    finally:
        stop_server(proc)


@pytest.mark.parametrize("server", [("--shutdown-grace", "120")], indirect=True)
def test_sigterm_stops_admitting_lets_streams_finish_and_exits_0(server):
    proc, base = server
    results: list[tuple[str, str | None, int]] = []
    started = threading.Barrier(3)

    def stream(seed: int) -> None:
        text, finish, chunks = "", None, 0
        for chunk in client(base).chat.completions.create(
            model=None,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=48,
            temperature=0.8,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            chunks += 1
            if chunks == 2:
                started.wait()
        results.append((text, finish, chunk.usage.completion_tokens if chunk.usage else -1))

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    started.wait()  # both streams are under way
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while (health := httpx.get(f"{base}/health")).status_code == 200 and time.time() < deadline:
        time.sleep(0.02)
    assert health.status_code == 503 and health.json()["status"] == "draining" and health.headers["retry-after"] == "1"
    refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]["message"]
    for thread in threads:
        thread.join(timeout=60)
    assert [(finish, tokens) for _, finish, tokens in results] == [("length", 48), ("length", 48)]
    assert proc.wait(timeout=30) == 0


def test_redis_killed_and_restarted_under_load_loses_no_request(redis_server, smollm2_path):
    """The response cache goes away mid-load: requests go on uncached; it comes back by itself (the cache
    retries Redis 30 s after it went away)."""
    proc, base, _ = start_server(*SMALL, "--cache-url", redis_server.url)
    outcomes: list[tuple[int, str, str, bool]] = []  # status, prompt, text, cached
    done = threading.Event()

    def load(worker: int) -> None:
        while not done.is_set():
            for prompt in ("def add(a, b):", "# A list of fruits:", "SELECT name FROM"):
                body = {"prompt": prompt, "max_tokens": 8}
                response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
                reply = response.json()
                text = reply["choices"][0]["text"] if response.status_code == 200 else reply["error"]["message"]
                cached = response.status_code == 200 and reply["speculative"].get("cached", False)
                outcomes.append((response.status_code, prompt, text, cached))

    def wait_for_a_cached_reply(since: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not any(cached for *_, cached in outcomes[since:]):
            time.sleep(0.25)

    workers = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    try:
        for worker in workers:
            worker.start()
        wait_for_a_cached_reply(0)
        port = redis_server.port
        redis_server.stop()
        stopped = len(outcomes)
        time.sleep(3)
        redis_server.start(port=port)  # empty: the cache fills again once the server retries it
        seen = len(outcomes)
        wait_for_a_cached_reply(seen)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=30)
    assert {status for status, *_ in outcomes} == {200}, [o for o in outcomes if o[0] != 200][:3]
    texts: dict[str, set[str]] = {}
    for _, prompt, text, _ in outcomes:
        texts.setdefault(prompt, set()).add(text)
    assert all(len(t) == 1 for t in texts.values()), texts  # cached or not, greedy gives the same text
    assert any(cached for *_, cached in outcomes[:stopped]) and any(cached for *_, cached in outcomes[seen:])
    assert seen > stopped  # requests ran while Redis was down


@pytest.mark.parametrize("server", [("--max-batch", "2", "--max-queue", "4")], indirect=True)
def test_clients_that_honour_retry_after_all_finish_with_their_solo_text(server):
    """Past --max-batch + --max-queue a client gets 429 + Retry-After; one that waits and retries gets in.
    Twelve at once are twice what the server admits (2 running + 4 waiting)."""
    import concurrent.futures

    _, base = server
    prompts = [f"Write a short poem about the number {i % 6}." for i in range(12)]

    def text(prompt: str) -> str:
        stream = client(base).completions.create(model=None, prompt=prompt, max_tokens=8, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    def patient(prompt: str) -> tuple[str, int]:
        refused = 0
        while True:
            try:
                return text(prompt), refused
            except openai.RateLimitError as exc:
                refused += 1
                time.sleep(float(exc.response.headers["retry-after"]))

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(patient, prompts))
    alone = {prompt: text(prompt) for prompt in set(prompts)}
    assert [answer for answer, _ in results] == [alone[p] for p in prompts]  # none lost, cut or doubled
    assert sum(refused for _, refused in results) > 0  # the bound was reached
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0


@pytest.mark.parametrize("server", [("--max-batch", "2", "--max-queue", "1")], indirect=True)
def test_loadtest_reports_latency_percentiles_and_retries_the_turned_away(server, tmp_path):
    import json
    import subprocess
    import sys

    _, base = server
    out = tmp_path / "load.json"
    command = [sys.executable, "-m", "specserve.cli", "loadtest", "--url", base, "--concurrency", "1,6"]
    command += ["--methods", "ngram,none", "--rounds", "2", "--max-tokens", "16", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["clients"], r["method"]) for r in rows} == {(c, m) for c in (1, 6) for m in ("ngram", "none")}
    for row in rows:
        assert row["requests"] == 2 * row["clients"]  # every request finished, the turned-away ones retried
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p99"] and 0 < row["tpot_ms_p50"] <= row["tpot_ms_p99"]
    # 6 clients against 2 running + 1 waiting: some were told to come back
    assert all(r["retried_429"] > 0 for r in rows if r["clients"] == 6)
    assert all(r["retried_429"] == 0 for r in rows if r["clients"] == 1)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("server", [("--max-batch", "4", "--max-queue", "1")], indirect=True)
def test_a_soak_with_clients_that_leave_leaks_no_sequence_descriptor_or_memory(server, tmp_path):
    import json
    import subprocess
    import sys

    _, base = server
    out = tmp_path / "soak.json"
    # one minute: each path of the mix is taken many times over (a sample every 5 s, the last 45 s after warm-up)
    command = [sys.executable, "-m", "specserve.cli", "loadtest", "--url", base, "--soak", "1", "--concurrency", "6"]
    command += ["--methods", "suffix", "--max-tokens", "24", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    report = json.loads(out.read_text())
    assert done.returncode == 0 and report["problems"] == [], done.stdout[-3000:] + done.stderr[-2000:]
    # 6 clients on 4 + 1 slots, the mix of greedy, sampled, stop strings, repeats, leaving: every path was taken
    assert report["completed"] > 0 and report["abandoned"] > 0 and report["cancelled"] > 0
    assert report["retried_429"] > 0 and report["cache_hits"] > 0
    last = report["samples"][-1]
    assert last["active"] == 0 and last["rss_bytes"] > 0 and last["logged_errors"] == 0 and len(report["samples"]) >= 10
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_soak_verdict_names_each_leak():
    from specserve.bench.soak import verdict

    def sample(t: float, rss_mib: float, fds: int, active: int = 0, errors: int = 0) -> dict:
        memory = rss_mib * 2**20
        return dict(t_s=t, rss_bytes=memory, open_fds=fds, active=active, waiting=0, logged_errors=errors)

    clean = {"seconds": 60, "completed": 9, "failed": 0, "failures": []}
    steady = [sample(0, 100, 20, errors=1), sample(15, 200, 28, errors=1), sample(60, 205, 21, errors=1)]
    assert verdict({**clean, "samples": steady}) == []  # an error logged before the soak is not the soak's
    leaking = [sample(0, 100, 20), sample(15, 200, 28), sample(60, 260, 40, active=2, errors=3)]
    problems = verdict({**clean, "failed": 1, "failures": ["boom"], "samples": leaking})
    assert [p.split()[1] for p in problems] == ["requests", "server", "the", "file", "memory"], problems
