"""Queue routing against a real Redis: a job that needs a GPU lands in the broker's ``gpu`` list, every other job in
Celery's default list, and the reconciler's view of the waiting messages covers both (else it would resend every
queued GPU job as lost)."""

from __future__ import annotations

import pytest

from bitplan.settings import load_settings
from tests.devstack import REDIS_URL, claim_redis_db, release_redis_db


@pytest.fixture
def broker(tmp_path):
    import redis

    db = claim_redis_db()
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client, url
    client.flushdb()
    release_redis_db(db)


@pytest.mark.parametrize("gpu_workers", [False, True])
def test_jobs_land_in_the_queue_of_their_device(broker, tmp_path, gpu_workers):
    from storage.models import Job
    from tests.rows import database_with_jobs
    from workers.app import WorkerApp

    redis, url = broker
    settings = load_settings(data_dir=str(tmp_path / "data"), broker_url=url, gpu_workers=gpu_workers)
    db, ids = database_with_jobs(settings, *({"state": "queued"} for _ in range(3)))
    for job_id, device in zip(ids, ("cuda", "cpu", "auto")):
        with db.session() as s:
            s.get(Job, job_id).request = {"device": device}
    app = WorkerApp(settings, db=db)
    for job_id in ids:
        app.enqueue(job_id)
    on_gpu = 2 if gpu_workers else 1  # cuda always; auto only when the deployment has GPU workers
    assert (redis.llen("gpu"), redis.llen("celery")) == (on_gpu, 3 - on_gpu)
    assert app.pending_job_ids() == set(ids)
