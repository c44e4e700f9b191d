"""A compact decoder forward pass in PyTorch (gpt-fast style), shared by the torch backends, for the
architectures in `ARCHITECTURES` (read from the GGUF's `general.architecture`).

The backends differ only in their linear layers and embedding lookup (`torch_int8.py`: FBGEMM int8,
`torch_q4.py`: specserve's kernels); the rest of a layer runs in specserve's kernels (kernels.cpp):
RMS norm, rotary embedding with the KV-cache write, attention (whole or sliding) and SiLU or GeLU, each row
on its own. What one architecture does differently is a few fields of `Architecture`, not another forward
pass; a file this pass would compute differently from llama.cpp (another architecture, YaRN, tensors it does
not read) is refused by `read_config` with the reason, and `auto` runs it on llama.cpp.

Exactness: when the linear layers are batch-invariant too (both are), a row's logits do not depend on which
other rows share its pass, so a verify window is bitwise k one-token steps, and concurrent sequences in one
pass get bitwise what each would get alone (tests/backends/test_backends.py checks both).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import gguf
import numpy as np
import torch

from specserve import kernels
from specserve.engine.compute import on_compute_thread
from specserve.engine.model import ContextOverflowError
from specserve.models.fetch import ModelError


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """What a model family's decoder layer does beyond the shared one (pre-norm attention and gated MLP, each
    added to the residual stream; rotary positions over each head's halves; every position attended)."""

    qk_norm: bool = False  # an RMS norm over each head of q and of k before the rotation (Qwen3, Gemma 3)
    # llama.cpp's "normal" rotation (pairs of neighbouring dimensions, where its converter interleaved the
    # halves of q and k). The rows of q and k are put back in halves at load, so the one rotation kernel
    # serves: q.k is unchanged by the same permutation of both.
    interleaved_rope: bool = False
    embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
    post_norms: bool = False  # the attention's and the MLP's outputs RMS-normed before the residual add (Gemma 3)
    activation: Literal["silu", "gelu_tanh"] = "silu"
    # Layers of a sliding window (when the file gives `attention.sliding_window`): all but every n-th (Gemma 3:
    # five of six), with their own rotation base. 0: none.
    sliding_pattern: int = 0


ARCHITECTURES = {
    "qwen2": Architecture(),
    "llama": Architecture(interleaved_rope=True),  # Llama 2/3, Mistral, SmolLM2, ...
    "qwen3": Architecture(qk_norm=True),
    "gemma3": Architecture(qk_norm=True, embed_scale=True, post_norms=True, activation="gelu_tanh", sliding_pattern=6),
}


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool  # q, k and v projections have biases (Qwen2's do; the file says)
    rms_eps: float
    rope_theta: float
    rope_scale: float = 1.0  # linear position scaling (positions are divided by it), layers without a window
    layer_windows: tuple[int, ...]  # per layer: the sliding window, or 0 (every earlier position)
    rope_theta_sliding: float = 10000.0  # the rotation base of the sliding-window layers
    n_vocab: int
    n_ctx_train: int

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    def as_dict(self) -> dict:
        return asdict(self)


_REQUIRED = object()


def read_config(reader: gguf.GGUFReader, backend: str) -> DecoderConfig:
    """The model's shape from GGUF metadata (keys and defaults as llama.cpp reads them); ModelError, naming
    llama.cpp as the way out, for a model this forward pass does not compute as llama.cpp does."""
    name = Path(reader.data.filename).name

    def field(key: str, default=_REQUIRED):
        if key not in reader.fields:
            if default is _REQUIRED:
                raise ModelError(f"GGUF metadata of {name} lacks {key}")
            return default
        return reader.fields[key].contents()

    def unsupported(what: str) -> ModelError:
        return ModelError(
            f"the {backend} backend does not run {name}: {what}; "
            "run it with --target-backend llama.cpp (or --draft-backend llama.cpp)"
        )

    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise unsupported(f"its architecture is {arch!r} (this backend runs {', '.join(ARCHITECTURES)})")
    heads, kv_heads = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv", None)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise unsupported("its layers differ in head counts")
    n_heads, d_model = int(heads), int(field(f"{arch}.embedding_length"))
    head_dim = int(field(f"{arch}.attention.key_length", d_model // n_heads))
    if int(field(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise unsupported("its keys and values differ in length")
    if int(field(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise unsupported("it rotates part of each head only")
    scaling = str(field(f"{arch}.rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise unsupported(f"its rope scaling is {scaling!r}")
    if float(field(f"{arch}.final_logit_softcapping", 0.0)):
        raise unsupported("it soft-caps its logits")
    n_layers = int(field(f"{arch}.block_count"))
    names = {tensor.name for tensor in reader.tensors}
    if unknown := sorted(names - _known_tensors(ARCHITECTURES[arch], n_layers)):
        raise unsupported(f"it has tensors this forward pass does not compute ({', '.join(unknown[:3])}, ...)")
    window, pattern = int(field(f"{arch}.attention.sliding_window", 0)), ARCHITECTURES[arch].sliding_pattern
    windows = (0,) * n_layers
    if window and pattern:
        pattern = field(f"{arch}.attention.sliding_window_pattern", pattern)
        if isinstance(pattern, list):  # per layer: whether it slides
            windows = tuple(window if slides else 0 for slides in pattern)
        else:  # llama.cpp's set_swa_pattern: the last of every `pattern` layers attends to everything
            windows = tuple(window if i % int(pattern) < int(pattern) - 1 else 0 for i in range(n_layers))
    return DecoderConfig(
        architecture=arch,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(kv_heads if kv_heads is not None else n_heads),
        head_dim=head_dim,
        qkv_bias="blk.0.attn_q.bias" in names,
        rms_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rope_scale=float(field(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        layer_windows=windows,
        rope_theta_sliding=float(field(f"{arch}.rope.freq_base_swa", 10000.0)),
        n_vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        n_ctx_train=int(field(f"{arch}.context_length")),
    )


def _known_tensors(arch: Architecture, n_layers: int) -> set[str]:
    """The tensors the forward pass reads (biases of q, k and v where a file has them)."""
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    per_layer += ["attn_q_norm", "attn_k_norm"] if arch.qk_norm else []
    per_layer += ["post_attention_norm", "post_ffw_norm"] if arch.post_norms else []
    names = {f"blk.{i}.{part}.weight" for i in range(n_layers) for part in per_layer}
    names |= {f"blk.{i}.attn_{x}.bias" for i in range(n_layers) for x in "qkv"}
    return names | {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}


_ROTATED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def rope_halves(config: DecoderConfig, name: str, rows: np.ndarray) -> np.ndarray:
    """A q or k weight's (or bias's) output rows, reordered from llama.cpp's interleaved rotation pairs to
    halves where the architecture has them (`Architecture.interleaved_rope`); any other tensor as it is.
    Rows are whole blocks of a quantized matrix, so this works on GGUF's bytes too."""
    if not config.arch.interleaved_rope or not name.endswith(_ROTATED):
        return rows
    heads = rows.shape[0] // config.head_dim
    paired = rows.reshape(heads, config.head_dim // 2, 2, *rows.shape[1:])
    return np.ascontiguousarray(paired.swapaxes(1, 2)).reshape(rows.shape)


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
    qkv: Linear  # q, k, v fused (one input), with the qkv bias if any
    out: Linear
    gate_up: Linear  # gate and up fused
    down: Linear
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    window: int = 0  # attends to the last `window` positions (0: to all); the sliding layers' own rotation
    q_norm: torch.Tensor | None = None  # per head (Architecture.qk_norm)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # Architecture.post_norms
    post_ffn_norm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.out.nbytes + self.gate_up.nbytes + self.down.nbytes


def build_layers(
    config: DecoderConfig, linear: Callable[[list[str], list[str] | None], Linear], norm: Callable[[str], torch.Tensor]
) -> list[Layer]:
    """The decoder layers from GGUF tensor names: `linear(weights, biases)` stacks matrices that share an
    input (q, k, v; gate, up) into one, so a layer makes four passes over its input rows."""
    layers = []
    arch = config.arch
    for i in range(config.n_layers):
        p = f"blk.{i}."
        qkv_bias = [p + f"attn_{x}.bias" for x in "qkv"] if config.qkv_bias else None
        layers.append(
            Layer(
                qkv=linear([p + f"attn_{x}.weight" for x in "qkv"], qkv_bias),
                out=linear([p + "attn_output.weight"], None),
                gate_up=linear([p + "ffn_gate.weight", p + "ffn_up.weight"], None),
                down=linear([p + "ffn_down.weight"], None),
                attn_norm=norm(p + "attn_norm.weight"),
                ffn_norm=norm(p + "ffn_norm.weight"),
                window=config.layer_windows[i],
                q_norm=norm(p + "attn_q_norm.weight") if arch.qk_norm else None,
                k_norm=norm(p + "attn_k_norm.weight") if arch.qk_norm else None,
                post_attn_norm=norm(p + "post_attention_norm.weight") if arch.post_norms else None,
                post_ffn_norm=norm(p + "post_ffw_norm.weight") if arch.post_norms else None,
            )
        )
    return layers


class KVCache:
    """One sequence's keys and values, [layers, kv_heads, capacity, head_dim], grown by doubling so that
    many concurrent sequences cost memory in proportion to their length, not to the context size."""

    _INITIAL = 256

    def __init__(self, config: DecoderConfig, n_ctx: int):
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


class DecoderModel:
    """The weights and the forward pass, shared by every sequence of one model."""

    def __init__(
        self,
        *,
        config: DecoderConfig,
        n_ctx: int,
        layers: list[Layer],
        embed: Callable[[torch.Tensor], torch.Tensor],
        head: Linear,
        out_norm: torch.Tensor,
        embed_bytes: int,
        rope_factors: torch.Tensor | None = None,
    ):
        """`rope_factors`: what each rotation frequency is divided by (Llama 3's `rope_freqs.weight`)."""
        self.config, self.layers, self._embed, self.head, self.out_norm = config, layers, embed, head, out_norm
        self.n_ctx = min(n_ctx, config.n_ctx_train)
        self._embed_bytes = embed_bytes
        self._ops = kernels.ops()
        arch = config.arch
        self._gated = self._ops.gelu_tanh_mul if arch.activation == "gelu_tanh" else self._ops.silu_mul
        # llama.cpp scales by sqrtf(n_embd): a float32 factor
        self._embed_scale = float(np.float32(math.sqrt(config.d_model))) if arch.embed_scale else None
        self._rotation = self._rotation_table(config.rope_theta, config.rope_scale, rope_factors)
        # llama.cpp rotates the sliding-window layers at their own base, unscaled and without frequency factors
        sliding = any(config.layer_windows)
        self._sliding_rotation = self._rotation_table(config.rope_theta_sliding, 1.0, None) if sliding else None
        self._scale = 1.0 / math.sqrt(config.head_dim)

    def _rotation_table(
        self, theta: float, scale: float, factors: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n_ctx, head_dim] of every position's angles, each half of a head alike."""
        hd = self.config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        if factors is not None:
            inv_freq = inv_freq / factors.double()
        angles = torch.outer(torch.arange(self.n_ctx, dtype=torch.float64) / scale, inv_freq)
        return torch.cos(angles).float().repeat(1, 2).contiguous(), torch.sin(angles).float().repeat(1, 2).contiguous()

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
        if self._embed_scale is not None:
            x = x * self._embed_scale  # one rounding per value, whatever the rows
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(ops.rms_norm(x, layer.attn_norm, c.rms_eps))
            if layer.q_norm is not None:
                qkv = self._normed_heads(qkv, layer)
            cos, sin = self._sliding_rotation if layer.window else self._rotation
            attended = []
            for cache, start, row, m in spans:
                keys, values = cache.k[i], cache.v[i]
                q = ops.rope_and_cache(qkv[row : row + m], cos, sin, keys, values, start, c.n_heads)
                attended.append(ops.attention(q, keys, values, start, self._scale, layer.window))
            x = x + self._post(
                layer.out(torch.cat(attended) if len(attended) > 1 else attended[0]), layer.post_attn_norm
            )
            mlp = layer.down(self._gated(layer.gate_up(ops.rms_norm(x, layer.ffn_norm, c.rms_eps))))
            x = x + self._post(mlp, layer.post_ffn_norm)
        keep, counts = [], []  # rows that need logits: the head is the biggest matrix, skip rows nobody reads
        for (cache, start, row, m), (_, _, all_logits) in zip(spans, work, strict=True):
            cache.n_past = start + m
            keep.extend(range(row, row + m) if all_logits else [row + m - 1])
            counts.append(m if all_logits else 1)
        logits = self.head(ops.rms_norm(x[keep].contiguous(), self.out_norm, c.rms_eps)).numpy()
        bounds = np.cumsum([0, *counts])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _post(self, y: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """A block's output as the residual stream adds it: RMS-normed where the architecture says so."""
        return y if norm is None else self._ops.rms_norm(y, norm, self.config.rms_eps)

    def _normed_heads(self, qkv: torch.Tensor, layer: Layer) -> torch.Tensor:
        """q and k with each head RMS-normed (Architecture.qk_norm); one head is one row of the norm kernel."""
        c, rows = self.config, qkv.shape[0]
        q_width, k_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v = qkv.split([q_width, k_width, qkv.shape[1] - q_width - k_width], dim=1)
        q = self._ops.rms_norm(q.reshape(-1, c.head_dim).contiguous(), layer.q_norm, c.rms_eps).reshape(rows, -1)
        k = self._ops.rms_norm(k.reshape(-1, c.head_dim).contiguous(), layer.k_norm, c.rms_eps).reshape(rows, -1)
        return torch.cat([q, k, v], dim=1)


class DecoderBackend:
    """A model in this process (the `Model` protocol): its sequences share the weights and run together in
    one forward pass. Subclasses name the backend and load the weights (`load_model`)."""

    name = "torch"
    converted_to: str | None = None  # set by a subclass that converts the file's weights
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

    def load_model(self, model_path: Path, n_ctx: int, show_progress: bool) -> DecoderModel:
        raise NotImplementedError

    def new_sequence(self) -> DecoderSequence:
        return DecoderSequence(self)

    def memory_bytes(self) -> int:
        return self.net.memory_bytes()

    def eval_batch(self, work: list[tuple[DecoderSequence, list[int], bool]]) -> list[np.ndarray]:
        if any(seq.model is not self for seq, _, _ in work):
            raise ValueError("eval_batch needs sequences of this model")
        return self.net.forward([(seq.cache, tokens, all_logits) for seq, tokens, all_logits in work])


class DecoderSequence:
    """One sequence's KV cache on a `DecoderBackend`."""

    def __init__(self, model: DecoderBackend):
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

    def copy_prefix(self, other: DecoderSequence, length: int) -> int:
        if other.model is not self.model:
            return 0
        length = min(length, other.n_past)
        self.cache.copy_prefix(other.cache, length)
        return length
