"""specserve's own CPU kernels (kernels.cpp), compiled for the machine that runs them.

Why our own: on these CPUs a 1.5B model is memory-bound for one row and, in llama.cpp and FBGEMM,
compute-bound soon after, so a speculative window costs several single steps (llama.cpp) or each step
reads twice the bytes (int8). A 4-bit weight stream with an int8 dot product per block keeps a window of a
few rows close to the cost of one (`specserve info` prints the measured table). Every output value is
computed the same way whatever the number of rows, so windows are bitwise equal to one-token steps.

The library is built with the system g++ against the installed torch (-march=native: the code paths for
AVX512-VNNI, AVX2 and portable C++ are chosen when it compiles) on first use, in a few seconds, and cached
in the specserve cache dir under a key of the source, torch, the compiler and the CPU's ISA flags, so a
library built for another CPU is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import torch

from specserve import SpecserveError
from specserve.hardware import build_key
from specserve.models.fetch import cache_dir

SOURCE = Path(__file__).with_name("kernels.cpp")
QK = 32  # values per Q4_0 block
_Q4_0_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles


class KernelBuildError(SpecserveError):
    pass


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelBuildError("the torch-q4 backend compiles its kernels with g++, which is not installed")
    return compiler


def _command(compiler: str, output: Path, generic: bool) -> list[str]:
    from torch.utils import cpp_extension

    namespace = "specserve_kernels_generic" if generic else "specserve_kernels"
    libraries = cpp_extension.library_paths()
    return [
        compiler,
        "-O3",
        "-march=native",
        "-ffp-contract=off",  # only the fused multiply-adds the source spells: every path rounds alike
        "-fopenmp",  # at::parallel_for is inline OpenMP; torch's libgomp (same soname) is the one loaded
        "-shared",
        "-fPIC",
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DSPECSERVE_NAMESPACE={namespace}",
        *(["-DSPECSERVE_GENERIC"] if generic else []),
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        str(SOURCE),
        "-o",
        str(output),
        *[f"-L{p}" for p in libraries],
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{libraries[0]}",
    ]


def library_path(generic: bool = False) -> Path:
    """The compiled library for this CPU, building it on first use."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    source_hash = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    key = build_key(source_hash, torch.__version__, *version, "generic" if generic else "native")
    path = cache_dir() / "kernels" / key / "specserve_kernels.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    print(f"compiling specserve kernels for this CPU ({path.parent}) ...", file=sys.stderr)
    result = subprocess.run(_command(compiler, partial, generic), capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln] or result.stderr.splitlines()[-1:]
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {(errors or ['no output'])[0]}")
    partial.replace(path)
    return path


@cache
def ops(generic: bool = False):
    """The kernels as torch ops (`ops().linear(...)`); `generic`: the portable C++ spelling, for tests."""
    torch.ops.load_library(str(library_path(generic)))
    return torch.ops.specserve_kernels_generic if generic else torch.ops.specserve_kernels


def pack_q4_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 weights as GGUF stores them, [n, k/32 * 18] bytes, in the kernel's layout for `tile` columns per
    tile (kernels.cpp): nibbles [n/tile, k/32, 4, tile, 4] and fp16 scales [n/tile, k/32, tile]."""
    n = blocks.shape[0]
    nb = blocks.shape[1] // _Q4_0_BLOCK_BYTES
    if n % tile:
        raise ValueError(f"{n} outputs are not a multiple of the kernel's tile of {tile}")
    by_block = np.ascontiguousarray(blocks).reshape(n, nb, _Q4_0_BLOCK_BYTES)
    scales = by_block[:, :, :2].copy().view(np.float16).reshape(n // tile, tile, nb).transpose(0, 2, 1)
    nibbles = by_block[:, :, 2:].reshape(n // tile, tile, nb, 4, 4).transpose(0, 2, 3, 1, 4)
    return (
        torch.from_numpy(np.ascontiguousarray(nibbles).reshape(-1)),
        torch.from_numpy(np.ascontiguousarray(scales).reshape(-1)),
    )
