"""Anthropic's Messages API through the official `anthropic` SDK, against the package's real server (the
default pair): the same replies as chat completions, streamed as Anthropic's events, stop sequences, tool
use round trips, token counting, and errors in Anthropic's shape."""

import json

import anthropic
import httpx
import pytest

from tests.support.servers import API_KEY
from tests.support.tools import ANSWER_IN_WORDS, CURRENCY

pytestmark = pytest.mark.models
ASK = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
# Anthropic's current API has no sampling fields (its SDK takes none); its earlier `temperature` still works,
# and the default, as there, is 1
GREEDY = {"extra_body": {"temperature": 0}}
# The same tool in Anthropic's shape
CONVERT = {
    "name": CURRENCY["function"]["name"],
    "description": CURRENCY["function"]["description"],
    "input_schema": CURRENCY["function"]["parameters"],
}


@pytest.fixture
def claude(server) -> anthropic.Anthropic:
    """The SDK as Claude Code's users point it at a local server: a base URL, a key (sent as x-api-key) and
    a model name of Anthropic's, which the server answers with its own model."""
    return anthropic.Anthropic(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)


def test_a_message_is_the_chat_completions_reply(claude, client):
    system = "You are a terse assistant."
    message = claude.messages.create(model="claude-sonnet-4-5", system=system, messages=ASK, max_tokens=24, **GREEDY)
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "system", "content": system}, *ASK], max_tokens=24, temperature=0
    )
    (block,) = message.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert message.model == client.models.list().data[0].id and message.id.startswith("msg_")


def test_a_stream_has_anthropics_events_and_the_same_text(claude, server):
    kwargs = {"model": "claude-haiku-4-5", "messages": ASK, "max_tokens": 20, **GREEDY}
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    body = {"model": "m", "messages": ASK, "max_tokens": 20, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/messages", json=body, headers={"x-api-key": API_KEY}) as raw:
        kinds = [line.removeprefix("event: ") for line in raw.iter_lines() if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 20


def test_a_stop_sequence_ends_the_reply_and_is_named(claude):
    kwargs = {"model": "m", "messages": ASK, "max_tokens": 40, **GREEDY}
    whole = claude.messages.create(**kwargs).content[0].text
    stop = "def"
    assert stop in whole
    cut = claude.messages.create(**kwargs, stop_sequences=["no such words", stop])
    assert cut.content[0].text == whole[: whole.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with claude.messages.stream(**kwargs, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop


def test_a_tool_use_round_trip_streamed_and_not(claude):
    ask = [{"role": "user", "content": "How many euros are 250 US dollars? Use the tool."}]
    kwargs = {"model": "m", "messages": ask, "max_tokens": 120, "tools": [CONVERT], **GREEDY}
    kwargs["tool_choice"] = {"type": "any", "disable_parallel_tool_use": True}
    message = claude.messages.create(**kwargs)
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and call.name == "convert_currency" and call.input["amount"] == 250
    with claude.messages.stream(**kwargs) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(call.name, call.input)]
    result = {"type": "tool_result", "tool_use_id": call.id, "content": '{"euros": 231.5}'}
    history = [*ask, {"role": "assistant", "content": message.content}, {"role": "user", "content": [result]}]
    answer = claude.messages.create(
        model="m", system=ANSWER_IN_WORDS, messages=history, max_tokens=40, tools=[CONVERT], **GREEDY
    )
    assert answer.stop_reason == "end_turn" and "231" in answer.content[0].text


def test_an_output_format_is_a_json_schema_the_reply_follows(claude):
    schema = {"type": "object", "properties": {"language": {"type": "string"}, "year": {"type": "integer"}}}
    schema |= {"required": ["language", "year"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Python's first release, as JSON."}]
    message = claude.messages.create(
        model="m", messages=ask, max_tokens=40, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    release = json.loads(message.content[0].text)
    assert set(release) == {"language", "year"} and isinstance(release["year"], int)


def test_count_tokens_is_the_prompt_a_message_would_have(claude):
    counted = claude.messages.count_tokens(model="m", messages=ASK, system="Be brief.")
    message = claude.messages.create(model="m", messages=ASK, system="Be brief.", max_tokens=1)
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens > 0


def test_errors_have_anthropics_shape(claude, server):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError, match="image") as refused:
        claude.messages.create(model="m", messages=[{"role": "user", "content": [image]}], max_tokens=4)
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="temperature"):  # Anthropic's range was 0-1
        claude.messages.create(model="m", messages=ASK, max_tokens=4, extra_body={"temperature": 1.5})
    wrong = anthropic.Anthropic(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as unauthorized:
        wrong.messages.create(model="m", messages=ASK, max_tokens=4)
    assert unauthorized.value.body["error"]["type"] == "authentication_error"
