"""specserve's kernels on this machine's instruction set: right, batch-invariant, and bitwise the same as the
portable C++ spelling of the same arithmetic (so the AVX2 and AVX512-VNNI paths, each tested on the CPU that
has it, agree with each other too)."""

import math

import gguf
import numpy as np
import pytest
import torch

from specserve import kernels


@pytest.fixture(scope="module", params=["native", "avx2"])
def native(request):
    """Each build for this CPU: its own ISA's path (AVX512-VNNI where the CPU has it) and AVX2 alone."""
    return kernels.build(request.param)


@pytest.fixture(scope="module")
def generic():
    return kernels.ops(generic=True)


KINDS = list(kernels.PACKERS)  # Q4_0 and the K-quants of a Q4_K_M file


def test_the_native_build_takes_the_best_path_this_cpu_has():
    from specserve.hardware import cpu_flags

    flags = cpu_flags()
    expected = "avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags else "avx2" if "avx2" in flags else "generic"
    native = kernels.build("native")
    assert native.isa() == expected
    assert native.tile_width() == (16 if expected == "avx512-vnni" else 8)


def test_the_build_in_use_is_the_fastest_measured_here():
    choice = kernels.choose_build(["native", "avx2"])
    assert kernels.ops().isa() == kernels.build(choice["chosen"]).isa()
    if choice["ms"]:  # two distinct ISAs here: both timed
        assert choice["ms"][choice["chosen"]] == min(choice["ms"].values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k"), [(64, 512), (1536, 8960), (2048, 1536)])
def test_linear_matches_the_dequantized_product(native, kind, n, k):
    rng = np.random.default_rng(n + k)
    blocks = kernels.random_blocks(rng, kind, n, k)
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    y = kernels.packed_linear(native, kind, blocks)(x, bias, n).double().numpy()
    weight = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).astype(np.float64)  # gguf's reading
    reference = x.double().numpy() @ weight.T + bias.double().numpy()
    # activations are quantized to 8 bits per block as llama.cpp does (Q8_0, Q8_K): ~0.5% relative error
    assert np.linalg.norm(y - reference) < 0.01 * np.linalg.norm(reference)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_rows_do_not_depend_on_each_other(native, kind):
    rng = np.random.default_rng(1)
    n, k = 256, 512
    linear = kernels.packed_linear(native, kind, kernels.random_blocks(rng, kind, n, k))
    x = torch.from_numpy(rng.standard_normal((17, k)).astype(np.float32) * 4)
    singles = torch.cat([linear(x[i : i + 1].contiguous(), None, n) for i in range(17)])
    for rows in range(1, 18):
        assert torch.equal(linear(x[:rows].contiguous(), None, n), singles[:rows]), rows


@pytest.mark.parametrize("kind", KINDS)
def test_linear_is_bitwise_the_portable_arithmetic(native, generic, kind):
    rng = np.random.default_rng(2)
    n, k = 512, 1024
    blocks = kernels.random_blocks(rng, kind, n, k)
    x = torch.from_numpy(rng.standard_normal((7, k)).astype(np.float32) * 3)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    fast, portable = (kernels.packed_linear(ops, kind, blocks)(x, bias, n) for ops in (native, generic))
    assert torch.equal(fast, portable)


def test_every_other_kernel_is_bitwise_the_portable_arithmetic(native, generic):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((7, 1024)).astype(np.float32) * 3)
    norm = torch.rand(1024)
    assert torch.equal(native.rms_norm(x, norm, 1e-6), generic.rms_norm(x, norm, 1e-6))
    gate_up = torch.from_numpy(rng.uniform(-90, 30, (3, 2 * 1000)).astype(np.float32))
    assert torch.equal(native.silu_mul(gate_up), generic.silu_mul(gate_up))
    assert torch.equal(native.gelu_tanh_mul(gate_up), generic.gelu_tanh_mul(gate_up))
    q, keys, values = torch.randn(4, 12 * 64), torch.randn(2, 40, 64), torch.randn(2, 40, 64)
    for window in (0, 7):
        fast, portable = (ops.attention(q, keys, values, 20, 0.125, window) for ops in (native, generic))
        assert torch.equal(fast, portable)


def gelu_tanh(g: torch.Tensor) -> torch.Tensor:
    """GeLU's tanh form as g sigmoid(2y) (1 + tanh(y) cancels to 0 below g = -10 even in double)."""
    return g * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))


@pytest.mark.parametrize(
    ("kernel", "function", "rtol"),
    # GeLU's sigmoid argument is a cubic in float32: a few ulps of it, times |z| up to ~50 where the value is
    # ~1e-20, make 1e-5 of relative error there
    [("silu_mul", torch.nn.functional.silu, 1e-6), ("gelu_tanh_mul", gelu_tanh, 1e-5)],
)
def test_gated_activations_are_accurate_over_the_whole_range(native, kernel, function, rtol):
    g = torch.linspace(-80, 30, 4000).reshape(1, -1)
    up = torch.rand_like(g) + 0.5
    got = getattr(native, kernel)(torch.cat([g, up], dim=1)).double()
    want = function(g.double()) * up.double()
    assert torch.allclose(got, want, rtol=rtol, atol=1e-30)  # far below zero gelu is below any float


def test_attention_equals_softmax_attention(native):
    torch.manual_seed(0)
    heads, kv, hd, start, rows = 12, 2, 64, 30, 5
    q, keys, values = torch.randn(rows, heads * hd), torch.randn(kv, 64, hd), torch.randn(kv, 64, hd)
    for window in (0, 9):  # 9: the last 9 positions, as llama.cpp's sliding-window mask leaves them
        got = native.attention(q, keys, values, start, 1 / hd**0.5, window)
        for r in range(rows):
            first = max(0, start + r + 1 - window) if window else 0
            for h in range(heads):
                k_, v_ = (cache[h // (heads // kv), first : start + r + 1] for cache in (keys, values))
                p = torch.softmax(k_ @ q[r, h * hd : (h + 1) * hd] / hd**0.5, dim=0)
                assert torch.allclose(got[r, h * hd : (h + 1) * hd], p @ v_, atol=1e-5)


def test_rope_writes_the_cache_and_rotates_halves(native):
    hd, heads, kv = 8, 2, 1
    qkv = torch.randn(3, (heads + 2 * kv) * hd)
    angles = torch.rand(10, hd // 2)
    cos, sin = torch.cos(angles).repeat(1, 2).contiguous(), torch.sin(angles).repeat(1, 2).contiguous()
    keys, values = torch.zeros(kv, 10, hd), torch.zeros(kv, 10, hd)
    q = native.rope_and_cache(qkv, cos, sin, keys, values, 4, heads)

    def rotate(x, pos):
        half = hd // 2
        return x * cos[pos] + torch.cat((-x[half:], x[:half])) * sin[pos]

    for r in range(3):
        assert torch.allclose(q[r, :hd], rotate(qkv[r, :hd], 4 + r), atol=1e-6)
        assert torch.allclose(keys[0, 4 + r], rotate(qkv[r, heads * hd : (heads + 1) * hd], 4 + r), atol=1e-6)
        assert torch.equal(values[0, 4 + r], qkv[r, (heads + 1) * hd :])
    assert not keys[0, :4].any() and not keys[0, 7:].any()
