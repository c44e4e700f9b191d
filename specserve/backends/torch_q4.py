"""torch-q4 backend: a Qwen2 model with Q4_0 weights on specserve's own kernels (specserve/kernels).

The weights are the model's GGUF file requantized to Q4_0, LM head included (llama.cpp's quantize API,
`models/quantize.py`; a Q4_0 file is used as it is): the same weights llama.cpp runs for that file, at 4.5
bits each, so one row reads about as many bytes as llama.cpp does. Activations are quantized per block of
32 as llama.cpp's Q8_0; the dot product of a block is exact in int32 and the blocks are summed in a fixed
order, so windows and concurrent sequences are bitwise what single tokens alone give.

A requantization is a slightly different model from a Q4_K_M file: `specserve bench` reports its top-1
agreement with the original on llama.cpp.

The packed weights are cached next to the requantized file (`cache_dir()/q4/`), so later loads only map them.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from rich.progress import Progress

from specserve import kernels
from specserve.backends.qwen2 import (
    Qwen2Backend,
    Qwen2Config,
    Qwen2Model,
    build_layers,
    cached_state,
    read_config,
)
from specserve.models.fetch import ModelError, cache_dir

_CACHE_FORMAT = 1
HEAD_AND_BODY = "Q4_0/Q4_0"  # what a file of another type is requantized to


class Q4Linear:
    """y = x W^T (+ b) on the Q4_0 kernel; W packed for the kernel's tile width."""

    def __init__(self, nibbles: torch.Tensor, scales: torch.Tensor, n: int, bias: torch.Tensor | None):
        self.nibbles, self.scales, self.n, self.bias = nibbles, scales, n, bias
        self.nbytes = nibbles.numel() + scales.numel() * 2
        self._linear = kernels.ops().linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.nibbles, self.scales, self.bias, self.n)


def q4_source(model_path: Path, tile: int, show_progress: bool = True) -> Path:
    """The Q4_0 file the backend runs: the file itself if every matrix is Q4_0, else its requantization.
    Reading a GGUF's metadata takes seconds (its vocabulary), so an already packed file is not opened."""
    from specserve.models.quantize import current_quantized, quantized_model

    for packed in (model_path, current_quantized(model_path, HEAD_AND_BODY)):
        if packed is not None and _packed_path(packed, tile).is_file():
            return packed
    reader = gguf.GGUFReader(str(model_path))
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    if all(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in matrices):
        return model_path
    return quantized_model(model_path, HEAD_AND_BODY, show_progress)


def _packed_path(source: Path, tile: int) -> Path:
    stat = source.stat()
    return cache_dir() / "q4" / f"{source.stem}-{stat.st_size}-tile{tile}-v{_CACHE_FORMAT}.pt"


def _pack(source: Path, tile: int, show_progress: bool) -> dict:
    reader = gguf.GGUFReader(str(source))
    config = read_config(reader, "torch-q4")
    state: dict = {"config": config.__dict__}
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"packing {source.name} for the Q4 kernels", total=len(reader.tensors))
        for t in reader.tensors:
            if t.name == "token_embd.weight":
                state[t.name] = torch.from_numpy(np.array(t.data))  # rows dequantized on lookup
            elif len(t.shape) == 2:
                if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                    raise ModelError(f"{source.name}: {t.name} is {t.tensor_type.name}, not Q4_0")
                state[t.name] = (*kernels.pack_q4_0(np.asarray(t.data), tile), int(t.data.shape[0]))
            else:
                state[t.name] = torch.from_numpy(np.array(t.data, dtype=np.float32))
            progress.advance(task)
    return state


def load_q4_model(model_path: Path, n_ctx: int, show_progress: bool) -> Qwen2Model:
    tile = kernels.ops().tile_width()
    source = q4_source(model_path, tile, show_progress)
    state = cached_state(_packed_path(source, tile), _CACHE_FORMAT, lambda: _pack(source, tile, show_progress))
    config = Qwen2Config(**state["config"])

    def linear(names: list[str], biases: list[str] | None) -> Q4Linear:
        nibbles = torch.cat([state[name][0] for name in names])
        scales = torch.cat([state[name][1] for name in names])
        bias = torch.cat([state[name] for name in biases]) if biases else None
        return Q4Linear(nibbles, scales, sum(state[name][2] for name in names), bias)

    layers = build_layers(config, linear, state.__getitem__)
    embed_blocks = state["token_embd.weight"].numpy()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        rows = embed_blocks[ids.numpy()]
        return torch.from_numpy(np.array(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q4_0), np.float32))

    head = linear(["output.weight"], None)
    return Qwen2Model(config, n_ctx, layers, embed, head, state["output_norm.weight"], embed_blocks.nbytes)


class TorchQ4Backend(Qwen2Backend):
    """One sequence on a Q4_0 Qwen2 model on specserve's kernels; `new_sequence` adds more on the same weights."""

    name = "torch-q4"

    def load_model(self, model_path: Path, n_ctx: int, show_progress: bool) -> Qwen2Model:
        return load_q4_model(model_path, n_ctx, show_progress)
