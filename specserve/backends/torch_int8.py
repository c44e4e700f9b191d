"""torch-int8 backend: the decoder forward (backends/decoder.py) on torch's int8 GEMMs, batch-invariant.

FBGEMM's int8 GEMM (and oneDNN's, `torch-int8-onednn`) is efficient for many rows, so a verify window costs
little more than one row; but its weights are 8 bits, so one row reads ~1.7x the bytes of a 4-bit file.
Which of the backends wins depends on the machine: `auto` measures (backends/choose/).

Exactness: a dynamic int8 linear picks one activation scale per *tensor*, so a row's result would depend on
the other rows in the batch, and a verify window would round differently from one-token decoding. We pin
the scale instead: each row is divided by its own absmax and two sentinel columns (+1, -1) are appended
(with zero weights), so every batch spans exactly [-1, 1], quantizes with the same parameters, accumulates
in exact int32, and is rescaled per row.

Weights come from the GGUF file (dequantized with the `gguf` package), are requantized to int8 per output
channel and cached in the specserve cache dir, so only the first load pays for dequantization.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from specserve.backends.decoder import (
    DecoderBackend,
    DecoderConfig,
    DecoderModel,
    build_layers,
    cached_state,
    read_config,
    rope_halves,
)
from specserve.models.fetch import cache_dir

# Activations are quantized to 8 bits (FBGEMM u8), so weights keep to 7 bits: AVX2's vpmaddubsw adds two
# u8*s8 products into a saturating int16, and 255*63*2 < 32767 keeps it exact.
_WEIGHT_QMAX = 63
_CACHE_FORMAT = 4

warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")


class Int8Linear:
    """y = x W^T + b with W int8 per output channel and x int8 per row (see module docstring)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        n_out = qweight.shape[0]
        padded = F.pad(qweight, (0, 2))  # zero weights for the two sentinel columns
        qtensor = torch._make_per_channel_quantized_tensor(
            padded, scale.double(), torch.zeros(n_out, dtype=torch.long), 0
        )
        self._packed = torch.ops.quantized.linear_prepack(qtensor, None)  # for torch's current int8 engine
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


def _int8_cache_path(model_path: Path) -> Path:
    stat = model_path.stat()
    return cache_dir() / "int8" / f"{model_path.stem}-{stat.st_size}-v{_CACHE_FORMAT}.pt"


def _convert(model_path: Path, show_progress: bool) -> dict:
    """Dequantize every GGUF tensor, requantize matrices to int8; returns a dict that torch.save can store."""
    reader = gguf.GGUFReader(str(model_path))
    config = read_config(reader, "torch-int8")
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        return torch.from_numpy(rope_halves(config, name, values))

    state: dict = {"config": config.as_dict()}
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
    return cached_state(_int8_cache_path(model_path), _CACHE_FORMAT, lambda: _convert(model_path, show_progress))


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Pack weights for this int8 engine (a packed weight keeps its engine; the setting is process-wide)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def load_int8_model(model_path: Path, n_ctx: int, show_progress: bool, engine: str = "fbgemm") -> DecoderModel:
    state = load_int8_state(model_path, show_progress)
    with quantized_engine(engine):
        return _int8_model(state, n_ctx)


def _int8_model(state: dict, n_ctx: int) -> DecoderModel:
    config = DecoderConfig(**state["config"])

    def linear(names: list[str], biases: list[str] | None) -> Int8Linear:
        # one GEMM over a shared input: the same per-row activation scale, so numerically identical
        weight = torch.cat([state[name][0] for name in names])
        scale = torch.cat([state[name][1] for name in names])
        return Int8Linear(weight, scale, torch.cat([state[name] for name in biases]) if biases else None)

    layers = build_layers(config, linear, lambda name: state[name].clone())
    embed_q, embed_s = state["token_embd.weight"][0].clone(), state["token_embd.weight"][1].clone()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return embed_q[ids].float() * embed_s[ids, None]

    return DecoderModel(
        config=config,
        n_ctx=n_ctx,
        layers=layers,
        embed=embed,
        head=Int8Linear(*state["output.weight"], None),
        out_norm=state["output_norm.weight"].clone(),
        embed_bytes=embed_q.numel() + embed_s.numel() * 4,
        rope_factors=state.get("rope_freqs.weight"),
    )


class TorchInt8Backend(DecoderBackend):
    """An int8 model (FBGEMM GEMMs)."""

    name = "torch-int8"
    converted_to = "int8 per output channel"
    engine = "fbgemm"

    def load_model(self, model_path: Path, n_ctx: int, show_progress: bool) -> DecoderModel:
        return load_int8_model(model_path, n_ctx, show_progress, self.engine)


class TorchInt8OnednnBackend(TorchInt8Backend):
    """The same on oneDNN's int8 GEMMs (which use AVX512-VNNI and AMX where FBGEMM does not)."""

    name = "torch-int8-onednn"
    engine = "onednn"
