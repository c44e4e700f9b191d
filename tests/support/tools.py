"""Function tools the API tests offer, in chat completions' shape (`{"type": "function", "function": ...}`)."""

CURRENCY = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"],
        },
    },
}
# What a tool-using model is told, or this 1.5B model answers tool results by restating its calls.
ANSWER_IN_WORDS = "When a tool has answered, reply to the user in one sentence."


def responses_tool(chat_tool: dict) -> dict:
    """The same tool in the Responses API's flat shape."""
    return {"type": "function", **chat_tool["function"]}
