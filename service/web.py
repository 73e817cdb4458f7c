"""The web form for people: sign in with an API key, submit a job, watch it run, read the
plan and its Pareto frontier.

Signing in opens a server-side session (``storage.models.WebSession``): the browser keeps
only a random session id in an HTTP-only, SameSite=Strict cookie, never the API key, and
signing out deletes the session row. Every form post that changes something carries the
session's CSRF token in a hidden field and, when the browser says where the post comes from
(``Origin``, else ``Referer``), must come from this site; otherwise it is refused with 403
before anything is stored.

Server-rendered Jinja2 pages with one small script (``static/app.js``) that polls a
progress fragment. The pages call the same operations as the REST API, so a job
made here is the same job a script would make.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.datastructures import FormData, UploadFile

from bitplan.errors import BitplanError
from bitplan.exports import FORMATS as EXPORT_FORMATS
from bitplan.exports import export_choices, export_plan
from bitplan.formats import FORMATS as NUMBER_FORMATS
from bitplan.formats import TARGETS
from bitplan.methods import DEFAULT_SENSITIVITY, METHODS
from bitplan.schemas import ACT_BITS, BUDGET_KEYS, DEFAULT_A_BITS, DEFAULT_SOLVER, DEFAULT_W_BITS, WEIGHT_BITS
from service import plots
from service.errors import ApiError
from service.jobspec import JobCreate
from service.operations import cancel_job, create_job, owned, store_upload
from storage.models import TERMINAL_STATES, DatasetFile, Job, ModelFile, Team
from storage.views import iso, job_dict

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["iso"] = iso
templates.env.globals["budget_label"] = {
    "avg_weight_bits": "average weight bits", "size_bytes": "model size (bytes)", "bops": "BOPs per sample",
    "latency_ms": "latency (ms, from your table)",
}
router = APIRouter(include_in_schema=False)
COOKIE = "bitplan_session"
LEGACY_COOKIE = "bitplan_key"  # older versions kept the API key itself here: browsers are told to drop it
DEFAULT_PORTS = {"http": 80, "https": 443}
PAGE_SIZE = 50
T = TypeVar("T")


class SignIn(Exception):
    """Raised by pages that need a team when no live session cookie came with the request."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def _session(request: Request) -> tuple[Team, str] | None:
    """The request's live session: (team, CSRF token); also left in ``request.state`` for the templates."""
    session_id = request.cookies.get(COOKIE)
    found = request.app.state.db.web_session_for(session_id) if session_id else None
    if found is not None:
        request.state.csrf_token = found[1]
    return found


def signed_in(request: Request) -> Team:
    found = _session(request)
    if found is None:
        raise SignIn(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return found[0]


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS.get(scheme)


def _same_origin(request: Request) -> bool:
    """True when the browser's ``Origin`` (else ``Referer``) is this site (scheme, host and port of the request, as
    the Host header names it), or when it sent neither (a script; the CSRF token still has to match)."""
    claimed = request.headers.get("origin")
    if claimed is None:
        claimed = request.headers.get("referer")
    if claimed is None:
        return True
    mine = _origin(str(request.url))
    return mine is not None and _origin(claimed) == mine  # "Origin: null" (a sandboxed or redirected post) fails


def _forged(request: Request, form: FormData, back: str) -> Response | None:
    """The 403 page when a form post lacks the session's CSRF token or comes from another site, else None.
    Call after ``signed_in``/``_session`` and before doing anything."""
    expected = getattr(request.state, "csrf_token", None)
    sent = form.get("csrf_token")
    token_ok = (expected is not None and isinstance(sent, str)
                and hmac.compare_digest(sent.encode(), expected.encode()))
    if token_ok and _same_origin(request):
        return None
    return _refused(request, back)


def _refused(request: Request, back: str) -> Response:
    return page(request, "forbidden.html", status=403, back=back,
                message="This form has expired or was sent from another site, so nothing was done.")


def install(app: FastAPI) -> None:
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(router)

    @app.exception_handler(SignIn)
    async def _sign_in(_request: Request, exc: SignIn) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(exc.next_url)}", status_code=303)


def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a template; forms that post find the session's CSRF token as ``csrf_token``."""
    context.setdefault("csrf_token", getattr(request.state, "csrf_token", ""))
    return templates.TemplateResponse(request, name, context, status_code=status)


# --- sign in ----------------------------------------------------------------------------------------------


def _safe_next(url: str | None) -> str:
    return url if url and url.startswith("/") and not url.startswith("//") else "/"


def _drop_cookies(request: Request, response: Response) -> None:
    secure = request.url.scheme == "https"
    if COOKIE in request.cookies:
        response.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=secure)
    if LEGACY_COOKIE in request.cookies:
        response.delete_cookie(LEGACY_COOKIE, httponly=True, samesite="strict", secure=secure)


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002
    response = page(request, "login.html", next=_safe_next(next), error=None)
    if LEGACY_COOKIE in request.cookies:
        response.delete_cookie(LEGACY_COOKIE, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    if not _same_origin(request):  # no session yet, so no token: a sign-in posted from another site is refused
        return _refused(request, "/login")
    key = str(form.get("key", "")).strip()
    next_url = _safe_next(str(form.get("next", "/")))
    db = request.app.state.db
    team = await _run(db.team_for_key, key) if key else None
    if team is None:
        error = "enter your API key" if not key else "this key is not valid (unknown or revoked)"
        return page(request, "login.html", status=401, next=next_url, error=error)
    hours = request.app.state.settings.session_hours
    old = request.cookies.get(COOKIE)
    if old:
        await _run(db.delete_web_session, old)
    session_id, _ = await _run(db.create_session, team.id, hours)
    response = RedirectResponse(next_url, status_code=303)
    _drop_cookies(request, response)
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", max_age=max(1, int(hours * 3600)),
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await request.form()
    if await _run(_session, request) is not None:
        refused = _forged(request, form, "/")
        if refused is not None:
            return refused
        await _run(request.app.state.db.delete_web_session, request.cookies[COOKIE])
    response = RedirectResponse("/login", status_code=303)
    _drop_cookies(request, response)
    return response


# --- the form ---------------------------------------------------------------------------------------------


def _choices(request: Request, team: Team) -> dict[str, Any]:
    from solver import SOLVERS

    with request.app.state.db.session() as s:
        models = s.scalars(select(ModelFile).where(ModelFile.team_id == team.id).order_by(ModelFile.created_at.desc())).all()
        datasets = s.scalars(select(DatasetFile).where(DatasetFile.team_id == team.id)
                             .order_by(DatasetFile.created_at.desc())).all()
    return {
        "team": team,
        "models": [{"id": m.id, "name": m.name, "layers": len(m.description.get("layers", []))} for m in models],
        "datasets": [{"id": d.id, "name": d.name, "samples": d.description.get("samples")} for d in datasets],
        "methods": [{"name": m.name, "summary": m.summary} for m in METHODS.values()],
        "solvers": [{"name": name, "summary": summary} for name, (_, summary) in SOLVERS.items()],
        "budget_keys": BUDGET_KEYS,
        "weight_bits": WEIGHT_BITS,
        "number_formats": {name: f.description for name, f in NUMBER_FORMATS.items()},
        "targets": TARGETS,
        "act_bits": ACT_BITS,
        "default_sensitivity": DEFAULT_SENSITIVITY,
        "default_solver": DEFAULT_SOLVER,
    }


def _defaults() -> dict[str, Any]:
    return {"model_id": "", "dataset_id": "synthetic", "budget_kind": "avg_weight_bits", "budget_value": "4",
            "w_bits": list(DEFAULT_W_BITS), "a_bits": str(DEFAULT_A_BITS[0]), "pins": "", "sensitivity": DEFAULT_SENSITIVITY,
            "solver": DEFAULT_SOLVER, "tie_shared_inputs": False, "seq_len": "128", "formats": [], "target": ""}


def _values_from_job(job: Job) -> dict[str, Any]:
    r = job.request
    if r.get("kind") == "profile":  # the form plans; a profile job gives it its model and data
        return {**_defaults(), "model_id": job.model_id, "dataset_id": job.dataset_id or "synthetic"}
    kind, value = next(iter(r["budgets"].items()))
    return {"model_id": job.model_id, "dataset_id": job.dataset_id or "synthetic", "budget_kind": kind,
            "budget_value": f"{value:g}", "w_bits": r["w_bits"], "a_bits": str(max(r["a_bits"])),
            "pins": "\n".join(f"{k}={v}" for k, v in r.get("pins", {}).items()),
            "sensitivity": r["sensitivity"]["method"], "solver": r["solver"]["method"],
            "tie_shared_inputs": bool(r.get("tie_shared_inputs", False)), "seq_len": str(r.get("seq_len", 128)),
            "formats": list(r.get("formats") or []), "target": r.get("target") or ""}


@router.get("/")
def form(request: Request, again: str | None = None) -> HTMLResponse:
    team = signed_in(request)
    values = _defaults()
    if again:
        with request.app.state.db.session() as s:
            try:
                values = _values_from_job(owned(s, Job, again, team, "job"))
            except ApiError:
                pass
    return page(request, "form.html", values=values, errors={}, **_choices(request, team))


def _file(form: FormData, name: str) -> UploadFile | None:
    item = form.get(name)
    return item if isinstance(item, UploadFile) and item.filename else None


@router.post("/")
async def submit(request: Request) -> Response:
    team = signed_in(request)
    form = await request.form()
    refused = _forged(request, form, "/")
    if refused is not None:  # before any upload is stored or job made
        return refused
    values: dict[str, Any] = {
        "model_id": str(form.get("model_id", "")), "dataset_id": str(form.get("dataset_id", "synthetic")),
        "budget_kind": str(form.get("budget_kind", "avg_weight_bits")), "budget_value": str(form.get("budget_value", "")).strip(),
        "w_bits": [int(str(b)) for b in form.getlist("w_bits") if str(b).isdigit()],
        "a_bits": str(form.get("a_bits", "16")),
        "pins": str(form.get("pins", "")), "sensitivity": str(form.get("sensitivity", DEFAULT_SENSITIVITY)),
        "solver": str(form.get("solver", DEFAULT_SOLVER)), "tie_shared_inputs": form.get("tie_shared_inputs") == "1",
        "seq_len": str(form.get("seq_len", "128")).strip() or "128",
        "formats": [str(f) for f in form.getlist("formats")], "target": str(form.get("target", "")).strip(),
    }
    errors: dict[str, str] = {}
    state = request.app.state
    # Files first: once stored they are picked in the re-rendered form, so nothing is lost on an error elsewhere.
    data_file = _file(form, "data_file")
    if data_file is not None:
        try:
            row, _ = await _run(store_upload, state, team, "dataset", data_file.file, data_file.filename)
            values["dataset_id"] = row["id"]
        except ApiError as exc:
            errors["dataset"] = _say(exc)
    model_file = _file(form, "model_file")
    if model_file is not None:
        dataset_for_trace = values["dataset_id"] if values["dataset_id"] not in ("", "synthetic") else None
        try:
            row, _ = await _run(store_upload, state, team, "model", model_file.file, model_file.filename, dataset_for_trace)
            values["model_id"] = row["id"]
        except ApiError as exc:
            errors["model"] = _say(exc)
    if not values["model_id"] and "model" not in errors:
        errors["model"] = ("choose an uploaded model or upload a model file (.pt2, TorchScript or a zipped Hugging Face "
                           "checkpoint)")
    latency_table = None
    if values["budget_kind"] == "latency_ms":
        table_file = _file(form, "latency_table")
        if table_file is None:
            errors["latency_table"] = "a latency budget needs a lookup table: JSON {layer: {bits: ms}}"
        else:
            try:
                latency_table = json.loads(await table_file.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                errors["latency_table"] = f"not JSON ({exc})"
    pins, pin_error = _pins(values["pins"])
    if pin_error:
        errors["pins"] = pin_error
    if not values["w_bits"]:
        errors["w_bits"] = "allow at least one bit width"
    if not values["seq_len"].isdigit():
        errors["seq_len"] = f"'{values['seq_len']}' is not a whole number of tokens"
    try:
        budget_value = float(values["budget_value"])
    except ValueError:
        errors["budget_value"] = f"'{values['budget_value']}' is not a number" if values["budget_value"] else "enter a budget"
        budget_value = None
    if not errors:
        try:
            body = JobCreate(
                model_id=values["model_id"], dataset_id=values["dataset_id"] or "synthetic",
                budgets={values["budget_kind"]: budget_value}, w_bits=values["w_bits"], a_bits=[int(values["a_bits"])],
                pins=pins, tie_shared_inputs=values["tie_shared_inputs"], sensitivity={"method": values["sensitivity"]},
                solver={"method": values["solver"]}, latency_table=latency_table, seq_len=int(values["seq_len"]),
                formats=values["formats"], target=values["target"] or None,
            )
            job, _ = await _run(create_job, state, team, body)
            return RedirectResponse(f"/jobs/{job.id}", status_code=303)
        except ValidationError as exc:
            for e in exc.errors():
                errors.setdefault(_field_of(e.get("loc", ())), str(e.get("msg", "")).removeprefix("Value error, "))
        except ApiError as exc:
            errors[_field_of_error(exc)] = _say(exc)
    return page(request, "form.html", status=422, values=values, errors=errors, **_choices(request, team))


async def _run(fn: Callable[..., T], *args: Any) -> T:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _say(exc: ApiError) -> str:
    return exc.message + (f" — {exc.hint}" if exc.hint else "")


def _pins(text: str) -> tuple[dict[str, int], str | None]:
    pins = {}
    for line in text.replace(",", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        name, sep, bits = line.rpartition("=")
        if not sep or not name.strip() or not bits.strip().isdigit():
            return {}, f"'{line}' is not LAYER=BITS (one per line, e.g. conv1=8)"
        pins[name.strip()] = int(bits)
    return pins, None


#: the request's fields (an error's ``field``, a validation error's first ``loc``) -> the form's inputs
FORM_FIELDS = {"budgets": "budget_value", "w_bits": "w_bits", "pins": "pins", "model_id": "model",
               "dataset_id": "dataset", "eval_dataset_id": "dataset", "latency_table": "latency_table",
               "sensitivity": "sensitivity", "solver": "solver", "seq_len": "seq_len", "formats": "formats",
               "target": "target"}


def _field_of(loc: Iterable[object]) -> str:
    parts = [str(p) for p in loc]
    return FORM_FIELDS.get(parts[0] if parts else "", "form")


def _field_of_error(exc: ApiError) -> str:
    """Where the form shows an error: by the field the error names, else at the top."""
    return FORM_FIELDS.get(exc.field or "", "form")


# --- jobs -------------------------------------------------------------------------------------------------


@router.get("/jobs")
def jobs(request: Request, page_no: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1) -> HTMLResponse:
    team = signed_in(request)
    with request.app.state.db.session() as s:
        total = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == team.id))
        rows = s.execute(select(Job, ModelFile.name).join(ModelFile, ModelFile.id == Job.model_id)
                         .where(Job.team_id == team.id).order_by(Job.created_at.desc(), Job.id)
                         .limit(PAGE_SIZE).offset((page_no - 1) * PAGE_SIZE)).all()
    items = [{"job": job_dict(job), "model": name} for job, name in rows]
    return page(request, "jobs.html", team=team, items=items, page_no=page_no,
                more=page_no * PAGE_SIZE < total, total=total)


def _job_context(request: Request, team: Team, job_id: str) -> dict[str, Any]:
    with request.app.state.db.session() as s:
        job = owned(s, Job, job_id, team, "job")
        model = s.get(ModelFile, job.model_id)
        view = job_dict(job)
        plan = job.plan
    context = {"team": team, "job": view, "model_name": model.name if model else "?", "plan": plan,
               "terminal": view["state"] in TERMINAL_STATES}
    if plan is not None and view["kind"] == "apply":  # a report and a checkpoint, not a plan
        context.update(plan=None, applied=plan)
    elif plan is not None and view["kind"] == "profile":  # a latency table, not a plan
        rows = list(plan.get("latency_table", {}).values())
        widths = sorted(rows[0], key=lambda b: (0, int(b), "") if b.isdigit() else (1, 0, b)) if rows else []
        context.update(plan=None, latency=plan, latency_widths=widths)
    elif plan is not None:
        context.update(plots.plan_view(plan))
        context["exports"] = export_choices(plan, stem=f"{job_id}-plan")
    return context


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> HTMLResponse:
    team = signed_in(request)
    try:
        context = _job_context(request, team, job_id)
    except ApiError as exc:
        return page(request, "missing.html", status=exc.status, team=team, message=exc.message)
    return page(request, "job.html", **context)


@router.get("/jobs/{job_id}/progress")
def job_progress(request: Request, job_id: str) -> Response:
    team = signed_in(request)
    try:
        context = _job_context(request, team, job_id)
    except ApiError as exc:
        return PlainTextResponse(exc.message, status_code=exc.status)
    return page(request, "_progress.html", **context)


@router.post("/jobs/{job_id}/cancel")
async def job_cancel(request: Request, job_id: str) -> Response:
    team = await _run(signed_in, request)
    form = await request.form()
    refused = _forged(request, form, f"/jobs/{quote(job_id)}")
    if refused is not None:
        return refused
    try:
        await _run(cancel_job, request.app.state, team, job_id)
    except ApiError as exc:
        if exc.status == 404:
            return page(request, "missing.html", status=404, team=team, message=exc.message)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _finished_plan(request: Request, job_id: str) -> dict[str, Any] | Response:
    """The signed-in team's job's plan, or the plain-text answer a download link gets instead (404, 409)."""
    team = signed_in(request)
    with request.app.state.db.session() as s:
        try:
            job = owned(s, Job, job_id, team, "job")
        except ApiError as exc:
            return PlainTextResponse(exc.message, status_code=404)
        plan: dict[str, Any] | None = job.plan
        state = job.state
    if plan is None:
        return PlainTextResponse(f"job {job_id} has no plan ({state})", status_code=409)
    return plan


@router.get("/jobs/{job_id}/plan.{fmt}")
def job_download(request: Request, job_id: str, fmt: str) -> Response:
    if fmt not in ("json", "csv"):
        return PlainTextResponse("download plan.json or plan.csv", status_code=404)
    plan = _finished_plan(request, job_id)
    if isinstance(plan, Response):
        return plan
    disposition = {"Content-Disposition": f'attachment; filename="{job_id}-plan.{fmt}"'}
    if fmt == "json":
        return JSONResponse(plan, headers=disposition)
    return PlainTextResponse(plots.plan_csv(plan), media_type="text/csv", headers=disposition)


@router.get("/jobs/{job_id}/export/{fmt}")
def job_export(request: Request, job_id: str, fmt: str) -> Response:
    """The plan as a runtime's file (bitplan.exports): what the job page's deploy links download."""
    if fmt not in EXPORT_FORMATS:
        return PlainTextResponse(f"no export format '{fmt}': {', '.join(EXPORT_FORMATS)}", status_code=404)
    plan = _finished_plan(request, job_id)
    if isinstance(plan, Response):
        return plan
    try:
        export = export_plan(plan, fmt, stem=f"{job_id}-plan")
    except BitplanError as exc:
        return PlainTextResponse(exc.one_line(), status_code=422)
    return Response(export.text, media_type=export.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{export.filename}"'})


@router.get("/jobs/{job_id}/latency.json")
def job_latency(request: Request, job_id: str) -> Response:
    """A profile job's latency table (the job page's link): what a plan job's latency_table takes."""
    result = _finished_result(request, job_id, "latency_table", "is not a latency profile")
    if isinstance(result, Response):
        return result
    return JSONResponse(result["latency_table"],
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-latency.json"'})


@router.get("/jobs/{job_id}/checkpoint.zip")
def job_checkpoint(request: Request, job_id: str) -> Response:
    """An apply job's zipped compressed-tensors checkpoint (the job page's link)."""
    result = _finished_result(request, job_id, "artifact", "did not apply a plan")
    if isinstance(result, Response):
        return result
    artifact = result["artifact"]
    path = request.app.state.blobs.path(artifact["sha256"])
    if not path.exists():
        return PlainTextResponse(f"the checkpoint of job {job_id} is no longer stored", status_code=410)
    return FileResponse(path, media_type="application/zip", filename=artifact["filename"])


def _finished_result(request: Request, job_id: str, key: str, otherwise: str) -> dict[str, Any] | Response:
    """The job's result when it holds ``key``; else the plain-text answer a download link gets."""
    result = _finished_plan(request, job_id)
    if not isinstance(result, Response) and key not in result:
        return PlainTextResponse(f"job {job_id} {otherwise}", status_code=409)
    return result
