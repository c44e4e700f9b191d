"""Tool-call parsing on the model's Hermes-style text (no model: the parser alone)."""

import json

from specserve.server.tools import StreamSplit, parse, repeats_a_call

CALL = (
    '<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 250, "from": "USD", "to": "EUR"}}\n</tool_call>'
)
OTHER = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>'


def test_identical_calls_count_once_and_a_cut_off_call_is_dropped():
    text = f"{CALL}\n{CALL}\n{OTHER}\n{CALL}\n" + '<tool_call>\n{ "name": "convert_currency", "arguments":'
    content, calls = parse(text)
    assert content is None  # no markup left in the content, not even the unfinished call
    assert [c.name for c in calls] == ["convert_currency", "get_time"]
    assert json.loads(calls[0].arguments) == {"amount": 250, "from": "USD", "to": "EUR"}


def test_text_around_calls_stays_and_a_block_that_is_no_call_stays_text():
    content, calls = parse(f"Let me check.\n{CALL}")
    assert content == "Let me check." and len(calls) == 1
    content, calls = parse("<tool_call>\nnot json\n</tool_call>")
    assert calls == [] and content == "<tool_call>\nnot json\n</tool_call>"


def test_a_reply_ends_at_the_first_repeated_call():
    assert not repeats_a_call(CALL)
    assert not repeats_a_call(f"{CALL}\n{OTHER}")
    assert repeats_a_call(f"{CALL}\n{OTHER}\n{CALL}")
    spaced = CALL.replace('{"amount": 250', '{ "amount":  250')  # the same call, spaced otherwise
    assert repeats_a_call(f"{CALL}\n{spaced}")
    assert not repeats_a_call(f"{CALL}\n<tool_call>\n" + '{"name": "convert_currency", "argu')


def test_a_stream_sends_no_markup_as_content():
    split = StreamSplit()
    sent = "".join(
        split.push(piece) for piece in ["Sure", ". <tool", "_call>\n{", '"name": "get_time"', "}\n</tool_call>"]
    )
    sent += split.finish()[0]
    assert sent == "Sure. " and "<" not in sent


def test_a_reply_that_is_only_json_calls_is_those_calls_fenced_or_bare():
    call = {"name": "get_time", "arguments": {"timezone": "CET"}}
    for text in (json.dumps(call), f"```json\n{json.dumps(call)}\n```", json.dumps([call, call])):
        content, calls = parse(text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_time", call["arguments"])
        ]
    for text in ('{"name": "Ada", "age": 36}', f"Here: {json.dumps(call)}", '{"name": "f", "arguments": 3}'):
        assert parse(text) == (text, [])  # JSON that is not only calls stays text


def test_a_stream_holds_a_reply_that_begins_as_json_and_sends_it_when_it_is_no_call():
    split = StreamSplit()
    call = '```json\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n```'
    assert [split.push(piece) for piece in ("``", call[2:20], call[20:])] == ["", "", ""]
    assert split.finish()[0] == "" and split.finish()[1][0].name == "get_time"
    split = StreamSplit()
    assert split.push("  `") == "" and split.push("x` is a name") == "  `x` is a name"
    split = StreamSplit()
    answer = '{"name": "Ada", "age": 36}'
    assert split.push(answer[:5]) == split.push(answer[5:]) == "" and split.finish() == (answer, [])
