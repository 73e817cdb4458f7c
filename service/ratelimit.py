"""Requests per API key: a token bucket per key (``rate`` per second, bursts of
``burst``), kept in this API process. Several API processes each allow the rate."""

from __future__ import annotations

import hashlib
import threading
import time


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key hash -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        digest = hashlib.sha256(key.encode()).hexdigest()
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
