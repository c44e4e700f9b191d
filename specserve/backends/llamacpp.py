"""llama.cpp backend (llama-cpp-python, low-level batch API).

One `llama_decode` appends a window and returns logits for every position in it; rollback is
`llama_memory_seq_rm` from the kept length on. On 2 cores llama.cpp is compute-bound once a pass has several
rows, so a window of k tokens costs far more than one (`specserve info` prints the table). Its kernels also
change with the row count (repacked GEMMs take rows in groups of 4), so a window may round differently from
single steps: which window sizes are exact is measured per machine and file (backends/choose/), and
speculation stays within them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaBatch, LlamaContext

from specserve.engine.compute import on_compute_thread
from specserve.engine.model import ContextOverflowError
from specserve.models.fetch import ModelError
from specserve.models.tokenizer import quiet_stderr


class _ContextPool:
    """The llama.cpp contexts of one model, lent to its sequences. llama-cpp-python registers every context
    it creates on its model for closing, so a context dropped by its sequence lives (with its KV cache,
    ~100 MB at n_ctx 4096) as long as the model: one per request, without end. Sequences give theirs back
    when reset (a finished request's target is: engine/target.py) or collected, and new ones take a returned
    context before creating one: the model holds as many contexts as it ever ran sequences at once."""

    def __init__(self, llama: llama_cpp.Llama):
        self._llama = llama
        self._free: list[LlamaContext] = [llama._ctx]  # the one the model was loaded with
        self._lock = threading.Lock()  # sequences are collected on whichever thread drops them
        self.created = 0  # contexts made beyond the first

    def take(self) -> LlamaContext:
        with self._lock:
            ctx = self._free.pop() if self._free else None
            self.created += ctx is None
        if ctx is not None:
            ctx.kv_cache_clear()  # the sequence starts empty, as in a new context
            return ctx
        with quiet_stderr():
            return LlamaContext(model=self._llama._model, params=self._llama.context_params, verbose=False)

    def give_back(self, ctx: LlamaContext) -> None:
        """No call into llama.cpp here: a sequence collected at interpreter exit may give back a context
        llama-cpp-python has already freed with its model."""
        with self._lock:
            self._free.append(ctx)


class LlamaCppBackend:
    """A GGUF model on llama.cpp (the `Model` protocol); each sequence is a llama.cpp context of its own.
    Sequences are evaluated one after another: llama.cpp is compute-bound for many rows, so batching them
    would cost as much as running them in turn, and each keeps its own window shapes."""

    name = "llama.cpp"
    converted_to = None
    copies_prefix = False  # contexts do not share KV memory
    batch_invariant = False  # kernels switch with the row count; which windows stay exact is measured
    batches_sequences = False  # each sequence is its own llama.cpp context, evaluated in turn

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        flash_attn: bool = True,
    ):
        """`flash_attn`: llama.cpp's fused attention, which computes each row alike whatever the window
        (without it, a 2-row window already rounds differently from two 1-row steps, see backends/choose/measure.py)."""
        threads = n_threads or os.cpu_count() or 1
        try:
            with quiet_stderr():
                self.llama = llama_cpp.Llama(
                    str(model_path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    flash_attn=flash_attn,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {model_path}: {exc}") from None
        self.pool = _ContextPool(self.llama)
        self.model_path = Path(model_path)
        self.n_vocab: int = self.llama.n_vocab()
        self.n_ctx: int = self.llama.n_ctx()
        self.n_batch = n_batch

    def new_sequence(self) -> LlamaCppSequence:
        return LlamaCppSequence(self)

    def eval_batch(self, work: list[tuple[LlamaCppSequence, list[int], bool]]) -> list[np.ndarray]:
        return [seq.eval(tokens, all_logits) for seq, tokens, all_logits in work]

    def memory_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self.llama._model.model))


class LlamaCppSequence:
    """One sequence on a `LlamaCppBackend`: a context borrowed from its pool at the first eval (so a request
    waiting in the server's queue holds none) and given back when reset or collected."""

    def __init__(self, model: LlamaCppBackend):
        self.model = model  # keeps the model alive as long as this sequence
        self._ctx: LlamaContext | None = None
        self._batch = LlamaBatch(n_tokens=model.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._n_past = 0

    @property
    def n_past(self) -> int:
        return self._n_past

    @on_compute_thread  # llama.cpp's threads are OpenMP's (engine/compute.py)
    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        n_ctx, n_vocab, n_batch = self.model.n_ctx, self.model.n_vocab, self.model.n_batch
        if self._n_past + len(tokens) > n_ctx:
            raise ContextOverflowError(f"{self._n_past + len(tokens)} tokens exceed the context of {n_ctx}")
        ctx = self._context()
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            is_last_chunk = start + len(chunk) == len(tokens)
            self._batch.set_batch(chunk, n_past=self._n_past, logits_all=all_logits)
            ctx.decode(self._batch)
            self._n_past += len(chunk)
            n_out = len(chunk) if all_logits else 1
            if all_logits or is_last_chunk:
                ptr = llama_cpp.llama_get_logits(ctx.ctx)
                flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_out * n_vocab,))
                rows.append(flat.reshape(n_out, n_vocab).copy())
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _context(self) -> LlamaContext:
        if self._ctx is None:
            self._ctx = self.model.pool.take()
        return self._ctx

    def copy_prefix(self, other: LlamaCppSequence, length: int) -> int:
        return 0  # contexts do not share KV memory; llama.cpp re-evaluates the prompt instead

    def truncate(self, length: int) -> None:
        if length < self._n_past:
            self._context().kv_cache_seq_rm(0, length, -1)
            self._n_past = length

    def reset(self) -> None:
        """Empty: the context goes back to the pool; the next eval borrows one."""
        if self._ctx is not None:
            self.model.pool.give_back(self._ctx)
            self._ctx = None
        self._n_past = 0

    def __del__(self) -> None:
        self.reset()
