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

Targets: the backends that run the model's file as it is, llama.cpp and torch-q4 (specserve's kernels; on
a file whose types they take). A requantized copy is another model (the bench's fidelity table: its greedy
replies differ from the file's), so it is a candidate only where the user allowed one (`--requantize`):
then llama.cpp and torch-q4 on the file's Q4_0 requantization, torch-int8 on FBGEMM, and torch-int8 on
oneDNN where the CPU has AVX512-VNNI or AMX (both convert the weights to int8) join them. Each is timed
for windows of 1..K_MAX+1 rows and checked for exactness: a window size is usable for speculation only if
its logits are bitwise those of one-token steps (otherwise greedy speculation could change the output), so
a kernel that changes arithmetic at 4 rows limits that target to windows of 3.

Drafts: llama.cpp, torch-q4 and torch-int8 on the draft file, converted where a backend needs it (a draft
needs no exactness and changes no output: the target decides every token; its cost is what counts).

The pick (`pick.py`: `pick_target`, `pick_draft`) is the policy, in one place: see their docstrings; the
measuring is `measure.py`, the cache `cache.py`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from specserve import hardware
from specserve.backends.choose.cache import cache_path, load_cached, machine_key
from specserve.backends.choose.measure import exact_window_sizes, measure_in_child
from specserve.backends.choose.pick import (
    BUSY_WHEN_MEASURED,
    Choice,
    Measured,
    exact_prefix,
    measured_while_busy,
    pick_draft,
    pick_target,
)
from specserve.engine.costs import DRAFT_ROWS
from specserve.models.fetch import exclusive

__all__ = [
    "BUSY_WHEN_MEASURED",
    "Choice",
    "Measured",
    "choose",
    "exact_prefix",
    "exact_window_sizes",
    "measure_candidates",
    "measure_in_child",
    "measured_while_busy",
]


def _has_onednn_int8(flags: frozenset[str]) -> bool:
    return "avx512_vnni" in flags or hardware.has_amx(flags)


def target_candidates(target: Path, requantize: bool, show_progress: bool) -> list[tuple[str, Path]]:
    """The file as it is on llama.cpp and torch-q4; with `requantize`, the copies too."""
    from specserve.backends.torch_q4 import HEAD_AND_BODY
    from specserve.models.quantize import quantized_model

    candidates = [("llama.cpp", target), ("torch-q4", target)]
    if requantize:
        requantized = quantized_model(target, HEAD_AND_BODY, show_progress)
        candidates += [("llama.cpp", requantized), ("torch-q4", requantized), ("torch-int8", target)]
        if _has_onednn_int8(hardware.cpu_flags()):
            candidates.append(("torch-int8-onednn", target))
    return candidates


def draft_candidates(draft: Path) -> list[tuple[str, Path]]:
    return [("llama.cpp", draft), ("torch-q4", draft), ("torch-int8", draft)]


def measure_candidates(
    role: str,
    model: Path,
    rows: tuple[int, ...],
    show_progress: bool = True,
    again: bool = False,
    *,
    requantize: bool = False,
) -> tuple[list[Measured], bool]:
    """Every candidate for `role` ("target" or "draft") on `model`, measured for `rows` (or read from the
    cache: then True). `again`: measure even if cached, and replace the cached table; `requantize`: a
    target's requantized copies are candidates too."""
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if show_progress else (lambda text: None)
    exact = role == "target"
    requantize = requantize or not exact  # a draft's copy changes no output
    path = cache_path(machine_key(role, model, rows, requantize))
    started = time.time()
    with exclusive(path, say):
        # another process may have measured again while this one waited: its table is as new as ours would be
        fresh = path.is_file() and path.stat().st_mtime >= started
        if (not again or fresh) and (cached := load_cached(path)) is not None:
            return cached, not fresh
        say(f"measuring the {role} backends on this CPU (once per machine; cached in {path.parent}):")
        candidates = target_candidates(model, requantize, show_progress) if exact else draft_candidates(model)
        results = [
            _timed(say, role, measure_in_child(backend, file, rows, exact, requantize=requantize))
            for backend, file in candidates
        ]
        say("  timing them all again, in turn (a slow spell of the machine hits them alike):")
        for result in results:
            if result.usable:
                again = measure_in_child(
                    result.backend, Path(result.model), rows, exact=False, load_first=False, requantize=requantize
                )
                _keep_fastest(result, again)
                _timed(say, role, result)
        path.write_text(json.dumps([asdict(result) for result in results]))
    return results, False


def choose(
    target: Path | None,
    draft: Path | None,
    k_max: int,
    show_progress: bool = True,
    again: bool = False,
    *,
    requantize: bool = False,
) -> Choice:
    """Measure (or read the cached measurements of) the candidates on this machine and pick. No `target`:
    a front-end of remote verifiers, which picks only its draft's backend. `again`: measure anew (`specserve
    info --remeasure`, or a table found to be measured while the machine was busy); `requantize`: the
    target may be a requantized copy (`--requantize`), where clearly faster."""
    rows = tuple(range(1, k_max + 2))
    targets, targets_cached = (
        measure_candidates("target", target, rows, show_progress, again, requantize=requantize)
        if target
        else ([], True)
    )
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
