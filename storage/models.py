"""The tables: teams and their API keys, uploaded models and datasets, jobs, and
the sensitivity cache. Typed SQLAlchemy 2.x models; the schema itself is owned by
the Alembic migrations in ``storage/migrations`` (applied on start)."""

from __future__ import annotations

import datetime as dt
import secrets
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UtcDateTime(TypeDecorator):
    """A timestamp that always reads back as an aware UTC datetime: SQLite drops the zone, PostgreSQL keeps
    it; every time bitplan stores is UTC (the one place that knows)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("t"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ApiKey(Base):
    """Only the key's sha256 is stored; the key itself is shown once, when created."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("k"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="the key's first characters, to tell keys apart in listings")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class _Upload:
    """Columns every uploaded file has: its team, content hash, name as uploaded, size, and what reading it found."""

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ModelFile(_Upload, Base):
    """An uploaded model, one row per (team, content): a re-upload finds the same row."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("team_id", "sha256", name="uq_models_team_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("m"))
    format: Mapped[str] = mapped_column(String(20))
    description: Mapped[dict] = mapped_column(JSON, doc="inputs, layers and other_bytes as measured on upload")


class DatasetFile(_Upload, Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("team_id", "sha256", name="uq_datasets_team_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("d"))
    description: Mapped[dict] = mapped_column(JSON, doc="samples, inputs and has_targets")


class JobState(StrEnum):
    """A job's life. Every change of state goes through :func:`move`, which allows only these steps:

    * queued -> running (a worker takes it) or cancelled;
    * running -> succeeded, failed or cancelled; running -> running when a worker takes over a job whose
      worker stopped sending heartbeats (a new lease);
    * succeeded, failed and cancelled are final.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATES = tuple(state.value for state in JobState)
TERMINAL_STATES = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
ACTIVE_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change that :data:`TRANSITIONS` does not allow: a bug in the caller, never a user's mistake."""


def move(job: Job, new: JobState, now: dt.datetime | None = None) -> None:
    """Set ``job``'s state to ``new`` if the state machine allows it; a final state also sets ``finished_at``."""
    old = JobState(job.state)
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job {job.id}: {old.value} -> {new.value} is not allowed")
    job.state = new.value
    if new.value in TERMINAL_STATES:
        job.finished_at = now or utcnow()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("j"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=True)
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=True)
    request: Mapped[dict] = mapped_column(JSON, doc="the job as submitted (validated)")
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    detail: Mapped[str] = mapped_column(Text, default="")
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_hint: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True,
                                                   doc="why it failed or was cancelled, for programs (docs/api.md)")
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cache_hit: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    plan: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_status: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_due_at: Mapped[dt.datetime | None] = mapped_column(
        UtcDateTime(), nullable=True, index=True,
        doc="when the callback is next to be sent (the outbox; None: nothing to send)")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True,
                                                            doc="last time the job was sent to the broker")
    lease: Mapped[str | None] = mapped_column(String(32), nullable=True,
                                              doc="token of the attempt that owns the running job; others stand down")
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True, doc="host:pid of the attempt")


class SensitivityEntry(Base):
    """A computed sensitivity table, keyed by what determines it (model and data content, method,
    its parameters, bit options, clipping, seed), reused by every later job that asks the same."""

    __tablename__ = "sensitivity_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    data_sha256: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON, doc="the key's inputs, readable")
    table: Mapped[dict] = mapped_column(JSON)
    seconds: Mapped[float] = mapped_column(Float)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class WebSession(Base):
    """A web sign-in: the browser holds a random id (only its sha256 is stored here), never the API key.
    Signing out deletes the row; ``csrf_token`` must come back with every form post of the session."""

    __tablename__ = "web_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)
