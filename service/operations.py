"""What the REST API and the web form both do: store an upload, create a job,
cancel one. Each takes the app's state (database, blobs, settings, queue) and the
signed-in team, and raises ApiError for anything the user must fix."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitplan.exports import CT_STORAGE
from service.errors import ApiError
from service.jobspec import ApplyCreate, JobCreate, ProfileCreate, check_against_model, check_data_fits, check_methods
from service.uploads import describe
from storage import TooLarge
from storage.models import ACTIVE_STATES, TERMINAL_STATES, DatasetFile, Job, JobState, ModelFile, Team, move, utcnow
from storage.views import dataset_dict, model_dict
from workers.callbacks import CallbackError, check_callback_url

if TYPE_CHECKING:
    from starlette.datastructures import State

log = logging.getLogger("bitplan.service")
TORCHSCRIPT_HINT = ("upload calibration data first and send its id as dataset_id with the model, "
                    "or send a torch.export (.pt2) archive")
#: the rows a team owns
Owned = TypeVar("Owned", ModelFile, DatasetFile, Job)


def owned(s: Session, cls: type[Owned], row_id: str, team: Team, what: str, field: str | None = None) -> Owned:
    """The team's own row, else 404 (never 403: another team's ids must not be confirmed); ``field``: the request
    field that named it."""
    row = s.get(cls, row_id) if "\x00" not in row_id else None  # PostgreSQL text cannot hold NUL
    if row is None or row.team_id != team.id:
        raise ApiError(404, f"no {what} '{row_id}' for this team", f"list yours with GET /v1/{what}s", field=field)
    return row


# Bidirectional overrides and isolates: a name shown as "data.npz" could be stored as "zpn.atad".
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_name(filename: str | None, default: str) -> str:
    """The name an upload is shown and stored under: its last path part, without control characters
    (PostgreSQL text cannot hold a NUL, nor can a command line or a file name),
    unpaired surrogates or bidirectional overrides, at most 200 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cs") and c not in _BIDI_CONTROLS)
    return name.strip()[:200] or default


def store_upload(state: State, team: Team, kind: str, source: BinaryIO, filename: str | None,
                 dataset_id: str | None = None) -> tuple[dict[str, Any], bool]:
    """Store a model (``kind='model'``) or dataset upload; returns (its JSON, created). A re-upload of the
    same bytes by the same team returns the earlier row; a refused file leaves nothing behind."""
    cls: type[ModelFile] | type[DatasetFile] = ModelFile if kind == "model" else DatasetFile
    view: Callable[[Any], dict[str, Any]] = model_dict if kind == "model" else dataset_dict
    try:
        staged = state.blobs.stage(source, state.settings.max_upload_bytes)
    except TooLarge as exc:
        raise ApiError(413, str(exc), "split the data, or ask the operator to raise BITPLAN_MAX_UPLOAD_MB") from None
    try:
        data_path = None
        with state.db.session() as s:
            existing = s.scalar(select(cls).where(cls.team_id == team.id, cls.sha256 == staged.sha256))
            if existing is not None:
                return view(existing), False
            if dataset_id:
                data_path = state.blobs.path(owned(s, DatasetFile, dataset_id, team, "dataset").sha256)
        name = clean_name(filename, "model.pt2" if kind == "model" else "data.npz")
        try:
            desc = describe("model" if kind == "model" else "data", staged.tmp, name, data_path,
                            memory_mb=state.settings.worker_memory_mb)
        except ApiError as exc:
            if exc.code == "needs_sample_inputs" and data_path is None:
                exc.hint = TORCHSCRIPT_HINT
            raise
        staged.commit()
        staged = None
        if kind == "model":
            row: ModelFile | DatasetFile = ModelFile(team_id=team.id, sha256=desc["sha256"], name=name, format=desc["format"],
                            size_bytes=desc["size_bytes"],
                            description={k: desc.get(k) for k in ("inputs", "layers", "other_bytes")})
        else:
            row = DatasetFile(team_id=team.id, sha256=desc["sha256"], name=name, size_bytes=desc["size_bytes"],
                              description={k: desc.get(k) for k in ("samples", "has_targets", "inputs", "text")})
        try:
            with state.db.session() as s:
                s.add(row)
                s.flush()
                return view(row), True
        except IntegrityError:  # the same team sent the same bytes at the same moment
            with state.db.session() as s:
                return view(s.scalar(select(cls).where(cls.team_id == team.id, cls.sha256 == row.sha256))), False
    finally:
        if staged is not None:
            staged.discard()


def create_apply_job(state: State, team: Team, plan_job_id: str, body: ApplyCreate,
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Check that job ``plan_job_id`` has a plan ``bitplan apply`` can write (a Hugging Face checkpoint's, INT
    widths), then record and queue the apply job."""
    _check_callback(state, body.callback_url)
    with state.db.session() as s:
        source = owned(s, Job, plan_job_id, team, "job")
        model = s.get(ModelFile, source.model_id)
        kind = (source.request or {}).get("kind", "plan")
        if kind != "plan" or source.state != JobState.SUCCEEDED or source.plan is None:
            raise ApiError(409, f"job {plan_job_id} has no plan to apply ({kind} job, {source.state})",
                           "apply a planning job that succeeded", code="no_plan")
        if model is None or model.format != "hf":
            raise ApiError(422, f"apply writes compressed-tensors checkpoints of Hugging Face checkpoints; job "
                           f"{plan_job_id} planned a {model.format if model else 'deleted'} model",
                           "write the plan for your runtime instead: GET /v1/jobs/{id}/plan?format=torchao|modelopt",
                           code="export_unsupported")
        formats = sorted({la.get("w_format", "int") for la in source.plan["layers"]} - set(CT_STORAGE))
        if formats:
            raise ApiError(422, f"the plan gives layers number formats compressed-tensors does not store "
                           f"({', '.join(formats)}); apply writes INT, " + ", ".join(sorted(set(CT_STORAGE) - {"int"})),
                           "plan with formats a runtime runs (e.g. target vllm), or without formats",
                           code="export_unsupported")
        model_id = source.model_id
    request = {"kind": "apply", "plan_job_id": plan_job_id, "device": "cpu", **body.model_dump(mode="json")}
    return _record(state, team, model_id, None, None, request, idempotency_key, body.callback_url)


def create_job(state: State, team: Team, body: JobCreate | ProfileCreate,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Check and record a job (planning, or a latency profile), then queue it; returns (job, replayed) — replayed
    for a repeated Idempotency-Key."""
    if isinstance(body, ProfileCreate):
        normalised = {"kind": "profile", **body.model_dump(mode="json")}
    else:
        normalised = check_methods(body)
    _check_callback(state, body.callback_url)
    with state.db.session() as s:
        if idempotency_key:
            earlier = s.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key))
            if earlier is not None:
                return earlier, True
        model = owned(s, ModelFile, body.model_id, team, "model", "model_id")
        if isinstance(body, ProfileCreate):
            if body.dataset_id != "synthetic":
                check_data_fits(model_dict(model), dataset_dict(owned(s, DatasetFile, body.dataset_id, team, "dataset",
                                                                      "dataset_id")), "dataset", "dataset_id")
            eval_id = None
        else:
            check_against_model(body, model_dict(model),
                                lambda i: dataset_dict(owned(s, DatasetFile, i, team, "dataset",
                                                             "dataset_id" if i == body.dataset_id else "eval_dataset_id")))
            eval_id = owned(s, DatasetFile, body.eval_dataset_id, team, "dataset").id if body.eval_dataset_id else None
        dataset_id = None if body.dataset_id == "synthetic" else owned(s, DatasetFile, body.dataset_id, team, "dataset",
                                                                       "dataset_id").id
    return _record(state, team, model.id, dataset_id, eval_id, normalised, idempotency_key, body.callback_url)


def _record(state: State, team: Team, model_id: str, dataset_id: str | None, eval_id: str | None,
            normalised: dict[str, Any], idempotency_key: str | None, callback_url: str | None) -> tuple[Job, bool]:
    """Store the job (once per Idempotency-Key; within the team's quota of active jobs, counted and inserted under
    one lock on the team's row) and queue it."""
    with state.db.session() as s:
        if idempotency_key:
            earlier = s.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key))
            if earlier is not None:
                return earlier, True
        _check_quota(state, s, team)
        job = Job(team_id=team.id, model_id=model_id, dataset_id=dataset_id, eval_dataset_id=eval_id, request=normalised,
                  idempotency_key=idempotency_key, callback_url=callback_url, enqueued_at=utcnow())
        s.add(job)
        try:
            s.flush()
        except IntegrityError:  # the same Idempotency-Key raced us
            s.rollback()
            return s.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)), True
    try:
        state.enqueue(job.id)
    except Exception as exc:  # the broker is down: the job is stored, and the reconciler sends it when it is back
        log.warning("could not enqueue %s now (%s); the reconciler will", job.id, exc)
        with state.db.session() as s:
            row = s.get(Job, job.id)
            if row is not None and row.state == JobState.QUEUED:
                row.enqueued_at = None
    return job, False


def _check_callback(state: State, url: str | None) -> None:
    """Before any row is written, and outside a session (it resolves DNS)."""
    if url is not None:
        try:
            check_callback_url(url, state.settings.callback_allow)
        except CallbackError as exc:
            exc.field = exc.field or "callback_url"
            raise ApiError.from_error(exc) from None


def _check_quota(state: State, s: Any, team: Team) -> None:
    s.get(Team, team.id, with_for_update=True)  # one submit per team at a time (PostgreSQL): the quota holds
    active = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == team.id,
                                                                   Job.state.in_(ACTIVE_STATES)))
    limit = state.settings.max_active_jobs
    if active >= limit:
        raise ApiError(429, f"your team has {active} jobs queued or running, the most it may have at once ({limit})",
                       "wait for one to finish (or cancel one with DELETE /v1/jobs/{id}), then submit again",
                       code="quota_exceeded", headers={"Retry-After": "10"})


def cancel_job(state: State, team: Team, job_id: str) -> Job:
    with state.db.session() as s:
        job = owned(s, Job, job_id, team, "job")
        s.refresh(job, with_for_update=True)
        if job.state in TERMINAL_STATES:
            raise ApiError(409, f"job {job.id} already {job.state}", "only queued or running jobs can be cancelled")
        move(job, JobState.CANCELLED)
        job.error_message, job.error_hint, job.error_code = "cancelled by the user", None, "cancelled"
    state.revoke(job_id)
    return job
