"""A backend in its own process, for benchmarks: plain decoding as a user of that backend would run it.

llama.cpp's thread pool and torch's OpenMP threads slow each other down when they share a process, and a
user running plain llama.cpp would not share one. A crash in the worker (a kernel that faults on this CPU)
is a one-line error naming the backend, not a hung bench.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np

from specserve import SpecserveError
from specserve.engine.sampling import SamplingParams


def _serve(conn, kind: str, model_path: str, n_ctx: int, flash_attn: bool) -> None:
    from specserve.backends import load_backend
    from specserve.backends.llamacpp import LlamaCppBackend
    from specserve.bench.measure import run_generation, window_costs
    from specserve.engine.loop import Generation
    from specserve.engine.target import LocalTarget
    from specserve.models.tokenizer import Tokenizer

    path = Path(model_path)
    if kind == "llama.cpp":
        model = LlamaCppBackend(path, n_ctx=n_ctx, flash_attn=flash_attn)
    else:
        model = load_backend(kind, path, n_ctx, show_progress=False)
    tokenizer = Tokenizer(path)
    conn.send(model.memory_bytes())
    while (request := conn.recv()) is not None:
        kind, payload = request
        if kind == "costs":
            conn.send(window_costs(model.new_sequence(), payload))
        elif kind == "argmax":  # teacher-forced greedy choices after each token of prompt + continuation
            prompt, tokens = payload
            logits = model.new_sequence().eval(prompt + tokens, all_logits=True)[len(prompt) - 1 : -1]
            conn.send(np.argmax(logits, axis=-1).tolist())
        else:
            ids, params = payload
            target = LocalTarget(model.new_sequence())
            generation = Generation(
                target=target,
                tokenizer=tokenizer,
                prompt=ids,
                params=params,
            )
            conn.send(run_generation(generation))


class BackendProcess:
    """Plain decoding on one backend in a child process; same measurements as in-process runs.
    `flash_attn` (llama.cpp): off is llama-cpp-python's default, what a user gets."""

    def __init__(self, kind: str, model_path: Path, n_ctx: int, flash_attn: bool = False):
        self.kind, self.model_path = kind, Path(model_path)
        context = mp.get_context("spawn")  # a fork would copy torch's thread state
        self._conn, child = context.Pipe()
        args = (child, kind, str(model_path), n_ctx, flash_attn)
        self._process = context.Process(target=_serve, args=args, daemon=True)
        self._process.start()
        self.memory = self._receive()

    @property
    def label(self) -> str:
        return f"{self.kind} {self.model_path.name}"

    def _receive(self):
        try:
            return self._conn.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise SpecserveError(f"the {self.label} worker died (exit code {self._process.exitcode})") from None

    def costs(self, context: list[int]) -> dict[str, float]:
        self._conn.send(("costs", context))
        return self._receive()

    def generate(self, ids: list[int], params: SamplingParams) -> dict:
        self._conn.send(("generate", (ids, params)))
        return self._receive()

    def argmax(self, prompt: list[int], tokens: list[int]) -> list[int]:
        self._conn.send(("argmax", (prompt, tokens)))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join(timeout=30)
