"""Every model pass of a process runs on one thread, whichever thread asks for it: `on_compute_thread`.

Why: torch's ops, specserve's kernels (`at::parallel_for`) and llama.cpp all parallelise with GNU OpenMP
(one libgomp per process: torch's and llama.cpp's share a soname). libgomp keeps a team of worker threads
for each thread that starts parallel regions, and while it manages more threads than the machine has CPUs
its workers stop spinning between regions: every region then puts them to sleep and wakes them through the
kernel (futex). Two calling threads are enough on a 2-core machine: the one that loaded the models and the
server's scheduler thread that steps them, or a verifier's worker thread, or a Ray actor's: passes from
the second thread then pay hundreds of sleeps and wake-ups each (docs/hardware.md has the measurement). So
every pass goes through one long-lived thread; one team of workers serves the whole process, and a pass
costs the same from any thread. A call made on that thread runs inline, so calls may nest (a load that
runs a pass).

Handing a call to the thread costs two thread wake-ups (tens of microseconds) against a pass of tens of
milliseconds.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None  # the compute thread's, once it runs


def _started() -> None:
    global _ident
    _ident = threading.get_ident()


def run(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` on the compute thread (inline when called there); its result or its exception."""
    global _executor
    if threading.get_ident() == _ident:
        return fn(*args, **kwargs)
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(1, thread_name_prefix="specserve-compute", initializer=_started)
    return _executor.submit(fn, *args, **kwargs).result()


def on_compute_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: every call of `fn` runs on the compute thread (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return run(fn, *args, **kwargs)

    return wrapper


def is_compute_thread() -> bool:
    return threading.get_ident() == _ident
