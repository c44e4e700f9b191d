"""Response cache for deterministic requests: in-process LRU or Redis, behind one small interface."""

from specserve.cache.response import (
    CachedResponse,
    LRUCache,
    RedisCache,
    ResponseCache,
    cache_key,
    open_cache,
)

__all__ = ["CachedResponse", "LRUCache", "RedisCache", "ResponseCache", "cache_key", "open_cache"]
