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


# The builds: this CPU's best path, the portable C++ (for the agreement check and tests), and AVX2 alone,
# should the AVX512 path ever disagree with the portable arithmetic on a CPU that has it.
VARIANTS: dict[str, list[str]] = {
    "native": [],
    "generic": ["-DSPECSERVE_GENERIC"],
    "avx2": ["-mno-avx512f"],
}


def _command(compiler: str, output: Path, variant: str) -> list[str]:
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [
        compiler,
        "-O3",
        "-march=native",
        *VARIANTS[variant],
        "-ffp-contract=off",  # only the fused multiply-adds the source spells: every path rounds alike
        "-fopenmp",  # at::parallel_for is inline OpenMP; torch's libgomp (same soname) is the one loaded
        "-shared",
        "-fPIC",
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DSPECSERVE_NAMESPACE=specserve_kernels_{variant}",
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        str(SOURCE),
        "-o",
        str(output),
        *[f"-L{p}" for p in libraries],
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{libraries[0]}",
    ]


def library_path(variant: str = "native") -> Path:
    """The compiled library for this CPU, building it on first use."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    source_hash = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    key = build_key(source_hash, torch.__version__, *version, variant)
    path = cache_dir() / "kernels" / key / "specserve_kernels.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    print(f"compiling specserve kernels ({variant}) for this CPU in {path.parent} ...", file=sys.stderr)
    result = subprocess.run(_command(compiler, partial, variant), capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln] or result.stderr.splitlines()[-1:]
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {(errors or ['no output'])[0]}")
    partial.replace(path)
    return path


def _load(variant: str):
    torch.ops.load_library(str(library_path(variant)))
    return getattr(torch.ops, f"specserve_kernels_{variant}")


def agrees(lib, reference) -> bool:
    """Whether `lib` computes bitwise what the portable build does, on random inputs to every kernel."""
    rng = np.random.default_rng(0)
    n, k = 64, 256
    blocks = rng.integers(0, 256, (n, k // QK * _Q4_0_BLOCK_BYTES), dtype=np.uint8)
    blocks.reshape(n, k // QK, -1)[:, :, :2] = np.array([0.01], np.float16).view(np.uint8)
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    gate_up = torch.from_numpy(rng.uniform(-20, 20, (3, 2 * k)).astype(np.float32))
    q, keys, values = (
        torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for shape in ((2, 4 * 64), (2, 16, 64), (2, 16, 64))
    )
    results = []
    for ops in (lib, reference):
        weight, scales = pack_q4_0(blocks, ops.tile_width())
        results.append(
            (
                ops.linear(x, weight, scales, None, n),
                ops.rms_norm(x, x[0].abs(), 1e-6),
                ops.silu_mul(gate_up),
                ops.attention(q, keys, values, 10, 0.125),
            )
        )
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@cache
def ops(generic: bool = False):
    """The kernels as torch ops (`ops().linear(...)`): this CPU's best build, checked at first use against
    the portable spelling (`generic`, also for tests). AVX512-VNNI is used only where it agrees bitwise;
    else the AVX2 build is, if it agrees; else the portable one."""
    reference = _load("generic")
    if generic:
        return reference
    for variant in ("native", "avx2"):
        lib = _load(variant)
        if agrees(lib, reference):
            return lib
        print(f"specserve kernels: the {lib.isa()} build disagrees with the portable arithmetic", file=sys.stderr)
    return reference


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
