"""Compiling kernels.cpp for this machine: one library per variant (VARIANTS), cached under a key of the
source and its flags, torch, the compiler, the variant and the CPU's ISA flags (`hardware.build_key`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from specserve import SpecserveError
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


def build(variant: str):
    """One build of the kernels (see VARIANTS) as a torch ops namespace, compiled on first use."""
    torch.ops.load_library(str(library_path(variant)))
    return getattr(torch.ops, f"specserve_kernels_{variant}")
