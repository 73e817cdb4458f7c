"""``/v1``: uploads, jobs, plans, the method registry. Contract: docs/api.md."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bitplan.errors import BitplanError
from bitplan.exports import export_choices, export_plan
from bitplan.schemas import PlanFile
from service.errors import ApiError
from service.jobspec import ApplyCreate, JobCreate, ProfileCreate
from service.operations import cancel_job, create_apply_job, create_job, owned, store_upload
from service.plots import plan_csv
from service.responses import ERRORS, DatasetList, DatasetOut, JobList, JobOut, ModelList, ModelOut
from storage import Database
from storage.models import ACTIVE_STATES, JOB_STATES, DatasetFile, Job, JobState, ModelFile, Team
from storage.views import dataset_dict, job_dict, model_dict

router = APIRouter(prefix="/v1", responses=ERRORS)


def db_of(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def current_team(request: Request, authorization: Annotated[str | None, Header()] = None) -> Team:
    if not authorization:
        raise ApiError(401, "no API key given", "send the header 'Authorization: Bearer <key>' "
                       "(create a key with: bitplan keys create --team NAME)")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "the Authorization header is not 'Bearer <key>'", "send 'Authorization: Bearer <key>'")
    team = db_of(request).team_for_key(key.strip())
    if team is None:
        raise ApiError(401, "this API key is not valid (unknown or revoked)", "create one with: bitplan keys create --team NAME")
    return team


TeamDep = Annotated[Team, Depends(current_team)]


def session(request: Request) -> Iterator[Session]:
    with db_of(request).session() as s:
        yield s


SessionDep = Annotated[Session, Depends(session)]


# --- uploads ----------------------------------------------------------------------------------------------


@router.post("/models", status_code=201, response_model=ModelOut,
             summary="Upload a model (.pt2 torch.export archive or TorchScript)")
def upload_model(request: Request, response: Response, team: TeamDep, file: Annotated[UploadFile, File()],
                 dataset_id: Annotated[str | None, Form(description="data to trace a TorchScript model with")] = None,
                 ) -> dict[str, Any]:
    body, created = store_upload(request.app.state, team, "model", file.file, file.filename, dataset_id)
    response.status_code = 201 if created else 200
    return body


@router.post("/datasets", status_code=201, response_model=DatasetOut,
             summary="Upload calibration or evaluation data (.npz or .safetensors)")
def upload_dataset(request: Request, response: Response, team: TeamDep,
                   file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    body, created = store_upload(request.app.state, team, "dataset", file.file, file.filename)
    response.status_code = 201 if created else 200
    return body


#: the uploads a team lists
Upload = TypeVar("Upload", ModelFile, DatasetFile)


def _listing(s: Session, cls: type[Upload], team: Team, view: Callable[[Upload], dict[str, Any]]) -> dict[str, Any]:
    rows = s.scalars(select(cls).where(cls.team_id == team.id).order_by(cls.created_at.desc())).all()
    return {"items": [view(r) for r in rows]}


@router.get("/models", response_model=ModelList, summary="The team's models")
def list_models(team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return _listing(s, ModelFile, team, model_dict)


@router.get("/models/{model_id}", response_model=ModelOut, summary="One model with its layer table")
def get_model(model_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return model_dict(owned(s, ModelFile, model_id, team, "model"))


@router.get("/datasets", response_model=DatasetList, summary="The team's datasets")
def list_datasets(team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return _listing(s, DatasetFile, team, dataset_dict)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(dataset_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return dataset_dict(owned(s, DatasetFile, dataset_id, team, "dataset"))


# --- jobs -------------------------------------------------------------------------------------------------


@router.post("/jobs", status_code=202, response_model=JobOut, summary="Submit a planning job")
def submit_job(request: Request, body: JobCreate, team: TeamDep,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    job, replay = create_job(request.app.state, team, body, idempotency_key)
    return _accepted(job, replay)


@router.post("/profiles", status_code=202, response_model=JobOut,
             summary="Time each layer at each weight width on a worker: the latency table for latency_ms budgets")
def submit_profile(request: Request, body: ProfileCreate, team: TeamDep,
                   idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    job, replay = create_job(request.app.state, team, body, idempotency_key)
    return _accepted(job, replay)


@router.post("/jobs/{job_id}/apply", status_code=202, response_model=JobOut,
             summary="Quantize a Hugging Face checkpoint by the job's plan on a worker: a compressed-tensors checkpoint "
                     "(GET /v1/jobs/{id}/checkpoint) and its real size beside the plan's (GET /v1/jobs/{id}/report)")
def submit_apply(request: Request, job_id: str, team: TeamDep, body: ApplyCreate | None = None,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    job, replay = create_apply_job(request.app.state, team, job_id, body or ApplyCreate(), idempotency_key)
    return _accepted(job, replay)


def _accepted(job: Job, replay: bool = False) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if replay:
        headers["Idempotent-Replay"] = "true"
    return JSONResponse(job_dict(job), status_code=202, headers=headers)


@router.get("/jobs", response_model=JobList, summary="The team's jobs, newest first")
def list_jobs(request: Request, team: TeamDep, s: SessionDep,
              state: Annotated[JobState | None, Query()] = None,
              model_id: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 20,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> dict[str, Any]:
    where = [Job.team_id == team.id]
    if state:
        where.append(Job.state == state)
    if model_id:
        where.append(Job.model_id == model_id)
    total = s.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = s.scalars(select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    nxt = None
    if offset + limit < total:
        query = f"limit={limit}&offset={offset + limit}" + (f"&state={state}" if state else "") + (
            f"&model_id={model_id}" if model_id else "")
        nxt = f"/v1/jobs?{query}"
    return {"items": [job_dict(r) for r in rows], "total": total, "limit": limit, "offset": offset, "next": nxt}


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job's state, stage and progress")
def get_job(job_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return job_dict(owned(s, Job, job_id, team, "job"))


#: what each kind of job leaves: the endpoint of its result
RESULTS = {"plan": "plan", "profile": "latency", "apply": "report"}


def _plan_of(job: Job, kind: str = "plan") -> dict[str, Any]:
    """The finished job's result: its plan (``kind`` plan), latency table (profile) or apply report (apply)."""
    has = (job.request or {}).get("kind", "plan")
    if has != kind:
        words = {"plan": "a planning job", "profile": "a latency profile", "apply": "a plan applied to a checkpoint"}
        raise ApiError(409, f"job {job.id} is {words.get(has, has)}: it has no {RESULTS[kind]}",
                       f"GET /v1/jobs/{job.id}/{RESULTS.get(has, 'plan')}", code="wrong_job_kind")
    if job.state != JobState.SUCCEEDED or job.plan is None:
        why = f"job {job.id} is {job.state}" + (f": {job.error_message}" if job.error_message else "")
        hint = "poll GET /v1/jobs/{id} until state is succeeded" if job.state in ACTIVE_STATES else (
            job.error_hint or "submit the job again")
        raise ApiError(409, f"no plan: {why}", hint)
    return job.plan


PlanFormat = Literal["json", "csv", "torchao", "compressed-tensors", "gguf", "modelopt"]


@router.get("/jobs/{job_id}/plan", responses={200: {"model": PlanFile, "content": {
                "text/csv": {}, "text/plain": {}, "application/yaml": {}}}},
            summary="The plan file (schema bitplan.plan/v1), ?format=csv, or a runtime's file "
                    "(torchao, compressed-tensors, gguf, modelopt: see /exports)", response_model=None)
def get_plan(job_id: str, team: TeamDep, s: SessionDep,
             format: PlanFormat = "json") -> dict[str, Any] | Response:  # noqa: A002
    plan = _plan_of(owned(s, Job, job_id, team, "job"))
    if format == "json":
        return plan
    if format == "csv":
        return PlainTextResponse(plan_csv(plan), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{job_id}-plan.csv"'})
    try:
        export = export_plan(plan, format, stem=f"{job_id}-plan")
    except BitplanError as exc:
        raise ApiError.from_error(exc, 422) from None
    return Response(export.text, media_type=export.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{export.filename}"'})


@router.get("/jobs/{job_id}/latency", summary="A profile job's latency table: {layer: {bits: ms}}, as the "
                                              "latency_table of a plan job reads it, with the notes and machine")
def get_latency(job_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return _plan_of(owned(s, Job, job_id, team, "job"), "profile")


@router.get("/jobs/{job_id}/report", summary="An apply job's report: the checkpoint's real size beside the plan's "
                                             "prediction, the CPU latency if asked, and the notes")
def get_report(job_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    return _plan_of(owned(s, Job, job_id, team, "job"), "apply")


@router.get("/jobs/{job_id}/checkpoint", response_class=FileResponse,
            summary="An apply job's compressed-tensors checkpoint, zipped (config.json, model.safetensors, tokenizer)")
def get_checkpoint(request: Request, job_id: str, team: TeamDep, s: SessionDep) -> FileResponse:
    result = _plan_of(owned(s, Job, job_id, team, "job"), "apply")
    artifact = result["artifact"]
    path = request.app.state.blobs.path(artifact["sha256"])
    if not path.exists():
        raise ApiError(410, f"the checkpoint of job {job_id} is no longer stored", "apply the plan again",
                       code="gone")
    return FileResponse(path, media_type="application/zip", filename=artifact["filename"])


@router.get("/jobs/{job_id}/exports", summary="The runtime formats the plan exports to: for each, the file's name, "
                                              "what each layer becomes and the notes, or why it cannot")
def get_exports(job_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    plan = _plan_of(owned(s, Job, job_id, team, "job"))
    return {"job": job_id, "formats": export_choices(plan, stem=f"{job_id}-plan")}


@router.get("/jobs/{job_id}/frontier", summary="The Pareto frontier around the plan", response_model=None)
def get_frontier(job_id: str, team: TeamDep, s: SessionDep) -> dict[str, Any]:
    plan = _plan_of(owned(s, Job, job_id, team, "job"))
    return {"budget": plan["budget"], "chosen": {**plan["cost"], "objective": plan["solver"]["objective"]},
            "points": plan.get("frontier") or []}


@router.delete("/jobs/{job_id}", status_code=202, response_model=JobOut, summary="Cancel queued or running work")
def delete_job(request: Request, job_id: str, team: TeamDep) -> dict[str, Any]:
    return job_dict(cancel_job(request.app.state, team, job_id))


# --- registry ---------------------------------------------------------------------------------------------


@router.get("/methods", summary="Registered sensitivity methods and solvers, with their parameters", response_model=None)
def methods() -> dict[str, Any]:
    from bitplan.methods import METHODS
    from solver import SOLVERS

    return {
        "sensitivity": [{"name": m.name, "summary": m.summary, "params": m.params.model_json_schema(),
                         "defaults": m.params().model_dump(mode="json"), "shardable": m.shardable}
                        for m in METHODS.values()],
        "solvers": [{"name": s.name, "summary": s.summary, "params": s.params.model_json_schema(),
                     "defaults": s.params().model_dump(mode="json")}
                    for s in SOLVERS.values()],
        "job_states": list(JOB_STATES),
    }
