"""The measurements of `auto`, cached per machine and model file (`~/.cache/specserve/auto/`), and the lock
that makes processes started together measure once."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specserve import hardware
from specserve.backends.choose.pick import Measured

_FORMAT = 3


def machine_key(role: str, model: Path, rows: tuple[int, ...]) -> str:
    import llama_cpp
    import torch

    from specserve import kernels

    stat = model.stat()
    kernel = (kernels.source_id(), kernels.ops().isa())  # the kernels' code and the build chosen for this CPU
    parts = (hardware.cpu_model(), str(os.cpu_count()), torch.__version__, llama_cpp.__version__, *kernel)
    measured = (role, f"{model.resolve()} {stat.st_size} {stat.st_mtime_ns}", ",".join(map(str, rows)))
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


@contextmanager
def exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Held while one process measures into `path`: others started at the same time wait for its result
    rather than time their candidates against each other on the same cores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another specserve process is measuring the backends; waiting for its result")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
