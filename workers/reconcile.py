"""The reconciler: makes every job reach a terminal state whatever happened to the
broker or the workers. Runs in the API process (a thread, every few seconds) and is
safe to run in several places at once: sending a job twice is harmless, because a
worker takes a job only through ``jobs.start()``, which lets one attempt hold it.

* queued jobs not sent (or not started) for ``requeue_after_s`` are sent again — a
  broker that restarted empty (Redis without persistence) lost them — unless the
  broker still holds their message (a backlog behind busy workers: sending again
  would only pile up duplicates);
* running jobs whose heartbeat stopped for ``heartbeat_stale_s`` lost their worker
  (killed, out of memory, machine gone) and are sent again; another worker takes
  them over;
* a job whose workers stopped ``max_attempts`` times fails with a message rather than
  killing another worker; running jobs far past the time limit fail too.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import or_, select

from bitplan.settings import Settings
from storage import Database
from storage.models import Job, JobState, move, utcnow
from workers.callbacks import schedule_callback

log = logging.getLogger("bitplan.reconcile")


def reconcile_once(db: Database, enqueue: Callable[[str], None], settings: Settings,
                   pending: Callable[[], set[str] | None] | None = None) -> dict[str, int]:
    """One pass; returns how many jobs were requeued, failed, or left alone because their message still waits in
    the broker (for logs and tests). ``pending`` lists the job ids the broker holds (None: it cannot tell)."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=settings.heartbeat_stale_s)
    waited = now - dt.timedelta(seconds=settings.requeue_after_s)
    overdue = now - dt.timedelta(seconds=settings.job_time_limit_s + 2 * settings.heartbeat_stale_s)
    counts = {"requeued": 0, "failed": 0, "still_queued": 0}
    send: list[str] = []
    waiting: set[str] | None = None
    with db.session() as s:
        queued = s.scalars(select(Job).where(Job.state == JobState.QUEUED,
                                             or_(Job.enqueued_at.is_(None), Job.enqueued_at < waited))
                           .with_for_update(skip_locked=True).limit(500)).all()
        lost = s.scalars(select(Job).where(Job.state == JobState.RUNNING,
                                           or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale))
                         .with_for_update(skip_locked=True).limit(500)).all()
        if (queued or lost) and pending is not None:
            waiting = _pending(pending)
        for job in lost:
            resent = job.enqueued_at is not None and job.enqueued_at > waited and job.attempts > 0
            if (waiting is not None and job.id in waiting) or (waiting is None and resent):
                counts["still_queued"] += 1  # already sent again, and no worker has taken it yet
                continue
            if job.attempts >= settings.max_attempts:
                _fail(job, now, "worker_lost",
                      f"the job's worker stopped {job.attempts} times without finishing it (killed, or out of memory?)",
                      "try a smaller max_samples or batch_size, or ask the operator to check the workers' memory")
                counts["failed"] += 1
                schedule_callback(s, job)  # sent by the callback dispatcher, as for a job a worker ended
            elif job.started_at is not None and job.started_at < overdue:
                _fail(job, now, "time_limit", f"the job ran longer than the time limit of {settings.job_time_limit_s:g} s",
                      "use a cheaper sensitivity method or fewer probes/samples")
                counts["failed"] += 1
                schedule_callback(s, job)  # sent by the callback dispatcher, as for a job a worker ended
            else:
                job.detail = f"worker lost (no heartbeat for {settings.heartbeat_stale_s:g} s): sent to another worker"
                job.enqueued_at = now
                send.append(job.id)
        for job in queued:
            job.enqueued_at = now
            if waiting is not None and job.id in waiting:  # a backlog, not a lost message: sending again piles up
                counts["still_queued"] += 1
                continue
            send.append(job.id)
    for job_id in send:
        try:
            enqueue(job_id)
            counts["requeued"] += 1
        except Exception as exc:  # broker down: the next pass tries again
            log.warning("could not requeue %s: %s", job_id, exc)
    if counts["requeued"] or counts["failed"]:
        log.info("reconciler: %s", counts)
    return counts


def _pending(pending: Callable[[], set[str] | None]) -> set[str] | None:
    try:
        return pending()
    except Exception as exc:  # the broker cannot be read now: resend as before (a worker skips a duplicate)
        log.warning("could not list the broker's queued messages: %s", exc)
        return None




def _fail(job: Job, now: dt.datetime, code: str, message: str, hint: str) -> None:
    move(job, JobState.FAILED, now)
    job.error_message, job.error_hint, job.error_code = message, hint, code


class Reconciler:
    """``reconcile_once`` every ``every_s`` seconds in a daemon thread until ``stop()``."""

    def __init__(self, db: Database, enqueue: Callable[[str], None], settings: Settings, every_s: float = 5.0,
                 pending: Callable[[], set[str] | None] | None = None) -> None:
        self.db, self.enqueue, self.settings, self.every_s, self.pending = db, enqueue, settings, every_s, pending
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitplan-reconciler", daemon=True)

    def start(self) -> Reconciler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                reconcile_once(self.db, self.enqueue, self.settings, self.pending)
            except Exception as exc:  # the database may be down; the next pass tries again
                log.warning("reconciler pass failed: %s", exc)
