"""`specserve info`'s model summary: the architecture, the weight types per kind of tensor, and what torch-q4
does with the file."""

import pytest

from specserve.info import model_summary

pytestmark = pytest.mark.models


def test_a_llama_file_of_the_kernels_types_runs_as_it_is(smollm2_path):
    summary = model_summary(smollm2_path)
    assert summary["architecture"] == "llama"
    assert summary["weights"]["attn_q"] == {"Q4_1": 30} and summary["weights"]["token_embd"] == {"Q8_0": 1}
    assert summary["torch-q4"] == "runs it as it is"


def test_a_file_with_a_type_the_kernels_lack_is_requantized_for_torch_q4_only_if_asked(smollm2_path):
    from specserve.models.quantize import quantized_model

    summary = model_summary(quantized_model(smollm2_path, "Q2_K", show_progress=False))
    assert summary["weights"]["ffn_down"] == {"Q3_K": 30}  # llama.cpp's Q2_K mix, for rows of 1536
    assert summary["torch-q4"] == (
        "lacks kernels for its Q3_K weights: runs its Q4_0/Q4_0 requantization (another model) "
        "only if asked (--requantize)"
    )


def test_a_mixed_file_lists_every_type_of_a_kind(target_path):
    summary = model_summary(target_path)  # Qwen2.5-Coder-1.5B Q4_K_M: v and down alternate Q4_K and Q6_K
    assert summary["architecture"] == "qwen2" and summary["torch-q4"] == "runs it as it is"
    down = summary["weights"]["ffn_down"]
    assert down.keys() == {"Q4_K", "Q6_K"} and sum(down.values()) == 28
