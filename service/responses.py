"""The shapes the ``/v1`` routes answer with, declared so the OpenAPI schema documents them.

Each model lists the fields clients rely on and allows more (``extra="allow"``), so a field added to a view
in ``storage/views.py`` is answered before it is documented here, never dropped."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bitplan.schemas import InputSpec, LayerInfo


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelOut(_Open):
    id: str
    sha256: str
    name: str
    format: str
    size_bytes: int
    inputs: list[InputSpec]
    layers: list[LayerInfo]
    other_bytes: float | None = None
    created_at: str | None = None


class DatasetOut(_Open):
    id: str
    sha256: str
    name: str
    samples: int | None = None
    has_targets: bool | None = None
    inputs: list[InputSpec]
    text: dict[str, int] | None = Field(None, description="text data (for a Hugging Face checkpoint): documents and "
                                                          "characters; its samples are made with the model's tokenizer")
    size_bytes: int
    created_at: str | None = None


class JobError(_Open):
    code: str = Field(description="e.g. infeasible, bad_data, time_limit, worker_lost, cancelled, internal")
    message: str
    hint: str | None = None


class JobOut(_Open):
    id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: str
    progress: float
    detail: str | None = None
    model_id: str
    dataset_id: str
    request: dict[str, Any]
    cache_hit: bool | None = None
    attempts: int
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: JobError | None = None
    callback_url: str | None = None
    callback_status: str | None = None
    kind: str = Field("plan", description="plan (POST /v1/jobs) or profile (POST /v1/profiles)")
    links: dict[str, str] = Field(description="self, and the result: plan and frontier, or latency for a profile")


class ModelList(_Open):
    items: list[ModelOut]


class DatasetList(_Open):
    items: list[DatasetOut]


class JobList(_Open):
    items: list[JobOut]
    total: int
    limit: int
    offset: int
    next: str | None = Field(None, description="the next page, if any")


class ErrorDetail(_Open):
    code: str = Field(description="stable: route by this (docs/api.md lists them)")
    message: str
    hint: str | None = None
    field: str | None = Field(None, description="the request field the error is about")


class ErrorBody(BaseModel):
    error: ErrorDetail


#: the error answers every /v1 route may give, for the OpenAPI schema
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (401, "no or bad API key"), (404, "not found (or another team's)"), (413, "too large"),
        (422, "the request cannot be used; `field` names the part at fault"), (429, "rate limit or quota"),
        (503, "the database is unavailable; retry after Retry-After seconds"))
}
