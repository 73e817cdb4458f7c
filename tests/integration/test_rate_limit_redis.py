"""The rate limit shared through Redis (real Redis, as in production), and a NUL in an upload's file name on
PostgreSQL (which refuses NUL in text).

Redis: database 15 of BITPLAN_TEST_REDIS, with a key prefix of this run's own; only those keys are deleted.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import pytest
import redis
from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import create_app
from service.ratelimit import RedisRateLimiter
from storage import Database
from tests.devstack import REDIS_URL, fresh_database
from tests.unit.test_api_hardening import multipart, npz

REDIS_DB_URL = f"{REDIS_URL}/15"
APP_PREFIX = "bitplan:ratelimit:"  # what create_app's limiter uses


@pytest.fixture
def prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    mine = f"bitplan-test-{secrets.token_hex(4)}:"
    yield mine
    client = redis.Redis.from_url(REDIS_DB_URL)
    keys = list(client.scan_iter(match=f"{mine}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_two_limiters_share_one_budget(prefix):
    """Two API processes' limiters on one Redis: burst 5 at 1/s allows 5 of 10 quick requests in all, not 5 each."""
    a, b = (RedisRateLimiter(REDIS_DB_URL, rate=1, burst=5, prefix=prefix) for _ in range(2))
    waits = [(a if i % 2 else b).take("team-key") for i in range(10)]
    assert sum(w == 0 for w in waits) == 5, waits
    assert all(0 < w <= 1.0 for w in waits[5:]), waits
    assert a.take("another-key") == 0  # one bucket per key
    time.sleep(1.1)  # one token back per second
    assert b.take("team-key") == 0 and a.take("team-key") > 0


def test_buckets_are_stored_under_the_key_hash_and_expire(prefix):
    limiter = RedisRateLimiter(REDIS_DB_URL, rate=2, burst=10, prefix=prefix)
    key = "sk-live-" + secrets.token_hex(8)
    assert limiter.take(key) == 0
    client = redis.Redis.from_url(REDIS_DB_URL)
    stored = [k.decode() for k in client.scan_iter(match=f"{prefix}*")]
    assert stored == [prefix + hashlib.sha256(key.encode()).hexdigest()]
    assert key not in str(client.hgetall(stored[0]))
    assert 0 < client.pttl(stored[0]) <= limiter.ttl_ms == 6000  # a full bucket (10 tokens at 2/s) after 5 s, +1 s
    client.close()


def test_create_app_on_a_redis_broker_shares_the_limit_between_processes(tmp_path):
    """Two apps (two API processes) on one Redis broker URL: one budget per key between them."""
    settings = load_settings(broker_url=REDIS_DB_URL, rate_limit=1, rate_burst=5, data_dir=str(tmp_path))
    apps = [create_app(settings, worker=False, reconcile=False) for _ in range(2)]
    assert all(isinstance(app.state.limiter, RedisRateLimiter) for app in apps)
    key = "shared-" + secrets.token_hex(8)
    clients = [TestClient(app) for app in apps]  # no lifespan: /healthz needs no database
    try:
        codes = [clients[i % 2].get("/healthz", headers={"Authorization": f"Bearer {key}"}).status_code for i in range(10)]
        assert codes.count(200) == 5 and codes.count(429) == 5, codes
    finally:
        redis.Redis.from_url(REDIS_DB_URL).delete(APP_PREFIX + hashlib.sha256(key.encode()).hexdigest())


def test_nul_in_an_upload_file_name_on_postgresql(tmp_path):
    with fresh_database() as url:
        settings = load_settings(data_dir=str(tmp_path), database_url=url, broker_url="memory://")
        db = Database(url)
        db.migrate()
        key = db.create_key("nul")
        headers = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(settings, worker=False, reconcile=False), raise_server_exceptions=False) as client:
            body, content_type = multipart("file", b"pg\x00data.npz", npz(3))
            r = client.post("/v1/datasets", content=body, headers={**headers, **content_type})
            assert r.status_code == 201, r.text[:500]
            assert r.json()["name"] == "pgdata.npz"
            assert client.get(f"/v1/datasets/{r.json()['id']}", headers=headers).json()["name"] == "pgdata.npz"
            body, content_type = multipart("file", b"\x00\x01", b"not a model")
            r = client.post("/v1/models", content=body, headers={**headers, **content_type})
            assert r.status_code == 422 and r.json()["error"]["message"].startswith("model.pt2 "), r.text[:500]
        db.engine.dispose()
