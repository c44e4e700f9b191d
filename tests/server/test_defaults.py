"""The defaults clients rely on without saying so: no max_tokens means until the model stops, any model name
is answered by the one model (unless --strict-model-name), pages on another origin may call the API
(--cors-origins), --api-key guards every route that runs or reveals the model, and every field other servers
take for a constrained reply is honoured. Plumbing, so the small SmolLM2 on llama.cpp serves it."""

import json
import re

import httpx
import openai
import pytest

from specserve.models.tokenizer import Tokenizer
from tests.support.servers import API_KEY, AUTH, start_server, stop_server

pytestmark = pytest.mark.small_model
SMALL = ("--target", "smollm2-135m", "--target-backend", "llama.cpp", "--draft", "none")
N_CTX = 512  # a multiple of 256: llama.cpp rounds a context up to one
NAMES = ("small-model", "house-alias")
PAGE = "http://page.example"


@pytest.fixture(scope="module")
def server(smollm2_path):
    options = ("--n-ctx", str(N_CTX), "--api-key", API_KEY, "--cors-origins", PAGE, "--served-model-name", *NAMES)
    proc, base, _ = start_server(*SMALL, *options)
    yield base
    stop_server(proc)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.mark.parametrize("asked", [{}, {"max_tokens": None}, {"max_tokens": -1}])
def test_without_max_tokens_a_reply_runs_to_the_context_end_as_length(server, smollm2_path, asked):
    never_stop = {str(t): -100 for t in Tokenizer(smollm2_path).stop_ids}
    body = {"prompt": "Once upon a time", "temperature": 0, "logit_bias": never_stop, **asked}
    reply = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=300).json()
    usage = reply["usage"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == N_CTX - usage["prompt_tokens"] > 128  # the old default cut at 128


def test_without_max_tokens_a_reply_ends_where_the_model_stops(server):
    reply = client(server).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello in one word."}]
    )
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < N_CTX // 2
    assert reply.model == NAMES[0]  # any name is answered, by the model that says its own name


def test_a_prompt_at_the_context_edge_is_answered_and_one_past_it_refused(server, smollm2_path):
    tokenizer = Tokenizer(smollm2_path)

    def prompt_of(n: int) -> str:
        text = " hello" * n
        assert len(tokenizer.encode(text, special=False)) == n
        return text

    at_limit = client(server).completions.create(model=None, prompt=prompt_of(N_CTX - 1), max_tokens=1)
    assert at_limit.usage.prompt_tokens == N_CTX - 1 and at_limit.usage.completion_tokens == 1
    never_stop = {str(t): -100 for t in tokenizer.stop_ids}
    unbounded = client(server).completions.create(model=None, prompt=prompt_of(N_CTX - 1), logit_bias=never_stop)
    assert unbounded.usage.completion_tokens == 1 and unbounded.choices[0].finish_reason == "length"
    for prompt, max_tokens in ((prompt_of(N_CTX), 1), (prompt_of(N_CTX - 1), 2)):
        with pytest.raises(openai.BadRequestError):
            client(server).completions.create(model=None, prompt=prompt, max_tokens=max_tokens)


def test_a_zero_max_tokens_is_refused(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model=None, prompt="hi", max_tokens=0)


def test_models_lists_each_served_name_with_its_context_and_metadata(server, smollm2_path):
    listed = client(server).models.list().data
    assert [m.id for m in listed] == list(NAMES)
    for model in listed:
        extra = model.model_extra
        meta = extra["meta"]
        assert (
            model.created > 0 and extra["max_model_len"] == meta["n_ctx"] == N_CTX and "own weights" in extra["weights"]
        )
        assert meta["arch"] == "llama" and meta["n_ctx_train"] == 8192 and meta["n_vocab"] == 49152
        assert meta["file"] == smollm2_path.name and meta["size"] == smollm2_path.stat().st_size


def test_a_strict_server_refuses_other_names_and_answers_its_own(smollm2_path):
    proc, base, _ = start_server(*SMALL, "--strict-model-name", "--served-model-name", *NAMES)
    try:
        strict = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="small-model"):
            strict.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
        assert strict.completions.create(model=NAMES[1], prompt="hi", max_tokens=2).model == NAMES[0]
    finally:
        stop_server(proc)


def test_a_page_on_an_allowed_origin_may_call_the_api(server):
    preflight = httpx.options(
        f"{server}/v1/chat/completions",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == PAGE
    answered = httpx.get(f"{server}/v1/models", headers={**AUTH, "Origin": PAGE})
    assert answered.headers["access-control-allow-origin"] == PAGE
    refused = httpx.get(f"{server}/v1/models", headers={"Origin": PAGE})  # a 401 the page can read
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    elsewhere = httpx.get(f"{server}/v1/models", headers={**AUTH, "Origin": "http://other.example"})
    assert "access-control-allow-origin" not in elsewhere.headers


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("POST", "/infill", {"input_prefix": "def f(", "input_suffix": ")\n", "n_predict": 1}),
        ("POST", "/tokenize", {"content": "hello"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
    ],
)
def test_every_route_that_runs_or_reveals_the_model_needs_the_key(server, method, path, body):
    bare = httpx.request(method, f"{server}{path}", json=body)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    for header in (AUTH, {"x-api-key": API_KEY}):  # OpenAI's clients send the first, Anthropic's the second
        assert httpx.request(method, f"{server}{path}", json=body, headers=header, timeout=60).status_code != 401


def test_probes_and_the_web_page_need_no_key(server):
    for path in ("/health", "/", "/dashboard", "/static/chat.js", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code == 200, path


FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def _is_flag(text: str) -> bool:
    return isinstance(json.loads(text)["ok"], bool)


@pytest.mark.parametrize(
    "asked, follows",
    [
        ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in ("red", "green")),
        ({"guided_json": FLAG}, _is_flag),
        ({"guided_json": json.dumps(FLAG)}, _is_flag),  # vLLM takes the schema as text too
        ({"structured_outputs": {"json": FLAG}}, _is_flag),
        ({"json_schema": FLAG}, _is_flag),  # llama-server's
        ({"grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),  # llama-server's GBNF
        ({"guided_grammar": "root ::= [0-9] [0-9]"}, lambda text: re.fullmatch("[0-9]{2}", text)),
        ({"structured_outputs": {"regex": "[a-c]{3}"}}, lambda text: re.fullmatch("[a-c]{3}", text)),
    ],
)
def test_every_field_that_asks_for_structure_is_honoured(server, asked, follows):
    """vLLM's and llama-server's spellings: a client that asks for a constrained reply gets one, never a
    reply that silently ignores the field."""
    body = {"prompt": "Is water wet? Answer:", "max_tokens": 24, "temperature": 0, **asked}
    reply = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=120).json()
    assert follows(reply["choices"][0]["text"]), reply


def test_two_fields_that_ask_for_structure_are_refused_by_name(server):
    body = {"prompt": "x", "max_tokens": 4, "guided_choice": ["a"], "json_schema": FLAG}
    refused = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH)
    assert refused.status_code == 400 and "guided_choice" in refused.text and "json_schema" in refused.text


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type_says(server, content_type):
    """`curl -d '{...}'` labels its body a form: Ollama's and llama-server's examples are written so."""
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2, "stream": False})
    for path in ("/v1/completions", "/api/generate"):
        reply = httpx.post(f"{server}{path}", content=body, headers=headers, timeout=60)
        assert reply.status_code == 200, (path, reply.text)
