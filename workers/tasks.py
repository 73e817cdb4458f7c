"""Celery task entry points; the work is in ``workers.jobs``.

``run_job`` carries the job id as its task id, so the API can revoke a queued job
by id. Sharded sensitivity runs as a chord: one ``sensitivity_shard`` per layer
block, then ``merge_shards`` on whichever worker finishes last.
"""

from __future__ import annotations

import json

from celery import chord

from workers.app import app


@app.task(name="bitplan.run_job")
def run_job(job_id: str) -> str:
    from workers import jobs

    # The embedded default has one in-process worker: shards would only queue behind each other there.
    from workers.app import settings

    return jobs.run_job(job_id, dispatch_shards=None if settings().embedded else _dispatch_shards)


@app.task(name="bitplan.sensitivity_shard")
def sensitivity_shard(job_id: str, layers: list[str], index: int, count: int, lease: str) -> dict | None:
    from workers import jobs

    return jobs.run_shard(job_id, layers, index, count, lease)


@app.task(name="bitplan.merge_shards")
def merge_shards(parts: list, job_id: str, lease: str) -> str:
    from workers import jobs

    return jobs.merge_and_continue(parts, job_id, lease)


def _dispatch_shards(job_id: str, blocks: list[list[str]], lease: str) -> None:
    header = [sensitivity_shard.s(job_id, block, i, len(blocks), lease) for i, block in enumerate(blocks)]
    chord(header)(merge_shards.s(job_id, lease))


def enqueue(job_id: str) -> None:
    """Queue a job (called by the API after the job row is committed)."""
    run_job.apply_async(args=[job_id], task_id=job_id)


def pending_job_ids(limit: int = 20_000) -> set[str] | None:
    """Ids of the jobs whose ``run_job`` message waits in the broker's queue; None when this broker cannot be
    inspected (Redis and the in-process memory broker can). Messages a worker took and has not acknowledged are
    not counted: that worker may be dead (the reconciler decides by the job's heartbeat)."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        queue = app.conf.task_default_queue or "celery"
        kind = type(channel).__module__
        if kind == "kombu.transport.memory":
            messages = [m for q in list(type(channel).queues.values()) for m in list(q.queue)[:limit]]
        elif kind == "kombu.transport.redis":
            client = channel.client
            keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps]
            raw = [m for key in keys for m in client.lrange(key, 0, limit - 1)]
            messages = [json.loads(m) for m in raw]
        else:
            return None
    ids: set[str] = set()
    for message in messages:
        if isinstance(message, str):
            message = json.loads(message)
        headers = message.get("headers") or {} if isinstance(message, dict) else {}
        if headers.get("task") == "bitplan.run_job" and headers.get("id"):
            ids.add(str(headers["id"]))
    return ids
