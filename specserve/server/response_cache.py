"""Response cache for deterministic (temperature 0) completions, and the store of finished Responses API
replies that `previous_response_id` continues (`ConversationStore`, in the same Redis when there is one).

Greedy decoding is a pure function of (model, prompt tokens, output-affecting sampling params), and speculative
decoding here is lossless, so a repeated request can be answered from a cache instead of the model. Two stores
share one small interface: an in-process LRU (default) and Redis (shared between server replicas, survives
restarts). Redis is an optimisation, never a dependency at run time: if it is down or misbehaves the cache
degrades to "always miss", logs one warning, and tries to reconnect later; it never raises into the server.

A cached response keeps the text pieces exactly as they were streamed, so a hit can be re-streamed piece by
piece with the same chunk boundaries as the original generation.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from specserve import SpecserveError

REDIS_CONNECT_TIMEOUT_S, REDIS_OP_TIMEOUT_S = 0.5, 1.0  # short: a dead or slow Redis is a miss, not a wait
log = logging.getLogger("specserve.cache")

KEY_VERSION = 1  # bump when the key payload or CachedResponse format changes, to orphan old entries


@dataclass(frozen=True)
class CachedResponse:
    """One finished generation, as the server needs it to answer again (streamed or not)."""

    pieces: tuple[str, ...]  # text pieces in the order they were streamed; "".join(pieces) is the completion
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    spec_stats: dict[str, Any] = field(default_factory=dict)  # speculative stats of the original run (JSON-able)
    stop_string: str | None = None  # the stop string that ended it

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so a cached value can't be mutated through a shared reference.
        object.__setattr__(self, "pieces", tuple(self.pieces))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def to_json(self) -> str:
        return json.dumps(
            {
                "pieces": list(self.pieces),
                "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "spec_stats": self.spec_stats,
                "stop_string": self.stop_string,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> CachedResponse:
        """Inverse of `to_json`; raises ValueError (or KeyError/TypeError) on malformed data."""
        d = json.loads(data)
        return cls(
            pieces=tuple(d["pieces"]),
            finish_reason=d["finish_reason"],
            prompt_tokens=int(d["prompt_tokens"]),
            completion_tokens=int(d["completion_tokens"]),
            spec_stats=dict(d.get("spec_stats") or {}),
            stop_string=d.get("stop_string"),
        )


def _canonical(value: Any) -> Any:
    """Normalise values that compare equal in Python but serialise differently (1.0 vs 1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def cache_key(model: str, prompt_tokens: Sequence[int], params: dict[str, Any]) -> str:
    """sha256 hex digest of a canonical JSON of the model id, prompt token ids and sampling params.

    `params` is whatever affects the output: max_tokens, stop, temperature, top_p, top_k, seed, ... — the caller
    decides. Speculation settings (method, k) must NOT be in it: verification is lossless, so the greedy output
    is identical whatever proposes the drafts, and including them would only split the cache.
    Raises ValueError for values JSON can't represent exactly (NaN, inf) and TypeError for non-JSON types.
    """
    payload = {
        "v": KEY_VERSION,
        "model": model,
        "prompt": [int(t) for t in prompt_tokens],  # int() also accepts numpy integers
        "params": _canonical(params),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@runtime_checkable
class ResponseCache(Protocol):
    """What the server uses. `get`/`put` never raise; `hits`/`misses` only grow (export them as counters)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    def get(self, key: str) -> CachedResponse | None: ...

    def put(self, key: str, value: CachedResponse) -> None: ...

    def close(self) -> None: ...


class _Counters:
    """Thread-safe hit/miss counters plus an optional callback `on_lookup(hit: bool)` for metrics."""

    def __init__(self, on_lookup: Callable[[bool], None] | None = None) -> None:
        self._counter_lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._on_lookup = on_lookup

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    def _count(self, value: CachedResponse | None) -> CachedResponse | None:
        with self._counter_lock:
            if value is None:
                self._misses += 1
            else:
                self._hits += 1
        if self._on_lookup is not None:
            self._on_lookup(value is not None)
        return value


class LRUCache(_Counters):
    """In-process LRU over an OrderedDict, guarded by one lock. `max_entries=0` stores nothing."""

    def __init__(self, max_entries: int = 1024, on_lookup: Callable[[bool], None] | None = None) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        super().__init__(on_lookup)
        self.max_entries = max_entries
        self._data: OrderedDict[str, CachedResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:  # a put holds one entry over the bound until it evicts: never show that state
            return len(self._data)

    def keys(self) -> list[str]:
        """Keys from least to most recently used (for tests and debugging)."""
        with self._lock:
            return list(self._data)

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
        return self._count(value)

    def put(self, key: str, value: CachedResponse) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            self._data.clear()


class RedisCache(_Counters):
    """Redis-backed cache (`SET key json PX ttl`), shared by every server pointed at the same Redis.

    Failure policy: the first error after a healthy period logs one warning and marks Redis down; while down,
    `get` is a miss and `put` is skipped without touching the network; after `retry_after_s` the next call
    tries again (and logs "reachable again" on success). Short socket timeouts and no client-side retries keep
    a dead or slow Redis from stalling requests for long.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600,
        prefix: str = "specserve:resp:",
        *,
        retry_after_s: float = 30.0,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        import redis  # imported here so the LRU path doesn't need redis-py
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        super().__init__(on_lookup)
        self.url = url
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.errors = 0  # failed Redis operations (connection, timeout, protocol, bad payload)
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_OP_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # fail fast: we fall back to a miss, not to waiting
            health_check_interval=0,
        )
        self._state_lock = threading.Lock()
        self._down_until: float | None = None  # monotonic time before which Redis isn't tried; None = healthy
        # Probe once so a misconfigured URL shows up in the log at startup rather than on the first request.
        self._call("PING", self._client.ping)

    def _available(self) -> bool:
        with self._state_lock:
            return self._down_until is None or time.monotonic() >= self._down_until

    def _call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one Redis operation; on any error mark Redis down and return (False, None). Never raises."""
        try:
            result = fn()
        except Exception as e:  # any failure must degrade to a miss, never reach the caller
            with self._state_lock:
                self.errors += 1
                first = self._down_until is None
                self._down_until = time.monotonic() + self.retry_after_s
            if first:
                log.warning(
                    "response cache: Redis at %s failed (%s: %s); serving without it, retrying every %.0f s",
                    self._safe_url(),
                    type(e).__name__,
                    e,
                    self.retry_after_s,
                )
            else:
                log.debug("response cache: Redis %s still failing: %s", what, e)
            return False, None
        with self._state_lock:
            recovered = self._down_until is not None
            self._down_until = None
        if recovered:
            log.warning("response cache: Redis at %s reachable again", self._safe_url())
        return True, result

    def _safe_url(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password in logs

    def get(self, key: str) -> CachedResponse | None:
        value: CachedResponse | None = None
        if (raw := self.get_text(key)) is not None:
            try:
                value = CachedResponse.from_json(raw)
            except (ValueError, KeyError, TypeError) as e:
                with self._state_lock:
                    self.errors += 1
                log.warning("response cache: ignoring malformed Redis entry %s%s: %s", self.prefix, key, e)
        return self._count(value)

    def put(self, key: str, value: CachedResponse) -> None:
        self.put_text(key, value.to_json())

    def get_text(self, key: str) -> str | bytes | None:
        """The value under `key` (after the prefix), None when missing or Redis is down; not counted."""
        if not self._available():
            return None
        ok, raw = self._call("GET", lambda: self._client.get(self.prefix + key))
        return raw if ok else None

    def put_text(self, key: str, data: str) -> None:
        """Store `data` under `key` for the TTL; skipped while Redis is down."""
        if self._available():
            self._call("SET", lambda: self._client.set(self.prefix + key, data, px=self.ttl_ms))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a broken connection must not fail shutdown
            pass


def open_cache(
    url: str | None,
    max_entries: int = 1024,
    *,
    ttl_s: float = 3600,
    prefix: str = "specserve:resp:",
    on_lookup: Callable[[bool], None] | None = None,
) -> ResponseCache:
    """None -> in-process `LRUCache(max_entries)`; `redis://host:port/db` (or rediss://) -> `RedisCache`.

    Anything else raises SpecserveError with a one-line message. `max_entries` applies to the LRU only (Redis is
    bounded by the TTL and its own maxmemory); `ttl_s` and `prefix` to Redis only. An unreachable Redis is not
    an error here: it is logged and retried (see RedisCache).
    """
    if url is None:
        return LRUCache(max_entries, on_lookup=on_lookup)
    hint = "expected redis://host:port/db"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as e:
        raise SpecserveError(f"bad cache URL {url!r}: {e} ({hint})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise SpecserveError(f"bad cache URL {url!r}: unsupported scheme {parts.scheme!r} ({hint})")
    if not parts.hostname:
        raise SpecserveError(f"bad cache URL {url!r}: no host ({hint})")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise SpecserveError(f"bad cache URL {url!r}: database must be a number, got {db!r} ({hint})")
    return RedisCache(url, ttl_s=ttl_s, prefix=prefix, on_lookup=on_lookup)


STORED_RESPONSES = 1000  # conversations kept for previous_response_id in process (least recently used go first)
CONVERSATION_KEY = "conversation:"  # after the response cache's prefix


class ConversationStore:
    """Finished responses and the chat messages that led to them, for `previous_response_id`. In this process
    (bounded: the least recently used go first, a restart forgets them), or in the Redis of the response
    cache when it has one (shared by the servers on it; bounded by the cache's TTL)."""

    def __init__(self, cache: ResponseCache | None = None, capacity: int = STORED_RESPONSES):
        self.redis = cache if isinstance(cache, RedisCache) else None
        self.capacity = capacity
        self._items: collections.OrderedDict[str, tuple[dict, list[dict]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict, messages: list[dict]) -> None:
        if self.redis is not None:
            self.redis.put_text(f"{CONVERSATION_KEY}{response['id']}", json.dumps([response, messages]))
            return
        with self._lock:
            self._items[response["id"]] = (response, messages)
            self._items.move_to_end(response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        if self.redis is not None:
            raw = self.redis.get_text(f"{CONVERSATION_KEY}{response_id}")
            if raw is None:
                return None
            response, messages = json.loads(raw)
            return response, messages
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found
