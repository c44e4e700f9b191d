"""A llama.cpp backend in its own process, for benchmarks.

llama.cpp's thread pool and torch's OpenMP threads slow each other down when they share a process (the
int8 target went from 30 to 45 ms/token here), and a user running plain llama.cpp would not share one.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from specserve.engine.sampling import SamplingParams


def _serve(conn, model_path: str, n_ctx: int) -> None:
    from specserve.backends.llamacpp import LlamaCppBackend
    from specserve.bench.measure import run_generation, window_costs
    from specserve.engine.loop import Generation
    from specserve.models.tokenizer import Tokenizer

    backend = LlamaCppBackend(Path(model_path), n_ctx=n_ctx)
    tokenizer = Tokenizer(Path(model_path))
    conn.send(backend.memory_bytes())
    while (request := conn.recv()) is not None:
        kind, payload = request
        if kind == "costs":
            conn.send(window_costs(backend, payload))
        else:
            ids, params = payload
            generation = Generation(backend, tokenizer.decode_bytes, tokenizer.stop_ids, ids, params, None, 0)
            conn.send(run_generation(generation))


class LlamaCppProcess:
    """Plain decoding on llama.cpp in a child process; same measurements as in-process runs."""

    def __init__(self, model_path: Path, n_ctx: int):
        context = mp.get_context("spawn")  # a fork would copy torch's thread state
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(model_path), n_ctx), daemon=True)
        self._process.start()
        self.memory = self._conn.recv()

    def costs(self, context: list[int]) -> dict[str, float]:
        self._conn.send(("costs", context))
        return self._conn.recv()

    def generate(self, ids: list[int], params: SamplingParams) -> dict:
        self._conn.send(("generate", (ids, params)))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)
