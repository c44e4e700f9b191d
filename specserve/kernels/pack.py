"""GGUF weight blocks in the kernels' layout (kernels.cpp): tiles of `ops.tile_width()` output columns side by
side, so one vector load reads the same bytes of every column of a tile."""

from __future__ import annotations

import numpy as np
import torch

# bytes per GGUF block and where its fp16 scales sit: (block bytes, values per block, fp16 scale offsets)
LAYOUTS = {
    "Q4_0": (18, 32, (0,)),
    "Q4_1": (20, 32, (0, 2)),
    "Q5_0": (22, 32, (0,)),
    "Q5_1": (24, 32, (0, 2)),
    "Q8_0": (34, 32, (0,)),
    "Q4_K": (144, 256, (0, 2)),
    "Q5_K": (176, 256, (0, 2)),
    "Q6_K": (210, 256, (208,)),
}


def random_blocks(rng: np.random.Generator, kind: str, n: int, k: int) -> np.ndarray:
    """Random weights of a GGUF type, [n, k / values per block * block bytes]: random codes and sub-block
    scales, fp16 scales of either sign and a realistic size (|d| <= 0.02, far from fp32's limits)."""
    size, per_block, offsets = LAYOUTS[kind]
    blocks = rng.integers(0, 256, (n, k // per_block, size), dtype=np.uint8)
    for offset in offsets:
        scale = rng.uniform(-0.02, 0.02, (n, k // per_block)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(n, -1, 2)
    return blocks.reshape(n, -1)


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


def _fifth_bits_layout(values: np.ndarray, tile: int) -> torch.Tensor:
    """Bit 4 of 5-bit codes [n, blocks, 32] -> [n / tile, blocks, tile, 4] bytes: bit g of byte i is input
    4g+i's, bit 4+g input 16+4g+i's (the nibbles' order, kernels.cpp)."""
    n, blocks = values.shape[:2]
    bits = ((values >> 4) & 1).reshape(n, blocks, 2, 4, 4)  # [.., half, g, i]
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 1, 2, 4, 1)
    return _by_groups((bits << shifts).sum(axis=(2, 3), dtype=np.uint8).reshape(n, blocks, 1, 4), tile)


def _by_block(blocks: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(blocks).reshape(blocks.shape[0], -1, LAYOUTS[kind][0])


def _halves(by_block: np.ndarray, count: int) -> np.ndarray:
    """The first `count` fp16 values of every block, [n, blocks, count]."""
    return by_block[:, :, : 2 * count].copy().view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0's 16 bytes of a block -> its 32 codes in input order (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0's 4 bytes of a block (a little-endian u32, bit i input i's) -> [.., 32] bits, 0 or 16."""
    return (np.unpackbits(qh, axis=-1, bitorder="little") << 4).astype(np.uint8)


def pack_q4_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 weights as GGUF stores them, [n, k/32 * 18] bytes, in the kernel's layout (kernels.cpp): codes
    [n/tile, k/32, 4, tile, 4] and fp16 scales [n/tile, k/32, tile]."""
    by_block = _by_block(blocks, "Q4_0")
    return _codes_layout(_nibbles(by_block[:, :, 2:]), tile), _tiled(_halves(by_block, 1)[:, :, 0], tile)


def pack_q4_1(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 (d, m, 16 bytes of codes per 32): codes as Q4_0's, d and m [n/tile, k/32, 2, tile] as fp16."""
    by_block = _by_block(blocks, "Q4_1")
    return _codes_layout(_nibbles(by_block[:, :, 4:]), tile), _tiled(_halves(by_block, 2), tile)


def pack_q5_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q5_0 (d, 4 bytes of fifth bits, 16 of low nibbles per 32): codes as Q4_0's, the fifth bits
    [n/tile, k/32, tile, 4], d [n/tile, k/32, tile]."""
    by_block = _by_block(blocks, "Q5_0")
    values = _nibbles(by_block[:, :, 6:]) | _fifth_bits(by_block[:, :, 2:6])
    return (
        _codes_layout(values & 0x0F, tile),
        _fifth_bits_layout(values, tile),
        _tiled(_halves(by_block, 1)[:, :, 0], tile),
    )


def pack_q5_1(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q5_1 (d, m, 4 bytes of fifth bits, 16 of low nibbles per 32): as Q5_0, with d and m as Q4_1's."""
    by_block = _by_block(blocks, "Q5_1")
    values = _nibbles(by_block[:, :, 8:]) | _fifth_bits(by_block[:, :, 4:8])
    return _codes_layout(values & 0x0F, tile), _fifth_bits_layout(values, tile), _tiled(_halves(by_block, 2), tile)


def pack_q8_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 (d, 32 int8 codes per 32): codes [n/tile, k/32, 8, tile, 4] (4 inputs of every column per group),
    d [n/tile, k/32, tile]."""
    by_block = _by_block(blocks, "Q8_0")
    n, nb = by_block.shape[:2]
    return _by_groups(by_block[:, :, 2:].reshape(n, nb, 8, 4), tile), _tiled(_halves(by_block, 1)[:, :, 0], tile)


def pack_q4_k(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q4_K weights ([n, k/256 * 144] bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 of codes) in the
    kernel's layout: codes as Q4_0's per block of 32, then the scales and mins [n/tile, k/32, tile] as u8 and
    d, dmin [n/tile, k/256, 2, tile] as fp16."""
    by_block = _by_block(blocks, "Q4_K")
    values = _k_codes(by_block[:, :, 16:])
    return _codes_layout(values, tile), *_k_scales(by_block, tile)


def pack_q5_k(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q5_K weights ([n, k/256 * 176] bytes: as Q4_K's with 32 bytes of fifth bits before the codes: bit s of
    byte i is input i's of sub-block s): codes as Q4_K's, the fifth bits as Q5_0's, then as Q4_K."""
    by_block = _by_block(blocks, "Q5_K")
    n, nsb = by_block.shape[:2]
    bits = np.unpackbits(by_block[:, :, 16:48, None], axis=-1, bitorder="little")  # [n, nsb, 32 inputs, 8 sub-blocks]
    values = _k_codes(by_block[:, :, 48:]) | (bits.transpose(0, 1, 3, 2).reshape(n, nsb * 8, 32) << 4)
    return _codes_layout(values & 0x0F, tile), _fifth_bits_layout(values, tile), *_k_scales(by_block, tile)


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """A Q4_K-like super-block's 128 bytes of 4-bit codes -> [n, k/32, 32] in input order (of each 32 bytes,
    the low nibbles are sub-block 2j, the high ones 2j+1)."""
    n, nsb = qs.shape[:2]
    qs = qs.reshape(n, nsb, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb * 8, 32)


def _k_scales(by_block: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q4_K's and Q5_K's 6-bit scales and mins [n/tile, k/32, tile] as u8, d and dmin [n/tile, k/256, 2, tile]."""
    from gguf.quants import Q4_K

    n, nsb = by_block.shape[:2]
    sc, mins = Q4_K.get_scale_min(by_block[:, :, 4:16].reshape(-1, 12))
    return (
        _tiled(sc.reshape(n, nsb * 8), tile),
        _tiled(mins.reshape(n, nsb * 8), tile),
        _tiled(_halves(by_block, 2), tile),
    )


def pack_q6_k(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, ...]:
    """Q6_K weights ([n, k/256 * 210] bytes: 128 of low nibbles, 64 of high bits, 16 int8 scales, fp16 d) in
    the kernel's layout: the low 4 bits of each code as Q4_0's codes, the high 2 bits [n/tile, k/32, 2,
    tile, 4] (bits 2g..2g+1 of byte i: input 4g+i, or 16+4g+i in the second half), the scales
    [n/tile, k/16, tile] and d [n/tile, k/256, tile]."""
    by_block = _by_block(blocks, "Q6_K")
    n, nsb = by_block.shape[:2]
    ql = by_block[:, :, :128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    qh = by_block[:, :, 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = ((ql & 0x0F).reshape(n, nsb, 256) | ((qh & 0x03).reshape(n, nsb, 256) << 4)).reshape(n, nsb * 8, 32)
    high = (codes >> 4).reshape(n, nsb * 8, 2, 4, 4)  # [.., half, g, i]
    high_bytes = (high << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)).sum(axis=3, dtype=np.uint8)
    scales = by_block[:, :, 192:208].copy().view(np.int8).reshape(n, nsb * 16)
    d = by_block[:, :, 208:210].copy().view(np.float16)[:, :, 0]
    return _codes_layout(codes & 0x0F, tile), _by_groups(high_bytes, tile), _tiled(scales, tile), _tiled(d, tile)


PACKERS = {  # the GGUF types the kernels take
    "Q4_0": pack_q4_0,
    "Q4_1": pack_q4_1,
    "Q5_0": pack_q5_0,
    "Q5_1": pack_q5_1,
    "Q8_0": pack_q8_0,
    "Q4_K": pack_q4_k,
    "Q5_K": pack_q5_k,
    "Q6_K": pack_q6_k,
}


def packed_linear(ops, kind: str, blocks: np.ndarray):
    """`kind`'s blocks packed for `ops`, as a function of (x, bias, n) on that build's kernel."""
    parts = PACKERS[kind](blocks, ops.tile_width())
    linear = linear_op(ops, kind)
    return lambda x, bias, n: linear(x, *parts, bias, n)


def linear_op(ops, kind: str):
    """The kernel for weights of GGUF type `kind`: (x, *packed parts, bias, n) -> x W^T + bias."""
    return {
        "Q4_0": ops.linear_q4_0,
        "Q4_1": ops.linear_q4_1,
        "Q5_0": ops.linear_q5_0,
        "Q5_1": ops.linear_q5_1,
        "Q8_0": ops.linear_q8_0,
        "Q4_K": ops.linear_q4_k,
        "Q5_K": ops.linear_q5_k,
        "Q6_K": ops.linear_q6_k,
    }[kind]
