"""What this CPU can do, and how to build for it. Standard library only: the Makefile runs it before the venv.

    python -m specserve.hardware llama-cmake-args     CMAKE_ARGS for the llama-cpp-python build on this CPU
    python -m specserve.hardware llama-key VERSION    the wheel cache key: version, build flags, ISA flags

llama.cpp builds with `-march=native` by default. On CPUs with AMX that enables its AMX kernels, which crash
(SIGSEGV in `ggml_backend_amx_mul_mat`, upstream llama.cpp #20824). Turning the AMX options off is not
enough, since `-march=native` defines the AMX macros itself; so on such CPUs the build names every ISA
extension the CPU has explicitly, without AMX. Elsewhere the native build is kept.

A wheel built for one CPU may use instructions another lacks (SIGILL), so a cached wheel is keyed by the
llama.cpp version, the build flags and the ISA flags of the CPU it was built on.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from functools import cache
from pathlib import Path

# The extensions that decide which kernels a build or a backend can use, in the order `info` prints them.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512vbmi",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# ggml's CMake options for each extension an explicit (non-native) build may enable.
_GGML_OPTIONS = (
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)
_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str:
    """x86's family and model numbers (which name a core generation: AMD family 25 model 1 is Zen 3)."""
    info = _cpuinfo()
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def isa(flags: frozenset[str] | None = None) -> list[str]:
    """The ISA extensions of `ISA_FLAGS` this CPU (or `flags`) has."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in ISA_FLAGS if f in flags]


def has_amx(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f.startswith("amx") for f in flags)


def llama_cmake_args(flags: frozenset[str] | None = None) -> list[str]:
    """CMake options for llama.cpp on a CPU with these flags: none (the native build) unless the CPU has AMX,
    then a non-native build with every extension it has but AMX."""
    flags = cpu_flags() if flags is None else flags
    if not has_amx(flags):
        return []
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in _GGML_OPTIONS]
    return args + [f"-D{option}=OFF" for option in _AMX_OPTIONS]


def build_key(*parts: str, flags: frozenset[str] | None = None) -> str:
    """A short key for something built on this CPU: the given parts, the machine and its ISA flags."""
    text = "\n".join([*parts, platform.machine(), " ".join(isa(flags))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def llama_key(version: str, flags: frozenset[str] | None = None) -> str:
    return f"{version}-{build_key(version, *llama_cmake_args(flags), flags=flags)}"


_MCL_CURRENT = 1


def lock_memory() -> str | None:
    """Keep every page this process has mapped now (the models' weights: file-backed maps, which a kernel
    reclaiming idle memory drops, to fault them back in at the next request) in RAM: `mlockall`, as
    llama-server's `--mlock`. Later allocations (KV caches) are not locked. Returns why not, or None."""
    import ctypes
    import ctypes.util
    import os

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mlockall(_MCL_CURRENT) == 0:
        return None
    error = ctypes.get_errno()
    return f"mlockall failed: {os.strerror(error)} (the locked-memory limit, `ulimit -l`, may be too low)"


def main(argv: list[str]) -> int:
    if argv[:1] == ["llama-cmake-args"]:
        print(" ".join(llama_cmake_args()))
    elif argv[:1] == ["llama-key"] and len(argv) == 2:
        print(llama_key(argv[1]))
    else:
        print("usage: python -m specserve.hardware llama-cmake-args | llama-key VERSION", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
