"""``create_app()``: the FastAPI application, wired to storage and the job queue.

Migrations run on start. With the embedded default (``memory://`` broker) the
process also runs a worker thread, so ``bitplan serve`` alone is a working service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitplan import __version__
from bitplan.settings import Settings, load_settings
from service import errors
from service.api import router
from service.ratelimit import make_rate_limiter
from storage import BlobStore, Database, Unavailable

if TYPE_CHECKING:
    from workers.app import WorkerApp

log = logging.getLogger("bitplan.service")
CallNext = Callable[[Request], Awaitable[Response]]


#: The routes that take multipart file uploads (limited by BITPLAN_MAX_UPLOAD_MB); any other body is capped as JSON.
UPLOAD_PATHS = frozenset({"/v1/models", "/v1/datasets", "/"})


class JsonBodyCap:
    """Refuse a request body other than a multipart upload larger than ``limit`` bytes with 413, before it is parsed.

    A declared Content-Length over the limit is answered at once, without reading the body (the HTTP server
    delivers no more than a declared length). A body sent without one (chunked) is read here, at most up
    to the limit, and handed on; the first byte past the limit ends the request with the same 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0:  # BITPLAN_MAX_JSON_KB=0: no cap
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        if multipart and scope.get("path") in UPLOAD_PATHS:
            await self.app(scope, receive, send)  # uploads: refuse_oversized_uploads and BITPLAN_MAX_UPLOAD_MB
            return
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            await self.app(scope, receive, send)
            return
        messages, size = [], 0  # chunked, or HTTP/2 without a length: count what arrives
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        kb = self.limit / 1024
        response = errors.error_response(
            413, "too_large", f"the request body is larger than {kb:g} KB, the limit for JSON (non-upload) requests",
            "send fewer or shorter values (pins and latency_table need only the model's layers), "
            "or ask the operator to raise BITPLAN_MAX_JSON_KB", headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(settings: Settings | None = None, worker: bool | None = None, reconcile: bool = True) -> FastAPI:
    """``worker``: run an in-process worker (default: only with the embedded memory broker); ``reconcile``: run
    the reconciler thread that resends lost work (workers/reconcile.py)."""
    settings = settings or load_settings()
    run_worker = settings.embedded if worker is None else worker
    app = FastAPI(
        title="bitplan", version=__version__, lifespan=_lifespan(settings, run_worker, reconcile),
        description="Mixed-precision bit-allocation search: upload a model and calibration data, submit a budget, "
                    "get the per-layer bit-width plan with its Pareto frontier and measured quality. "
                    "Authenticate with `Authorization: Bearer <key>`.",
    )
    celery_app = _attach_state(app, settings)
    errors.install(app)
    _install_limits(app, settings)
    app.include_router(router)
    _install_health(app, celery_app)
    from service import web

    web.install(app)
    return app


def _lifespan(settings: Settings, run_worker: bool,
              reconcile: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start: migrate, warm the sandbox, and run the in-process worker, the reconciler and the callback
    dispatcher as asked; stop them at shutdown (a later app in this process must not find this one's)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db.migrate()
        worker = None
        from workers.sandbox import shared_sandbox

        shared_sandbox().warm_in_background()  # the process that reads uploads (and runs jobs) starts once, now
        if run_worker:
            worker = app.state.celery.start_in_process_worker()
            log.info("in-process worker started (broker %s)", settings.broker_url)
        reconciler = dispatcher = None
        if reconcile:
            from workers.callbacks import CallbackDispatcher
            from workers.reconcile import Reconciler
            reconciler = Reconciler(app.state.db, app.state.enqueue, settings,
                                    pending=app.state.celery.pending_job_ids).start()
            dispatcher = CallbackDispatcher(app.state.db, settings.callback_allow).start()  # sends job callbacks
        yield
        if reconciler is not None:
            reconciler.stop()
        if dispatcher is not None:
            dispatcher.stop()
        if worker is not None:
            worker.stop(in_sighandler=False)

    return lifespan


def _attach_state(app: FastAPI, settings: Settings) -> WorkerApp:
    """What the routes use, on ``app.state``: settings, database, blob store, and the job queue's enqueue and
    revoke. Returns the Celery app, this FastAPI app's own (an in-process worker shares the database)."""
    app.state.settings = settings
    app.state.db = Database(settings.database_url)
    app.state.blobs = BlobStore(settings.data_dir)
    from workers.app import WorkerApp

    celery_app = app.state.celery = WorkerApp(settings, db=app.state.db, blobs=app.state.blobs)
    app.state.enqueue = celery_app.enqueue
    app.state.revoke = celery_app.revoke
    return celery_app


def _install_limits(app: FastAPI, settings: Settings) -> None:
    """The rate limit per key, the declared-length check on uploads, and the cap on JSON bodies."""
    limiter = app.state.limiter = make_rate_limiter(settings)

    @app.middleware("http")
    async def rate_limit(request: Request, call_next: CallNext) -> Response:
        """Per API key (header or sign-in cookie); anonymous requests are not counted."""
        auth = request.headers.get("authorization", "")
        key = auth.partition(" ")[2].strip() or request.cookies.get("bitplan_session")
        if key:
            wait = limiter.take(key)
            if wait > 0:
                return errors.error_response(429, "rate_limited", f"more than {settings.rate_limit:g} requests per second "
                                             "with this key", f"slow down; retry after {wait:.1f} s",
                                             headers={"Retry-After": str(max(1, round(wait + 0.5)))})
        return await call_next(request)

    @app.middleware("http")
    async def refuse_oversized_uploads(request: Request, call_next: CallNext) -> Response:
        """Answer 413 from the declared length, before the body is read and spooled to disk."""
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > settings.max_upload_bytes + (1 << 20):
            return errors.error_response(413, "too_large", f"upload is larger than the limit of "
                                         f"{settings.max_upload_bytes / 1e6:g} MB",
                                         "split the data, or ask the operator to raise BITPLAN_MAX_UPLOAD_MB")
        return await call_next(request)

    app.add_middleware(JsonBodyCap, limit=settings.max_json_bytes)


def _install_health(app: FastAPI, celery_app: WorkerApp) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"], summary="Database and broker reachable")
    def readyz() -> JSONResponse:
        checks = {}
        try:
            app.state.db.ping()
            checks["database"] = "ok"
        except Unavailable as exc:
            checks["database"] = str(exc)
        try:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
