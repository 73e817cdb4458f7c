"""The Celery app of one deployment: the API makes one (to enqueue, revoke and read the queue) and so does
``bitplan worker`` (to run the tasks).

Nothing here is module-level state: ``WorkerApp(settings)`` builds an app bound to those settings, with the
tasks registered on it and a ``Runtime`` (settings, database, blob store) that its tasks use. Two apps in one
process (tests, or an embedded server beside another) do not see each other's broker or database.

Jobs are acknowledged late and redelivered if a worker dies, so a job step must be safe to run twice
(``workers.jobs`` checks the job's state before working).

Queues: a job that needs a GPU (its ``device`` is cuda or cuda:N, or auto when BITPLAN_GPU_WORKERS says the
deployment has GPU workers) goes to the ``gpu`` queue, every other job to Celery's default queue. The route is
decided per task from the job's stored request (:meth:`WorkerApp.route`), so a job's shards and its merge follow
it; ``bitplan worker --device cuda`` consumes the gpu queue (and, with ``--cpu-jobs-too``, the default one). The
embedded deployment has one in-process worker, which takes every job from the default queue.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import Celery

from bitplan.settings import Settings

if TYPE_CHECKING:
    from storage import BlobStore, Database

log = logging.getLogger("bitplan.worker")

#: the Celery queue of jobs that need a GPU worker (the others use Celery's default queue, "celery")
GPU_QUEUE = "gpu"


def queue_for(device: str, settings: Settings) -> str | None:
    """The queue of a job asking for ``device``: GPU_QUEUE when it needs a GPU worker, None (the default queue)
    otherwise, and always in the embedded deployment, whose one in-process worker takes every job."""
    from bitplan.schemas import needs_gpu

    if settings.embedded:
        return None
    return GPU_QUEUE if needs_gpu(device, settings.gpu_workers) else None


def job_device(requested: str, worker: str) -> str:
    """The device a job runs on at a worker whose device is ``worker``: the job's cpu or cuda:N as asked; its cuda
    on the worker's GPU (cuda:N for a ``--device cuda:N`` worker); its auto wherever the worker runs jobs."""
    if requested == "cpu" or requested.startswith("cuda:"):
        return requested
    if requested == "cuda":
        return worker if worker.startswith("cuda") else "cuda"
    return worker


def worker_queues(device: str, cpu_jobs_too: bool = False, default_queue: str = "celery") -> list[str]:
    """The queues a ``bitplan worker --device DEVICE`` consumes: a GPU worker the gpu queue (and the default one
    with ``cpu_jobs_too``), a CPU worker the default queue."""
    if device.startswith("cuda"):
        return [GPU_QUEUE, default_queue] if cpu_jobs_too else [GPU_QUEUE]
    return [default_queue]


class Runtime:
    """What a task needs besides its arguments: the settings, and the database and blob store they name.
    The database is opened on first use, in the process that uses it (a prefork worker's child, not its parent)."""

    def __init__(self, settings: Settings, db: Database | None = None, blobs: BlobStore | None = None) -> None:
        self.settings = settings
        self._db, self._blobs = db, blobs
        self._lock = threading.Lock()

    @property
    def db(self) -> Database:
        with self._lock:
            if self._db is None:
                from storage import Database

                self._db = Database(self.settings.database_url)
            return self._db

    @property
    def blobs(self) -> BlobStore:
        with self._lock:
            if self._blobs is None:
                from storage import BlobStore

                self._blobs = BlobStore(self.settings.data_dir)
            return self._blobs


class WorkerApp(Celery):  # type: ignore[misc]  # celery is untyped
    """A Celery app for ``settings``: its broker and result backend, the job tasks, and their ``runtime``.

    ``db`` and ``blobs`` may be passed to share the API's (the embedded default runs the worker in the API's
    process); otherwise the runtime opens its own."""

    def __init__(self, settings: Settings, db: Database | None = None, blobs: BlobStore | None = None) -> None:
        # set_as_current=False: Celery's "current app" is process-wide; each caller holds its own app instead
        super().__init__("bitplan", set_as_current=False)
        self.runtime = Runtime(settings, db, blobs)
        self.conf.update(
            broker_url=settings.broker_url,
            result_backend=settings.result_backend,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            broker_connection_retry_on_startup=True,
            broker_connection_timeout=3,
            # a submit must not hang while the broker is down: the job row is kept and the reconciler sends it later
            task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
            broker_transport_options={"visibility_timeout": 6 * 3600},
            result_expires=24 * 3600,
            # Backstops for a prefork worker whose own loop hung: the job's child is killed at the job's time limit
            # by jobs.run_untrusted; these end the task itself a little later (the solo pool ignores them).
            task_soft_time_limit=settings.job_time_limit_s + 120,
            task_time_limit=settings.job_time_limit_s + 300,
            worker_hijack_root_logger=False,
            worker_send_task_events=False,
            task_routes=(self.route,),  # the gpu queue for jobs that need a GPU (queue_for)
        )
        from workers.tasks import register

        register(self)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def route(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str] | None:
        """A Celery router: the queue of the job a ``bitplan.*`` task works on (its first argument that is a job
        id), from the job's stored ``device``; None leaves Celery's default queue."""
        if not name.startswith("bitplan.") or self.settings.embedded:
            return None
        job_id = next((a for a in [*(args or ()), *(kwargs or {}).values()] if isinstance(a, str) and a.startswith("j_")),
                      None)
        queue = self.job_queue(job_id) if job_id else None
        return {"queue": queue} if queue else None

    def job_queue(self, job_id: str) -> str | None:
        """The queue of a stored job (None: the default queue, also for an unknown job). When the database cannot be
        read the default queue is used: the job cannot start anywhere until it can be read again."""
        from sqlalchemy import select

        from storage.models import Job

        try:
            with self.runtime.db.session() as s:
                request = s.scalar(select(Job.request).where(Job.id == job_id))
        except Exception as exc:
            log.warning("could not read job %s to route it (%s); default queue", job_id, exc)
            return None
        return queue_for(str((request or {}).get("device") or "auto"), self.settings) if request is not None else None

    def enqueue(self, job_id: str) -> None:
        """Queue a job (called by the API after the job row is committed). The task id is the job id, so a
        queued job can be revoked by id."""
        self.tasks["bitplan.run_job"].apply_async(args=[job_id], task_id=job_id)

    def revoke(self, job_id: str) -> None:
        """Tell the workers to drop a queued job (best effort: the job row already says cancelled, and a worker
        checks it before running)."""
        try:
            self.control.revoke(job_id)
        except Exception as exc:
            log.warning("could not broadcast revoke of %s: %s", job_id, exc)

    def pending_job_ids(self, limit: int = 20_000) -> set[str] | None:
        """Ids of the jobs whose ``run_job`` message waits in the broker's queue; None when this broker cannot be
        inspected (Redis and the in-process memory broker can). Messages a worker took and has not acknowledged
        are not counted: that worker may be dead (the reconciler decides by the job's heartbeat)."""
        with self.connection_for_read() as conn:
            channel = conn.default_channel
            queues = [self.conf.task_default_queue or "celery", GPU_QUEUE]
            kind = type(channel).__module__
            if kind == "kombu.transport.memory":
                messages: list[Any] = [m for q in list(type(channel).queues.values()) for m in list(q.queue)[:limit]]
            elif kind == "kombu.transport.redis":
                client = channel.client
                keys = [channel._q_for_pri(queue, pri) for queue in queues for pri in channel.priority_steps]
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

    def start_in_process_worker(self) -> Any:
        """Run a worker in a thread of this process (the embedded default: memory broker, no Redis); returns the
        worker, whose ``stop()`` ends it. It only orchestrates: models are read and run in sandboxed children.

        The solo pool runs each task in that thread, where this app is made Celery's current app (Celery looks
        tasks up in the current app, which is per thread): another app's worker thread keeps its own."""
        worker = self.WorkController(
            app=self, concurrency=1, pool_cls="solo", hostname="embedded@localhost", loglevel="WARNING",
            without_heartbeat=True, without_mingle=True, without_gossip=True,
        )

        def run() -> None:
            self.set_current()
            worker.start()

        thread = threading.Thread(target=run, name="bitplan-worker", daemon=True)
        thread.start()
        return worker
