"""The measurements of `auto`, cached per machine and model file (`~/.cache/specserve/auto/`); processes
started together measure once (`models.fetch.exclusive`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from specserve import hardware
from specserve.backends.choose.pick import Measured

_FORMAT = 5


def machine_key(role: str, model: Path, rows: tuple[int, ...], requantize: bool) -> str:
    """The machine, the libraries, the kernels' build, the model file and what was measured (`requantize`:
    with requantized copies among the candidates)."""
    import llama_cpp
    import torch

    from specserve import kernels

    stat = model.stat()
    kernel = (kernels.source_id(), kernels.ops().isa())  # the kernels' code and the build chosen for this CPU
    parts = (hardware.cpu_model(), str(os.cpu_count()), torch.__version__, llama_cpp.__version__, *kernel)
    measured = (role, f"{model.resolve()} {stat.st_size} {stat.st_mtime_ns}", ",".join(map(str, rows)))
    measured += ("copies too",) if requantize else ()
    return hardware.build_key(*parts, *measured, str(_FORMAT))


def cache_path(key: str) -> Path:
    from specserve.models.fetch import cache_dir

    return cache_dir() / "auto" / f"{key}.json"


def load_cached(path: Path) -> list[Measured] | None:
    try:
        data = json.loads(path.read_text())
        return [Measured(**{**m, "seconds": {int(k): v for k, v in m["seconds"].items()}}) for m in data]
    except (OSError, ValueError, KeyError, TypeError):
        return None
