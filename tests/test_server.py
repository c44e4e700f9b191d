"""The HTTP API through the official `openai` client, against a real `specserve serve` process."""

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.models
PROMPT = "Write a Python function `is_prime(n)` that returns True if n is prime."


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "specserve.cli", "serve", "--port", str(port), "--n-ctx", "2048"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not become healthy")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_chat_completion_matches_plain_decoding(client):
    messages = [{"role": "user", "content": PROMPT}]
    spec = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=32)
    plain = client.chat.completions.create(
        model=spec.model, messages=messages, max_tokens=32, extra_body={"speculation": {"method": "none"}}
    )
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.completion_tokens == 32 and spec.choices[0].finish_reason == "length"
    assert spec.model_extra["speculative"]["accepted"] > 0
    assert plain.model_extra["speculative"]["drafted"] == 0


def test_streaming_chat_concatenates_to_the_full_text(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=None, messages=messages, max_tokens=24).choices[0].message.content
    stream = client.chat.completions.create(model=None, messages=messages, max_tokens=24, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(chunks) == full and len([c for c in chunks if c]) > 1


def test_completions_with_stop_string(client):
    result = client.completions.create(model=None, prompt="def add(a, b):\n", max_tokens=40, stop=["\n\n"])
    assert "\n\n" not in result.choices[0].text and result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model": "no-such-model"}, openai.NotFoundError),
        ({"max_tokens": 0}, openai.BadRequestError),
        ({"max_tokens": 100_000}, openai.BadRequestError),
        ({"temperature": -1}, openai.BadRequestError),
        ({"n": 2}, openai.BadRequestError),
        ({"messages": []}, openai.BadRequestError),
    ],
)
def test_bad_requests_get_openai_errors_and_server_stays_up(client, server, kwargs, error):
    args = {"model": None, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    assert info.value.body and "message" in info.value.body
    assert httpx.get(f"{server}/health").status_code == 200


def test_malformed_json_is_a_400_with_an_error_body(server):
    response = httpx.post(
        f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()
