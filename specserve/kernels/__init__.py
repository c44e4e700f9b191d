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

import sys
from functools import cache

from specserve.engine.compute import on_compute_thread
from specserve.kernels.build import SOURCE, KernelBuildError, build, source_id
from specserve.kernels.pack import PACKERS, linear_op, packed_linear, random_blocks
from specserve.kernels.select import agrees, choose_build

__all__ = [
    "PACKERS",
    "SOURCE",
    "KernelBuildError",
    "build",
    "choose_build",
    "linear_op",
    "ops",
    "packed_linear",
    "random_blocks",
    "source_id",
]


@cache
@on_compute_thread  # it runs the builds (the agreement check, the timing) on the thread passes run on
def ops(generic: bool = False):
    """The kernels as torch ops (`ops().linear_q4_0(...)`): of the builds for this CPU that compute bitwise what
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
