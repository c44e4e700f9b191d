"""PyTorch int8 backend: a compact Qwen2 forward pass on FBGEMM int8 GEMMs, batch-invariant.

Why this exists: on this 2-core CPU llama.cpp is compute-bound for windows of several tokens (5 tokens
cost ~3x one), while FBGEMM's int8 GEMM is memory-bound (5 rows cost ~1.2x one row), so a speculative
window can be verified for little more than a single token.

Exactness: FBGEMM's dynamic linear picks one activation scale per *tensor*, so a row's result would
depend on the other rows in the batch, and a verify window would round differently from one-token
decoding. We pin the scale instead: each row is divided by its own absmax and two sentinel columns
(+1, -1) are appended (with zero weights), so every batch spans exactly [-1, 1], quantizes with the same
parameters, accumulates in exact int32, and is rescaled per row. Attention for windows runs row by row
over exactly the keys a one-token step would see. Result: window logits are bitwise equal to one-token
logits (tests/test_backends.py checks this), so greedy speculation reproduces the target exactly.

Weights come from the GGUF file (dequantized with the `gguf` package), are requantized to int8 per output
channel and cached in the specserve cache dir, so only the first load pays for dequantization.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from specserve.backends.base import ContextOverflowError
from specserve.models.fetch import ModelError, cache_dir

# Activations are quantized to 8 bits (FBGEMM u8), so weights keep to 7 bits: AVX2's vpmaddubsw adds two
# u8*s8 products into a saturating int16, and 255*63*2 < 32767 keeps it exact.
_WEIGHT_QMAX = 63
_WINDOW_ROWWISE_MAX = 32  # windows up to this size use the row-by-row (batch-invariant) attention
_CACHE_FORMAT = 2

warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")


class Int8Linear:
    """y = x W^T + b with W int8 per output channel and x int8 per row (see module docstring)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        n_out = qweight.shape[0]
        padded = F.pad(qweight, (0, 2))  # zero weights for the two sentinel columns
        qtensor = torch._make_per_channel_quantized_tensor(
            padded, scale.double(), torch.zeros(n_out, dtype=torch.long), 0
        )
        self._packed = torch.ops.quantized.linear_prepack(qtensor, None)
        self.bias = bias
        self.nbytes = qweight.numel() + scale.numel() * 4
        self._sentinels = torch.tensor([[1.0, -1.0]]).expand(4096, 2).contiguous()

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / _WEIGHT_QMAX
        qweight = torch.round(weight / scale[:, None]).clamp(-_WEIGHT_QMAX, _WEIGHT_QMAX).to(torch.int8)
        return qweight, scale.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        sentinels = self._sentinels[:rows] if rows <= 4096 else torch.tensor([[1.0, -1.0]]).expand(rows, 2)
        y = torch.ops.quantized.linear_dynamic(torch.cat((x / amax, sentinels), dim=-1), self._packed, False)
        y.mul_(amax)
        if self.bias is not None:
            y.add_(self.bias)
        return y


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


def _read_config(reader: gguf.GGUFReader) -> Qwen2Config:
    def field(key: str):
        if key not in reader.fields:
            raise ModelError(f"GGUF metadata lacks {key}")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "qwen2":
        raise ModelError(f"the torch-int8 backend runs qwen2 models; this file is {arch!r} (use --backend llama.cpp)")
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


def _int8_cache_path(model_path: Path) -> Path:
    stat = model_path.stat()
    return cache_dir() / "int8" / f"{model_path.stem}-{stat.st_size}-v{_CACHE_FORMAT}.pt"


def _convert(model_path: Path, show_progress: bool) -> dict:
    """Dequantize every GGUF tensor, requantize matrices to int8; returns a dict that torch.save can store."""
    reader = gguf.GGUFReader(str(model_path))
    config = _read_config(reader)
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    state: dict = {"config": config.__dict__, "format": _CACHE_FORMAT}
    names = [n for n in tensors if n.endswith(".weight") or n.endswith(".bias")]
    if "output.weight" not in tensors:
        names.append("output.weight")  # tied embeddings: the head reuses token_embd
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"int8 conversion of {model_path.name}", total=len(names))
        for name in names:
            source = "token_embd.weight" if name == "output.weight" and name not in tensors else name
            value = load(source)
            if value.dim() == 2:
                state[name] = Int8Linear.quantize(value)
            else:
                state[name] = value
            progress.advance(task)
    return state


def load_int8_state(model_path: Path, show_progress: bool = True) -> dict:
    path = _int8_cache_path(model_path)
    if path.exists():
        try:
            state = torch.load(path, mmap=True, weights_only=False)
            if state.get("format") == _CACHE_FORMAT:
                return state
        except (RuntimeError, EOFError, OSError):
            pass  # a truncated cache file: rebuild it
    state = _convert(model_path, show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)
    return state


class _Layer:
    def __init__(self, state: dict, i: int, config: Qwen2Config):
        p = f"blk.{i}."
        # q, k, v share one input: one fused GEMM (same per-row activation scale, so numerically identical).
        qkv_w = torch.cat([state[p + f"attn_{x}.weight"][0] for x in "qkv"])
        qkv_s = torch.cat([state[p + f"attn_{x}.weight"][1] for x in "qkv"])
        qkv_b = torch.cat([state[p + f"attn_{x}.bias"] for x in "qkv"])
        self.qkv = Int8Linear(qkv_w, qkv_s, qkv_b)
        self.out = Int8Linear(*state[p + "attn_output.weight"], None)
        gate_up_w = torch.cat([state[p + "ffn_gate.weight"][0], state[p + "ffn_up.weight"][0]])
        gate_up_s = torch.cat([state[p + "ffn_gate.weight"][1], state[p + "ffn_up.weight"][1]])
        self.gate_up = Int8Linear(gate_up_w, gate_up_s, None)
        self.down = Int8Linear(*state[p + "ffn_down.weight"], None)
        self.attn_norm = state[p + "attn_norm.weight"].clone()
        self.ffn_norm = state[p + "ffn_norm.weight"].clone()

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.out.nbytes + self.gate_up.nbytes + self.down.nbytes


class _Int8Qwen2:
    """The weights and the forward pass, shared by every sequence of one model."""

    def __init__(self, model_path: Path, n_ctx: int, show_progress: bool):
        state = load_int8_state(model_path, show_progress)
        c = self.config = Qwen2Config(**state["config"])
        self.n_ctx = min(n_ctx, c.n_ctx_train)
        self.layers = [_Layer(state, i, c) for i in range(c.n_layers)]
        embed_q, embed_s = state["token_embd.weight"]
        self._embed_q, self._embed_s = embed_q.clone(), embed_s.clone()
        self.head = Int8Linear(*state["output.weight"], None)
        self.out_norm = state["output_norm.weight"].clone()
        hd = c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(self.n_ctx, dtype=torch.float64), inv_freq)
        self._cos = torch.cos(angles).float().repeat(1, 2)
        self._sin = torch.sin(angles).float().repeat(1, 2)
        self._scale = 1.0 / math.sqrt(hd)

    def memory_bytes(self) -> int:
        embed = self._embed_q.numel() + self._embed_s.numel() * 4
        return embed + self.head.nbytes + sum(layer.nbytes for layer in self.layers)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_eps) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # NEOX-style rotation over halves of the head dimension (what llama.cpp uses for qwen2).
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, q: torch.Tensor, cache: _KVCache, layer: int, start: int) -> torch.Tensor:
        """q: [m, n_heads, hd] at positions start..start+m-1; keys/values are already in the cache."""
        c = self.config
        m = q.shape[0]
        rep = c.n_heads // c.n_kv_heads
        keys, values = cache.k[layer], cache.v[layer]
        if m <= _WINDOW_ROWWISE_MAX:
            # Each row sees exactly the keys it would see as a one-token step: same shapes, same rounding.
            rows = []
            for i in range(m):
                end = start + i + 1
                qi = q[i].view(c.n_kv_heads, rep, c.head_dim)
                scores = torch.bmm(qi, keys[:, :end].transpose(1, 2)) * self._scale
                rows.append(torch.bmm(torch.softmax(scores, dim=-1), values[:, :end]).reshape(-1))
            return torch.stack(rows)
        end = start + m
        qg = q.view(m, c.n_kv_heads, rep, c.head_dim).permute(1, 2, 0, 3)  # [kv, rep, m, hd]
        mask = torch.ones(m, end, dtype=torch.bool).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            qg, keys[:, None, :end], values[:, None, :end], attn_mask=mask, scale=self._scale
        )
        return out.permute(2, 0, 1, 3).reshape(m, -1)

    @torch.inference_mode()
    def forward(self, work: list[tuple[_KVCache, list[int], bool]]) -> list[np.ndarray]:
        """Append tokens to several sequences at once: every row of every sequence goes through the same
        GEMMs (per-row quantization keeps each row's result independent of its neighbours); attention runs
        per sequence against its own cache. Returns per sequence logits for all rows or the last one."""
        c = self.config
        spans = []  # (cache, start, row offset, row count)
        offset = 0
        for cache, tokens, _ in work:
            start = cache.n_past
            if start + len(tokens) > self.n_ctx:
                raise ContextOverflowError(f"{start + len(tokens)} tokens exceed the context of {self.n_ctx}")
            cache.reserve(start + len(tokens))
            spans.append((cache, start, offset, len(tokens)))
            offset += len(tokens)
        ids = torch.tensor([t for _, tokens, _ in work for t in tokens], dtype=torch.long)
        positions = torch.cat([torch.arange(start, start + m) for _, start, _, m in spans])
        x = self._embed_q[ids].float() * self._embed_s[ids, None]
        cos, sin = self._cos[positions, None], self._sin[positions, None]
        rows = len(ids)
        n_q, n_kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms_norm(x, layer.attn_norm))
            q = self._rope(qkv[:, :n_q].view(rows, c.n_heads, c.head_dim), cos, sin)
            k = self._rope(qkv[:, n_q : n_q + n_kv].view(rows, c.n_kv_heads, c.head_dim), cos, sin)
            v = qkv[:, n_q + n_kv :].view(rows, c.n_kv_heads, c.head_dim)
            attended = []
            for cache, start, row, m in spans:
                cache.k[i, :, start : start + m] = k[row : row + m].transpose(0, 1)
                cache.v[i, :, start : start + m] = v[row : row + m].transpose(0, 1)
                attended.append(self._attention(q[row : row + m], cache, i, start))
            x = x + layer.out(torch.cat(attended) if len(attended) > 1 else attended[0])
            gate, up = layer.gate_up(self._rms_norm(x, layer.ffn_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        keep = []  # rows that need logits: the head is the biggest GEMM, skip rows nobody reads
        counts = []
        for (cache, start, row, m), (_, _, all_logits) in zip(spans, work, strict=True):
            cache.n_past = start + m
            keep.extend(range(row, row + m) if all_logits else [row + m - 1])
            counts.append(m if all_logits else 1)
        logits = self.head(self._rms_norm(x[keep], self.out_norm)).numpy()
        bounds = np.cumsum([0, *counts])
        result = [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return result


class _KVCache:
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

    def copy_prefix(self, other: _KVCache, length: int) -> None:
        self.reserve(length)
        self.k[:, :, :length] = other.k[:, :, :length]
        self.v[:, :, :length] = other.v[:, :, :length]
        self.n_past = length


class TorchInt8Backend:
    """One sequence (its own KV cache) on an int8 Qwen2 model; `new_sequence` adds more on the same weights."""

    name = "torch-int8"
    copies_prefix = True

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        show_progress: bool = True,
        _model: _Int8Qwen2 | None = None,
    ):
        if _model is None:
            torch.set_num_threads(n_threads or os.cpu_count() or 1)
            _model = _Int8Qwen2(Path(model_path), n_ctx, show_progress)
        self.model_path = Path(model_path)
        self._model = self.weights = _model
        self.config = _model.config
        self.n_vocab = _model.config.n_vocab
        self.n_ctx = _model.n_ctx
        self._cache = _KVCache(_model.config, _model.n_ctx)

    def new_sequence(self) -> TorchInt8Backend:
        return TorchInt8Backend(self.model_path, _model=self._model)

    @property
    def n_past(self) -> int:
        return self._cache.n_past

    def memory_bytes(self) -> int:
        return self._model.memory_bytes()

    def truncate(self, length: int) -> None:
        # Positions past n_past are never read (attention is bounded by position), so no clearing needed.
        self._cache.n_past = min(self._cache.n_past, length)

    def reset(self) -> None:
        self._cache.n_past = 0

    def copy_prefix(self, other: TorchInt8Backend, length: int) -> int:
        if other._model is not self._model:
            return 0
        length = min(length, other.n_past)
        self._cache.copy_prefix(other._cache, length)
        return length

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        return self._model.forward([(self._cache, tokens, all_logits)])[0]

    def eval_batch(self, work: list[tuple[TorchInt8Backend, list[int], bool]]) -> list[np.ndarray]:
        if any(seq._model is not self._model for seq, _, _ in work):
            raise ValueError("eval_batch needs sequences of one model")
        return self._model.forward([(seq._cache, tokens, all_logits) for seq, tokens, all_logits in work])
