"""Ollama's API through the official `ollama` client, against the package's real server (the default pair):
the same replies as chat completions and completions, streamed as newline-delimited JSON, JSON format, fill
in the middle, the model listed and shown as Ollama's clients read it, and errors in Ollama's shape."""

import json

import httpx
import ollama
import pytest

from tests.support.servers import AUTH

pytestmark = pytest.mark.models
ASK = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture
def local(server) -> ollama.Client:
    """The client as Open WebUI or a script holds it: a host, a model name of Ollama's (the server answers
    any name with its model), and here the server's key."""
    return ollama.Client(host=server, headers=AUTH, timeout=300)


def test_a_chat_is_the_chat_completions_reply_streamed_or_not(local, client):
    reply = local.chat(model="llama3.2", messages=ASK, options=GREEDY, stream=False)
    chat = client.chat.completions.create(model=None, messages=ASK, max_tokens=16, temperature=0)
    assert reply.message.content == chat.choices[0].message.content and reply.message.role == "assistant"
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 16
    assert reply.prompt_eval_count == chat.usage.prompt_tokens and reply.model == chat.model
    assert reply.eval_duration > 0 and reply.total_duration >= reply.eval_duration
    chunks = list(local.chat(model="llama3.2", messages=ASK, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == reply.message.content
    assert [c.done for c in chunks].index(True) == len(chunks) - 1 and chunks[-1].eval_count == 16


def test_generate_templated_raw_and_in_the_middle(local, client):
    templated = local.generate(model="m", prompt=ASK[0]["content"], options=GREEDY)
    chat = client.chat.completions.create(model=None, messages=ASK, max_tokens=16, temperature=0)
    assert templated.response == chat.choices[0].message.content
    raw = local.generate(model="m", prompt="def add(a, b):\n", raw=True, options=GREEDY)
    plain = client.completions.create(model=None, prompt="def add(a, b):\n", max_tokens=16, temperature=0)
    assert raw.response == plain.choices[0].text
    fim = {"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n"}
    middle = local.generate(model="m", **fim, options=GREEDY)
    completion = client.completions.create(
        model=None, prompt=fim["prompt"], suffix=fim["suffix"], max_tokens=16, temperature=0
    )
    assert middle.response == completion.choices[0].text
    loaded = local.generate(model="m", prompt="")  # Ollama's way of loading a model
    assert loaded.done and loaded.done_reason == "load"


def test_json_format_gives_json(local):
    ask = [{"role": "user", "content": "Give the name and age of a fictional person as JSON."}]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    schema["required"] = ["name", "age"]
    reply = local.chat(model="m", messages=ask, format=schema, options={"temperature": 0, "num_predict": 60})
    person = json.loads(reply.message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_the_model_is_listed_and_shown_as_ollamas_clients_read_it(local, client, server):
    name = client.models.list().data[0].id
    (listed,) = local.list().models
    assert listed.model == name and listed.size > 0 and listed.details.format == "gguf"
    assert listed.details.family == "qwen2" and listed.details.quantization_level == "Q4_K_M"
    shown = local.show(name)
    assert {"completion", "tools", "insert"} <= set(shown.capabilities)
    assert shown.modelinfo["qwen2.context_length"] == 2048  # the server's context (--n-ctx), not the file's
    assert "<|im_start|>" in shown.template
    (running,) = local.ps().models
    assert running.model == name
    assert httpx.get(f"{server}/api/version", headers=AUTH).json()["version"]


def test_errors_have_ollamas_shape(local, server):
    with pytest.raises(ollama.ResponseError, match="images") as refused:
        local.chat(model="m", messages=[{**ASK[0], "images": ["AAAA"]}], stream=False)
    assert refused.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as unauthorized:
        ollama.Client(host=server).list()
    assert unauthorized.value.status_code == 401 and "API key" in unauthorized.value.error
