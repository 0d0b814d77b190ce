"""Token-bucket rate limits: in memory (one process) or in Redis (shared by many processes).

A bucket holds at most `burst` tokens and refills at `per_second`; a request takes one token
or is refused with the time until one is there (`Retry-After`). The Redis backend runs the
whole read-refill-take-write step as one Lua script (EVALSHA), so two gateway processes can
never both take the last token, and it reads the clock from Redis, so their clocks don't matter.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from secure_handler.errors import RateLimiterUnavailable
from secure_handler.gateway.config import GatewayConfig, RateLimit, RedisConfig

__all__ = [
    "Decision",
    "MemoryRateLimiter",
    "RateLimiter",
    "RateLimiterUnavailable",
    "RedisRateLimiter",
    "build_limiter",
]


@dataclass(frozen=True)
class Decision:
    """The outcome of taking one token."""

    allowed: bool
    retry_after_s: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` in whole seconds, never 0 (a client retrying at once is refused)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter(Protocol):
    """Takes one token from the bucket named `bucket`."""

    async def hit(self, bucket: str, limit: RateLimit) -> Decision: ...

    async def aclose(self) -> None: ...


class MemoryRateLimiter:
    """Buckets in an insertion-ordered dict, least recently used first: exact for one process,
    not shared, and O(1) per request whatever the number of buckets.

    Memory is bounded: each request drops up to two of the least recently used buckets that
    are full again (a full bucket is the same as no bucket, so no decision changes), and past
    `max_buckets` the least recently used bucket goes whatever its state (CWE-770: a flood of
    fresh client addresses must not grow the gateway). That forced eviction can forgive a
    long-idle client part of its debt, never more than one bucket per new bucket.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        # bucket → (tokens, updated at, full again at); order = least recently used first
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._max_buckets = max_buckets
        self.evicted_early = 0  # buckets dropped before they were full again

    async def hit(self, bucket: str, limit: RateLimit) -> Decision:
        return self.take(bucket, limit, time.monotonic())

    def take(self, bucket: str, limit: RateLimit, now: float) -> Decision:
        """The synchronous step, with the clock passed in (`hit` uses the monotonic clock)."""
        with self._lock:
            state = self._buckets.pop(bucket, None)
            tokens, at, _ = state if state is not None else (float(limit.burst), now, now)
            tokens = min(float(limit.burst), tokens + max(0.0, now - at) * limit.per_second)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            full_at = now + (limit.burst - tokens) / limit.per_second
            self._buckets[bucket] = (tokens, now, full_at)  # now the most recently used
            self._evict(now)
        if allowed:
            return Decision(True)
        return Decision(False, (1.0 - tokens) / limit.per_second)

    def _evict(self, now: float) -> None:
        for _ in range(2):
            oldest = next(iter(self._buckets))
            if self._buckets[oldest][2] > now:
                break
            del self._buckets[oldest]
        while len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)
            self.evicted_early += 1

    def __len__(self) -> int:
        return len(self._buckets)

    async def aclose(self) -> None:
        return None


#: KEYS[1] bucket; ARGV rate/s, burst. Returns {allowed (0/1), wait in ms}. Time is Redis's
#: own (in ms, 13 digits: exact in Lua's doubles and in its %.14g tostring).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class RedisRateLimiter:
    """Buckets as Redis hashes, updated atomically by `TOKEN_BUCKET_LUA`."""

    def __init__(self, config: RedisConfig) -> None:
        import redis.asyncio as aioredis  # optional dependency: import only when configured

        self._prefix = config.prefix
        self._client: Any = aioredis.Redis.from_url(
            config.url, socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s
        )
        # register_script calls EVALSHA and loads the script once on NOSCRIPT.
        self._script: Any = self._client.register_script(TOKEN_BUCKET_LUA)

    async def hit(self, bucket: str, limit: RateLimit) -> Decision:
        from redis.exceptions import RedisError

        try:
            allowed, wait_ms = await self._script(
                keys=[self._prefix + bucket], args=[repr(limit.per_second), limit.burst]
            )
        except (RedisError, OSError) as exc:
            raise RateLimiterUnavailable(f"redis: {type(exc).__name__}") from exc
        return Decision(bool(int(allowed)), int(wait_ms) / 1000.0)

    async def aclose(self) -> None:
        await self._client.aclose()


def build_limiter(config: GatewayConfig) -> RateLimiter:
    """The limiter the config asks for."""
    if config.rate_limit_backend == "redis":
        assert config.redis is not None  # checked by GatewayConfig
        return RedisRateLimiter(config.redis)
    return MemoryRateLimiter()
