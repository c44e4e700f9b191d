"""llama-server's routes for editors and token counting, on the module's `specserve serve`: fill in the middle
(/infill in llama.vim's shape, OpenAI's `suffix` on /v1/completions), /tokenize and /detokenize; compared with
llama-server itself on the target's GGUF."""

import json

import httpx
import pytest

from tests.support.servers import AUTH

pytestmark = pytest.mark.models


def test_tokenize_and_detokenize_in_llama_servers_shapes(server):
    text = "def greet(name):\n    return f'héllo {name}' 👋"
    tokens = httpx.post(f"{server}/tokenize", json={"content": text}, headers=AUTH).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    pieces = httpx.post(f"{server}/tokenize", json={"content": text, "with_pieces": True}, headers=AUTH).json()
    assert [p["id"] for p in pieces["tokens"]] == tokens
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces["tokens"])
    assert raw.decode() == text  # the emoji's bytes span tokens: those pieces come as byte lists
    assert any(isinstance(p["piece"], list) for p in pieces["tokens"])
    back = httpx.post(f"{server}/detokenize", json={"tokens": tokens}, headers=AUTH).json()
    assert back == {"content": text}
    special = httpx.post(f"{server}/tokenize", json={"content": "<|im_end|>"}, headers=AUTH).json()["tokens"]
    assert len(special) == 1  # parse_special defaults to true, as in llama-server
    plain = {"content": "<|im_end|>", "parse_special": False}
    assert len(httpx.post(f"{server}/tokenize", json=plain, headers=AUTH).json()["tokens"]) > 1
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [-1, 10**9]}, headers=AUTH)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    assert httpx.post(f"{server}/tokenize", json={"text": "x"}, headers=AUTH).status_code == 400


# A request as llama.vim (ggml-org/llama.vim) sends it: the lines around the cursor, chunks of other files.
LLAMA_VIM_INFILL = {
    "input_prefix": "import math\n\n\ndef circle_area(radius):\n",
    "input_suffix": "\n\n\ndef circle_circumference(radius):\n    return 2 * math.pi * radius\n",
    "input_extra": [{"filename": "shapes.py", "text": "def square_area(side):\n    return side * side\n"}],
    "prompt": "    return ",
    "n_predict": 16,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/predicted_n", "truncated", "tokens_cached"],
}


def test_infill_in_llama_vims_shape_and_suffix_on_completions_agree(server):
    done = httpx.post(f"{server}/infill", json=LLAMA_VIM_INFILL, headers=AUTH, timeout=120)
    assert done.status_code == 200, done.text
    picked = done.json()  # only the fields llama.vim asked for, by path, as llama-server answers
    assert picked.keys() == set(LLAMA_VIM_INFILL["response_fields"])
    assert "radius" in picked["content"] and picked["timings/predicted_n"] >= 1
    whole = {k: v for k, v in LLAMA_VIM_INFILL.items() if k != "response_fields"}
    reply = httpx.post(f"{server}/infill", json=whole, headers=AUTH, timeout=120).json()
    assert reply["content"] == picked["content"] and reply["stop"] is True and reply["tokens_predicted"] <= 16
    assert reply["timings"]["prompt_n"] + reply["timings"]["cache_n"] == reply["tokens_evaluated"]  # new + reused
    assert reply["prompt"].startswith("<|repo_name|>myproject\n<|file_sep|>shapes.py\n")
    assert reply["prompt"].endswith(LLAMA_VIM_INFILL["input_suffix"] + "<|fim_middle|>")
    # streamed: llama-server's chunks, the same text
    chunks = []
    with httpx.stream("POST", f"{server}/infill", json={**whole, "stream": True}, headers=AUTH) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert "".join(c["content"] for c in chunks) == reply["content"] and chunks[-1]["stop"] is True
    # OpenAI's suffix on /v1/completions: the same prompt without the extra files, the same kind of reply
    fim = {"prompt": LLAMA_VIM_INFILL["input_prefix"] + "    return ", "suffix": LLAMA_VIM_INFILL["input_suffix"]}
    completion = httpx.post(f"{server}/v1/completions", json={**fim, "max_tokens": 16}, headers=AUTH).json()
    assert "radius" in completion["choices"][0]["text"]
    assert completion["usage"]["prompt_tokens"] < reply["tokens_evaluated"]  # no extra chunks
    missing = httpx.post(f"{server}/infill", json={"input_prefix": "x"}, headers=AUTH)
    assert missing.status_code == 400 and "input_suffix" in missing.json()["error"]["message"]
