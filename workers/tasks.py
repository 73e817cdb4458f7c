"""Celery task entry points, registered on each ``WorkerApp``; the work is in ``workers.jobs``.

``run_job`` carries the job id as its task id, so the API can revoke a queued job by id. Sharded sensitivity
runs as a chord: one ``sensitivity_shard`` per layer block or probe range, then ``merge_shards`` on whichever
worker finishes last. Every task reads the deployment (settings, database, blobs) from the app it is registered on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import chord

if TYPE_CHECKING:
    from workers.app import WorkerApp


def register(app: WorkerApp) -> None:
    """Register the job tasks on ``app``."""

    def dispatch_shards(job_id: str, shards: list[dict[str, Any]], lease: str) -> None:
        header = [sensitivity_shard.s(job_id, shard, i, len(shards), lease) for i, shard in enumerate(shards)]
        chord(header, app=app)(merge_shards.s(job_id, lease))

    # shared=False: Celery would otherwise add every task to each app created later in the process
    @app.task(name="bitplan.run_job", shared=False)  # type: ignore[misc]  # celery is untyped
    def run_job(job_id: str) -> str:
        from workers import jobs

        # The embedded default has one in-process worker: shards would only queue behind each other there.
        return jobs.run_job(app.runtime, job_id, dispatch_shards=None if app.settings.embedded else dispatch_shards)

    @app.task(name="bitplan.sensitivity_shard", shared=False)  # type: ignore[misc]
    def sensitivity_shard(job_id: str, shard: dict[str, Any] | list[str], index: int, count: int,
                          lease: str) -> dict[str, Any] | None:
        from workers import jobs

        # shard: {"layers": [names]} or {"probes": [start, end]} (a bare list of names from an older sender: layers)
        return jobs.run_shard(app.runtime, job_id, shard, index, count, lease)

    @app.task(name="bitplan.merge_shards", shared=False)  # type: ignore[misc]
    def merge_shards(parts: list[dict[str, Any] | None], job_id: str, lease: str) -> str:
        from workers import jobs

        return jobs.merge_and_continue(app.runtime, parts, job_id, lease)
