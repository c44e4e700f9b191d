"""What the build derives from a CPU's flags: llama.cpp's CMake options and the wheel cache key."""

import subprocess
import sys

from specserve import hardware

AVX2_ONLY = frozenset("fpu sse4_2 avx avx2 fma f16c bmi2".split())  # the AMD kind's extensions
WITH_AMX = frozenset(
    "sse4_2 avx avx2 fma f16c bmi2 avx_vnni avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8".split()
)


def test_a_cpu_without_amx_keeps_the_native_build():
    assert hardware.llama_cmake_args(AVX2_ONLY) == []


def test_a_cpu_with_amx_builds_every_extension_it_has_but_amx():
    args = hardware.llama_cmake_args(WITH_AMX)
    assert "-DGGML_NATIVE=OFF" in args  # -march=native would define the AMX macros whatever the options say
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON"} <= set(args)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DGGML_AVX512_VBMI=OFF" in args  # not in these flags: not enabled


def test_wheels_for_different_cpus_never_share_a_cache_key():
    assert hardware.llama_key("0.3.36", AVX2_ONLY) != hardware.llama_key("0.3.36", WITH_AMX)
    assert hardware.llama_key("0.3.36", AVX2_ONLY) != hardware.llama_key("0.3.37", AVX2_ONLY)
    assert hardware.llama_key("0.3.36", AVX2_ONLY) == hardware.llama_key("0.3.36", AVX2_ONLY | {"fpu", "sse"})


def test_this_cpu_is_described_and_the_makefile_gets_its_values():
    assert hardware.cpu_model()
    assert set(hardware.isa()) <= set(hardware.ISA_FLAGS)
    run = [sys.executable, "-m", "specserve.hardware"]
    key = subprocess.run([*run, "llama-key", "0.3.36"], capture_output=True, text=True, check=True).stdout.strip()
    assert key == hardware.llama_key("0.3.36")
    args = subprocess.run([*run, "llama-cmake-args"], capture_output=True, text=True, check=True).stdout.split()
    assert args == hardware.llama_cmake_args()
    assert subprocess.run([*run, "nonsense"], capture_output=True).returncode == 2
