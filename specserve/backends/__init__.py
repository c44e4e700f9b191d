"""Backends: implementations of the engine's model protocol (engine/model.py), loaded by name."""

from __future__ import annotations

from pathlib import Path

from specserve import SpecserveError
from specserve.config import BACKENDS
from specserve.engine.compute import on_compute_thread
from specserve.engine.model import Model


@on_compute_thread  # loading runs torch and llama.cpp ops: on the thread every pass runs on
def load_backend(kind: str, path: Path, n_ctx: int, show_progress: bool = True, *, requantize: bool = False) -> Model:
    """A model on a backend by name (not `auto`: the runtime resolves that, see backends/choose/). Each module is
    imported only when asked for: llama.cpp and torch take seconds to load. `requantize`: torch-q4 may run a
    requantized copy of a file whose types its kernels lack (a draft; a target only where the user allowed it)."""
    if kind == "llama.cpp":
        from specserve.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, n_ctx=n_ctx)
    if kind == "torch-int8":
        from specserve.backends.torch_int8 import TorchInt8Backend

        return TorchInt8Backend(path, n_ctx=n_ctx, show_progress=show_progress)
    if kind == "torch-int8-onednn":
        from specserve.backends.torch_int8 import TorchInt8OnednnBackend

        return TorchInt8OnednnBackend(path, n_ctx=n_ctx, show_progress=show_progress)
    if kind == "torch-q4":
        from specserve.backends.torch_q4 import TorchQ4Backend

        return TorchQ4Backend(path, n_ctx=n_ctx, show_progress=show_progress, requantize=requantize)
    raise SpecserveError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
