"""`--target-backend auto` / `--draft-backend auto`: the backends measured on this machine, and the pick.

Every candidate is loaded and timed in a child process of its own, so a kernel that crashes on this CPU
(llama.cpp's AMX kernels, upstream #20824) or cannot load a model is reported and skipped, not fatal. All
are timed in two rounds, each candidate in turn, and keep their faster time per window size: a shared
machine's speed drifts by more than the candidates differ, and a slow spell should not decide the pick. The
measurements are cached per machine (CPU model, cores, ISA flags, library versions) and model file, targets and
drafts apart, so only the first start on a machine pays for them, a verifier (no draft) and a local server
(with one) read the same target measurements and so pick the same target, and processes started together
measure once (the others wait for the result). A different machine measures again. So does this one when a
process finds its target passes clearly faster than the cached table says (`measured_while_busy`): that
table was measured while something else ran, and its pick may be another phase's.

Targets: llama.cpp and torch-q4 (specserve's kernels) each on the model's file and on its Q4_0
requantization, torch-int8 on FBGEMM, and torch-int8 on oneDNN where the CPU has AVX512-VNNI or AMX. Each is
timed for windows of 1..K_MAX+1 rows and checked for exactness: a window size is usable for speculation
only if its logits are bitwise those of one-token steps (otherwise greedy speculation could change the
output), so a kernel that changes arithmetic at 4 rows limits that target to windows of 3.

Drafts: the same backends on the draft file (a draft needs no exactness; its cost is what counts).

The pick (`pick_target`, `pick_draft`) is the policy, in one place: see their docstrings.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from specserve import SpecserveError, hardware
from specserve.backends import load_backend
from specserve.engine.costs import measure_rows

if TYPE_CHECKING:
    from specserve.engine.model import Model
    from specserve.models.tokenizer import Tokenizer

# Acceptance rates the target is judged at (plain decoding, prose-like and code-like text): a target is
# picked for the mean time per token over these, so neither plain decoding nor drafting alone decides.
REFERENCE_ACCEPTANCE = (0.0, 0.6, 0.85)
# A target may be slower on plain decoding than llama.cpp on the model's own file by at most this much;
# and a requantized file (a different model: the bench's fidelity table) is picked over the model's own
# weights only where it is faster than that by more than this much.
PLAIN_TOLERANCE = 1.05
DRAFT_ROWS = (1, 2, 32)  # draft passes timed: a drafted token, a window's first pass, a catch-up
# The cached table is taken to be measured on a busy machine when a one-row pass runs this much faster now.
# Both take the fastest of several passes, which a busy spell slows but a quiet one does not speed up; only
# a faster machine now says the table is off (a slower one says that now is busy, not a time to measure).
BUSY_WHEN_MEASURED = 1.3
_CHECK_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
_WINDOW_TEXT = "\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
_MEASURE_TIMEOUT_S = 1800  # a first int8 conversion of a 1.5B model takes minutes on 2 cores
_FORMAT = 3


@dataclass
class Measured:
    """One backend on one model file, as measured in its own process."""

    backend: str
    model: str  # the file it ran
    seconds: dict[int, float] = field(default_factory=dict)  # rows appended -> seconds (fastest of 2 rounds of 3)
    exact: list[int] = field(default_factory=list)  # window sizes bitwise equal to one-token steps
    memory: int = 0
    error: str | None = None  # why it cannot be used here

    @property
    def label(self) -> str:
        return f"{self.backend} {Path(self.model).name}"

    @property
    def usable(self) -> bool:
        return self.error is None and bool(self.seconds)

    def exact_windows(self) -> int:
        return exact_prefix(self.exact)


def exact_prefix(sizes: list[int]) -> int:
    """The largest n such that windows of 1..n rows are all exact."""
    n = 0
    while n + 1 in sizes:
        n += 1
    return n


@dataclass
class Choice:
    target: Measured | None
    draft: Measured | None
    reason: str
    targets: list[Measured]
    drafts: list[Measured]
    scores: dict[str, float]  # target label -> mean ms per token over REFERENCE_ACCEPTANCE
    cached: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def draft_window_seconds(draft: Measured, k: int) -> float:
    """A window of k drafts: a first pass of 2 rows, then one row per further token."""
    if k <= 0:
        return 0.0
    return draft.seconds[2] + (k - 1) * draft.seconds[1]


def expected_tokens(acceptance: float, k: int) -> float:
    return sum(acceptance**i for i in range(k + 1))


def mean_ms_per_token(target: Measured, k_max: int) -> float:
    """Mean over REFERENCE_ACCEPTANCE of the target's best time per token, over exact windows up to k_max
    drafts. Drafting's cost is the drafter's and is left out: model-free drafters cost nothing, a front-end's
    draft runs on another machine, and a verifier, which knows no drafter, must pick the target a local
    server on the same machine picks (the same greedy output either way)."""
    limit = min(k_max, target.exact_windows() - 1, max(target.seconds) - 1)
    times = []
    for a in REFERENCE_ACCEPTANCE:
        best = target.seconds[1]
        for k in range(1, limit + 1):
            best = min(best, target.seconds[k + 1] / expected_tokens(a, k))
        times.append(best)
    return 1000 * sum(times) / len(times)


def measured_while_busy(choice: Choice, one_row_s: float) -> bool:
    """Whether `choice` came from the cache and its target's one-row pass, which takes `one_row_s` now,
    was measured BUSY_WHEN_MEASURED times slower or more."""
    target = choice.target
    return choice.cached and target is not None and target.seconds[1] > BUSY_WHEN_MEASURED * one_row_s


def pick_draft(drafts: list[Measured]) -> tuple[Measured | None, str]:
    """The draft that drafts a window of 4 fastest (a first pass of 2 rows and three of 1)."""
    usable = [d for d in drafts if d.usable]
    if not usable:
        return None, "no draft backend runs here"
    best = min(usable, key=lambda d: draft_window_seconds(d, 4))
    return best, f"{best.label}: a window of 4 drafts in {1000 * draft_window_seconds(best, 4):.0f} ms"


def pick_target(
    targets: list[Measured], k_max: int, reference: Measured | None
) -> tuple[Measured | None, str, dict[str, float]]:
    """The target with the least mean time per token over REFERENCE_ACCEPTANCE (`mean_ms_per_token`: exact
    window sizes only), among those at most PLAIN_TOLERANCE slower on plain decoding than `reference`
    (llama.cpp on the model's own file: what a user would run instead); one on the model's own file rather
    than a requantization unless that is more than PLAIN_TOLERANCE faster."""
    usable = [t for t in targets if t.usable]
    scores = {t.label: round(mean_ms_per_token(t, k_max), 2) for t in usable}
    if not usable:
        return None, "no target backend runs here", scores
    fast_enough = usable
    if reference is not None and reference.usable:
        fast_enough = [t for t in usable if t.seconds[1] <= PLAIN_TOLERANCE * reference.seconds[1]] or usable
    best = min(fast_enough, key=lambda t: scores[t.label])
    own = [t for t in fast_enough if reference is not None and t.model == reference.model]
    if own and best not in own:
        best_own = min(own, key=lambda t: scores[t.label])
        if scores[best_own.label] <= PLAIN_TOLERANCE * scores[best.label]:
            best = best_own
    reason = (
        f"{best.label}: {scores[best.label]:.1f} ms/token on average at acceptance "
        f"{', '.join(f'{a:g}' for a in REFERENCE_ACCEPTANCE)}; plain decoding {1000 * best.seconds[1]:.1f} ms/token"
    )
    if reference is not None and reference.usable and best is not reference:
        reason += f" (llama.cpp on the model's file: {1000 * reference.seconds[1]:.1f})"
    return best, reason, scores


# --- measuring, in child processes ---------------------------------------------------------------------


def _child_command(backend: str, model: Path, rows: tuple[int, ...] | None, exact: bool = False) -> list[str]:
    """The child that measures `rows` (None: one that only loads the model)."""
    command = [sys.executable, "-m", "specserve.backends.choose", "--backend", backend, "--model", str(model)]
    if rows is None:
        return command + ["--load-only"]
    command += ["--rows", ",".join(map(str, rows))]
    return command + (["--exact"] if exact else [])


def measure_in_child(
    backend: str, model: Path, rows: tuple[int, ...], exact: bool, load_first: bool = True
) -> Measured:
    """Run `measure` in a fresh process: a crash there is a result here. With `load_first`, a load alone runs
    first, in a process of its own, so that a first load's packing or conversion (writing a GiB of cache for
    the 1.5B) is over before anything is timed."""
    result = Measured(backend, str(model))
    commands = [_child_command(backend, model, None)] if load_first else []
    try:
        for command in [*commands, _child_command(backend, model, rows, exact)]:
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
    result.exact, result.memory = data["exact"], data["memory"]
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


def measure(backend: str, model: Path, rows: tuple[int, ...], exact: bool) -> dict:
    """Load the backend, time appending each row count to a warm sequence, and (`exact`) find the window
    sizes whose logits are bitwise those of one-token steps."""
    from specserve.models.tokenizer import Tokenizer

    loaded = load_backend(backend, model, n_ctx=2048, show_progress=False)
    tokenizer = Tokenizer(model)
    seconds = measure_rows(loaded.new_sequence(), tokenizer.encode(_CHECK_TEXT), rows, repeats=3)
    exact_sizes = exact_window_sizes(loaded, tokenizer, rows) if exact else []
    return {"seconds": seconds, "exact": exact_sizes, "memory": loaded.memory_bytes()}


# --- the candidates and the cached choice ----------------------------------------------------------------


def _has_onednn_int8(flags: frozenset[str]) -> bool:
    return "avx512_vnni" in flags or hardware.has_amx(flags)


def target_candidates(target: Path, show_progress: bool) -> list[tuple[str, Path]]:
    from specserve.backends.torch_q4 import HEAD_AND_BODY
    from specserve.models.quantize import quantized_model

    requantized = quantized_model(target, HEAD_AND_BODY, show_progress)
    candidates = [("llama.cpp", target), ("llama.cpp", requantized), ("torch-q4", target), ("torch-q4", requantized)]
    candidates.append(("torch-int8", target))
    if _has_onednn_int8(hardware.cpu_flags()):
        candidates.append(("torch-int8-onednn", target))
    return candidates


def draft_candidates(draft: Path) -> list[tuple[str, Path]]:
    return [("llama.cpp", draft), ("torch-q4", draft), ("torch-int8", draft)]


def _machine_key(role: str, model: Path, rows: tuple[int, ...]) -> str:
    import llama_cpp
    import torch

    from specserve import kernels

    stat = model.stat()
    kernel = (kernels.source_id(), kernels.ops().isa())  # the kernels' code and the build chosen for this CPU
    parts = (hardware.cpu_model(), str(os.cpu_count()), torch.__version__, llama_cpp.__version__, *kernel)
    measured = (role, f"{model.resolve()} {stat.st_size} {stat.st_mtime_ns}", ",".join(map(str, rows)))
    return hardware.build_key(*parts, *measured, str(_FORMAT))


def _cache_path(key: str) -> Path:
    from specserve.models.fetch import cache_dir

    return cache_dir() / "auto" / f"{key}.json"


def _load_cached(path: Path) -> list[Measured] | None:
    try:
        data = json.loads(path.read_text())
        return [Measured(**{**m, "seconds": {int(k): v for k, v in m["seconds"].items()}}) for m in data]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
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


def measure_candidates(
    role: str, model: Path, rows: tuple[int, ...], show_progress: bool = True, again: bool = False
) -> tuple[list[Measured], bool]:
    """Every candidate for `role` ("target" or "draft") on `model`, measured for `rows` (or read from the
    cache: then True). `again`: measure even if cached, and replace the cached table."""
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if show_progress else (lambda text: None)
    path = _cache_path(_machine_key(role, model, rows))
    started = time.time()
    with _exclusive(path, say):
        # another process may have measured again while this one waited: its table is as new as ours would be
        fresh = path.is_file() and path.stat().st_mtime >= started
        if (not again or fresh) and (cached := _load_cached(path)) is not None:
            return cached, not fresh
        say(f"measuring the {role} backends on this CPU (once per machine; cached in {path.parent}):")
        exact = role == "target"
        candidates = target_candidates(model, show_progress) if exact else draft_candidates(model)
        results = [_timed(say, role, measure_in_child(backend, file, rows, exact)) for backend, file in candidates]
        say("  timing them all again, in turn (a slow spell of the machine hits them alike):")
        for result in results:
            if result.usable:
                again = measure_in_child(result.backend, Path(result.model), rows, exact=False, load_first=False)
                _keep_fastest(result, again)
                _timed(say, role, result)
        path.write_text(json.dumps([asdict(result) for result in results]))
    return results, False


def choose(
    target: Path | None, draft: Path | None, k_max: int, show_progress: bool = True, again: bool = False
) -> Choice:
    """Measure (or read the cached measurements of) the candidates on this machine and pick. No `target`:
    a front-end of remote verifiers, which picks only its draft's backend. `again`: measure anew (`specserve
    info --remeasure`, or a table found to be measured while the machine was busy)."""
    rows = tuple(range(1, k_max + 2))
    targets, targets_cached = measure_candidates("target", target, rows, show_progress, again) if target else ([], True)
    drafts, drafts_cached = (
        measure_candidates("draft", draft, DRAFT_ROWS, show_progress, again) if draft else ([], True)
    )
    chosen_draft, draft_reason = pick_draft(drafts) if draft else (None, "no draft model")
    reference = next((t for t in targets if t.backend == "llama.cpp" and Path(t.model) == target), None)
    chosen, reason, scores = pick_target(targets, k_max, reference) if target else (None, "remote", {})
    reason = f"target {reason}; draft {draft_reason}"
    return Choice(chosen, chosen_draft, reason, targets, drafts, scores, targets_cached and drafts_cached)


def _keep_fastest(measured: Measured, again: Measured) -> None:
    """Each window size's time becomes the faster of two rounds (a failed second round keeps the first)."""
    if again.usable:
        measured.seconds = {rows: min(s, again.seconds[rows]) for rows, s in measured.seconds.items()}


def _timed(say, role: str, m: Measured) -> Measured:
    if m.usable:
        exact = f", windows exact up to {m.exact_windows()} rows" if role == "target" else ""
        say(f"  {role} {m.label}: {1000 * m.seconds[1]:.1f} ms for 1 row{exact}")
    else:
        say(f"  {role} {m.label}: not usable here ({m.error})")
    return m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one backend on one model (a child of `choose`)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True, type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rows", type=lambda t: tuple(int(x) for x in t.split(",")), help="window sizes to time")
    group.add_argument("--load-only", action="store_true", help="only load: prepare the weights' cache")
    parser.add_argument("--exact", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.load_only:
            load_backend(args.backend, args.model, n_ctx=256, show_progress=False)
            return 0
        result = measure(args.backend, args.model, args.rows, args.exact)
    except SpecserveError as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 1
    result["load_and_measure_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
