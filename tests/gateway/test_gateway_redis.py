"""The Redis token bucket against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from secure_handler.deploy.launcher import free_port
from secure_handler.gateway.config import RateLimit, RedisConfig
from secure_handler.gateway.ratelimit import (
    Decision,
    RateLimiterUnavailable,
    RedisRateLimiter,
)

pytestmark = pytest.mark.integration


def _bucket() -> str:
    return f"test:{uuid.uuid4().hex}"


async def _hits(limiter: RedisRateLimiter, bucket: str, limit: RateLimit, n: int) -> list[Decision]:
    return [await limiter.hit(bucket, limit) for _ in range(n)]


def test_burst_then_429_then_recovery(redis_url: str) -> None:
    limit, bucket = RateLimit(per_second=5, burst=3), _bucket()

    async def scenario() -> tuple[list[Decision], Decision]:
        limiter = RedisRateLimiter(RedisConfig(url=redis_url))
        try:
            first = await _hits(limiter, bucket, limit, 4)
            await asyncio.sleep(first[-1].retry_after_s + 0.05)
            return first, await limiter.hit(bucket, limit)
        finally:
            await limiter.aclose()

    first, later = asyncio.run(scenario())
    assert [d.allowed for d in first] == [True, True, True, False]
    assert 0 < first[-1].retry_after_s <= 0.2  # one token at 5/s
    assert first[-1].retry_after_header == "1"
    assert later.allowed


def test_concurrent_hits_never_overdraw(redis_url: str) -> None:
    """50 concurrent requests from two limiters (two pools) against one bucket of 10."""
    limit, bucket = RateLimit(per_second=0.001, burst=10), _bucket()

    async def scenario() -> list[Decision]:
        # 50 connections open at once: on a loaded machine that takes longer than the
        # production 0.5 s timeout; the check is about overdraw, not speed.
        a = RedisRateLimiter(RedisConfig(url=redis_url, timeout_s=10))
        b = RedisRateLimiter(RedisConfig(url=redis_url, timeout_s=10))
        try:
            tasks = [(a if i % 2 else b).hit(bucket, limit) for i in range(50)]
            return list(await asyncio.gather(*tasks))
        finally:
            await a.aclose()
            await b.aclose()

    decisions = asyncio.run(scenario())
    assert sum(d.allowed for d in decisions) == 10


def test_script_is_reloaded_after_a_flush(redis_url: str) -> None:
    limit = RateLimit(per_second=1, burst=5)

    async def scenario() -> list[Decision]:
        limiter = RedisRateLimiter(RedisConfig(url=redis_url))
        try:
            first = await limiter.hit(_bucket(), limit)
            redis.Redis.from_url(redis_url).script_flush()  # EVALSHA now answers NOSCRIPT
            return [first, await limiter.hit(_bucket(), limit)]
        finally:
            await limiter.aclose()

    assert all(d.allowed for d in asyncio.run(scenario()))


def test_bucket_state_expires_in_redis(redis_url: str) -> None:
    bucket = _bucket()
    config = RedisConfig(url=redis_url, prefix="rl:")

    async def scenario() -> None:
        limiter = RedisRateLimiter(config)
        try:
            await limiter.hit(bucket, RateLimit(per_second=10, burst=2))
        finally:
            await limiter.aclose()

    asyncio.run(scenario())
    ttl_ms = redis.Redis.from_url(redis_url).pttl(f"rl:{bucket}")
    assert 0 < ttl_ms <= 1200  # refill time (0.2 s) plus a second: no key lives forever


def test_unreachable_redis_fails_closed() -> None:
    config = RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)

    async def scenario() -> None:
        limiter = RedisRateLimiter(config)
        try:
            await limiter.hit("x", RateLimit(per_second=1, burst=1))
        finally:
            await limiter.aclose()

    with pytest.raises(RateLimiterUnavailable):
        asyncio.run(scenario())
