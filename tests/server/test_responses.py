"""OpenAI's Responses API on the package's `specserve serve`, through the clients that speak it unchanged:
the openai SDK, the OpenAI Agents SDK (on its default Responses model and on chat completions) and, for
structured output, pydantic-ai."""

import asyncio
import json

import httpx
import openai
import pydantic
import pytest
import redis

from tests.support import tools
from tests.support.servers import API_KEY, AUTH
from tests.support.tools import responses_tool

pytestmark = pytest.mark.models
CURRENCY = responses_tool(tools.CURRENCY)
ANSWER_IN_WORDS = tools.ANSWER_IN_WORDS


@pytest.fixture
def model(client) -> str:
    return client.models.list().data[0].id


def test_a_response_streams_the_documented_events_and_equals_the_whole(client, model):
    whole = client.responses.create(model=model, input="Count from one to five.", max_output_tokens=24)
    assert whole.status == "completed" and whole.output_text and whole.output[0].type == "message"
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 24
    kinds, deltas = [], ""
    with client.responses.stream(model=model, input="Count from one to five.", max_output_tokens=24) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.output_item.added", "response.output_text.delta", "response.output_text.done"} <= set(kinds)
    assert deltas == final.output_text == whole.output_text  # greedy: the target's own text either way
    cut = client.responses.create(model=model, input="Count from one to fifty.", max_output_tokens=4)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_logprobs_are_the_chat_completions_streamed_or_not(client, model):
    ask, n = "Name three colours.", 12
    include = ["message.output_text.logprobs"]
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": ask}], max_tokens=n, logprobs=True, top_logprobs=2
    )
    expected = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in chat.choices[0].logprobs.content]
    whole = client.responses.create(model=model, input=ask, max_output_tokens=n, include=include, top_logprobs=2)
    part = whole.output[0].content[0]
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in part.logprobs] == expected
    assert "".join(t.token for t in part.logprobs) == part.text == chat.choices[0].message.content
    streamed = []
    with client.responses.stream(
        model=model, input=ask, max_output_tokens=n, include=include, top_logprobs=2
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed += [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in event.logprobs]
    assert streamed == expected
    plain = client.responses.create(model=model, input=ask, max_output_tokens=n, top_logprobs=2)
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == part.text
    # a call's tokens are not the message's: a reply that is only a call has no text, so no logprobs
    ask = "How many euros are 250 US dollars? Use the tool."
    with client.responses.stream(
        model=model, input=ask, tools=[CURRENCY], tool_choice="required", max_output_tokens=200, include=include
    ) as stream:
        kinds = {event.type for event in stream}
        (call,) = stream.get_final_response().output
    assert call.type == "function_call" and "response.output_text.delta" not in kinds


def test_a_required_call_then_its_output_continues_the_stored_conversation(client, model, redis_url):
    ask = "How many euros are 250 US dollars? Use the tool."
    called = client.responses.create(
        model=model, input=ask, tools=[CURRENCY], tool_choice="required", max_output_tokens=200
    )
    (call,) = called.output  # one call: the model's repeats end the reply (server/tools.py)
    assert call.type == "function_call" and call.name == "convert_currency"
    assert json.loads(call.arguments)["amount"] == 250 and called.usage.output_tokens < 200
    # kept in the response cache's Redis (the package's server has one), for any server on it to continue
    assert redis.Redis.from_url(redis_url).exists(f"specserve:resp:conversation:{called.id}")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"euros": 231.5}'}
    answer = client.responses.create(
        model=model, previous_response_id=called.id, input=[result], tools=[CURRENCY], instructions=ANSWER_IN_WORDS
    )
    assert "231" in answer.output_text
    streamed = []
    with client.responses.stream(model=model, input=ask, tools=[CURRENCY], tool_choice="required") as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.done":
                streamed.append(json.loads(event.arguments))
            assert event.type != "response.output_text.delta"  # no tool markup as text
    assert streamed == [json.loads(call.arguments)]


def test_a_json_schema_format_gives_json_of_that_schema(client, model):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    text = {"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}}
    reply = client.responses.create(model=model, input="The capital of Norway?", text=text, max_output_tokens=40)
    assert json.loads(reply.output_text)["city"]


def test_bad_responses_requests_get_openai_errors(server, model):
    cases = [
        ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "function tools"),
        ({"input": []}, 400, "input"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{not json"}]}, 400, "JSON"),
        ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ]
    for body, status, words in cases:
        response = httpx.post(f"{server}/v1/responses", json={"model": model, **body}, headers=AUTH)
        assert response.status_code == status and words in response.json()["error"]["message"], (body, response.text)
    assert httpx.get(f"{server}/health").status_code == 200


def test_the_agents_sdk_runs_a_function_tool_on_responses_and_on_chat_completions(server, model):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no export to OpenAI's tracing endpoint
    calls = []

    @function_tool
    def convert_currency(amount: float, source: str, target: str) -> str:
        """Convert an amount of money from the source currency to the target currency (ISO codes)."""
        calls.append((amount, source, target))
        return f"{amount * 0.926:.2f} {target}"

    async def run(model_class) -> str:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        agent = Agent(
            name="assistant",
            instructions=f"Use the tool for conversions. {ANSWER_IN_WORDS}",
            tools=[convert_currency],
            model=model_class(model=model, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", max_tokens=120),
        )
        result = await Runner.run(agent, "How many euros are 250 US dollars?", max_turns=4)
        return result.final_output

    for model_class in (OpenAIResponsesModel, OpenAIChatCompletionsModel):
        calls.clear()
        final = asyncio.run(run(model_class))
        assert calls == [(250.0, "USD", "EUR")] and "231.50" in final, (model_class.__name__, calls, final)


def test_pydantic_ai_structured_output_as_a_tool_and_natively(server, model):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class City(pydantic.BaseModel):
        name: str
        country: str

    chat_model = OpenAIChatModel(model, provider=OpenAIProvider(base_url=f"{server}/v1", api_key=API_KEY))
    for output_type in (City, NativeOutput(City)):  # a final_result tool call, then response_format
        result = Agent(chat_model, output_type=output_type).run_sync(
            "The capital of Norway.", model_settings={"max_tokens": 60}
        )
        assert result.output == City(name="Oslo", country="Norway")
