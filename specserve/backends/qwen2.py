"""A compact Qwen2 forward pass in PyTorch (gpt-fast style), shared by the torch backends.

The backends differ only in their linear layers and embedding lookup (`torch_int8.py`: FBGEMM int8,
`torch_q4.py`: specserve's Q4_0 kernels); the rest of a layer runs in specserve's kernels (kernels.cpp):
RMS norm, rotary embedding with the KV-cache write, attention and SiLU, each row on its own.

Exactness: when the linear layers are batch-invariant too (both are), a row's logits do not depend on which
other rows share its pass, so a verify window is bitwise k one-token steps, and concurrent sequences in one
pass get bitwise what each would get alone (tests/backends/test_backends.py checks both).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
import torch

from specserve import kernels
from specserve.engine.compute import on_compute_thread
from specserve.engine.model import ContextOverflowError
from specserve.models.fetch import ModelError


@dataclass
class Qwen2Config:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    rms_eps: float
    rope_theta: float
    n_vocab: int
    n_ctx_train: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def read_config(reader: gguf.GGUFReader, backend: str) -> Qwen2Config:
    def field(key: str):
        if key not in reader.fields:
            raise ModelError(f"GGUF metadata lacks {key}")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "qwen2":
        raise ModelError(
            f"the {backend} backend runs qwen2 models and {Path(reader.data.filename).name} is {arch!r}: "
            "run it with --target-backend llama.cpp (or --draft-backend llama.cpp)"
        )
    return Qwen2Config(
        n_layers=int(field("qwen2.block_count")),
        d_model=int(field("qwen2.embedding_length")),
        n_heads=int(field("qwen2.attention.head_count")),
        n_kv_heads=int(field("qwen2.attention.head_count_kv")),
        rms_eps=float(field("qwen2.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("qwen2.rope.freq_base")),
        n_vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        n_ctx_train=int(field("qwen2.context_length")),
    )


def cached_state(path: Path, version: int, build: Callable[[], dict]) -> dict:
    """Tensors converted from a GGUF file, memory-mapped from `path` if it holds this format `version`,
    else built and saved there (under a temporary name first: a crash never leaves a truncated cache)."""
    if path.exists():
        try:
            state = torch.load(path, mmap=True, weights_only=False)
            if state.get("format") == version:
                return state
        except (RuntimeError, EOFError, OSError):
            pass  # a truncated cache file: build it again
    state = {**build(), "format": version}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(state, partial)
    partial.replace(path)
    return state


class Linear(Protocol):
    """y = x W^T (+ b) for x float [rows, in]; the result of each row must not depend on the other rows."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Layer:
    qkv: Linear  # q, k, v fused (one input), with the qkv bias
    out: Linear
    gate_up: Linear  # gate and up fused
    down: Linear
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.out.nbytes + self.gate_up.nbytes + self.down.nbytes


def build_layers(
    config: Qwen2Config, linear: Callable[[list[str], list[str] | None], Linear], norm: Callable[[str], torch.Tensor]
) -> list[Layer]:
    """The decoder layers from GGUF tensor names: `linear(weights, biases)` stacks matrices that share an
    input (q, k, v; gate, up) into one, so a layer makes four passes over its input rows."""
    layers = []
    for i in range(config.n_layers):
        p = f"blk.{i}."
        layers.append(
            Layer(
                qkv=linear([p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]),
                out=linear([p + "attn_output.weight"], None),
                gate_up=linear([p + "ffn_gate.weight", p + "ffn_up.weight"], None),
                down=linear([p + "ffn_down.weight"], None),
                attn_norm=norm(p + "attn_norm.weight"),
                ffn_norm=norm(p + "ffn_norm.weight"),
            )
        )
    return layers


class KVCache:
    """One sequence's keys and values, [layers, kv_heads, capacity, head_dim], grown by doubling so that
    many concurrent sequences cost memory in proportion to their length, not to the context size."""

    _INITIAL = 256

    def __init__(self, config: Qwen2Config, n_ctx: int):
        self._n_ctx = n_ctx
        self.k = self.v = torch.zeros(config.n_layers, config.n_kv_heads, 0, config.head_dim)
        self.capacity = 0
        self.n_past = 0

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = min(self._n_ctx, max(length, self._INITIAL, 2 * self.capacity))
        layers, heads, _, hd = self.k.shape
        k, v = torch.zeros(layers, heads, capacity, hd), torch.zeros(layers, heads, capacity, hd)
        k[:, :, : self.n_past] = self.k[:, :, : self.n_past]
        v[:, :, : self.n_past] = self.v[:, :, : self.n_past]
        self.k, self.v, self.capacity = k, v, capacity

    @on_compute_thread  # a large copy runs in parallel (engine/compute.py)
    def copy_prefix(self, other: KVCache, length: int) -> None:
        self.reserve(length)
        self.k[:, :, :length] = other.k[:, :, :length]
        self.v[:, :, :length] = other.v[:, :, :length]
        self.n_past = length


class Qwen2Model:
    """The weights and the forward pass, shared by every sequence of one model."""

    def __init__(
        self,
        config: Qwen2Config,
        n_ctx: int,
        layers: list[Layer],
        embed: Callable[[torch.Tensor], torch.Tensor],
        head: Linear,
        out_norm: torch.Tensor,
        embed_bytes: int,
    ):
        self.config, self.layers, self._embed, self.head, self.out_norm = config, layers, embed, head, out_norm
        self.n_ctx = min(n_ctx, config.n_ctx_train)
        self._embed_bytes = embed_bytes
        self._ops = kernels.ops()
        hd = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(self.n_ctx, dtype=torch.float64), inv_freq)
        self._cos = torch.cos(angles).float().repeat(1, 2).contiguous()
        self._sin = torch.sin(angles).float().repeat(1, 2).contiguous()
        self._scale = 1.0 / math.sqrt(hd)

    def memory_bytes(self) -> int:
        return self._embed_bytes + self.head.nbytes + sum(layer.nbytes for layer in self.layers)

    @on_compute_thread
    @torch.inference_mode()
    def forward(self, work: list[tuple[KVCache, list[int], bool]]) -> list[np.ndarray]:
        """Append tokens to several sequences at once: all their rows go through the same linear layers,
        attention runs per sequence against its own cache. Per sequence: logits of all rows or the last."""
        c, ops = self.config, self._ops
        spans = []  # (cache, start, row offset, row count)
        offset = 0
        for cache, tokens, _ in work:
            start = cache.n_past
            if start + len(tokens) > self.n_ctx:
                raise ContextOverflowError(f"{start + len(tokens)} tokens exceed the context of {self.n_ctx}")
            cache.reserve(start + len(tokens))
            spans.append((cache, start, offset, len(tokens)))
            offset += len(tokens)
        x = self._embed(torch.tensor([t for _, tokens, _ in work for t in tokens], dtype=torch.long))
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(ops.rms_norm(x, layer.attn_norm, c.rms_eps))
            attended = []
            for cache, start, row, m in spans:
                keys, values = cache.k[i], cache.v[i]
                q = ops.rope_and_cache(qkv[row : row + m], self._cos, self._sin, keys, values, start, c.n_heads)
                attended.append(ops.attention(q, keys, values, start, self._scale))
            x = x + layer.out(torch.cat(attended) if len(attended) > 1 else attended[0])
            x = x + layer.down(ops.silu_mul(layer.gate_up(ops.rms_norm(x, layer.ffn_norm, c.rms_eps))))
        keep, counts = [], []  # rows that need logits: the head is the biggest matrix, skip rows nobody reads
        for (cache, start, row, m), (_, _, all_logits) in zip(spans, work, strict=True):
            cache.n_past = start + m
            keep.extend(range(row, row + m) if all_logits else [row + m - 1])
            counts.append(m if all_logits else 1)
        logits = self.head(ops.rms_norm(x[keep].contiguous(), self.out_norm, c.rms_eps)).numpy()
        bounds = np.cumsum([0, *counts])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Qwen2Backend:
    """A Qwen2 model in this process (the `Model` protocol): its sequences share the weights and run
    together in one forward pass. Subclasses name the backend and load the weights (`load_model`)."""

    name = "torch"
    copies_prefix = True
    batch_invariant = True  # per-row activation scales, row-by-row attention (module docstring)
    batches_sequences = True  # one forward pass over every sequence's rows

    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, show_progress: bool = True):
        torch.set_num_threads(n_threads or os.cpu_count() or 1)
        self.model_path = Path(model_path)
        self.net = self.load_model(self.model_path, n_ctx, show_progress)
        self.config = self.net.config
        self.n_vocab = self.net.config.n_vocab
        self.n_ctx = self.net.n_ctx

    def load_model(self, model_path: Path, n_ctx: int, show_progress: bool) -> Qwen2Model:
        raise NotImplementedError

    def new_sequence(self) -> Qwen2Sequence:
        return Qwen2Sequence(self)

    def memory_bytes(self) -> int:
        return self.net.memory_bytes()

    def eval_batch(self, work: list[tuple[Qwen2Sequence, list[int], bool]]) -> list[np.ndarray]:
        if any(seq.model is not self for seq, _, _ in work):
            raise ValueError("eval_batch needs sequences of this model")
        return self.net.forward([(seq.cache, tokens, all_logits) for seq, tokens, all_logits in work])


class Qwen2Sequence:
    """One sequence's KV cache on a `Qwen2Backend`."""

    def __init__(self, model: Qwen2Backend):
        self.model = model
        self.cache = KVCache(model.config, model.n_ctx)

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        return self.model.net.forward([(self.cache, tokens, all_logits)])[0]

    def truncate(self, length: int) -> None:
        # Positions past n_past are never read (attention is bounded by position), so no clearing needed.
        self.cache.n_past = min(self.cache.n_past, length)

    def reset(self) -> None:
        self.cache.n_past = 0

    def copy_prefix(self, other: Qwen2Sequence, length: int) -> int:
        if other.model is not self.model:
            return 0
        length = min(length, other.n_past)
        self.cache.copy_prefix(other.cache, length)
        return length
