"""GGUF weight blocks in the kernels' layout (kernels.cpp): tiles of `ops.tile_width()` output columns side by
side, so one vector load reads the same bytes of every column of a tile."""

from __future__ import annotations

import numpy as np
import torch

# bytes per GGUF block and where its fp16 scales sit: (block bytes, values per block, fp16 scale offsets)
LAYOUTS = {"Q4_0": (18, 32, (0,)), "Q4_K": (144, 256, (0, 2)), "Q6_K": (210, 256, (208,))}


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


def pack_q4_0(blocks: np.ndarray, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 weights as GGUF stores them, [n, k/32 * 18] bytes, in the kernel's layout (kernels.cpp): codes
    [n/tile, k/32, 4, tile, 4] and fp16 scales [n/tile, k/32, tile]."""
    n = blocks.shape[0]
    by_block = np.ascontiguousarray(blocks).reshape(n, -1, LAYOUTS["Q4_0"][0])
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


def packed_linear(ops, kind: str, blocks: np.ndarray):
    """`kind`'s blocks packed for `ops`, as a function of (x, bias, n) on that build's kernel."""
    parts = PACKERS[kind](blocks, ops.tile_width())
    linear = linear_op(ops, kind)
    return lambda x, bias, n: linear(x, *parts, bias, n)


def linear_op(ops, kind: str):
    """The kernel for weights of GGUF type `kind`: (x, *packed parts, bias, n) -> x W^T + bias."""
    return {"Q4_0": ops.linear, "Q4_K": ops.linear_q4_k, "Q6_K": ops.linear_q6_k}[kind]
