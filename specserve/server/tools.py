"""Tool calling in the chat template's own format (Hermes-style, as Qwen2.5 writes it, and vLLM's `hermes`
parser reads it): the template lists the tools; the model answers with

    <tool_call>
    {"name": "<function>", "arguments": {...}}
    </tool_call>

blocks, which become `message.tool_calls`. With `tool_choice` "required" or a named function, the reply is
constrained to such blocks by a grammar (engine/grammar.py), each call's arguments to its function's JSON
schema; with "auto" the model decides and its calls are parsed; with "none" the template gets no tools.

A small model often repeats its call until max_tokens: the reply ends at the first call that repeats an
earlier one (`repeats_a_call`, the scheduler checks it after each step), identical calls count once, and a
call cut off by max_tokens is dropped. Tool markup never reaches `content`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from specserve.engine.grammar import lark_grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_BARE_STARTS = ("{", "[", "```")  # how a reply that may be calls written as JSON begins


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    @property
    def input(self) -> dict:
        """The arguments as an object (Anthropic's `input`, Ollama's `arguments`); {} where they are not one."""
        try:
            arguments = json.loads(self.arguments)
        except json.JSONDecodeError:
            return {}
        return arguments if isinstance(arguments, dict) else {}

    def body(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def call_grammar(functions: list[dict], open_token: int, close_token: int, parallel: bool = True) -> str:
    """A Lark grammar for one call of these functions, or several with `parallel` (OpenAI `function`
    objects: name, parameters); `<tool_call>` and `</tool_call>` are the tokens the model writes them as."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    start = 'start: call ("\\n" call)*\n' if parallel else "start: call\n"
    call = f'call: <[{open_token}]> "\\n" body "\\n" <[{close_token}]>\n'
    lark = start + call + f"body: %json {json.dumps(schema)}\n"
    return lark_grammar(lark)


def repeats_a_call(text: str) -> bool:
    """Whether the last complete call in the text is the same call as an earlier one (as JSON: spacing and
    key order aside)."""
    blocks = [_canonical(m.group(1)) for m in _CALL.finditer(text)]
    return len(blocks) > 1 and blocks[-1] in blocks[:-1]


def _canonical(block: str) -> str:
    try:
        return json.dumps(json.loads(block), sort_keys=True)
    except json.JSONDecodeError:
        return block


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """The reply's text outside its tool calls (None if nothing is left), and the distinct calls. A block
    that is not a JSON object with a name stays in the text, as vLLM's parser leaves it; an unclosed block at
    the end (max_tokens cut the call off) is dropped. A reply that is nothing but calls written as JSON, bare
    or in a ```json fence (Qwen2.5-Coder's way under tool_choice "auto"), is those calls."""
    calls: list[ToolCall] = []
    seen: set[tuple[str, str]] = set()

    def add(call: object) -> bool:
        """Take `call` if it is a call (an object with a name and arguments); say whether it was."""
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return False
        arguments = call.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        if (call["name"], arguments) not in seen:
            seen.add((call["name"], arguments))
            calls.append(ToolCall(call["name"], arguments, f"call_{uuid.uuid4().hex[:24]}"))
        return True

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        return "" if add(call) else match.group(0)

    content = _CALL.sub(take, text)
    if (cut := content.rfind(CALL_OPEN)) >= 0 and CALL_CLOSE not in content[cut:]:
        content = content[:cut]
    content = content.strip()
    if not calls and (bare := _bare_calls(content)) is not None and all(add(call) for call in bare):
        return None, calls
    return content or None, calls


def _bare_calls(text: str) -> list[dict] | None:
    """The objects of a text that is only a call or a list of calls written as JSON (bare or fenced), each
    with a name and object arguments and nothing else; else None."""
    if fence := _FENCE.fullmatch(text):
        text = fence.group(1)
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    objects = value if isinstance(value, list) else [value]
    if objects and all(
        isinstance(o, dict) and set(o) == {"name", "arguments"} and isinstance(o["arguments"], dict) for o in objects
    ):
        return objects
    return None


class StreamSplit:
    """Streams a reply's text until a tool call begins, then holds the rest for `finish`. A reply that
    begins as JSON may be calls written bare (`parse`): it is held whole."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of `text` streamed as content
        self.in_calls = False

    def push(self, piece: str) -> str:
        """The text that is surely content and not yet sent."""
        self.text += piece
        if self.in_calls:
            return ""
        if self.sent == 0:
            start = self.text.lstrip()[:3]
            if not start or any(s.startswith(start) or start.startswith(s) for s in _BARE_STARTS):
                self.in_calls = bool(start) and any(start.startswith(s) for s in _BARE_STARTS)
                return ""
        end = self.text.find(CALL_OPEN, self.sent)
        if end >= 0:
            self.in_calls = True
        else:  # hold back a tail that may be the start of "<tool_call>"
            end = len(self.text)
            for keep in range(min(len(CALL_OPEN) - 1, end - self.sent), 0, -1):
                if CALL_OPEN.startswith(self.text[end - keep :]):
                    end -= keep
                    break
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left of the content, and the calls."""
        rest = self.text[self.sent :]
        content, calls = parse(rest)
        if not calls and CALL_OPEN not in rest:  # no call after all: the text as it came
            return rest, []
        return content or "", calls
