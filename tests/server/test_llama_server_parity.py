"""The same requests to llama-server (built by `make llama-server` from the pinned source) on the target's GGUF,
as the served bench runs it: the same tokens, the same infill prompt, replies of the same shape (the texts may
differ where the backends' numerics do)."""

import httpx
import openai
import pytest

from specserve.bench.served import default_llama_server, llama_server
from tests.server.test_infill import LLAMA_VIM_INFILL
from tests.support.servers import API_KEY, AUTH

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def peer(target_path):
    assert default_llama_server().is_file(), "run `make llama-server` (`make test` does)"
    process = llama_server(binary=default_llama_server(), model=target_path, extra=[], name="llama-server")
    yield process.base
    process.stop()


def test_tokenize_gives_llama_servers_tokens(server, peer):
    for content in ("def f(x):\n    return x ** 2  # squares\n", "<|im_start|>user\nhé 👋<|im_end|>"):
        ours = httpx.post(f"{server}/tokenize", json={"content": content}, headers=AUTH).json()
        assert ours == httpx.post(f"{peer}/tokenize", json={"content": content}).json()


def test_infill_builds_llama_servers_prompt(server, peer):
    whole = {k: v for k, v in LLAMA_VIM_INFILL.items() if k != "response_fields"}
    theirs = httpx.post(f"{peer}/infill", json={**whole, "temperature": 0}, timeout=300).json()
    ours = httpx.post(f"{server}/infill", json=whole, headers=AUTH, timeout=300).json()
    assert ours["prompt"] == theirs["prompt"] and ours["tokens_evaluated"] == theirs["tokens_evaluated"]
    # llama.vim's request: the fields it asked for, by path, on both
    theirs = httpx.post(f"{peer}/infill", json={**LLAMA_VIM_INFILL, "temperature": 0}, timeout=300).json()
    ours = httpx.post(f"{server}/infill", json=LLAMA_VIM_INFILL, headers=AUTH, timeout=300).json()
    assert ours.keys() == theirs.keys() == set(LLAMA_VIM_INFILL["response_fields"])


def test_a_response_has_llama_servers_shape(server, peer):
    replies = []
    for base, key in ((server, API_KEY), (peer, "none")):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        replies.append(client.responses.create(model=model, input="Say hello in French.", max_output_tokens=16))
    ours, theirs = replies
    assert [item.type for item in ours.output] == [item.type for item in theirs.output if item.type != "reasoning"]
    assert ours.output_text and theirs.output_text and ours.status == theirs.status == "completed"
