"""Cheaper drafts by requantizing a GGUF file with llama.cpp's own quantize API.

Why: a draft's cost per token is mostly reading its weights, so fewer bits per weight make a faster (if less
faithful) draft, and a heavily quantized copy of the *target* is a draft that shares its tokenizer by
construction (self-speculation). Requantizing takes seconds, so files are made on demand and cached in
`cache_dir()/quantized/<stem>-<QTYPE>.gguf`.

Draft spec strings (`resolve_draft_spec`):
  quantized:Q2_K        the default draft model, requantized to Q2_K
  self:Q2_K             the target model, requantized to Q2_K
  <name-or-path>@Q4_0   any registry name or GGUF path, requantized to Q4_0
  quantized:Q4_0/Q4_0   the same with the LM head (output tensor) requantized too (the default draft)
  anything else         `resolve_model` (a registry name or a GGUF path), as before

Note: requantizing a Q4_K_M file cannot restore precision it lost; and K-quants need rows that are a multiple
of 256 wide, so llama.cpp falls back to other types for such tensors (e.g. Qwen2.5-0.5B, d=896: its Q2_K and
Q3_K_M files are no smaller than Q4_0). Which spec drafts fastest is the CPU's to say: `auto` times the
draft candidates, and `specserve bench --table seed --quantized-draft A,B,...` compares specs side by side.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import sys
import threading
from pathlib import Path

import llama_cpp
from llama_cpp import _logger as llama_cpp_logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from specserve.models.fetch import ModelError, cache_dir, resolve_model
from specserve.models.registry import DEFAULT_DRAFT
from specserve.models.tokenizer import quiet_stderr

# Types llama.cpp can produce without an importance matrix (IQ1/IQ2 and Q2_K_S need one and may abort the
# process without it). Highest precision first, so the error message reads as a scale.
_QTYPE_NAMES = (
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
)
QTYPES: dict[str, int] = {name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") for name in _QTYPE_NAMES}

# Types for the output tensor alone ("BODY/HEAD" qtypes): ggml tensor types, not llama.cpp file types.
_HEAD_TYPE_NAMES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
HEAD_TYPES: dict[str, int] = {name: getattr(llama_cpp, f"GGML_TYPE_{name}") for name in _HEAD_TYPE_NAMES}

_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def parse_qtype(qtype: str) -> tuple[str, str | None]:
    """(body type, LM-head type or None) from "Q4_0" or "Q4_0/Q4_0" (case-insensitive); ModelError if unknown.

    llama.cpp keeps the output projection (LM head) at Q8_0/Q6_K whatever the body type. For a small draft that
    head is a third of the file (Qwen2.5-0.5B: 151936 x 896), so "BODY/HEAD" also requantizes it.
    """
    body, slash, head = qtype.strip().upper().partition("/")
    if body not in QTYPES or (slash and head not in HEAD_TYPES):
        raise ModelError(
            f"unknown quantization type {qtype!r}; valid: {', '.join(QTYPES)}; "
            f"optionally /HEAD for the output tensor (e.g. Q4_0/Q4_0), HEAD one of {', '.join(HEAD_TYPES)}"
        )
    return body, head or None


def qtype_name(qtype: str) -> str:
    """Canonical spelling of a qtype string, e.g. "q4_0/q4_0" -> "Q4_0/Q4_0"."""
    body, head = parse_qtype(qtype)
    return body if head is None else f"{body}/{head}"


def quantized_path(source: Path, qtype: str) -> Path:
    """Where the requantized copy of `source` lives (it may not exist yet)."""
    body, head = parse_qtype(qtype)
    suffix = body if head is None else f"{body}-head-{head}"
    return cache_dir() / "quantized" / f"{Path(source).stem}-{suffix}.gguf"


def _source_id(source: Path) -> str:
    stat = source.stat()
    return f"{source.resolve()} {stat.st_size} {stat.st_mtime_ns}\n"


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".source")


class _LlamaLog:
    """Collects llama.cpp's log lines while active (they drive the progress bar and give the error line on
    failure) and silences fd 2, where ggml also prints directly. SPECSERVE_LLAMA_LOG=1 passes both through.

    Why a callback and not only an fd redirect: llama-cpp-python's default callback prints through Python's
    sys.stderr, which is not fd 2 wherever sys.stderr has been replaced (pytest, notebooks)."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=256)
        self._echo = bool(os.environ.get("SPECSERVE_LLAMA_LOG"))
        self._callback = llama_cpp.llama_log_callback(self._on_log)  # keep a reference while installed
        self._quiet = contextlib.ExitStack()

    def _on_log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace")
        self.lines.append(line)
        if self._echo:
            print(line, end="", file=sys.stderr, flush=True)

    def __enter__(self) -> _LlamaLog:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        self._quiet.enter_context(quiet_stderr())
        return self

    def __exit__(self, *exc: object) -> None:
        self._quiet.close()
        llama_cpp.llama_log_set(llama_cpp_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own

    def progress(self) -> tuple[int, int] | None:
        """(tensors done, total) from the last "[ i/ n] name ..." line llama.cpp logged, if any."""
        for line in reversed(self.lines):
            if match := _TENSOR_LINE.search(line):
                return int(match[1]), int(match[2])
        return None

    def error_line(self) -> str:
        lines = [ln.strip() for ln in "".join(self.lines).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return (errors or lines or ["llama_model_quantize failed (no log)"])[-1]


def current_quantized(source: Path, qtype: str) -> Path | None:
    """The cached requantized copy of `source`, if it was made from the file there now."""
    out = quantized_path(source, qtype)
    marker = _marker(out)
    if out.is_file() and marker.is_file() and marker.read_text() == _source_id(Path(source)):
        return out
    return None


def quantized_model(source: Path, qtype: str, show_progress: bool = True) -> Path:
    """Return a copy of GGUF `source` requantized to `qtype`, making it on first use.

    The file is written under a temporary `.partial` name and renamed, so a crash never leaves a truncated
    model in the cache. A `.source` marker (path, size, mtime of the source) catches a changed source or two
    sources with the same file name; then the copy is made again.
    """
    body, head = parse_qtype(qtype)
    name = qtype_name(qtype)
    source = Path(source)
    if not source.is_file():
        raise ModelError(f"cannot quantize {source}: no such file")
    if current := current_quantized(source, qtype):
        return current
    out = quantized_path(source, qtype)
    source_id = _source_id(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")  # per process: concurrent runs don't collide

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QTYPES[body]
    params.allow_requantize = True
    if head is not None:
        params.output_tensor_type = HEAD_TYPES[head]
    result: list[int | BaseException] = []

    def work() -> None:
        try:
            result.append(llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params))
        except BaseException as exc:  # noqa: B036 - handed to the main thread
            result.append(exc)

    # The progress display must not go to fd 2 (silenced below): give rich its own copy of the terminal.
    console = Console(file=os.fdopen(os.dup(2), "w")) if show_progress else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn())
    try:
        with (
            Progress(*columns, TimeElapsedColumn(), console=console, disable=not show_progress, transient=True) as bar,
            _LlamaLog() as log,
        ):
            task = bar.add_task(f"quantizing to {name}", total=None)
            thread = threading.Thread(target=work, name="specserve-quantize", daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(0.1)
                if done_total := log.progress():
                    bar.update(task, completed=done_total[0], total=done_total[1])
        outcome = result[0] if result else RuntimeError("quantize thread ended without a result")
        if isinstance(outcome, BaseException):
            raise ModelError(f"quantizing {source.name} to {name} failed: {outcome}") from None
        if outcome != 0 or not partial.is_file():
            raise ModelError(f"quantizing {source.name} to {name} failed: {log.error_line()}")
        partial.replace(out)
        _marker(out).write_text(source_id)
    finally:
        partial.unlink(missing_ok=True)
        if console is not None:
            console.file.close()
    if show_progress:
        print(f"quantized {source.name} -> {out} ({out.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    return out


def requantized_from(path: Path) -> tuple[Path, str] | None:
    """(the source file, the qtype) of a copy `quantized_model` made, or None: `path` is not one."""
    marker = _marker(Path(path))
    if not marker.is_file():
        return None
    source = Path(marker.read_text().rsplit(" ", 2)[0])
    suffix = Path(path).stem.removeprefix(f"{source.stem}-")
    return source, suffix.replace("-head-", "/")


def weights_in_words(path: Path, converted_to: str | None = None) -> str:
    """What a backend runs, said so that nobody takes a requantized copy for the file they chose: `path`'s own
    weights, or a copy (a file `quantized_model` made, or weights the backend converted on load to
    `converted_to`, e.g. torch-int8's int8)."""
    made = [f"converted to {converted_to} on load"] if converted_to else []
    origin = Path(path)
    while (found := requantized_from(origin)) is not None:
        origin, qtype = found
        made.append(f"requantized to {qtype}")
    if not made:
        return f"the file's own weights ({origin.name})"
    return f"a requantized copy, not the file's own weights: {origin.name} {', then '.join(reversed(made))}"


def resolve_target_spec(spec: str, show_progress: bool = True) -> Path:
    """The GGUF file `--target` names: a registry name or a path, or NAME_OR_PATH@QTYPE for its requantized
    copy (made on first use; a copy runs only where asked for by name, see backends/choose/)."""
    if (split := _split_at_qtype(spec, "target")) is not None:
        base, qtype = split
        return quantized_model(resolve_target_spec(base, show_progress), qtype, show_progress)
    return resolve_model(spec, show_progress)


def _split_at_qtype(spec: str, role: str) -> tuple[str, str] | None:
    """(base, qtype) of NAME_OR_PATH@QTYPE, or None where `spec` has no '@' or is an existing file."""
    if "@" not in spec or Path(spec).expanduser().exists():
        return None
    base, _, qtype = spec.rpartition("@")
    if not base:
        raise ModelError(f"{role} spec {spec!r} has no model before '@' (expected NAME_OR_PATH@QTYPE)")
    return base, qtype_name(qtype)


def parse_draft_spec(spec: str, target_spec: str) -> tuple[str, str | None]:
    """Split a draft spec into (base model spec, qtype or None); no file is touched except to see whether
    `spec` names an existing file (a path that happens to contain '@' or ':' stays a path)."""
    if ":" in spec and not Path(spec).expanduser().exists():
        kind, _, qtype = spec.partition(":")
        if kind == "quantized":
            return DEFAULT_DRAFT, qtype_name(qtype)
        if kind == "self":
            return target_spec, qtype_name(qtype)
    return _split_at_qtype(spec, "draft") or (spec, None)


def resolve_draft_spec(spec: str, target_spec: str, show_progress: bool = True) -> Path:
    """The GGUF file a draft spec names, requantizing (and fetching the base model) on first use.

    `target_spec` is what `self:` refers to; it may itself be `NAME_OR_PATH@QTYPE`.
    """
    base, qtype = parse_draft_spec(spec, target_spec)
    if base != spec:
        # The base came from a prefix or suffix and may carry its own @QTYPE (self: on a requantized target).
        base_path = resolve_draft_spec(base, target_spec, show_progress)
    else:
        base_path = resolve_model(base, show_progress)
    return base_path if qtype is None else quantized_model(base_path, qtype, show_progress)
