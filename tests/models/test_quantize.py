"""Requantized drafts: llama.cpp's quantize API, cached by name, and the draft spec strings that name them."""

from pathlib import Path

import numpy as np
import pytest

from specserve.models.fetch import ModelError
from specserve.models.quantize import (
    HEAD_TYPES,
    QTYPES,
    parse_draft_spec,
    quantized_model,
    resolve_draft_spec,
    resolve_target_spec,
    weights_in_words,
)
from specserve.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET


def _load_and_eval(path: Path, tokens: list[int]) -> tuple[int, np.ndarray]:
    from specserve.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(path, n_ctx=256, n_threads=1)  # 2 threads stall badly on a busy 2-core box
    return backend.n_vocab, backend.new_sequence().eval(tokens)


REAL_TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees. "
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
)


@pytest.mark.small_model
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_smollm2_loads_and_runs(smollm2_path, isolated_cache, qtype):
    out = quantized_model(smollm2_path, qtype, show_progress=False)
    assert out == isolated_cache / "quantized" / f"{smollm2_path.stem}-{qtype}.gguf"
    assert out.read_bytes()[:4] == b"GGUF"
    assert not list(out.parent.glob("*.partial")), "the temporary file must be renamed away"
    from specserve.models.tokenizer import Tokenizer

    tokens = Tokenizer(smollm2_path).encode(REAL_TEXT)
    n_vocab, logits = _load_and_eval(out, tokens)
    source_vocab, source_logits = _load_and_eval(smollm2_path, tokens)
    assert n_vocab == source_vocab
    assert logits.shape == (len(tokens), n_vocab) and np.isfinite(logits).all()
    # Same model up to quantization noise: the next-token choice on real text mostly agrees (66 tokens:
    # 0.97-0.99 at Q8_0, 0.79 at Q4_0 on this 135M model).
    assert (logits.argmax(-1) == source_logits.argmax(-1)).mean() >= 0.6


@pytest.mark.small_model
def test_second_call_reuses_the_file(smollm2_path, isolated_cache):
    first = quantized_model(smollm2_path, "q8_0", show_progress=False)  # names are case-insensitive
    mtime = first.stat().st_mtime_ns
    second = quantized_model(smollm2_path, "Q8_0", show_progress=False)
    assert second == first and second.stat().st_mtime_ns == mtime


@pytest.mark.small_model
def test_same_name_different_source_is_requantized(smollm2_path, isolated_cache, tmp_path):
    """Two sources with the same file name must not share a cached copy."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "model.gguf").symlink_to(smollm2_path)
    (tmp_path / "b" / "model.gguf").symlink_to(quantized_model(smollm2_path, "Q4_0", show_progress=False))
    first = quantized_model(tmp_path / "a" / "model.gguf", "Q8_0", show_progress=False)
    mtime = first.stat().st_mtime_ns
    second = quantized_model(tmp_path / "b" / "model.gguf", "Q8_0", show_progress=False)
    assert second == first  # same cache name ...
    assert second.stat().st_mtime_ns != mtime  # ... but made again, from the other source
    assert "-Q4_0.gguf " in (second.parent / (second.name + ".source")).read_text()


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.small_model
def test_body_slash_head_also_requantizes_the_lm_head(smollm2_path, isolated_cache):
    """SmolLM2 ties its head to token_embd (Q8_0); "Q8_0/Q4_0" must bring that tensor to Q4_0."""
    out = quantized_model(smollm2_path, "q8_0/q4_0", show_progress=False)
    assert out.name == f"{smollm2_path.stem}-Q8_0-head-Q4_0.gguf"
    types = _tensor_types(out)
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert _tensor_types(quantized_model(smollm2_path, "Q8_0", show_progress=False))["token_embd.weight"] == "Q8_0"


def test_unknown_qtype_is_one_line_listing_valid_names(tmp_path):
    with pytest.raises(ModelError) as info:
        quantized_model(tmp_path / "x.gguf", "Q9_X")
    message = str(info.value)
    assert "\n" not in message and "Q9_X" in message
    assert all(name in message for name in QTYPES) and all(name in message for name in HEAD_TYPES)


def test_missing_or_broken_source_is_a_model_error(tmp_path, isolated_cache):
    with pytest.raises(ModelError, match="no such file"):
        quantized_model(tmp_path / "missing.gguf", "Q4_0", show_progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="failed"):
        quantized_model(bad, "Q4_0", show_progress=False)
    assert not list((isolated_cache / "quantized").glob("*")), "nothing is left behind after a failure"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("quantized:Q2_K", (DEFAULT_DRAFT, "Q2_K")),
        ("quantized:q4_0", (DEFAULT_DRAFT, "Q4_0")),
        ("self:Q2_K", ("my-target", "Q2_K")),
        ("qwen2.5-coder-0.5b@Q3_K_M", ("qwen2.5-coder-0.5b", "Q3_K_M")),
        ("/models/a@b.gguf@Q8_0", ("/models/a@b.gguf", "Q8_0")),
        ("quantized:q4_0/q4_0", (DEFAULT_DRAFT, "Q4_0/Q4_0")),
        ("self:Q2_K/Q4_K", ("my-target", "Q2_K/Q4_K")),
        (DEFAULT_DRAFT, (DEFAULT_DRAFT, None)),
        ("/models/draft.gguf", ("/models/draft.gguf", None)),
    ],
)
def test_parse_draft_spec(spec, expected):
    assert parse_draft_spec(spec, "my-target") == expected


@pytest.mark.parametrize("spec", ["quantized:Q9", "self:", "x@nope", "@Q4_0", "quantized:Q4_0/", "x@Q4_0/Q4_K_M"])
def test_bad_draft_specs(spec):
    with pytest.raises(ModelError):
        parse_draft_spec(spec, DEFAULT_TARGET)


def test_an_existing_path_with_at_sign_stays_a_path(tmp_path):
    path = tmp_path / "draft@Q4_0.gguf"
    path.write_bytes(b"GGUF")
    assert parse_draft_spec(str(path), DEFAULT_TARGET) == (str(path), None)


@pytest.mark.small_model
def test_resolve_draft_spec(smollm2_path, isolated_cache):
    """`self:` requantizes the target, `@` any model (here both the small fixture), plain specs pass through."""
    target = str(smollm2_path)
    assert resolve_draft_spec(target, target, show_progress=False) == smollm2_path
    by_self = resolve_draft_spec("self:Q8_0", target, show_progress=False)
    by_at = resolve_draft_spec(f"{target}@Q8_0", target, show_progress=False)
    assert by_self == by_at == isolated_cache / "quantized" / f"{smollm2_path.stem}-Q8_0.gguf"
    # self: on a target that is itself a requantized spec chains the two.
    chained = resolve_draft_spec("self:Q4_0", f"{target}@Q8_0", show_progress=False)
    assert chained.name == f"{smollm2_path.stem}-Q8_0-Q4_0.gguf"


@pytest.mark.small_model
def test_a_requantized_target_is_named_as_a_copy_wherever_it_runs(smollm2_path, isolated_cache):
    """`--target NAME@Q` runs a copy because it was asked for by name; its description says so, and names the
    file it came from, through a chain of copies and a backend's own conversion on load."""
    target = str(smollm2_path)
    assert resolve_target_spec(target, show_progress=False) == smollm2_path
    assert weights_in_words(smollm2_path) == f"the file's own weights ({smollm2_path.name})"
    copy = resolve_target_spec(f"{target}@Q8_0", show_progress=False)
    assert copy == isolated_cache / "quantized" / f"{smollm2_path.stem}-Q8_0.gguf"
    assert weights_in_words(copy) == (
        f"a requantized copy, not the file's own weights: {smollm2_path.name} requantized to Q8_0"
    )
    chained = resolve_target_spec(f"{target}@Q8_0@Q4_0/Q4_0", show_progress=False)
    assert weights_in_words(chained, "int8 per output channel") == (
        f"a requantized copy, not the file's own weights: {smollm2_path.name} requantized to Q8_0, "
        "then requantized to Q4_0/Q4_0, then converted to int8 per output channel on load"
    )
    with pytest.raises(ModelError, match="no model before '@'"):
        resolve_target_spec("@Q4_0")


@pytest.mark.models
def test_quantized_default_draft_shares_the_target_vocab(target_path, isolated_cache, monkeypatch):
    """The issue's `--draft quantized:...`: the default draft requantized (head too), still a valid draft."""
    from specserve.models.fetch import ensure_model
    from specserve.models.tokenizer import Tokenizer, check_compatible

    # Fetch from the real cache (no re-download), quantize into the isolated one.
    draft_source = ensure_model(DEFAULT_DRAFT, show_progress=False, root=target_path.parent.parent)
    monkeypatch.setattr("specserve.models.quantize.resolve_model", lambda spec, show_progress: draft_source)
    path = resolve_draft_spec("quantized:Q4_0/Q4_0", DEFAULT_TARGET, show_progress=False)
    assert path.parent == isolated_cache / "quantized"
    assert _tensor_types(path)["output.weight"] == "Q4_0"  # Q8_0 in the source: a third of the file
    assert path.stat().st_size < 0.75 * draft_source.stat().st_size
    check_compatible(Tokenizer(target_path), Tokenizer(path))
