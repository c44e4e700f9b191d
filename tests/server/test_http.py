"""What every route shares (server/http.py), on its own: the pings of a quiet stream, the header naming
unknown fields."""

import asyncio

from specserve.server.http import IGNORED_FIELDS_HEADER, ignored_fields_header, with_pings


def test_a_quiet_stream_gets_pings_and_every_event_in_order():
    async def slow():
        for item in ("a", "b"):
            await asyncio.sleep(0.35)
            yield item

    async def run():
        return [event async for event in with_pings(slow(), 0.1)]

    seen = asyncio.run(run())
    assert [e for e in seen if e is not None] == ["a", "b"] and seen.count(None) >= 4


def test_a_stream_left_early_closes_its_events():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.05)
                yield "x"
        finally:
            closed.append(True)

    async def run():
        paced = with_pings(endless(), 0.01)
        seen = [await anext(paced) for _ in range(5)]
        await paced.aclose()
        return seen

    assert "x" in asyncio.run(run()) and closed == [True]


def test_unknown_field_names_make_a_header_value_http_allows():
    """Names come from the client: any text, which a header value must carry as visible ASCII."""
    import h11

    value = ignored_fields_header(["store", "ends in a space ", "a,b", "\u00ff\x7f"])[IGNORED_FIELDS_HEADER]
    h11.Response(status_code=200, headers=[(IGNORED_FIELDS_HEADER, value)])  # raises on a value h11 refuses
    assert value.split(", ") == ["store", "ends\\u0020in\\u0020a\\u0020space\\u0020", "a\\u002cb", "\\u00ff\\u007f"]
