"""torch-q4 backend: a decoder (backends/decoder.py) on specserve's own kernels (specserve/kernels), on the
file's own weights.

The kernels take the weight types of llama.cpp's Q4_0..Q8_0, Q4_K_M and Q5_K_M files as they are (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). So on such a file this runs the very weights llama.cpp runs,
reading as many bytes per token; activations are quantized as llama.cpp quantizes them for each type (Q8_0
per 32 values, Q8_K per 256). A file with other types (Q2_K, Q3_K, IQ*, F16) runs only where a requantized
copy is allowed (`requantize`: a draft, or a target with `--requantize`): its Q4_0 requantization, LM head
included (llama.cpp's quantize API, `models/quantize.py`), a slightly different model. A target's file is
otherwise refused, with the ways to run it.

Every block's dot product is exact in int32 and the blocks are summed in a fixed order, so windows and
concurrent sequences are bitwise what single tokens alone give.

The packed weights are cached (`cache_dir()/q4/`), so later loads only map them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.progress import Progress

from specserve import kernels
from specserve.backends.decoder import (
    DecoderBackend,
    DecoderConfig,
    DecoderModel,
    build_layers,
    cached_state,
    read_config,
    rope_halves,
)
from specserve.models.fetch import ModelError, cache_dir

_CACHE_FORMAT = 4
HEAD_AND_BODY = "Q4_0/Q4_0"  # what a file of other types is requantized to
Q = gguf.GGMLQuantizationType


@dataclass
class KernelLinear:
    """y = x W^T (+ b) on the kernel for W's type; W's parts packed for the kernel's tile width, stacked by
    output (tile-major, so matrices of one type stack by concatenation)."""

    kind: str  # the GGUF type name: one of kernels.PACKERS
    parts: tuple[torch.Tensor, ...]
    n: int
    bias: torch.Tensor | None

    def __post_init__(self) -> None:
        self._linear = kernels.linear_op(kernels.ops(), self.kind)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, *self.parts, self.bias, self.n)


@dataclass
class Concat:
    """Matrices of different types that share an input (Q4_K_M keeps some v at Q6_K or Q8_0 beside q and k)."""

    linears: list[KernelLinear]

    def __post_init__(self) -> None:
        self.nbytes = sum(linear.nbytes for linear in self.linears)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x) for linear in self.linears], dim=1)


def types_lacking_kernels(reader: gguf.GGUFReader) -> list[str]:
    """The matrices' types the kernels do not take (the embedding only needs its rows dequantized, unless it
    is the LM head too); empty: the file runs as it is."""
    names = {t.name for t in reader.tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    matrices = [t for t in reader.tensors if len(t.shape) == 2 and (t.name != "token_embd.weight" or t.name == head)]
    return sorted({t.tensor_type.name for t in matrices} - set(kernels.PACKERS))


def q4_source(model_path: Path, tile: int, show_progress: bool = True, requantize: bool = False) -> Path:
    """The file the backend runs: the file itself if the kernels take its types, else (`requantize`) its
    Q4_0 requantization; ModelError if not allowed. Reading a GGUF's metadata takes seconds (its
    vocabulary), so a packed file is not opened."""
    from specserve.models.quantize import quantized_model

    if _packed_path(model_path, tile).is_file():
        return model_path
    reader = gguf.GGUFReader(str(model_path))
    read_config(reader, "torch-q4")  # a model the backend cannot run fails here, not after a requantization
    if not (lacking := types_lacking_kernels(reader)):
        return model_path
    if not requantize:
        raise ModelError(
            f"specserve's kernels do not take {model_path.name}'s {', '.join(lacking)} weights; run the file on "
            f"llama.cpp (--target-backend llama.cpp or auto), or a requantized copy of it, which is another model "
            f"(--target {model_path}@{HEAD_AND_BODY}, or --requantize)"
        )
    return quantized_model(model_path, HEAD_AND_BODY, show_progress)


def _packed_path(source: Path, tile: int) -> Path:
    stat = source.stat()
    return cache_dir() / "q4" / f"{source.stem}-{stat.st_size}-tile{tile}-v{_CACHE_FORMAT}.pt"


def _pack(source: Path, tile: int, show_progress: bool) -> dict:
    reader = gguf.GGUFReader(str(source))
    config = read_config(reader, "torch-q4")
    state: dict = {"config": config.as_dict()}
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"packing {source.name} for specserve's kernels", total=len(reader.tensors))
        tied = "output.weight" not in {t.name for t in reader.tensors}  # the head is the embedding
        for t in reader.tensors:
            if t.name == "token_embd.weight":  # rows dequantized on lookup
                state[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(t.data)))
                if tied:
                    state["output.weight"] = (
                        t.tensor_type.name,
                        kernels.PACKERS[t.tensor_type.name](np.asarray(t.data), tile),
                        int(t.data.shape[0]),
                    )
            elif len(t.shape) == 2:
                parts = kernels.PACKERS[t.tensor_type.name](rope_halves(config, t.name, np.asarray(t.data)), tile)
                state[t.name] = (t.tensor_type.name, parts, int(t.data.shape[0]))
            else:
                state[t.name] = torch.from_numpy(rope_halves(config, t.name, np.array(t.data, dtype=np.float32)))
            progress.advance(task)
    return state


def load_q4_model(source: Path, n_ctx: int, show_progress: bool) -> DecoderModel:
    """The model of `source` (a file whose types the kernels take: `q4_source`) on the kernels."""
    tile = kernels.ops().tile_width()
    state = cached_state(_packed_path(source, tile), _CACHE_FORMAT, lambda: _pack(source, tile, show_progress))
    config = DecoderConfig(**state["config"])

    def linear(names: list[str], biases: list[str] | None) -> KernelLinear | Concat:
        groups: list[list[int]] = []  # runs of neighbouring matrices of one type: stacked into one
        for i, name in enumerate(names):
            if groups and state[names[groups[-1][-1]]][0] == state[name][0]:
                groups[-1].append(i)
            else:
                groups.append([i])
        linears = []
        for group in groups:
            members = [state[names[i]] for i in group]
            parts = tuple(torch.cat(tensors) for tensors in zip(*(m[1] for m in members), strict=True))
            bias = torch.cat([state[biases[i]] for i in group]) if biases else None
            linears.append(KernelLinear(members[0][0], parts, sum(m[2] for m in members), bias))
        return linears[0] if len(linears) == 1 else Concat(linears)

    layers = build_layers(config, linear, state.__getitem__)
    embed_type, embed_blocks = state["token_embd.weight"][0], state["token_embd.weight"][1].numpy()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        rows = gguf.quants.dequantize(embed_blocks[ids.numpy()], Q[embed_type])
        return torch.from_numpy(np.array(rows, np.float32))

    return DecoderModel(
        config=config,
        n_ctx=n_ctx,
        layers=layers,
        embed=embed,
        head=linear(["output.weight"], None),
        out_norm=state["output_norm.weight"],
        embed_bytes=embed_blocks.nbytes,
        rope_factors=state.get("rope_freqs.weight"),
    )


class TorchQ4Backend(DecoderBackend):
    """A model on specserve's kernels."""

    name = "torch-q4"

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, show_progress: bool = True, requantize: bool = False):
        """`requantize`: a file of types the kernels lack runs as its Q4_0 requantization (else ModelError)."""
        self.requantize = requantize
        super().__init__(model_path, n_ctx=n_ctx, show_progress=show_progress)

    def load_model(self, model_path: Path, n_ctx: int, show_progress: bool) -> DecoderModel:
        source = q4_source(model_path, kernels.ops().tile_width(), show_progress, self.requantize)
        self.converted_to = None if source == model_path else HEAD_AND_BODY
        return load_q4_model(source, n_ctx, show_progress)
