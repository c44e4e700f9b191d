"""The HTTP API through the official `openai` client, against a real `specserve serve` process (with a real
Redis as its response cache), plus an in-process app for the OpenTelemetry span tree."""

import concurrent.futures
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import API_KEY, AUTH, start_server, stop_server
from tests.support.tools import ANSWER_IN_WORDS, CURRENCY

pytestmark = pytest.mark.models
PROMPT = "Write a Python function `is_prime(n)` that returns True if n is prime."
TOPICS = [
    "reverse a string",
    "sum a list",
    "count vowels",
    "check a palindrome",
    "flatten a list",
    "compute a factorial",
    "merge two dicts",
    "find the maximum",
    "remove duplicates",
    "parse an int",
]


def test_health_is_503_while_loading_then_ok_and_requests_naming_no_method_get_the_servers():
    """`--speculation`: what runs for standard clients, which never send specserve's `speculation` field."""
    proc, base, statuses = start_server("--max-batch", "2", "--speculation", "none")
    try:
        assert statuses[0] == 503 and statuses[-1] == 200  # the port is open long before the models are
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        assert httpx.get(f"{base}/v1/specserve/info").json()["speculation"] == "none"
        drafted = {}
        for method in (None, "draft"):
            body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "seed": len(drafted)}
            if method is not None:
                body["speculation"] = {"method": method, "k": 4}
            reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).json()
            drafted[method] = reply["speculative"]["drafted"]
        assert drafted[None] == 0 and drafted["draft"] > 0, drafted
    finally:
        stop_server(proc)


def test_chat_completion_matches_plain_decoding(client):
    messages = [{"role": "user", "content": PROMPT}]
    # fixed k: with k=auto a 32-token reply may rightly not draft (the draft's prompt catch-up would not pay)
    spec = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=messages,
        max_tokens=32,
        extra_body={"speculation": {"method": "draft", "k": 4}},
    )
    plain = client.chat.completions.create(
        model=spec.model, messages=messages, max_tokens=32, seed=1, extra_body={"speculation": {"method": "none"}}
    )  # a seed makes it a different cache key, so this one really runs without speculation
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.completion_tokens == 32 and spec.choices[0].finish_reason == "length"
    assert spec.model_extra["speculative"]["accepted"] > 0
    assert plain.model_extra["speculative"]["drafted"] == 0


def test_suffix_drafting_over_a_quoted_function_matches_plain_decoding(client):
    code = "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative side')\n"
    messages = [{"role": "user", "content": f"```python\n{code}```\nRename `area` to `rectangle_area`. Only code."}]
    kwargs = {"model": client.models.list().data[0].id, "messages": messages, "max_tokens": 40, "user": "alice"}
    suffix = client.chat.completions.create(**kwargs, extra_body={"speculation": {"method": "suffix"}})
    plain = client.chat.completions.create(**kwargs, seed=2, extra_body={"speculation": {"method": "none"}})
    assert suffix.choices[0].message.content == plain.choices[0].message.content
    assert suffix.model_extra["speculative"]["accepted"] > 0  # the reply restates the quoted lines


def test_chat_logprobs_are_the_targets_with_or_without_speculation(client):
    kwargs = {"model": None, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24}
    kwargs |= {"logprobs": True, "top_logprobs": 3}
    spec = client.chat.completions.create(**kwargs, extra_body={"speculation": {"method": "draft", "k": 4}})
    plain = client.chat.completions.create(**kwargs, extra_body={"speculation": {"method": "none"}})
    assert spec.model_extra["speculative"]["accepted"] > 0
    content = spec.choices[0].logprobs.content
    assert len(content) == spec.usage.completion_tokens == 24
    # bitwise: the rows that verify a window are the rows plain decoding computes (batch-invariant target)
    assert [(t.token, t.logprob) for t in content] == [(t.token, t.logprob) for t in plain.choices[0].logprobs.content]
    assert "".join(t.token for t in content) == spec.choices[0].message.content
    for t in content:  # greedy: the emitted token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_traced_stream_says_which_side_produced_each_token(client):
    kwargs = {"model": None, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "stream": True}
    kwargs["logprobs"] = True
    # a fixed k: on a busy machine adaptive k may draft nothing in 24 tokens
    speculation = {"method": "draft", "k": 4, "trace": True}
    traced = list(client.chat.completions.create(**kwargs, extra_body={"speculation": speculation}))
    plain = list(client.chat.completions.create(**kwargs))
    pieces = [c for c in traced if c.choices and c.choices[0].delta.content]
    origins = [c.model_extra["specserve"]["token"] for c in pieces]
    assert {o["source"] for o in origins} == {"draft", "target"}
    for window in {o["window"]: o for o in origins if o["window"] > 0}.values():
        assert 0 <= window["accepted"] <= window["drafted"] and window["verify_ms"] > 0
    drafted = sum(o["source"] == "draft" for o in origins)
    # every accepted draft token shows, but for those past max_tokens in the last window
    assert 0 < drafted <= traced[-1].model_extra["speculative"]["accepted"]
    assert [o["logprob"] for o in origins] == [c.choices[0].logprobs.content[0].logprob for c in pieces]
    assert all("specserve" not in (c.model_extra or {}) for c in plain)  # off unless asked for
    text = "".join(c.choices[0].delta.content for c in pieces)
    assert text == "".join(c.choices[0].delta.content or "" for c in plain if c.choices)


def test_completion_logprobs_stream_as_they_come(client):
    kwargs = {"model": None, "prompt": "def fibonacci(n):\n", "max_tokens": 16, "logprobs": 2, "temperature": 0.8}
    kwargs["extra_body"] = {"speculation": {"method": "draft", "k": 4}}  # a fixed k: the same coin flips each run
    whole = client.completions.create(**kwargs, seed=5)
    tokens, logprobs, text = [], [], ""
    for chunk in client.completions.create(**kwargs, seed=5, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            lp = chunk.choices[0].logprobs
            assert lp.text_offset == [len(text) + sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
            tokens += lp.tokens
            logprobs += lp.token_logprobs
        text += chunk.choices[0].text if chunk.choices else ""
    reference = whole.choices[0].logprobs
    assert text == whole.choices[0].text and tokens == reference.tokens and logprobs == reference.token_logprobs
    assert len(tokens) == 16 and all(-9999 <= lp <= 0 for lp in logprobs)
    assert all(len(top) <= 2 for top in reference.top_logprobs)


def test_penalties_keep_speculation_exact(client):
    kwargs = {"model": None, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32}
    kwargs |= {"frequency_penalty": 0.8, "presence_penalty": 0.3, "logit_bias": {"220": -2}}
    spec = client.chat.completions.create(**kwargs, extra_body={"speculation": {"method": "draft", "k": 4}})
    plain = client.chat.completions.create(**kwargs, seed=4, extra_body={"speculation": {"method": "none"}})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.model_extra["speculative"]["accepted"] > 0


def test_structured_output_parses_into_the_clients_model(client):
    import pydantic

    class Release(pydantic.BaseModel):
        language: str
        year: int
        typed: bool

    messages = [{"role": "user", "content": "Give the first release of Python as JSON (language, year, typed)."}]
    kwargs = {"model": client.models.list().data[0].id, "messages": messages, "max_tokens": 60}
    spec = client.chat.completions.parse(**kwargs, response_format=Release)
    plain = client.chat.completions.parse(
        **kwargs, response_format=Release, seed=6, extra_body={"speculation": {"method": "none"}}
    )
    parsed = spec.choices[0].message.parsed
    assert isinstance(parsed, Release) and parsed == plain.choices[0].message.parsed
    assert spec.choices[0].message.content == plain.choices[0].message.content
    regex = client.completions.create(
        model=None, prompt="The answer is ", max_tokens=8, extra_body={"guided_regex": "(yes|no)[.!]"}
    )
    assert regex.choices[0].text in {"yes.", "yes!", "no.", "no!"}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_required_tool_call_round_trip(client):
    kwargs = {"model": None, "messages": ASK, "max_tokens": 60, "tools": [WEATHER, CLOCK], "tool_choice": "required"}
    first = client.chat.completions.create(**kwargs)
    plain = client.chat.completions.create(**kwargs, seed=8, extra_body={"speculation": {"method": "none"}})
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"].lower().startswith("paris")
    assert {c.function.name for c in calls} <= {"get_weather", "get_time"}
    assert [c.function.model_dump() for c in plain.choices[0].message.tool_calls] == [
        c.function.model_dump() for c in calls
    ]
    single = client.chat.completions.create(**kwargs, parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1
    results = {"get_weather": '{"temperature_c": 18, "sky": "cloudy"}', "get_time": '{"time": "14:05"}'}
    # Without a system prompt that says so, this 1.5B model answers tool results by restating its calls (and
    # after two results, even with one).
    answer_in_words = {"role": "system", "content": ANSWER_IN_WORDS}
    (call,) = single.choices[0].message.tool_calls
    history = [
        answer_in_words,
        *ASK,
        single.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": results[call.function.name]},
    ]
    answer = client.chat.completions.create(model=None, messages=history, max_tokens=40, tools=[WEATHER, CLOCK])
    assert answer.choices[0].finish_reason == "stop" and "18" in answer.choices[0].message.content


def streamed_calls(client, kwargs: dict) -> tuple[str, list[tuple[str, str]]]:
    """The streamed reply's content and its calls (name, arguments)."""
    content, calls = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            calls += chunk.choices[0].delta.tool_calls or []
    return content, [(c.function.name, c.function.arguments) for c in calls]


def test_an_auto_call_the_model_writes_as_json_is_a_call_streamed_or_not(client):
    """Qwen2.5-Coder under tool_choice "auto" writes its call as a JSON object (fenced or bare), not in
    <tool_call> tags: it is the call, not text."""
    kwargs = {"model": None, "messages": ASK, "max_tokens": 60, "tools": [WEATHER, CLOCK], "tool_choice": "auto"}
    reply = client.chat.completions.create(**kwargs)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and not reply.choices[0].message.content
    assert call.function.name == "get_weather" and "paris" in call.function.arguments.lower()
    assert streamed_calls(client, kwargs) == ("", [(call.function.name, call.function.arguments)])


def test_a_required_call_stops_instead_of_repeating_to_max_tokens(client):
    """The 1.5B model repeats its call until max_tokens; the reply ends at the first repeat and holds the call
    once, with no markup in the content, streamed or not."""
    ask = [{"role": "user", "content": "How many euros are 250 US dollars? Use the tool."}]
    kwargs = {"model": None, "messages": ask, "max_tokens": 200, "tools": [CURRENCY], "tool_choice": "required"}
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["convert_currency"]
    assert json.loads(choice.message.tool_calls[0].function.arguments)["amount"] == 250
    assert reply.usage.completion_tokens < 200
    whole = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert streamed_calls(client, kwargs) == ("", whole)


def test_a_named_tool_is_called_and_streams_as_a_delta(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    kwargs = {"model": None, "messages": ASK, "max_tokens": 60, "tools": [WEATHER, CLOCK], "tool_choice": choice}
    kwargs["parallel_tool_calls"] = False
    whole = client.chat.completions.create(**kwargs)
    deltas, finish = [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "get_time" and "timezone" in json.loads(call.function.arguments)
    assert finish == "tool_calls" and [(d.function.name, d.function.arguments) for d in deltas] == [
        (call.function.name, call.function.arguments)
    ]


def test_langchain_chat_model_with_tools_and_structured_output(server):
    import pydantic
    from langchain_openai import ChatOpenAI

    class City(pydantic.BaseModel):
        name: str
        country: str

    model = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY).models.list().data[0].id
    llm = ChatOpenAI(base_url=f"{server}/v1", api_key=API_KEY, model=model, max_tokens=48, temperature=0)
    assert llm.invoke("Say hello in French.").content
    assert "".join(chunk.content for chunk in llm.stream("Count from one to five."))
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert called.tool_calls[0]["name"] == "get_weather" and "city" in called.tool_calls[0]["args"]
    city = llm.with_structured_output(City, method="json_schema").invoke("The capital of Norway, as JSON.")
    assert isinstance(city, City) and city.name


def test_content_parts_read_as_their_text(client):
    kwargs = {"model": None, "max_tokens": 8}
    parts = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "primary colours."}]
    as_parts = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": parts}])
    as_text = client.chat.completions.create(
        **kwargs, seed=3, messages=[{"role": "user", "content": "Name three primary colours."}]
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_streaming_chat_concatenates_to_the_full_text(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=None, messages=messages, max_tokens=24)
    stream = client.chat.completions.create(model=None, messages=messages, max_tokens=24, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(chunks) == full.choices[0].message.content and len([c for c in chunks if c]) > 1


def test_completions_with_stop_string(client):
    result = client.completions.create(model=None, prompt="def add(a, b):\n", max_tokens=40, stop=["\n\n"])
    assert "\n\n" not in result.choices[0].text and result.choices[0].finish_reason == "stop"


def test_repeated_greedy_request_is_served_from_redis_and_still_streams(client, redis_url):
    import redis

    prompt = "def fizzbuzz(n):\n"
    first = client.completions.create(model=None, prompt=prompt, max_tokens=20)
    again = client.completions.create(model=None, prompt=prompt, max_tokens=20)
    assert again.choices[0].text == first.choices[0].text
    assert again.model_extra["speculative"].get("cached") is True
    assert not first.model_extra["speculative"].get("cached")
    assert redis.Redis.from_url(redis_url).keys("specserve:resp:*")  # it is in the real Redis
    pieces = [
        c.choices[0].text for c in client.completions.create(model=None, prompt=prompt, max_tokens=20, stream=True)
    ]
    assert "".join(pieces) == first.choices[0].text and len([p for p in pieces if p]) > 1


def _stream_text(server: str, topic: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=600)
    messages = [{"role": "user", "content": f"Write a Python function to {topic}."}]
    # seed: a distinct cache key per call, so every request is really generated (greedy all the same)
    stream = client.chat.completions.create(
        model=None, messages=messages, max_tokens=max_tokens, stream=True, seed=int(time.monotonic_ns() % 2**31)
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length")
    return "".join(pieces)


def test_concurrent_streams_equal_each_request_alone(server):
    """Batched decoding is exact: every stream completes with the text the same request gets alone; three
    times the batch (8) at once, so batches form, change as requests end, and some wait their turn."""
    requests = [(TOPICS[i % len(TOPICS)], 12 + i % 3) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _stream_text(server, *r), requests))
    alone = {r: _stream_text(server, *r) for r in sorted(set(requests))}
    assert [alone[r] for r in requests] == together
    assert httpx.get(f"{server}/health").json()["in_flight"] == 0


def test_over_the_queue_bound_requests_get_429_with_retry_after(server):
    def post(i: int) -> httpx.Response:
        body = {"prompt": f"# {i}\n", "max_tokens": 4, "temperature": 0.5, "seed": i}
        return httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        responses = list(pool.map(post, range(80)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    busy = next(r for r in responses if r.status_code == 429)
    # whole seconds, within what the openai SDK honours (it falls back to its own backoff past 120)
    assert 1 <= int(busy.headers["retry-after"]) <= 60 and busy.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses if r.status_code == 200)


def test_edge_inputs_are_answered_correctly_or_with_a_4xx(client):
    """(The context's edges: tests/server/test_defaults.py, on a small model.)"""
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=None, prompt="", max_tokens=4)
    blank = client.completions.create(model=None, prompt="   \n\t ", max_tokens=3)
    assert blank.usage.completion_tokens <= 3 and blank.choices[0].finish_reason in ("stop", "length")
    one = client.completions.create(model=None, prompt="def add(a, b):", max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"

    # stop strings that are prefixes of each other: the reply ends where the first of them begins
    whole = client.completions.create(model=None, prompt="def add(a, b):\n", max_tokens=24, seed=9).choices[0].text
    cut = client.completions.create(model=None, prompt="def add(a, b):\n", max_tokens=24, stop=["return a", "ret"])
    assert "ret" in whole and cut.choices[0].text == whole[: whole.index("ret")]
    assert cut.choices[0].finish_reason == "stop"

    # characters of several bytes split across tokens stream whole, never as replacement characters
    messages = [{"role": "user", "content": "Write 'good morning' in Japanese, Chinese and Korean, with an emoji."}]
    kwargs = {"model": None, "messages": messages, "max_tokens": 40}
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text and "\ufffd" not in text and any(ord(ch) > 0x3000 for ch in text)


def test_client_disconnect_cancels_the_stream(server):
    body = {"prompt": "def long_function():\n", "max_tokens": 1000, "stream": True, "temperature": 0.7}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 4:
                break  # leave mid-stream
    deadline = time.time() + 30
    while httpx.get(f"{server}/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server}/health").json()["in_flight"] == 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_tokens": 0}, openai.BadRequestError),
        ({"max_tokens": 100_000}, openai.BadRequestError),
        ({"temperature": -1}, openai.BadRequestError),
        ({"n": 0}, openai.BadRequestError),
        ({"messages": []}, openai.BadRequestError),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, openai.BadRequestError),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError),
        ({"extra_body": {"speculation": {"method": "psychic"}}}, openai.BadRequestError),
        ({"extra_body": {"speculation": {"k": -3}}}, openai.BadRequestError),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            openai.BadRequestError,
        ),
        ({"top_logprobs": 2}, openai.BadRequestError),  # without logprobs: true
        ({"logit_bias": {"99999999": 5}}, openai.BadRequestError),  # not a token of the vocabulary
        ({"presence_penalty": 3}, openai.BadRequestError),
        ({"extra_body": {"guided_regex": "(unclosed"}}, openai.BadRequestError),
        ({"tool_choice": "required"}, openai.BadRequestError),  # without tools
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            openai.BadRequestError,
        ),
        ({"response_format": {"type": "json_schema"}}, openai.BadRequestError),
        ({"logprobs": True, "top_logprobs": 50}, openai.BadRequestError),
    ],
)
def test_bad_requests_get_openai_errors_and_server_stays_up(client, server, kwargs, error):
    args = {"model": None, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    assert info.value.body and "message" in info.value.body
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize(
    "content, status",
    [
        (b"{not json", 400),
        (b'{"prompt": "x", "max_tokens": "ten"}', 400),
        (b'{"prompt": 5}', 400),
        (b'{"max_tokens": 3}', 400),
        (b"[1, 2]", 400),
        (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413),
    ],
)
def test_malformed_bodies_get_json_errors(server, content, status):
    headers = {"content-type": "application/json", **AUTH}
    response = httpx.post(f"{server}/v1/completions", content=content, headers=headers)
    assert response.status_code == status and response.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_v1_routes_need_the_api_key_and_health_does_not(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.body["code"] == "invalid_api_key"
    bare = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").status_code == 200  # probes need no key
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    assert families["specserve_rejected_api_keys"].samples[0].value >= 2


def test_unknown_route_is_a_json_404(server):
    response = httpx.get(f"{server}/v1/nothing", headers=AUTH)
    assert response.status_code == 404 and "error" in response.json()


def test_metrics_parse_and_count_the_work(client, server):
    client.completions.create(model=None, prompt="def square(x):\n", max_tokens=16, seed=7)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}

    def value(name: str, sample_suffix: str = "") -> float:
        return sum(s.value for s in families[name].samples if s.name == name + sample_suffix)

    for name in ("specserve_drafted_tokens", "specserve_accepted_tokens", "specserve_generated_tokens"):
        assert value(name, "_total") > 0, name
    assert value("specserve_draft_latency_ms", "_count") > 0
    assert value("specserve_verifier_latency_ms", "_count") > 0
    assert 0 < value("specserve_acceptance_rate") <= 1
    assert value("specserve_tokens_per_second") > 0
    assert value("specserve_position_accepted", "_total") > 0
    assert value("specserve_requests", "_total") > 0
    assert "specserve_queue_depth" in families
    assert value("specserve_cache_hits", "_total") > 0 and value("specserve_cache_misses", "_total") > 0
    # latencies per request, prompt tokens, windows; the speculation counters under vLLM's names agree
    for name in ("specserve_time_to_first_token_seconds", "specserve_e2e_request_latency_seconds"):
        assert value(name, "_count") > 0, name
    assert value("specserve_time_per_output_token_seconds", "_count") > 0
    assert value("specserve_prompt_tokens", "_total") > 0 and value("specserve_verify_windows", "_total") > 0
    assert value("vllm:spec_decode_num_draft_tokens", "_total") == value("specserve_drafted_tokens", "_total")
    assert value("vllm:spec_decode_num_accepted_tokens", "_total") == value("specserve_accepted_tokens", "_total")
    per_position = value("vllm:spec_decode_num_accepted_tokens_per_pos", "_total")
    assert per_position == value("vllm:spec_decode_num_accepted_tokens", "_total")
    assert 0 < value("vllm:spec_decode_num_drafts", "_total") <= value("specserve_verify_windows", "_total")
    model = client.models.list().data[0].id
    assert {s.labels["model_name"] for s in families["vllm:spec_decode_num_drafts"].samples} == {model}


def test_n_choices_are_the_replies_to_seeds_in_a_row_streamed_or_not(client):
    kwargs = {"model": None, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10}
    # Plain decoding: a sampled reply follows the target's distribution whatever was drafted, but which sample
    # a seed gives depends on the drafts, and suffix drafting draws on earlier replies (these singles' among
    # them), so with it a seed's reply depends on what the server answered before.
    kwargs |= {"temperature": 1.0, "extra_body": {"speculation": {"method": "none"}}}
    singles = [client.chat.completions.create(**kwargs, seed=11 + i) for i in range(3)]
    texts = [s.choices[0].message.content for s in singles]
    many = client.chat.completions.create(**kwargs, n=3, seed=11)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == texts and len(set(texts)) > 1
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, n=3, seed=11, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs, n=17)


def test_n_choices_prefill_a_long_prompt_once(client, server):
    """Choices after the first copy its prompt KV (whole 128-token chunks) instead of evaluating it again."""

    def reused() -> float:
        text = httpx.get(f"{server}/metrics", headers=AUTH).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in families["specserve_prefix_reused_tokens"].samples if s.name.endswith("_total"))

    backend = httpx.get(f"{server}/v1/specserve/info", headers=AUTH).json()["target_backend"]
    if backend == "llama.cpp":  # `auto` picked it on this CPU: its sequences do not copy KV
        pytest.skip("the target runs on llama.cpp, whose sequences do not copy prefixes")
    words = " ".join(f"item{i}" for i in range(300))  # a prompt no earlier request shares
    messages = [{"role": "user", "content": f"Which item comes after item41 in: {words}?"}]
    before = reused()
    many = client.chat.completions.create(model=None, messages=messages, max_tokens=4, n=3, temperature=1.0, seed=1)
    assert len(many.choices) == 3 and many.usage.prompt_tokens > 256
    assert reused() - before >= 2 * 256  # choices 1 and 2: at least two whole chunks each


def test_ignore_eos_stop_token_ids_and_min_p(client, server):
    short = {"messages": [{"role": "user", "content": "Answer with one word: is 7 prime?"}], "max_tokens": 24}
    ended = client.chat.completions.create(model=None, **short)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 24
    going = client.chat.completions.create(model=None, **short, extra_body={"ignore_eos": True})
    assert going.choices[0].finish_reason == "length" and going.usage.completion_tokens == 24
    assert going.choices[0].message.content.startswith(ended.choices[0].message.content)

    long = {"model": None, "prompt": "def bubble_sort(items):\n", "max_tokens": 32}
    whole = client.completions.create(**long).choices[0].text
    tokens = httpx.post(f"{server}/tokenize", json={"content": whole}, headers=AUTH).json()["tokens"]
    cut = client.completions.create(**long, extra_body={"stop_token_ids": [tokens[4]]}).choices[0]
    assert cut.finish_reason == "stop" and whole.startswith(cut.text) and len(cut.text) < len(whole)

    # min_p = 1 keeps only the most likely token: sampling then is greedy decoding, whatever the seed
    sampled = client.completions.create(**long, temperature=1.0, seed=3, extra_body={"min_p": 1.0}).choices[0].text
    assert sampled == whole
    assert client.completions.create(**long, temperature=1.0, seed=3).choices[0].text != whole


def test_fields_a_server_does_not_know_are_accepted_and_named_and_unhonourable_ones_refused(server):
    body = {"prompt": "1, 2, 3,", "max_tokens": 4, "store": True, "metadata": {"a": "b"}, "frobnicate": 1}
    response = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
    assert response.headers["x-specserve-ignored-fields"] == "frobnicate, metadata, store"
    for field, value in [("best_of", 3), ("functions", [{"name": "f"}]), ("echo", True), ("modalities", ["audio"])]:
        refused = httpx.post(f"{server}/v1/completions", json={"prompt": "x", field: value}, headers=AUTH)
        assert refused.status_code == 400 and field in refused.json()["error"]["message"], field
    one = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 1, "best_of": 1}, headers=AUTH)
    assert one.status_code == 200
    assert httpx.get(f"{server}/health").status_code == 200


def test_request_span_has_draft_verify_accept_children(runtime):
    """In-process app with the OpenTelemetry SDK's in-memory exporter."""
    from fastapi.testclient import TestClient
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from specserve.server.app import create_app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    with TestClient(create_app(runtime)) as http:
        body = {"prompt": "def add(a, b):\n", "max_tokens": 12, "speculation": {"method": "draft", "k": 3}}
        assert http.post("/v1/completions", json=body).status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "specserve.request"]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id]
    names = {s.name for s in children}
    assert {"prefill", "draft", "verify", "accept"} <= names
    assert all(request.start_time <= s.start_time <= s.end_time <= request.end_time for s in children)
    assert request.attributes["specserve.completion_tokens"] == 12


def test_alert_rules_parse_and_watch_acceptance():
    import shutil

    import yaml

    path = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    low = next(r for r in rules if r["alert"] == "SpecserveLowAcceptance")
    assert low["expr"].replace(" ", "") == "specserve_acceptance_rate<0.6" and low["for"] == "5m"
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "rules", str(path)], check=True)


def test_the_grafana_dashboard_queries_only_metrics_the_server_has(server, client):
    client.chat.completions.create(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "specserve.json"
    exprs = [t["expr"] for panel in json.loads(path.read_text())["panels"] for t in panel["targets"]]
    queried = {name for e in exprs for name in re.findall(r"\b((?:specserve_|vllm:)[\w:]+)", e)}
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert len(queried) >= 18 and queried <= exposed, queried - exposed
    assert {"vllm:spec_decode_num_drafts_total", "specserve_time_to_first_token_seconds_bucket"} <= queried


def test_metrics_can_be_put_behind_the_api_key(runtime):
    from fastapi.testclient import TestClient

    from specserve.config import ServerConfig
    from specserve.server.app import create_app

    with TestClient(create_app(runtime, ServerConfig(api_key="k1", metrics_need_key=True))) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert http.get("/health").status_code == 200
