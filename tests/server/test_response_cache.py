"""Response cache: LRU semantics, key stability, and Redis behaviour against a real redis-server (up and down)."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve import SpecserveError
from specserve.server.response_cache import CachedResponse, LRUCache, RedisCache, ResponseCache, cache_key, open_cache
from tests.support.ports import free_port

RESP = CachedResponse(
    pieces=["Hello", ",", " wörld", " 🙂"],
    finish_reason="stop",
    prompt_tokens=7,
    completion_tokens=4,
    spec_stats={"method": "draft", "k": 4, "accepted": 3, "proposed": 4, "acceptance": 0.75},
)
BASE_PARAMS = {"max_tokens": 128, "stop": ["\n\n"], "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "specserve.cache" and r.levelno >= logging.WARNING]


def _resp(i: int) -> CachedResponse:
    return CachedResponse([f"r{i}"], "length", i, 1)


# --- CachedResponse -------------------------------------------------------------------------------------------


def test_cached_response_text_and_immutability():
    assert RESP.text == "Hello, wörld 🙂"
    assert isinstance(RESP.pieces, tuple)


@given(
    pieces=st.lists(st.text(max_size=8), max_size=6),
    finish=st.sampled_from(["stop", "length"]),
    n=st.integers(0, 10_000),
)
def test_cached_response_json_round_trip(pieces, finish, n):
    r = CachedResponse(pieces, finish, n, n + 1, {"accepted": n, "rate": 0.5, "method": "ngram"})
    assert CachedResponse.from_json(r.to_json()) == r
    assert CachedResponse.from_json(r.to_json().encode()) == r  # Redis hands back bytes


# --- cache_key ------------------------------------------------------------------------------------------------


def test_key_is_stable_hex_sha256():
    k = cache_key("qwen", [1, 2, 3], dict(BASE_PARAMS))
    assert k == cache_key("qwen", [1, 2, 3], dict(reversed(list(BASE_PARAMS.items()))))  # dict order irrelevant
    assert k == cache_key("qwen", (1, 2, 3), dict(BASE_PARAMS))
    assert len(k) == 64 and int(k, 16) >= 0


def test_key_treats_equal_numbers_alike():
    assert cache_key("m", [1], {"temperature": 0}) == cache_key("m", [1], {"temperature": 0.0})
    assert cache_key("m", [1], {"max_tokens": 16}) == cache_key("m", [1], {"max_tokens": 16.0})
    assert cache_key("m", [1], {"seed": 1}) != cache_key("m", [1], {"seed": True})


def test_key_sensitive_to_model_and_prompt():
    k = cache_key("qwen", [1, 2, 3], BASE_PARAMS)
    assert k != cache_key("qwen2", [1, 2, 3], BASE_PARAMS)
    assert k != cache_key("qwen", [1, 2], BASE_PARAMS)
    assert k != cache_key("qwen", [1, 2, 3, 4], BASE_PARAMS)
    assert k != cache_key("qwen", [3, 2, 1], BASE_PARAMS)
    assert cache_key("m", [12], {}) != cache_key("m", [1, 2], {})


PARAM_VALUES = {
    "max_tokens": st.integers(1, 4096),
    "stop": st.lists(st.text(max_size=4), max_size=3),
    "temperature": st.floats(0, 2, allow_nan=False),
    "top_p": st.floats(0.01, 1, allow_nan=False),
    "top_k": st.integers(0, 100),
    "seed": st.none() | st.integers(0, 2**32),
}


@given(data=st.data(), name=st.sampled_from(sorted(PARAM_VALUES)))
def test_key_changes_with_any_param(data, name):
    params = dict(BASE_PARAMS)
    new = data.draw(PARAM_VALUES[name].filter(lambda v: v != params[name]))
    assert cache_key("m", [5, 6], params) != cache_key("m", [5, 6], {**params, name: new})
    without = {k: v for k, v in params.items() if k != name}
    assert cache_key("m", [5, 6], params) != cache_key("m", [5, 6], without)


def test_key_rejects_nan():
    with pytest.raises(ValueError):
        cache_key("m", [1], {"temperature": float("nan")})


# --- LRUCache -------------------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used():
    c = LRUCache(max_entries=2)
    c.put("a", _resp(1))
    c.put("b", _resp(2))
    assert c.get("a") == _resp(1)  # a is now most recent
    c.put("c", _resp(3))  # evicts b
    assert c.keys() == ["a", "c"]
    assert c.get("b") is None
    c.put("a", _resp(4))  # overwrite refreshes a; c is now oldest
    c.put("d", _resp(5))
    assert c.keys() == ["a", "d"] and c.get("a") == _resp(4)
    assert (c.hits, c.misses) == (2, 1)


def test_lru_counters_and_callback():
    seen: list[bool] = []
    c = open_cache(None, max_entries=4, on_lookup=seen.append)
    assert isinstance(c, LRUCache) and isinstance(c, ResponseCache)
    assert c.get("k") is None
    c.put("k", RESP)
    assert c.get("k") is RESP
    assert (c.hits, c.misses, seen) == (1, 1, [False, True])
    c.close()
    assert c.get("k") is None


def test_lru_zero_size_stores_nothing_and_negative_is_rejected():
    c = LRUCache(0)
    c.put("k", RESP)
    assert c.get("k") is None and len(c) == 0
    with pytest.raises(ValueError):
        LRUCache(-1)


def test_lru_thread_safety():
    c = LRUCache(max_entries=50)
    n_threads, n_ops = 8, 2000
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(tid: int) -> None:
        try:
            start.wait()
            for i in range(n_ops):
                key = f"k{(i * 7 + tid) % 120}"
                c.put(key, _resp(i))
                got = c.get(key if i % 2 else f"k{i % 120}")
                assert got is None or isinstance(got, CachedResponse)
                assert len(c) <= 50
        except BaseException as e:  # surface failures from worker threads
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c) == 50 and len(set(c.keys())) == 50
    assert c.hits + c.misses == n_threads * n_ops


@settings(max_examples=200)
@given(
    max_entries=st.integers(1, 5),
    ops=st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 7)), max_size=60),
)
def test_lru_matches_reference_model(max_entries, ops):
    c = LRUCache(max_entries)
    model: list[tuple[str, CachedResponse]] = []  # least recently used first
    for i, (op, k) in enumerate(ops):
        key = f"k{k}"
        idx = next((j for j, (mk, _) in enumerate(model) if mk == key), None)
        if op == "put":
            c.put(key, _resp(i))
            if idx is not None:
                model.pop(idx)
            model.append((key, _resp(i)))
            del model[: max(0, len(model) - max_entries)]
        else:
            expected = None
            if idx is not None:
                expected = model.pop(idx)[1]
                model.append((key, expected))
            assert c.get(key) == expected
        assert len(c) <= max_entries
        assert c.keys() == [mk for mk, _ in model]


# --- RedisCache against a real server -------------------------------------------------------------------------


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"  # the session server is shared: keep tests' keys apart


def test_redis_round_trip(redis_url):
    cache = open_cache(redis_url, max_entries=1, prefix=_prefix())
    assert isinstance(cache, RedisCache) and isinstance(cache, ResponseCache)
    try:
        assert cache.get("k") is None
        cache.put("k", RESP)
        cache.put("k2", _resp(2))  # max_entries is LRU-only: Redis keeps both
        assert cache.get("k") == RESP
        assert cache.get("k2") == _resp(2)
        assert (cache.hits, cache.misses, cache.errors) == (2, 1, 0)
    finally:
        cache.close()


def test_redis_ttl_is_set_and_expires(redis_url):
    prefix = _prefix()
    cache = RedisCache(redis_url, ttl_s=3600, prefix=prefix)
    short = RedisCache(redis_url, ttl_s=0.3, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        cache.put("long", RESP)
        short.put("short", RESP)
        assert 3_590_000 < client.pttl(prefix + "long") <= 3_600_000
        assert 0 < client.pttl(prefix + "short") <= 300
        time.sleep(0.5)
        assert short.get("short") is None
        assert cache.get("long") == RESP
    finally:
        client.close()
        cache.close()
        short.close()


def test_redis_malformed_entry_is_a_miss(redis_url, caplog):
    prefix = _prefix()
    client = redis.Redis.from_url(redis_url)
    client.set(prefix + "bad", b"{not json")
    cache = RedisCache(redis_url, prefix=prefix)
    try:
        assert cache.get("bad") is None
        assert cache.misses == 1 and len(_warnings(caplog)) == 1
        cache.put("ok", RESP)
        assert cache.get("ok") == RESP  # a bad payload doesn't mark Redis down
    finally:
        client.close()
        cache.close()


def test_redis_unreachable_is_a_miss_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="specserve.cache")
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    cache = open_cache(url, max_entries=8)
    for i in range(20):
        assert cache.get(f"k{i}") is None
        cache.put(f"k{i}", RESP)
    assert time.monotonic() - started < 2.0  # fails fast and then doesn't retry per request
    assert (cache.hits, cache.misses, cache.errors) == (0, 20, 1)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()
    cache.close()


def test_redis_stopped_mid_test_then_back(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="specserve.cache")
    cache = RedisCache(redis_server.url, prefix=_prefix(), retry_after_s=0.3)
    try:
        cache.put("k", RESP)
        assert cache.get("k") == RESP
        assert not _warnings(caplog)

        port = redis_server.port
        redis_server.stop()
        assert cache.get("k") is None
        cache.put("k2", RESP)
        assert cache.get("k2") is None
        assert len(_warnings(caplog)) == 1

        time.sleep(0.4)  # past retry_after_s: still down, so one more attempt fails quietly
        assert cache.get("k") is None
        assert len(_warnings(caplog)) == 1 and cache.errors == 2

        redis_server.start(port=port)  # empty again: no persistence
        time.sleep(0.4)
        assert cache.get("k") is None
        cache.put("k", RESP)
        assert cache.get("k") == RESP
        messages = [r.getMessage() for r in _warnings(caplog)]
        assert len(messages) == 2 and "reachable again" in messages[1]
    finally:
        cache.close()


# --- open_cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://localhost:6379/0",
        "memcached://localhost:11211",
        "redis://",
        "redis://localhost:notaport/0",
        "redis://localhost:99999/0",
        "redis://localhost:6379/zero",
    ],
)
def test_open_cache_rejects_bad_urls(url):
    with pytest.raises(SpecserveError) as e:
        open_cache(url, max_entries=8)
    msg = str(e.value)
    assert "\n" not in msg and "redis://host:port/db" in msg
