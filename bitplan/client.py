"""A small Python client for the bitplan REST API (docs/api.md).

It imports neither torch nor the server, so a laptop that only submits jobs needs httpx and
pydantic. Every failure (HTTP error, unreachable server, timeout) is a ``ClientError``, which is a
``BitplanError``: the CLI prints it as one line and exits 2, like any other user error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

from bitplan.errors import BitplanError
from bitplan.exports import FORMATS as EXPORT_FORMATS
from bitplan.progress import ProgressFn
from bitplan.settings import load_settings

#: Job states after which nothing changes any more.
#: what GET /v1/jobs/{id}/plan serves: the plan file, its CSV, or a runtime's file (bitplan.exports)
PLAN_FORMATS = ("json", "csv", *EXPORT_FORMATS)
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

HINT_UNREACHABLE = "start the server with `bitplan serve` or set BITPLAN_URL"
HINT_UNAUTHORIZED = "pass --key, set BITPLAN_API_KEY, or create a key with `bitplan keys create --team NAME`"


class ClientError(BitplanError):
    """An API call that did not succeed: ``status`` is the HTTP status (``None`` when no answer came),
    ``code`` the API's error code, ``fields`` the per-field problems of a 422."""

    code = "client"

    def __init__(self, message: str, hint: str | None = None, status: int | None = None, code: str | None = None,
                 fields: list[dict] | None = None, field: str | None = None, **extra) -> None:
        super().__init__(message, hint, field=field, code=code or None, **extra)
        self.status = status
        self.fields = fields or []

    @property
    def status_code(self) -> int | None:
        """httpx-style alias, so callers can test ``err.status_code == 404`` either way."""
        return self.status


def _field_text(field: dict) -> str:
    """``budgets.avg_weight_bits: must be > 0`` from either the API's string loc or FastAPI's list loc."""
    loc = field.get("loc", "")
    if isinstance(loc, (list, tuple)):
        loc = ".".join(str(part) for part in loc if part != "body")
    return f"{loc or 'value'}: {field.get('msg', 'invalid')}"


def _error_from_response(response: httpx.Response) -> ClientError:
    """Map an error answer to a ClientError; tolerant of non-JSON bodies (a proxy's HTML, a crash)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    message = hint = code = field = None
    fields: list[dict] = []
    extra: dict = {}
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, hint, code = error.get("message"), error.get("hint"), error.get("code")
        field = error.get("field") if isinstance(error.get("field"), str) else None
        fields = [f for f in error.get("fields") or [] if isinstance(f, dict)]
        extra = {k: v for k, v in error.items() if k not in ("message", "hint", "code", "field", "fields")}
    elif isinstance(body, dict) and "detail" in body:  # FastAPI's own shape, should a route skip the mapping
        detail = body["detail"]
        if isinstance(detail, list):
            fields = [f for f in detail if isinstance(f, dict)]
        else:
            message = str(detail)
    request = response.request
    if not message and fields:
        message = "invalid request"
    elif not message:
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
        message = f"{request.method} {request.url.path} answered HTTP {response.status_code}" + (f": {text}" if text else "")
    if fields:
        message = f"{message}: " + "; ".join(_field_text(f) for f in fields)
    if response.status_code == 401:
        hint = HINT_UNAUTHORIZED
    return ClientError(message, hint, status=response.status_code, code=code, fields=fields, field=field, **extra)


class Client:
    """Synchronous client; ``url`` and ``key`` default to BITPLAN_URL and BITPLAN_API_KEY (via load_settings)."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60,
                 transport: httpx.BaseTransport | None = None) -> None:
        if url is None or key is None:
            settings = load_settings()
            url = settings.url if url is None else url
            key = settings.api_key if key is None else key
        self.url = url.rstrip("/")
        self.key = key or None
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; transport failures become ClientErrors that name the URL, HTTP errors carry the API's message."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot reach the bitplan server at {self.url} ({exc})", HINT_UNREACHABLE) from None
        except httpx.TimeoutException:
            raise ClientError(f"the bitplan server at {self.url} did not answer {method} {path} in time",
                              "retry, or raise the client timeout") from None
        except httpx.TransportError as exc:
            raise ClientError(f"talking to the bitplan server at {self.url} failed: {exc}", HINT_UNREACHABLE) from None
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{method} {path} answered something that is not JSON",
                              f"is {self.url} a bitplan server?", status=response.status_code) from None

    @contextmanager
    def _open_upload(self, path: str | Path) -> Iterator[IO[bytes]]:
        """Open a file for a streamed upload, with a user error rather than a traceback when it is missing."""
        path = Path(path)
        if not path.is_file():
            raise ClientError(f"file '{path}' not found")
        with path.open("rb") as fh:
            yield fh

    def _upload(self, endpoint: str, path: str | Path, form: dict[str, str]) -> dict:
        # httpx reads a file object in chunks while sending, so a large model is never held in memory
        with self._open_upload(path) as fh:
            files = {"file": (Path(path).name, fh, "application/octet-stream")}
            return self._json("POST", endpoint, files=files, data=form)

    # -- uploads ----------------------------------------------------------------------------------

    def upload_model(self, path: str | Path, dataset_id: str | None = None) -> dict:
        """Upload a .pt2 or TorchScript file; ``dataset_id`` gives TorchScript the inputs to trace it with."""
        return self._upload("/v1/models", path, {"dataset_id": dataset_id} if dataset_id else {})

    def upload_dataset(self, path: str | Path) -> dict:
        """Upload calibration or evaluation data (.npz / .safetensors)."""
        return self._upload("/v1/datasets", path, {})

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, model_id: str, budgets: dict, dataset_id: str = "synthetic", **fields: Any) -> dict:
        """POST /v1/jobs. ``fields`` are the other request keys (w_bits, solver, ...); ``None`` values are left
        to the server's defaults. ``idempotency_key=`` makes a retried submit return the first job."""
        idempotency_key = fields.pop("idempotency_key", None)
        body = {"model_id": model_id, "dataset_id": dataset_id, "budgets": budgets}
        body.update({k: v for k, v in fields.items() if v is not None})
        headers = {"Idempotency-Key": str(idempotency_key)} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def profile(self, model_id: str, dataset_id: str = "synthetic", **fields: Any) -> dict:
        """POST /v1/profiles: time each layer at each width on a worker (w_bits, batch, runs, device, ...); wait
        for the job, then ``latency(job_id)`` is the table a plan job's ``latency_table`` takes."""
        body = {"model_id": model_id, "dataset_id": dataset_id}
        body.update({k: v for k, v in fields.items() if v is not None})
        return self._json("POST", "/v1/profiles", json=body)

    def latency(self, job_id: str) -> dict:
        """A finished profile job's result: ``{"latency_table": {layer: {bits: ms}}, "notes", "device", ...}``."""
        return self._json("GET", f"/v1/jobs/{job_id}/latency")

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, state: str | None = None, model_id: str | None = None, limit: int = 20, offset: int = 0) -> dict:
        """One page of this team's jobs, newest first: ``{"items", "total", "limit", "offset", "next"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if model_id:
            params["model_id"] = model_id
        return self._json("GET", "/v1/jobs", params=params)

    def wait(self, job_id: str, progress: ProgressFn | None = None, poll: float = 0.5,
             timeout: float | None = None) -> dict:
        """Poll until the job ends and return it (whatever the final state: the caller decides what failed means).

        ``progress(stage, fraction, detail)`` is called only when one of them changed, so a bar is not redrawn
        for nothing. Raises ClientError after ``timeout`` seconds; the job itself keeps running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple | None = None
        while True:
            job = self.job(job_id)
            seen = (job.get("stage") or "", float(job.get("progress") or 0.0), job.get("detail") or "")
            if progress is not None and seen != last:
                progress(*seen)
            last = seen
            if job.get("state") in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientError(f"job {job_id} is still {job.get('state')} ({seen[0]}) after {timeout:g}s",
                                  f"keep waiting with `bitplan wait {job_id}`, or stop it with `bitplan cancel {job_id}`")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def plan(self, job_id: str, format: str = "json") -> dict | str:
        """The plan file (``bitplan.plan/v1``) as a dict; with ``format="csv"`` the per-layer CSV text, or with a
        runtime's name (torchao, compressed-tensors, gguf, modelopt) the text of that runtime's file."""
        if format == "json":
            return self._json("GET", f"/v1/jobs/{job_id}/plan")
        if format in PLAN_FORMATS:
            return self._request("GET", f"/v1/jobs/{job_id}/plan", params={"format": format}).text
        raise ClientError(f"unknown plan format '{format}'", f"use one of: {', '.join(PLAN_FORMATS)}")

    def exports(self, job_id: str) -> dict:
        """What each runtime format would hold for the job's plan, or why it cannot."""
        return self._json("GET", f"/v1/jobs/{job_id}/exports")

    def frontier(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/frontier")

    def cancel(self, job_id: str) -> dict:
        """DELETE the job: stops queued or running work and answers the job (409 if it already ended)."""
        return self._json("DELETE", f"/v1/jobs/{job_id}")

    def methods(self) -> dict:
        """The sensitivity methods and solvers the server offers, with their parameter schemas (no key needed)."""
        return self._json("GET", "/v1/methods")
