"""Every error the API answers is JSON with a message a user can act on:
``{"error": {"code", "message", "hint"}}`` (422s also list the failing ``fields``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitplan.errors import BitplanError
from storage import Unavailable

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
                503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.headers = status, message, hint, headers
        self.code = code or STATUS_CODES.get(status, "error")
        self.extra = extra


def error_response(status: int, code: str, message: str, hint: str | None = None, headers=None, **extra) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint, **extra}}, status_code=status,
                        headers=headers)


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return error_response(exc.status, exc.code, exc.message, exc.hint, headers=headers, **exc.extra)

    @app.exception_handler(BitplanError)
    async def _bitplan_error(_req: Request, exc: BitplanError):
        return error_response(422, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        fields = [{"loc": _loc(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        message = "; ".join(f"{f['loc']}: {f['msg']}" for f in fields) or "invalid request"
        return error_response(422, "invalid_request", message, "see the API description at /docs", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        hint = "see the API description at /docs" if exc.status_code in (404, 405) else None
        return error_response(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), str(exc.detail), hint)

    @app.exception_handler(Unavailable)
    async def _unavailable(_req: Request, exc: Unavailable):
        return error_response(503, "unavailable", str(exc), "the service's database is down; retry in a few seconds",
                              headers={"Retry-After": "5"})
