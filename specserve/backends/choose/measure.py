"""One backend on one model file, measured in a child process of its own (`python -m
specserve.backends.choose`): a kernel that crashes on this CPU (llama.cpp's AMX kernels, upstream #20824) or
cannot load a model is a result, not the end of the caller."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from specserve import SpecserveError
from specserve.backends import load_backend
from specserve.backends.choose.pick import Measured
from specserve.engine.costs import CALIBRATION_TEXT, measure_rows

if TYPE_CHECKING:
    from specserve.engine.model import Model
    from specserve.models.tokenizer import Tokenizer

# Exactness is checked on two contexts of this text, for a window of tokens of the next
_CHECK_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
_WINDOW_TEXT = "\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
_MEASURE_TIMEOUT_S = 1800  # a first int8 conversion of a 1.5B model takes minutes on 2 cores


def _child_command(
    backend: str, model: Path, rows: tuple[int, ...] | None, exact: bool = False, requantize: bool = False
) -> list[str]:
    """The child that measures `rows` (None: one that only loads the model)."""
    command = [sys.executable, "-m", "specserve.backends.choose", "--backend", backend, "--model", str(model)]
    command += ["--requantize"] if requantize else []
    if rows is None:
        return command + ["--load-only"]
    command += ["--rows", ",".join(map(str, rows))]
    return command + (["--exact"] if exact else [])


def measure_in_child(
    backend: str,
    model: Path,
    rows: tuple[int, ...],
    exact: bool,
    load_first: bool = True,
    *,
    requantize: bool = False,
) -> Measured:
    """Run `measure` in a fresh process: a crash there is a result here. With `load_first`, a load alone runs
    first, in a process of its own, so that a first load's packing or conversion (writing a GiB of cache for
    the 1.5B) is over before anything is timed. `requantize`: as `load_backend`'s."""
    result = Measured(backend, str(model))
    commands = [_child_command(backend, model, None, requantize=requantize)] if load_first else []
    try:
        for command in [*commands, _child_command(backend, model, rows, exact, requantize)]:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_MEASURE_TIMEOUT_S)
            if done.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        result.error = f"no result within {_MEASURE_TIMEOUT_S} s"
        return result
    if done.returncode < 0:
        result.error = f"crashed with {signal.Signals(-done.returncode).name}"
        return result
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
        result.error = (errors or [f"exit status {done.returncode}"])[-1].removeprefix("specserve: error: ")
        return result
    data = json.loads(lines[-1])
    result.seconds = {int(k): v for k, v in data["seconds"].items()}
    result.exact, result.memory, result.converted_to = data["exact"], data["memory"], data["converted_to"]
    return result


def exact_window_sizes(model: Model, tokenizer: Tokenizer, rows: tuple[int, ...]) -> list[int]:
    """The window sizes among `rows` whose logits are bitwise those of one-token steps over the same tokens,
    on two contexts of different lengths (kernels switch by row count, not by the tokens)."""
    import numpy as np

    context = tokenizer.encode(_CHECK_TEXT)
    window = (tokenizer.encode(_WINDOW_TEXT) * max(rows))[: max(rows)]
    exact = list(rows)
    sequence = model.new_sequence()
    for prefix in (context, context * 6):
        sequence.reset()
        sequence.eval(prefix, all_logits=False)
        base = sequence.n_past
        singles = np.concatenate([sequence.eval([token]) for token in window])
        for size in rows:
            sequence.truncate(base)
            if size in exact and not np.array_equal(sequence.eval(window[:size]), singles[:size]):
                exact.remove(size)
    sequence.reset()
    return exact


def measure(backend: str, model: Path, rows: tuple[int, ...], exact: bool, requantize: bool = False) -> dict:
    """Load the backend, time appending each row count to a warm sequence, and (`exact`) find the window
    sizes whose logits are bitwise those of one-token steps."""
    from specserve.models.tokenizer import Tokenizer

    loaded = load_backend(backend, model, n_ctx=2048, show_progress=False, requantize=requantize)
    tokenizer = Tokenizer(model)
    seconds = measure_rows(loaded.new_sequence(), tokenizer.encode(CALIBRATION_TEXT), rows, repeats=3)
    exact_sizes = exact_window_sizes(loaded, tokenizer, rows) if exact else []
    return {
        "seconds": seconds,
        "exact": exact_sizes,
        "memory": loaded.memory_bytes(),
        "converted_to": loaded.converted_to,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one backend on one model (a child of `choose`)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True, type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rows", type=lambda t: tuple(int(x) for x in t.split(",")), help="window sizes to time")
    group.add_argument("--load-only", action="store_true", help="only load: prepare the weights' cache")
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--requantize", action="store_true", help="torch-q4 may run a file's Q4_0 copy")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.load_only:
            load_backend(args.backend, args.model, n_ctx=256, show_progress=False, requantize=args.requantize)
            return 0
        result = measure(args.backend, args.model, args.rows, args.exact, args.requantize)
    except SpecserveError as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 1
    result["load_and_measure_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0
