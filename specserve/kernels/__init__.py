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
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch

from specserve import SpecserveError
from specserve.engine.compute import on_compute_thread
from specserve.hardware import build_key
from specserve.models.fetch import cache_dir

SOURCE = Path(__file__).with_name("kernels.cpp")


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


# How the kernels compile, apart from the paths: part of the build's cache key.
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",  # only the fused multiply-adds the source spells: every path rounds alike
    # Schedule for register pressure: GCC otherwise issues all of a block's multiplies before their sums,
    # which the 16 AVX2 registers cannot hold (spilled to the stack, 8x as often, in the 4-row Q4_0 tile).
    "-fschedule-insns",
    "-fsched-pressure",
)


def source_id() -> str:
    """What the kernels' code is: their source and how it compiles (not its file's time: every clone has a
    new one). Keys every cache of something built or measured from them."""
    return hashlib.sha256("\n".join([SOURCE.read_text(), *FLAGS]).encode()).hexdigest()


def _command(compiler: str, output: Path, variant: str) -> list[str]:
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [
        compiler,
        *FLAGS,
        *VARIANTS[variant],
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
    key = build_key(source_id(), torch.__version__, *version, variant)
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


# bytes per GGUF block and where its fp16 scales sit: (block bytes, values per block, fp16 scale offsets)
_LAYOUTS = {"Q4_0": (18, 32, (0,)), "Q4_K": (144, 256, (0, 2)), "Q6_K": (210, 256, (208,))}


def random_blocks(rng: np.random.Generator, kind: str, n: int, k: int) -> np.ndarray:
    """Random weights of a GGUF type, [n, k / values per block * block bytes]: random codes and sub-block
    scales, fp16 scales of either sign and a realistic size (|d| <= 0.02, far from fp32's limits)."""
    size, per_block, offsets = _LAYOUTS[kind]
    blocks = rng.integers(0, 256, (n, k // per_block, size), dtype=np.uint8)
    for offset in offsets:
        scale = rng.uniform(-0.02, 0.02, (n, k // per_block)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(n, -1, 2)
    return blocks.reshape(n, -1)


def packed_linear(ops, kind: str, blocks: np.ndarray):
    """`kind`'s blocks packed for `ops`, as a function of (x, bias, n) on that build's kernel."""
    parts = PACKERS[kind](blocks, ops.tile_width())
    linear = linear_op(ops, kind)
    return lambda x, bias, n: linear(x, *parts, bias, n)


def linear_op(ops, kind: str):
    """The kernel for weights of GGUF type `kind`: (x, *packed parts, bias, n) -> x W^T + bias."""
    return {"Q4_0": ops.linear, "Q4_K": ops.linear_q4_k, "Q6_K": ops.linear_q6_k}[kind]


def agrees(lib, reference) -> bool:
    """Whether `lib` computes bitwise what the portable build does, on random inputs to every kernel."""
    rng = np.random.default_rng(0)
    n, k = 64, 512
    weights = {kind: random_blocks(rng, kind, n, k) for kind in _LAYOUTS}
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    gate_up = torch.from_numpy(rng.uniform(-20, 20, (3, 2 * k)).astype(np.float32))
    q, keys, values = (
        torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for shape in ((2, 4 * 64), (2, 16, 64), (2, 16, 64))
    )
    results = []
    for ops in (lib, reference):
        results.append(
            (
                *(packed_linear(ops, kind, blocks)(x, None, n) for kind, blocks in weights.items()),
                ops.rms_norm(x, x[0].abs(), 1e-6),
                ops.silu_mul(gate_up),
                ops.attention(q, keys, values, 10, 0.125),
            )
        )
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@cache
@on_compute_thread  # it runs the builds (the agreement check, the timing) on the thread passes run on
def ops(generic: bool = False):
    """The kernels as torch ops (`ops().linear(...)`): of the builds for this CPU that compute bitwise what
    the portable spelling does (`generic`, also for tests), the fastest, as measured on this machine
    (`choose_build`): which ISA streams weights faster depends on the CPU's vector units and memory."""
    reference = build("generic")
    if generic:
        return reference
    agreeing = []
    for variant in ("native", "avx2"):
        lib = build(variant)
        if agrees(lib, reference):
            agreeing.append(variant)
        else:
            print(f"specserve kernels: the {lib.isa()} build disagrees with the portable arithmetic", file=sys.stderr)
    if not agreeing:
        return reference
    return build(choose_build(agreeing)["chosen"])


def build(variant: str):
    """One build of the kernels (see VARIANTS) as a torch ops namespace, compiled on first use."""
    torch.ops.load_library(str(library_path(variant)))
    return getattr(torch.ops, f"specserve_kernels_{variant}")


BUILD_CHOICE_ROWS = (1, 2, 4)  # the windows that matter most: plain decoding and short drafts


def choose_build(variants: list[str]) -> dict:
    """The fastest of `variants` (builds of distinct ISAs) at streaming a model's worth of the MLP weights of
    a Q4_K_M file (larger than any cache) for BUILD_CHOICE_ROWS rows: {"chosen", "ms": {variant: total}}.
    Measured once per machine and build, then read from the cache dir."""
    import json

    isas = {variant: build(variant).isa() for variant in variants}
    distinct = list({isa: variant for variant, isa in reversed(isas.items())}.values())
    if len(distinct) == 1:
        return {"chosen": distinct[0], "ms": {}}
    keys = [source_id(), torch.__version__, *sorted(distinct)]
    path = cache_dir() / "kernels" / f"choice-{build_key(*keys)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    print("timing the specserve kernel builds on this CPU (once) ...", file=sys.stderr)
    rng = np.random.default_rng(0)
    shapes = [("Q4_K", 8960 * 2, 1536), ("Q6_K", 1536, 8960)]  # gate+up and down of one layer of the 1.5B
    weights = [(kind, n, k, random_blocks(rng, kind, n, k)) for kind, n, k in shapes for _ in range(6)]
    inputs = {rows: {k: torch.randn(rows, k) for _, _, k in shapes} for rows in BUILD_CHOICE_ROWS}
    streams = {}
    for variant in distinct:
        lib = build(variant)
        streams[variant] = [(packed_linear(lib, kind, blocks), n, k) for kind, n, k, blocks in weights]
    best = {variant: {rows: float("inf") for rows in BUILD_CHOICE_ROWS} for variant in distinct}
    for _ in range(5):  # rounds alternate the builds, so drift in the machine's speed hits them alike
        for variant, stream in streams.items():
            for rows in BUILD_CHOICE_ROWS:
                start = time.perf_counter()
                for linear, n, k in stream:
                    linear(inputs[rows][k], None, n)
                best[variant][rows] = min(best[variant][rows], time.perf_counter() - start)
    totals = {variant: round(1000 * sum(times.values()), 2) for variant, times in best.items()}
    result = {"chosen": min(totals, key=totals.get), "ms": totals}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _tiled(per_column: np.ndarray, tile: int) -> torch.Tensor:
    """[n, blocks, ...] per output column -> [n / tile, blocks, ..., tile]: a tile's values side by side."""
    n = per_column.shape[0]
    if n % tile:
        raise ValueError(f"{n} outputs are not a multiple of the kernel's tile of {tile}")
    tiled = per_column.reshape(n // tile, tile, *per_column.shape[1:])
    order = (0, *range(2, tiled.ndim), 1)
    return torch.from_numpy(np.ascontiguousarray(tiled.transpose(order)).reshape(-1))


def _by_groups(per_column: np.ndarray, tile: int) -> torch.Tensor:
    """[n, blocks, groups, 4 bytes] -> [n / tile, blocks, groups, tile, 4]: a vector holds 4 bytes of every
    column of the tile."""
    n, blocks, groups = per_column.shape[:3]
    if n % tile:
        raise ValueError(f"{n} outputs are not a multiple of the kernel's tile of {tile}")
    tiled = per_column.reshape(n // tile, tile, blocks, groups, 4).transpose(0, 2, 3, 1, 4)
    return torch.from_numpy(np.ascontiguousarray(tiled).reshape(-1))


def _codes_layout(values: np.ndarray, tile: int) -> torch.Tensor:
    """4-bit codes [n, blocks, 32] in input order -> the kernel's layout: byte i of group g holds input 4g+i
    in its low nibble and 16+4g+i in its high one (Q4_0's own byte order)."""
    n, blocks = values.shape[:2]
    paired = (values[:, :, :16] | (values[:, :, 16:] << 4)).astype(np.uint8)
    return _by_groups(paired.reshape(n, blocks, 4, 4), tile)


def pack_q4_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 weights as GGUF stores them, [n, k/32 * 18] bytes, in the kernel's layout (kernels.cpp): codes
    [n/tile, k/32, 4, tile, 4] and fp16 scales [n/tile, k/32, tile]."""
    n = blocks.shape[0]
    by_block = np.ascontiguousarray(blocks).reshape(n, -1, _LAYOUTS["Q4_0"][0])
    scales = by_block[:, :, :2].copy().view(np.float16)[:, :, 0]
    qs = by_block[:, :, 2:]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [n, blocks, 32] in input order
    return _codes_layout(values, tile), _tiled(scales, tile)


def pack_q4_k(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q4_K weights ([n, k/256 * 144] bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 of codes) in the
    kernel's layout: codes as Q4_0's per block of 32, then the scales and mins [n/tile, k/32, tile] as u8 and
    d, dmin [n/tile, k/256, 2, tile] as fp16."""
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    by_block = np.ascontiguousarray(blocks).reshape(n, -1, 144)
    nsb = by_block.shape[1]
    dd = by_block[:, :, :4].copy().view(np.float16)  # [n, nsb, 2]: d, dmin
    sc, mins = Q4_K.get_scale_min(by_block[:, :, 4:16].reshape(-1, 12))
    qs = by_block[:, :, 16:].reshape(n, nsb, 4, 1, 32)
    # 64 inputs per 32 bytes: the low nibbles are sub-block 2j, the high ones 2j+1
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb * 8, 32)
    return (
        _codes_layout(values, tile),
        _tiled(sc.reshape(n, nsb * 8), tile),
        _tiled(mins.reshape(n, nsb * 8), tile),
        _tiled(dd, tile),
    )


def pack_q6_k(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q6_K weights ([n, k/256 * 210] bytes: 128 of low nibbles, 64 of high bits, 16 int8 scales, fp16 d) in
    the kernel's layout: the low 4 bits of each code as Q4_0's codes, the high 2 bits [n/tile, k/32, 2,
    tile, 4] (bits 2g..2g+1 of byte i: input 4g+i, or 16+4g+i in the second half), the scales
    [n/tile, k/16, tile] and d [n/tile, k/256, tile]."""
    n = blocks.shape[0]
    by_block = np.ascontiguousarray(blocks).reshape(n, -1, 210)
    nsb = by_block.shape[1]
    ql = by_block[:, :, :128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    qh = by_block[:, :, 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = ((ql & 0x0F).reshape(n, nsb, 256) | ((qh & 0x03).reshape(n, nsb, 256) << 4)).reshape(n, nsb * 8, 32)
    high = (codes >> 4).reshape(n, nsb * 8, 2, 4, 4)  # [.., half, g, i]
    high_bytes = (high << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)).sum(axis=3, dtype=np.uint8)
    scales = by_block[:, :, 192:208].copy().view(np.int8).reshape(n, nsb * 16)
    d = by_block[:, :, 208:210].copy().view(np.float16)[:, :, 0]
    return _codes_layout(codes & 0x0F, tile), _by_groups(high_bytes, tile), _tiled(scales, tile), _tiled(d, tile)


PACKERS = {"Q4_0": pack_q4_0, "Q4_K": pack_q4_k, "Q6_K": pack_q6_k}  # the GGUF types the kernels take
