"""The reconciler asks the broker which job messages are still waiting before it resends any (a backlog behind
busy workers must not grow duplicates). Against a real Redis (a database of its own), with no worker consuming."""

from __future__ import annotations

import pytest

from bitplan.settings import load_settings
from tests.devstack import REDIS_URL, claim_redis_db, release_redis_db


@pytest.fixture
def redis_broker(tmp_path):
    import redis

    db = claim_redis_db()
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    from workers.app import WorkerApp

    yield client, WorkerApp(load_settings(data_dir=str(tmp_path / "data"), broker_url=url))
    client.flushdb()
    release_redis_db(db)


def test_pending_job_ids_reads_the_redis_queue(redis_broker):
    redis, app = redis_broker
    app.enqueue("j_waiting1")
    app.enqueue("j_waiting2")
    assert app.pending_job_ids() == {"j_waiting1", "j_waiting2"}
    assert redis.llen("celery") == 2


def test_a_backlog_in_redis_is_not_sent_again(redis_broker, tmp_path):
    import datetime as dt

    from storage.models import utcnow
    from tests.rows import database_with_jobs
    from workers.reconcile import reconcile_once

    redis_broker, app = redis_broker
    enqueue, pending_job_ids = app.enqueue, app.pending_job_ids

    settings = load_settings(data_dir=str(tmp_path / "data"), requeue_after_s=0.0)
    earlier = utcnow() - dt.timedelta(seconds=5)
    db, jobs = database_with_jobs(settings, *({"state": "queued", "enqueued_at": earlier} for _ in range(3)))
    for job_id in jobs:
        enqueue(job_id)
    for _ in range(5):  # every pass finds them due (requeue_after_s=0) and still waiting in Redis
        assert reconcile_once(db, enqueue, settings, pending=pending_job_ids)["requeued"] == 0
    assert redis_broker.llen("celery") == 3
    redis_broker.delete("celery")  # Redis restarted empty: now they are lost, and sent again once
    assert reconcile_once(db, enqueue, settings, pending=pending_job_ids)["requeued"] == 3
    assert redis_broker.llen("celery") == 3
