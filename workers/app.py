"""The Celery app shared by the API (which enqueues) and the workers (which run).

Jobs are acknowledged late and redelivered if a worker dies, so a job step must be
safe to run twice (``workers.jobs`` checks the job's state before working).
"""

from __future__ import annotations

import threading
from functools import lru_cache

from celery import Celery

from bitplan.settings import Settings, load_settings

app = Celery("bitplan", include=["workers.tasks"])
_settings: Settings | None = None


def configure(settings: Settings | None = None) -> Celery:
    """Point the app at the broker and result backend of ``settings`` (default: the environment)."""
    global _settings
    _settings = settings or load_settings()
    app.conf.update(
        broker_url=_settings.broker_url,
        result_backend=_settings.result_backend,
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
        task_soft_time_limit=_settings.job_time_limit_s + 120,
        task_time_limit=_settings.job_time_limit_s + 300,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    # Connections pooled for an earlier broker would keep sending there: drop them all (kombu keeps them globally),
    # as Celery does after a fork.
    from kombu import pools

    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    runtime.cache_clear()
    return app


def settings() -> Settings:
    return _settings if _settings is not None else configure() and _settings  # type: ignore[return-value]


@lru_cache(maxsize=1)
def runtime():
    """The database and blob store of the configured settings (one per process)."""
    from storage import BlobStore, Database

    s = settings()
    return Database(s.database_url), BlobStore(s.data_dir)


def start_in_process_worker(concurrency: int = 1):
    """Run a worker in a thread of this process (the embedded default: memory broker, no Redis); returns the
    worker, whose ``stop()`` ends it. It only orchestrates: models are read and run in sandboxed children."""
    worker = app.WorkController(
        app=app, concurrency=concurrency, pool_cls="solo" if concurrency == 1 else "threads",
        hostname="embedded@localhost", loglevel="WARNING", without_heartbeat=True, without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="bitplan-worker", daemon=True)
    thread.start()
    return worker
