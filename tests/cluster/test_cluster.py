"""Disaggregated speculative decoding: the draft in a front-end, the target in `specserve verifier` services,
over real gRPC on loopback. Real processes for the model paths; a fixed-distribution model behind the real
service for the statistics (so every window is an independent trial)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from specserve import SpecserveError  # noqa: E402
from specserve.cluster import verifier_pb2 as pb  # noqa: E402
from specserve.cluster import verifier_pb2_grpc as pb_grpc  # noqa: E402
from specserve.cluster.client.remote import RemoteTarget, RemoteVerifier  # noqa: E402
from specserve.cluster.client.router import ClientOptions, VerifierPool  # noqa: E402
from specserve.cluster.protocol import auth_metadata, params_to_wire  # noqa: E402
from specserve.cluster.verifier.service import VerifierService, start_server  # noqa: E402
from specserve.engine.sampling import SamplingParams, keep_top_k  # noqa: E402
from specserve.engine.target import Window  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.servers import start_server as start_frontend  # noqa: E402
from tests.support.servers import stop_server as stop_frontend  # noqa: E402

PROMPTS = [
    "Write a Python function `is_prime(n)` that returns True if n is prime.",
    "Explain in two sentences what a hash map is.",
]


# --- helpers ---


def _window(append: list[int], *, drafts: list[int] | None = None, probs: list | None = None, params, rng) -> Window:
    """A window that asks for a verdict."""
    return Window(append=append, drafts=drafts or [], probs=probs or [], predict=True, params=params, rng=rng)


class VerifierProcess:
    """A `specserve verifier` process on a free loopback port; ready once it prints its listening line."""

    def __init__(self, *extra: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)  # a file: a full pipe would block it
        command = [sys.executable, "-m", "specserve.cli", "verifier", "--listen", self.address, "--n-ctx", "2048"]
        self.proc = subprocess.Popen(
            [*command, *extra], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> VerifierProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"verifier exited: {self.output()[-3000:]}")
            if "listening on" in self.output():
                return self
            time.sleep(0.25)
        pytest.fail("verifier did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


def info(address: str, token: str | None = None, credentials=None) -> pb.InfoReply:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return pb_grpc.VerifierStub(channel).Info(pb.InfoRequest(), timeout=10, metadata=auth_metadata(token))


def chat(
    base: str,
    prompt: str,
    max_tokens: int,
    method: str = "draft",
    stream: bool = False,
    seed: int = 0,
    k: int | None = None,
):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    return client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=stream,
        seed=seed,  # greedy ignores it; a distinct value keeps the response cache out of the way
        extra_body={"speculation": {"method": method} | ({"k": k} if k is not None else {})},
    )


def reference(runtime, prompt: str, max_tokens: int) -> str:
    """Single-process output: target and draft in this process, no network."""
    generation = runtime.generate(
        runtime.encode_prompt(messages=[{"role": "user", "content": prompt}]),
        SamplingParams(max_tokens=max_tokens),
        method="none",
    )
    for _ in generation:
        pass
    return generation.text


# --- the protocol path with a model whose every position predicts p (each window an independent trial) ---


class FixedDistribution:
    """A Model whose logits are log p at every position, whatever the tokens."""

    name = "fixed"
    model_path, converted_to = Path("fixed.gguf"), None  # no file: its weights are p
    copies_prefix = False

    def __init__(self, p: np.ndarray):
        self.p, self.n_vocab, self.n_ctx = p, len(p), 1 << 20
        with np.errstate(divide="ignore"):
            self.logits = np.log(p).astype(np.float32)

    def new_sequence(self) -> FixedSequence:
        return FixedSequence(self)

    def eval_batch(self, work):
        return [sequence.eval(tokens, all_logits) for sequence, tokens, all_logits in work]

    def memory_bytes(self) -> int:
        return 0


class FixedSequence:
    def __init__(self, model: FixedDistribution):
        self.model, self._n = model, 0

    @property
    def n_past(self) -> int:
        return self._n

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        self._n += len(tokens)
        return np.tile(self.model.logits, (len(tokens) if all_logits else 1, 1))

    def truncate(self, length: int) -> None:
        self._n = length

    def reset(self) -> None:
        self._n = 0


class InProcessVerifier:
    """The real VerifierService and gRPC server, on an event loop in a thread of this process."""

    def __init__(
        self,
        p: np.ndarray | None,
        max_sessions: int = 256,
        auth_token: str | None = None,
        model=None,
        model_name: str = "fixed",
    ):
        """Over `FixedDistribution(p)`, or over `model`."""
        model = FixedDistribution(p) if model is None else model
        tokenizer = SimpleNamespace(n_vocab=model.n_vocab, digest="fixed", chat_template="")
        self.service = VerifierService(
            model=model,
            tokenizer=tokenizer,
            model_name=model_name,
            window_cost_s={1: 1e-3},
            max_sessions=max_sessions,
            idle_s=300.0,
        )
        self.service.auth_token = auth_token
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        started = asyncio.run_coroutine_threadsafe(start_server(self.service, "127.0.0.1:0"), self.loop)
        self.server, port = started.result(timeout=30)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.service.expiry.cancel)
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=30)
        self.service.worker.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)


P = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
Q_DENSE = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def test_sampling_through_the_protocol_follows_the_target_distribution():
    """Drafts drawn from a top-3 truncated q (zero where p has mass), sent sparse over gRPC, verified remotely
    with a fixed seed per session: the emitted token is distributed as p (the engine's TV and chi-square test),
    and each reply carries the window's expected acceptance and the target's confidence for adaptive k."""
    verifier = InProcessVerifier(P)
    pool = VerifierPool([verifier.address], "fixed")
    try:
        q = keep_top_k(Q_DENSE, 3)
        assert np.count_nonzero(q) == 3 and np.isclose(q.sum(), 1.0)
        sessions = [RemoteTarget(pool) for _ in range(80)]
        params = [SamplingParams(temperature=1.0, seed=i) for i in range(len(sessions))]
        unused = np.random.default_rng(0)  # verification randomness lives on the verifier
        first = [_window([1], params=p, rng=unused) for p in params]
        RemoteVerifier(pool).run(sessions, first)
        draft_rng = np.random.default_rng(1234)
        counts = np.zeros(len(P))
        n = 20_000  # TV's noise is ~0.006 here, a third of its bound; chi-square's bound does not depend on n
        for _ in range(n // len(sessions)):
            drafts = draft_rng.choice(len(P), p=q, size=len(sessions))
            windows = [
                _window([1], drafts=[int(d)], probs=[q], params=p, rng=unused)
                for d, p in zip(drafts, params, strict=True)
            ]
            for draft, verdict in zip(drafts, RemoteVerifier(pool).run(sessions, windows), strict=True):
                counts[draft if verdict.accepted else verdict.next_token] += 1
                # the low-noise acceptance estimate travels too: one tried position, sum min(p, q)
                assert verdict.expected_accepted == pytest.approx(np.minimum(P, q).sum(), rel=1e-6)
                # and the target's confidence where the window began (its top probability at temperature 1)
                assert verdict.confidence == pytest.approx(P.max(), rel=1e-5)
        empirical = counts / n
        tv = 0.5 * np.abs(empirical - P).sum()
        assert tv < 0.02, f"TV {tv:.4f}: {np.round(empirical, 3)} vs {P}"
        chi2 = ((empirical - P) ** 2 / P * n).sum()
        assert chi2 < 20.5, f"chi-square {chi2:.1f}"
    finally:
        pool.close()
        verifier.stop()


def test_evicted_session_gets_a_clear_error_and_the_client_replays():
    verifier = InProcessVerifier(P, max_sessions=2)
    pool = VerifierPool([verifier.address], "fixed")
    try:
        greedy, rng = SamplingParams(), np.random.default_rng(0)
        # Raw stream: open, one window, then two other sessions push it out of the 2-session table.
        stub = pb_grpc.VerifierStub(grpc.insecure_channel(verifier.address))
        outbox: queue.Queue = queue.Queue()
        outbox.put(pb.ClientMessage(open=pb.Open(params=params_to_wire(greedy))))
        outbox.put(pb.ClientMessage(window=pb.Window(append=[1, 2], predict=True)))
        replies = stub.Session(iter(outbox.get, None), timeout=30)
        assert next(replies).has_verdict
        others = [RemoteTarget(pool) for _ in range(2)]
        for other in others:  # one after the other, so that others[0] is the least recently used
            RemoteVerifier(pool).run([other], [_window([3], params=greedy, rng=rng)])
        outbox.put(pb.ClientMessage(window=pb.Window(append=[4], predict=True)))
        with pytest.raises(grpc.RpcError) as error:
            next(replies)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "session evicted" in error.value.details() and "at most 2 sessions" in error.value.details()
        outbox.put(None)

        # A RemoteTarget whose session was evicted re-opens with its context and gets its verdict.
        victim = others[0]
        third = RemoteTarget(pool)
        RemoteVerifier(pool).run([third], [_window([5, 0, 1], params=greedy, rng=rng)])  # evicts others[0]
        retry = _window([2], drafts=[0], probs=[None], params=greedy, rng=rng)
        (verdict,) = RemoteVerifier(pool).run([victim], [retry])
        assert verdict.accepted == 0 and verdict.next_token == int(np.argmax(P))
        assert victim.failovers == 1 and victim.n_past == 2
    finally:
        pool.close()
        verifier.stop()


@pytest.mark.small_model
def test_an_evicted_session_gives_its_llama_context_to_the_next_at_once(smollm2_path):
    """A session pushed out of the table releases its KV (a llama.cpp context here) when it is evicted,
    not when its client's stream ends: the session that evicted it runs on that same context."""
    from specserve.backends.llamacpp import LlamaCppBackend

    model = LlamaCppBackend(smollm2_path, n_ctx=256)
    verifier = InProcessVerifier(None, max_sessions=1, model=model)
    try:
        stub = pb_grpc.VerifierStub(grpc.insecure_channel(verifier.address))
        streams = []
        for first in (1, 2):  # the second open evicts the first session while its stream stays open
            outbox: queue.Queue = queue.Queue()
            outbox.put(pb.ClientMessage(open=pb.Open(params=params_to_wire(SamplingParams()))))
            outbox.put(pb.ClientMessage(window=pb.Window(append=[first, 3, 4], predict=True)))
            replies = stub.Session(iter(outbox.get, None), timeout=30)
            assert next(replies).has_verdict
            streams.append((outbox, replies))
        assert model.pool.created == 0  # the second session borrowed the first one's context, the model's own
        for outbox, _ in streams:
            outbox.put(None)
        deadline = time.time() + 10
        while time.time() < deadline and len(model.pool._free) < 1:
            time.sleep(0.05)
        assert model.pool.created == 0 and len(model.pool._free) == 1  # and the second gave it back on close
    finally:
        verifier.stop()


def test_malformed_windows_are_refused_with_a_one_line_reason():
    verifier = InProcessVerifier(P)
    try:
        stub = pb_grpc.VerifierStub(grpc.insecure_channel(verifier.address))
        open_ = pb.ClientMessage(open=pb.Open(params=params_to_wire(SamplingParams())))
        cases = {
            "token id out of range": pb.Window(append=[99], predict=True),
            "must append at least one token": pb.Window(drafts=[1], predict=True),
            "distributions for": pb.Window(append=[1], drafts=[1, 2], dists=[pb.SparseDist()], predict=True),
            "a window before open": None,
        }
        for reason, window in cases.items():
            messages = [open_, pb.ClientMessage(window=window)] if window else [pb.ClientMessage(window=pb.Window())]
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Session(iter(messages), timeout=10))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.value.details()
        assert info(verifier.address).model == "fixed"  # still serving
    finally:
        verifier.stop()


_valid_tokens = st.lists(st.integers(0, len(P) - 1), max_size=12)
_tokens = st.one_of(_valid_tokens, st.lists(st.integers(-3, len(P) + 3), max_size=12))
_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
_params = st.builds(
    pb.SamplingParams,
    temperature=st.one_of(st.just(0.0), _floats),
    top_k=st.integers(-5, 10),
    top_p=_floats,
    seed=st.integers(0, 2**64 - 1),
)
_dists = st.lists(st.builds(pb.SparseDist, ids=_tokens, probs=st.lists(_floats, max_size=12)), max_size=4)
_message = st.one_of(
    st.builds(
        lambda params, context, prompt: pb.ClientMessage(
            open=pb.Open(params=params, context=context, prompt_tokens=prompt)
        ),
        _params,
        st.one_of(_tokens, st.lists(st.integers(0, len(P) - 1), min_size=60, max_size=80)),  # past the context
        st.integers(-(2**31), 2**31 - 1),
    ),
    st.builds(
        lambda append, drafts, dists, predict: pb.ClientMessage(
            window=pb.Window(append=append, drafts=drafts, dists=dists, predict=predict)
        ),
        _tokens,
        st.one_of(_tokens, st.lists(st.integers(0, len(P) - 1), min_size=40, max_size=70)),  # huge drafts
        _dists,
        st.booleans(),
    ),
    st.just(pb.ClientMessage(close=pb.Close())),
    st.just(pb.ClientMessage()),
)
_valid_open = st.builds(
    lambda temperature, seed: pb.ClientMessage(
        open=pb.Open(params=pb.SamplingParams(temperature=temperature, top_p=1.0, seed=seed))
    ),
    st.sampled_from([0.0, 1.0]),
    st.integers(0, 2**32),
)
# A stream of random messages, or one that opens properly and then goes wrong (so windows get checked).
_streams = st.one_of(
    st.lists(_message, min_size=1, max_size=6),
    st.builds(lambda first, rest: [first, *rest], _valid_open, st.lists(_message, min_size=1, max_size=6)),
)
# What a malformed or out-of-order stream may end with; never UNKNOWN or INTERNAL (a crash) or a deadline (a hang).
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def test_fuzzed_verifier_streams_end_in_a_status_and_spare_the_other_sessions():
    verifier = InProcessVerifier(P)
    verifier.service.model.n_ctx = 64  # small, so that contexts and windows past it are reachable
    stub = pb_grpc.VerifierStub(grpc.insecure_channel(verifier.address))
    bystander = RemoteTarget(VerifierPool([verifier.address], "fixed"))  # a well-behaved session throughout
    unused = np.random.default_rng(0)
    bystander.verifier.run([bystander], [_window([1], params=SamplingParams(), rng=unused)])

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_streams)
    def stream(messages):
        try:
            list(stub.Session(iter(messages), timeout=10))
        except grpc.RpcError as error:
            assert error.code() in _REFUSALS, (error.code(), error.details())
            refusals.append(error.details())
        if bystander.n_past > 48:  # its own context is near the limit: start it again
            bystander.reset()
            bystander.verifier.run([bystander], [_window([1], params=SamplingParams(), rng=unused)])
        (verdict,) = bystander.verifier.run(
            [bystander], [_window([2], drafts=[3], probs=[None], params=SamplingParams(), rng=unused)]
        )
        assert verdict is not None and bystander.failovers == 0

    refusals: list[str] = []
    try:
        stream()
        assert info(verifier.address).model == "fixed"
        assert 0 < len(refusals) < 300  # both refused and well-formed streams were tried
    finally:
        bystander.close()
        verifier.stop()


def test_pool_reports_unreachable_verifiers_in_one_line():
    with pytest.raises(SpecserveError, match=r"no verifier reachable \(127\.0\.0\.1:\d+: unavailable"):
        VerifierPool([f"127.0.0.1:{free_port()}"], "fixed")
    with pytest.raises(SpecserveError, match="HOST:PORT"):
        VerifierPool(["localhost"], "fixed")


# --- real processes with the real model pair ---


@pytest.fixture(scope="module")
def verifiers(runtime):
    """Two verifier replicas with the 1.5B target (started together: they load in parallel), on the backend
    of the in-process runtime they are compared with: `auto` in another process, timed while another loads,
    may pick another backend, whose greedy replies differ at near-ties (rounding order)."""
    backend = ("--target-backend", runtime.target_backend)
    replicas = [VerifierProcess(*backend), VerifierProcess(*backend)]
    try:
        yield [r.wait_ready() for r in replicas]
    finally:
        for r in replicas:
            r.stop()


@pytest.mark.models
def test_greedy_through_a_remote_verifier_matches_single_process(runtime, verifiers):
    expected = {prompt: reference(runtime, prompt, 48) for prompt in PROMPTS}
    proc, base, _ = start_frontend("--verifier", verifiers[0].address)
    try:
        for i, prompt in enumerate(PROMPTS):
            # a fixed k: adaptive k may rightly find a short reply not worth the draft's prompt catch-up
            spec = chat(base, prompt, 48, seed=i, k=4)
            assert spec.choices[0].message.content == expected[prompt]
            assert spec.model_extra["speculative"]["accepted"] > 0
            plain = chat(base, prompt, 48, method="none", seed=100 + i)  # one round trip per token
            assert plain.choices[0].message.content == expected[prompt]
            assert plain.model_extra["speculative"]["drafted"] == 0
        pieces = [c.choices[0].delta.content or "" for c in chat(base, PROMPTS[0], 48, stream=True, seed=7)]
        assert "".join(pieces) == expected[PROMPTS[0]]
        assert spec.model == runtime.target_name
        # the front-end names the weights the verifiers run, as a local server names its own
        models = httpx.get(f"{base}/v1/models").json()["data"]
        assert models[0]["weights"] == runtime.target_weights == f"the file's own weights ({runtime.target_name})"
    finally:
        stop_frontend(proc)


@pytest.mark.models
def test_draft_failure_falls_back_to_target_only_with_identical_output(runtime, monkeypatch):
    prompt_ids = runtime.encode_prompt(messages=[{"role": "user", "content": PROMPTS[0]}])
    # fixed k: adaptive k may rightly not draft at all for 24 tokens (the draft's prompt catch-up would not pay)
    generation = runtime.generate(prompt_ids, SamplingParams(max_tokens=24), method="draft", k=4)

    def draft_lost(work):
        raise RuntimeError("draft worker lost")

    monkeypatch.setattr(runtime.draft, "eval_batch", draft_lost)  # the draft side fails at its first step
    for _ in generation:
        pass
    assert generation.text == reference(runtime, PROMPTS[0], 24)
    assert generation.stats.drafted == 0 and set(generation.stats.chosen_k) == {0}
    assert generation.proposer is None


@pytest.mark.models
def test_pipelined_drafting_keeps_greedy_output(runtime):
    from specserve.cluster.client.pipeline import PipelinedDrafter

    prompt_ids = runtime.encode_prompt(messages=[{"role": "user", "content": PROMPTS[0]}])
    generation = runtime.generate(prompt_ids, SamplingParams(max_tokens=64), method="draft", k=4)
    generation.proposer = drafter = PipelinedDrafter(generation.proposer)
    for _ in generation:
        pass
    assert generation.text == reference(runtime, PROMPTS[0], 64)
    assert drafter.hits > 0 and generation.stats.accepted > 0  # some windows came from the pre-draft


@pytest.mark.models
def test_kill_9_of_a_replica_under_16_streams_loses_nothing(runtime, verifiers):
    """Runs last in this module: it kills one of the module's verifiers."""
    prompts = [
        "Write a Python class `LRUCache` with get and put, using an OrderedDict.",
        "Write a Python function that merges two sorted lists.",
        "Explain in two sentences what a hash map is.",
        "Write a Python function `is_prime(n)` that returns True if n is prime.",
    ]
    expected = {p: reference(runtime, p, 64) for p in prompts}  # most of each reply comes after the kill
    replicas = ",".join(v.address for v in verifiers)
    proc, base, _ = start_frontend("--verifier", replicas, "--max-batch", "16")  # all 16 run at once
    started = threading.Barrier(17)

    def stream(i: int) -> str:
        pieces = []
        for chunk in chat(base, prompts[i % 4], 64, stream=True, seed=100 + i):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if len(pieces) == 3:
                started.wait(timeout=300)  # every stream is under way before the kill
        return "".join(pieces)

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(stream, i) for i in range(16)]
            started.wait(timeout=300)
            loads = {v.address: info(v.address).sessions for v in verifiers}
            assert all(loads.values()), f"sessions on both replicas: {loads}"
            victim = verifiers[0]
            victim.proc.kill()  # SIGKILL: no goodbye on its streams
            victim.proc.wait()
            texts = [f.result(timeout=600) for f in futures]
        assert texts == [expected[prompts[i % 4]] for i in range(16)]  # no gap, no duplicate, same tokens
        survivor = verifiers[1]
        assert survivor.proc.poll() is None and info(survivor.address).model == runtime.target_name
    finally:
        stop_frontend(proc)


# --- security: a real verifier process with the small SmolLM2 model (llama.cpp) ---

SMALL = ("--target", "smollm2-135m", "--target-backend", "llama.cpp")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), which is also its own CA."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.mark.small_model
def test_auth_token_required_and_garbage_bytes_do_not_hurt(smollm2_path):
    verifier = VerifierProcess(*SMALL, env={"SPECSERVE_AUTH_TOKEN": "s3cret"}).wait_ready()
    try:
        for token in (None, "wrong"):
            with pytest.raises(grpc.RpcError) as error:
                info(verifier.address, token)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(SpecserveError, match="refused: no auth token"):
            VerifierPool([verifier.address], "any")
        assert "refused" in verifier.output() and "wrong auth token" in verifier.output()  # logged
        assert info(verifier.address, "s3cret").model == smollm2_path.name

        with socket.create_connection(("127.0.0.1", verifier.port), timeout=10) as raw:
            raw.sendall(os.urandom(4096) + b"GET / HTTP/1.1\r\n\r\n" * 50)
            received = b""
            while chunk := raw.recv(65536):  # the server closes the connection: recv returns b""
                received += chunk
        assert verifier.proc.poll() is None
        assert info(verifier.address, "s3cret").model == smollm2_path.name  # still serving
    finally:
        verifier.stop()


def wait_for_health(base: str, status: int, saying: str = "", timeout: float = 120) -> dict:
    """The first /health body with this status (and, for a 503, an error that says `saying`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = httpx.get(f"{base}/health", timeout=5)
        if response.status_code == status and saying in (response.json().get("error") or ""):
            assert status != 503 or response.headers["retry-after"] == "1"  # not ready: poll again soon
            return response.json()
        time.sleep(0.25)
    pytest.fail(f"/health did not answer {status} within {timeout:.0f} s: {response.status_code} {response.text}")


@pytest.mark.small_model
def test_a_frontend_started_before_its_verifier_waits_for_it_and_for_its_return(smollm2_path):
    """As compose or systemd start them: both at once, the verifier still loading its model."""
    port = free_port()
    frontend, base, _ = start_frontend(*SMALL, "--draft", "none", "--verifier", f"127.0.0.1:{port}", healthy=False)
    verifier = None
    try:
        waiting = wait_for_health(base, 503, saying="waiting for a verifier")
        assert waiting["status"] == "loading" and f"127.0.0.1:{port}: unavailable" in waiting["error"]
        verifier = VerifierProcess(*SMALL, port=port).wait_ready()
        wait_for_health(base, 200)
        first = chat(base, "Say hi.", 8, method="ngram").choices[0].message.content

        verifier.stop()  # every replica gone: the front-end says so and refuses, then takes it back
        assert wait_for_health(base, 503, saying="no verifier available")["status"] == "unavailable"
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "no verifier available" in refused.json()["error"]["message"]
        verifier = VerifierProcess(*SMALL, port=port).wait_ready()
        wait_for_health(base, 200)
        assert chat(base, "Say hi.", 8, method="ngram", seed=1).choices[0].message.content == first
    finally:
        stop_frontend(frontend)
        if verifier is not None:
            verifier.stop()


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: what each process exported, as (service, span) pairs."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        received = self.spans = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope in resource_spans.scope_spans:
                        received.extend((attributes["service.name"], span) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.mark.small_model
def test_one_trace_spans_the_frontend_and_the_verifier_which_has_its_own_metrics(smollm2_path):
    receiver = OtlpReceiver()
    metrics_port = free_port()
    verifier = VerifierProcess(*SMALL, "--metrics-port", str(metrics_port), env=receiver.env()).wait_ready()
    frontend, base, _ = start_frontend(*SMALL, "--draft", "none", "--verifier", verifier.address, env=receiver.env())
    try:
        chat(base, "Say hi.", 8, method="ngram")
        deadline = time.time() + 30
        while time.time() < deadline and {"specserve.request", "verifier.window"} - {s.name for _, s in receiver.spans}:
            time.sleep(0.2)
        (request,) = [span for name, span in receiver.spans if span.name == "specserve.request"]
        windows = [
            span for name, span in receiver.spans if name == "specserve-verifier" and span.name == "verifier.window"
        ]
        assert windows and all(w.trace_id == request.trace_id and w.parent_span_id == request.span_id for w in windows)
        opened = [span for _, span in receiver.spans if span.name == "verifier.open"]
        assert [o.trace_id for o in opened] == [request.trace_id]
        rows = [a.value.int_value for w in windows for a in w.attributes if a.key == "specserve.rows"]
        assert len(rows) == len(windows) and all(r >= 1 for r in rows)

        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples["specserve_verifier_windows_total"] == len(windows)
        assert samples["specserve_verifier_batch_rows_count"] >= len(windows)
        assert samples["specserve_verifier_sessions"] == 0  # the stream closed with the request
        assert samples["specserve_verifier_replayed_tokens_total"] == 0  # nothing failed over
        for name in ("specserve_verifier_auth_failures_total", "specserve_verifier_accepted_tokens_total"):
            assert name in samples
    finally:
        stop_frontend(frontend)
        verifier.stop()
        receiver.server.shutdown()


@pytest.mark.small_model
def test_tls_with_a_ca_and_a_remote_generation(smollm2_path, tls_files):
    from specserve.engine.loop import Generation
    from specserve.models.tokenizer import Tokenizer

    cert, key = tls_files
    verifier = VerifierProcess(*SMALL, "--tls-cert", cert, "--tls-key", key).wait_ready()
    tokenizer = Tokenizer(smollm2_path)
    try:
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port fails
            info(verifier.address)
        pool = VerifierPool([verifier.address], tokenizer.digest, ClientOptions(tls_ca=cert))
        with open(cert, "rb") as f:
            assert info(verifier.address, credentials=grpc.ssl_channel_credentials(f.read())).sessions == 0
        prompt = tokenizer.encode("The capital of France is")
        params = SamplingParams(max_tokens=8)
        remote = RemoteTarget(pool)
        generation = Generation(
            target=remote,
            tokenizer=tokenizer,
            prompt=prompt,
            params=params,
        )
        for _ in generation:
            pass
        assert generation.stats.generated == 8 and generation.text.strip()
        pool.close()
    finally:
        verifier.stop()


def test_a_client_interceptor_delays_every_message_and_the_pool_measures_it():
    """The WAN bench's latency (`bench.wan.Delay`) is a gRPC client interceptor on the pool's channels: the
    health check's round trip, which adaptive k plans with, includes it, and so does every window."""
    from specserve.bench.wan import Delay

    verifier = InProcessVerifier(P)
    delay = Delay()
    pool = VerifierPool([verifier.address], "fixed", ClientOptions(interceptors=(delay,)))
    try:
        delay.one_way_s = 0.05
        pool.check_now()
        assert pool.round_trip_s >= 2 * delay.one_way_s
        session = RemoteTarget(pool)
        start = time.perf_counter()
        window = _window([1, 2], params=SamplingParams(), rng=np.random.default_rng())
        (verdict,) = session.verifier.run([session], [window])
        assert time.perf_counter() - start >= 2 * delay.one_way_s
        assert verdict.accepted == 0 and verdict.next_token == int(np.argmax(P))
        session.close()
    finally:
        pool.close()
        verifier.stop()


def test_a_pool_refuses_a_verifier_with_another_tokenizer():
    verifier = InProcessVerifier(P)
    try:
        with pytest.raises(SpecserveError, match="different tokenizer than the draft"):
            VerifierPool([verifier.address], "not-the-same-digest")
    finally:
        verifier.stop()


def test_a_pool_keeps_out_a_replica_that_runs_another_target(caplog):
    """Replicas on machines of different kinds may pick different targets (`auto`: the model's file on one,
    its requantization on another); a session failing over between them would change models mid-reply."""
    verifiers = [InProcessVerifier(P), InProcessVerifier(P, model_name="fixed-Q4_0")]
    try:
        pool = VerifierPool([v.address for v in verifiers], "fixed")
        try:
            assert [r.healthy for r in pool.replicas] == [True, False]
            reason = "it runs fixed on fixed-Q4_0, the pool fixed on fixed"
            assert reason in pool.replicas[1].error and reason in caplog.text
            session = RemoteTarget(pool)
            RemoteVerifier(pool).run([session], [_window([1], params=SamplingParams(), rng=np.random.default_rng(0))])
            assert pool.replicas[0].sessions == 1 and pool.replicas[1].sessions == 0
            session.close()
        finally:
            pool.close()
    finally:
        for verifier in verifiers:
            verifier.stop()


# --- Ray: a local cluster on loopback, started and stopped here ---


@pytest.mark.small_model
def test_ray_places_replicas_and_a_frontend_and_restarts_a_killed_replica(smollm2_path, tmp_path):
    ray_cli = str(Path(sys.executable).parent / "ray")
    gcs = f"127.0.0.1:{free_port()}"
    # --block keeps `ray start` in the foreground: stopping its process group stops this cluster only.
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", gcs.split(":")[1]]
        + ["--num-cpus", "4", "--include-dashboard", "false", "--disable-usage-stats"],
        stdout=open(tmp_path / "ray.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    small = ["--target", "smollm2-135m", "--target-backend", "llama.cpp", "--n-ctx", "1024"]
    small += ["--draft", "smollm2-135m", "--draft-backend", "llama.cpp"]

    def specserve_ray(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "specserve.cli", "ray", *args, "--address", gcs, *small],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    try:
        deadline = time.time() + 120
        while subprocess.run([ray_cli, "status", "--address", gcs], capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, (tmp_path / "ray.log").read_text()[-2000:]
            time.sleep(1)
        http_port = free_port()
        up = specserve_ray("up", "--replicas", "2", "--port", str(http_port))
        addresses = up.split("verifiers: ")[1].split()[0].split(",")
        assert len(addresses) == 2
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 300
        while True:
            try:
                if openai.OpenAI(base_url=f"{base}/v1", api_key="x").models.list().data:
                    break
            except openai.APIError:
                pass
            assert time.time() < deadline, "the front-end actor did not become ready"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        first = client.completions.create(model=None, prompt="The capital of France is", max_tokens=12, seed=1)

        status = specserve_ray("status")
        pid = int(status.split("verifier-0: ")[1].split("pid ")[1].split()[0])
        os.kill(pid, signal.SIGKILL)  # a replica process crashes: Ray restarts it at the same address
        deadline = time.time() + 300
        while True:
            try:
                if info(addresses[0]).model:
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, "Ray did not restart the replica"
            time.sleep(1)
        assert f"pid {pid}" not in specserve_ray("status")
        again = client.completions.create(model=None, prompt="The capital of France is", max_tokens=12, seed=2)
        assert again.choices[0].text == first.choices[0].text
        assert "stopped verifier-0" in specserve_ray("down")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # `ray start` wrote this cluster's address for `auto` to find; stopped by signal, it leaves it behind
        from ray._common.utils import reset_ray_address
        from ray._private.utils import read_ray_address

        if (left := read_ray_address()) is not None and left.endswith(f":{gcs.split(':')[1]}"):
            reset_ray_address()


def test_ray_up_without_a_live_cluster_says_what_to_do_in_one_line(tmp_path):
    """The address a stopped cluster left for `auto` to find (RAY_TMPDIR keeps this one away from the
    machine's): `ray.init` would retry it for ten minutes."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "ray", "up", "--replicas", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,  # a hang's bound: the check itself takes a TCP connection attempt
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("specserve: error: no Ray cluster answers") and "ray start --head" in lines[0]
