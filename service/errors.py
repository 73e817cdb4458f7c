"""Every error the API answers is JSON with a message a user can act on:
``{"error": {"code", "message", "hint"}}``, with the request ``field`` it is about when there is one and any
extra facts (``minimums`` of an infeasible budget); request-validation 422s also list the failing ``fields``.

Whatever a request holds, the answer stays small: messages are cut to ``MAX_MESSAGE_CHARS``, and a
422 lists at most ``MAX_FIELDS`` fields, each cut to ``MAX_FIELD_CHARS``. An exception no handler
expects is a 500 in the same shape, with its traceback in the server log and not in the answer.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitplan.errors import BitplanError
from storage import Unavailable

log = logging.getLogger("bitplan.service")
MAX_FIELDS = 20  # a 422 lists at most this many failing fields ...
MAX_FIELD_CHARS = 300  # ... each "loc: msg" cut to this length ...
MAX_MESSAGE_CHARS = 2000  # ... and any message or hint to this length
BUG_HINT = "this is a bug in bitplan; the server log has the traceback"

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
                503: "unavailable"}


class ApiError(Exception):
    """An answer other than 2xx: ``{"error": {"code", "message", "hint", ["field",] **extra}}``."""

    def __init__(self, status: int, message: str, hint: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.headers = status, message, hint, headers
        self.code = code or STATUS_CODES.get(status, "error")
        self.field = field
        self.extra = extra

    @classmethod
    def from_error(cls, exc: BitplanError, status: int = 422, message: str | None = None) -> ApiError:
        """``exc`` as an answer: its code, hint, field and extra facts (``minimums``) kept."""
        return cls(status, exc.message if message is None else message, exc.hint, code=exc.code, field=exc.field,
                   **exc.extra)

    def body(self) -> dict[str, Any]:
        return {"field": self.field, **self.extra} if self.field is not None else dict(self.extra)


def error_response(status: int, code: str, message: str, hint: str | None = None,
                   headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    message, hint = clip(message, MAX_MESSAGE_CHARS), None if hint is None else clip(hint, MAX_MESSAGE_CHARS)
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint, **extra}}, status_code=status,
                        headers=headers)


def clip(text: str, limit: int) -> str:
    """``text``, or its start and how much was cut when it is longer than ``limit`` characters."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 0)
    return text[:keep] + f"… ({len(text) - keep} more characters)"


def _loc(loc: Iterable[object]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return error_response(exc.status, exc.code, exc.message, exc.hint, headers=headers, **exc.body())

    @app.exception_handler(BitplanError)
    async def _bitplan_error(_req: Request, exc: BitplanError) -> JSONResponse:
        api = ApiError.from_error(exc)
        return error_response(api.status, api.code, api.message, api.hint, **api.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = []
        for e in errors[:MAX_FIELDS]:  # a body with a million bad values is answered with the first few
            loc = clip(_loc(e.get("loc", ())), MAX_FIELD_CHARS // 2)
            fields.append({"loc": loc, "msg": clip(str(e.get("msg", "")), MAX_FIELD_CHARS - len(loc) - 2)})
        message = "; ".join(f"{f['loc']}: {f['msg']}" for f in fields) or "invalid request"
        if len(errors) > len(fields):
            message = clip(message, MAX_MESSAGE_CHARS - 40) + f"; and {len(errors) - len(fields)} more failing fields"
        return error_response(422, "invalid_request", message, "see the API description at /docs", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        hint = "see the API description at /docs" if exc.status_code in (404, 405) else None
        return error_response(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), str(exc.detail), hint)

    @app.exception_handler(Unavailable)
    async def _unavailable(_req: Request, exc: Unavailable) -> JSONResponse:
        return error_response(503, "unavailable", str(exc), "the service's database is down; retry in a few seconds",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything else: Starlette's ServerErrorMiddleware calls this, sends the answer, then re-raises for the server."""
        ref = secrets.token_hex(4)
        log.error("unexpected error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"the server failed to answer this request (error {ref})", BUG_HINT)
