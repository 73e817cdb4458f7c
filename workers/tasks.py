"""Celery task entry points; the work is in ``workers.jobs``.

``run_job`` carries the job id as its task id, so the API can revoke a queued job
by id. Sharded sensitivity runs as a chord: one ``sensitivity_shard`` per layer
block, then ``merge_shards`` on whichever worker finishes last.
"""

from __future__ import annotations

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
