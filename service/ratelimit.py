"""Requests per API key: a token bucket per key (``rate`` per second, bursts of ``burst``).

``make_rate_limiter(settings)`` picks where the buckets live. With a Redis broker they are kept in
Redis (``RedisRateLimiter``), so every API process behind one load balancer shares one budget per
key; with the embedded broker (one process) they are kept in this process (``RateLimiter``).

A key is stored only as its SHA-256, never as given. If Redis cannot be reached the limiter
falls back to this process's buckets (logging a warning at most once a minute), so the API
keeps answering; it tries Redis again after ``retry_s``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bitplan.settings import Settings

log = logging.getLogger("bitplan.service")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class RateLimiter:
    """The buckets of this process only: with N API processes a key may make N times the rate."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key hash -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        digest = _digest(key)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(digest, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[digest] = (tokens - 1.0, now)
                return 0.0
            self._buckets[digest] = (tokens, now)
            if len(self._buckets) > 100_000:  # keys seen once (e.g. guessed): forget them all
                self._buckets.clear()
            return (1.0 - tokens) / self.rate


# The same bucket as RateLimiter.take, in one atomic step on the Redis server, timed by the server's clock
# (so API processes on several machines agree). The bucket expires once it would be full again anyway.
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local ttl_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return string.format('%.6f', wait)
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every API process using the same Redis database."""

    def __init__(self, url: str, rate: float, burst: int, prefix: str = "bitplan:ratelimit:", timeout_s: float = 0.25,
                 retry_s: float = 5.0) -> None:
        import redis

        self.rate, self.burst, self.prefix, self.url = rate, burst, prefix, url
        self.retry_s = retry_s
        self.fallback = RateLimiter(rate, burst)
        # Short timeouts: the limiter runs on every request, and a hung Redis must not hang the API.
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(TOKEN_BUCKET)
        self._errors = (redis.RedisError, OSError)
        # A full bucket is the same as no bucket: keep one only until it would have refilled.
        self.ttl_ms = int(math.ceil(max(burst, 1) / rate * 1000)) + 1000 if rate > 0 else 0
        self._down_until = 0.0  # monotonic time before which Redis is not tried again
        self._warned_at = -math.inf
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        if time.monotonic() < self._down_until:
            return self.fallback.take(key)
        try:
            wait = self._script(keys=[self.prefix + _digest(key)], args=[repr(float(self.rate)), self.burst, self.ttl_ms])
            return float(wait)
        except self._errors as exc:
            self._unreachable(exc)
            return self.fallback.take(key)

    def _unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._down_until = now + self.retry_s
            if now - self._warned_at < 60:
                return
            self._warned_at = now
        log.warning("rate limiter: Redis unreachable (%s: %s); counting requests in this process until it is back",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def make_rate_limiter(settings: Settings) -> RateLimiter | RedisRateLimiter:
    """Shared buckets in Redis when the broker is Redis, else this process's own."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(settings.broker_url, settings.rate_limit, settings.rate_burst)
    return RateLimiter(settings.rate_limit, settings.rate_burst)
