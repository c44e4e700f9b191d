"""GGUF files for tests: a real model's weights under edited metadata (gguf-py's own copier)."""

from pathlib import Path

import gguf
import numpy as np
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata


def with_metadata(source: Path, dest: Path, fields: dict[str, str | float]) -> Path:
    """`source` copied to `dest` with `fields` set (strings and float32 values), nothing else changed."""
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    typed = {
        key: MetadataDetails(gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32, value)
        for key, value in fields.items()
    }
    copy_with_new_metadata(reader, writer, typed, remove_metadata=())
    return dest


def tiny_qwen3(tokenizer_source: Path, dest: Path, seed: int = 0) -> Path:
    """A small Qwen3 of random weights (2 layers, d=128, heads of 64 whose q is wider than d, as Qwen3's are,
    per-head q/k norms) with `tokenizer_source`'s tokenizer: no Qwen3 GGUF small enough ships
    on PyPI, and random weights are enough to compare two implementations of one architecture."""
    rng = np.random.default_rng(seed)
    source = gguf.GGUFReader(str(tokenizer_source))
    n_vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    d, heads, kv_heads, hd, ff, layers = 128, 4, 2, 64, 256, 2
    writer = gguf.GGUFWriter(str(dest), arch="qwen3")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)

    def matrix(rows: int, cols: int) -> np.ndarray:  # unit-scale outputs, so logits are not all near-ties
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # small embeddings and a head of its own: the layers, not the input token, decide the logits
    writer.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, d)) / np.sqrt(d)).astype(np.float16))
    writer.add_tensor("output.weight", matrix(n_vocab, d))
    writer.add_tensor("output_norm.weight", norm(d))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", norm(d))
        writer.add_tensor(p + "attn_q.weight", matrix(heads * hd, d))
        writer.add_tensor(p + "attn_k.weight", matrix(kv_heads * hd, d))
        writer.add_tensor(p + "attn_v.weight", matrix(kv_heads * hd, d))
        writer.add_tensor(p + "attn_output.weight", matrix(d, heads * hd))
        writer.add_tensor(p + "attn_q_norm.weight", norm(hd))
        writer.add_tensor(p + "attn_k_norm.weight", norm(hd))
        writer.add_tensor(p + "ffn_norm.weight", norm(d))
        writer.add_tensor(p + "ffn_gate.weight", matrix(ff, d))
        writer.add_tensor(p + "ffn_up.weight", matrix(ff, d))
        writer.add_tensor(p + "ffn_down.weight", matrix(d, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
