"""``POST /v1/jobs``: the request body, and the checks that can be made before any
work is queued (method names and parameters, bit widths, pins, and whether the
budget can be met at all, from the layer table measured on upload)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bitplan.costs import CostModel
from bitplan.errors import BitplanError
from bitplan.methods import get_method, parse_params
from bitplan.schemas import ACT_BITS, WEIGHT_BITS, Budget, LayerInfo
from service.errors import ApiError


class MethodChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict = Field(default_factory=dict)


class JobCreate(BaseModel):
    """A planning job. Only ``model_id`` and ``budgets`` are required."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model_id: str = Field(max_length=64)
    dataset_id: str = Field("synthetic", max_length=64,
                            description="an uploaded dataset, or 'synthetic' (random inputs shaped like the model's)")
    eval_dataset_id: str | None = Field(None, max_length=64, description="held-out data for the measured figures")
    budgets: Budget
    w_bits: list[int] = Field([2, 3, 4, 5, 6, 8], min_length=1, max_length=8)
    a_bits: list[int] = Field([16], min_length=1, max_length=3)
    pins: dict[str, int] = Field(default_factory=dict)
    sensitivity: MethodChoice = MethodChoice(method="hessian_trace")
    solver: MethodChoice = MethodChoice(method="ilp")
    clip: Literal["mse", "minmax"] = "mse"
    latency_table: dict[str, dict[int, float]] | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    validate_plan: bool = Field(True, alias="validate", description="measure the plan on the eval data")
    shards: int = Field(1, ge=1, le=64, description="split a shardable method's sensitivity work over this many workers")
    synthetic_samples: int = Field(64, ge=1, le=4096)
    reuse_sensitivity: bool = Field(True, description="reuse a cached sensitivity table computed with the same inputs")
    callback_url: str | None = Field(None, max_length=2000, description="POSTed the job JSON when the job ends")

    @field_validator("w_bits")
    @classmethod
    def _w_bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in WEIGHT_BITS]
        if bad:
            raise ValueError(f"weight bits {bad} not supported; choose from {list(WEIGHT_BITS)}")
        return sorted(set(v))

    @field_validator("a_bits")
    @classmethod
    def _a_bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ACT_BITS]
        if bad:
            raise ValueError(f"activation bits {bad} not supported; choose from {list(ACT_BITS)}")
        return sorted(set(v))

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL")
        return v


def check_methods(job: JobCreate) -> dict:
    """Names and parameters of the sensitivity method and solver; returns the normalised request."""
    from solver import SOLVERS, solver_params

    try:
        info = get_method(job.sensitivity.method)
        parse_params(info, job.sensitivity.params)
    except BitplanError as exc:
        raise ApiError(422, exc.message, exc.hint, code="invalid_request") from None
    if job.solver.method not in SOLVERS:
        raise ApiError(422, f"unknown solver '{job.solver.method}'", "valid solvers: " + ", ".join(SOLVERS),
                       code="invalid_request")
    valid = solver_params(job.solver.method)
    unknown = sorted(set(job.solver.params) - set(valid))
    if unknown:
        raise ApiError(422, f"solver '{job.solver.method}' has no parameter(s) {', '.join(unknown)}",
                       f"valid parameters of '{job.solver.method}': " + (", ".join(valid) or "none"), code="invalid_request")
    if job.shards > 1 and not info.shardable:
        from bitplan.methods import METHODS

        shardable = [m.name for m in METHODS.values() if m.shardable]
        raise ApiError(422, f"sensitivity method '{info.name}' cannot be split into shards",
                       "use shards=1, or one of: " + ", ".join(shardable), code="invalid_request")
    request = job.model_dump(mode="json", by_alias=True)
    request["budgets"] = job.budgets.limits()
    return request


def check_against_model(job: JobCreate, description: dict) -> None:
    """Pins name real layers, the latency table covers them, and the budget is achievable."""
    try:
        layers = tuple(LayerInfo(**row) for row in description.get("layers", []))
    except ValidationError:
        return  # an old description; the worker checks again
    names = {layer.name for layer in layers}
    unknown = sorted(set(job.pins) - names)
    if unknown:
        raise ApiError(422, f"pins name unknown layer(s) {unknown}",
                       "the model's layers are listed by GET /v1/models/{id}", code="invalid_request")
    bad_bits = {n: b for n, b in job.pins.items() if b not in WEIGHT_BITS}
    if bad_bits:
        raise ApiError(422, f"pinned bit widths {bad_bits} not supported", f"choose from {list(WEIGHT_BITS)}",
                       code="invalid_request")
    limits = job.budgets.limits()
    if "latency_ms" in limits and job.latency_table is None:
        raise ApiError(422, "a latency_ms budget needs a latency_table", "add latency_table: {layer: {bits: ms}}",
                       code="invalid_request")
    costs = CostModel(layers, float(description.get("other_bytes") or 0.0), job.latency_table)
    lowest = {layer.name: (job.pins.get(layer.name, min(job.w_bits)), min(job.a_bits)) for layer in layers}
    try:
        cost = costs.plan_cost(lowest).model_dump()
    except BitplanError as exc:
        raise ApiError(422, exc.message, exc.hint, code="invalid_request") from None
    over = {key: (limit, cost[key]) for key, limit in limits.items()
            if cost.get(key) is not None and cost[key] > limit * (1 + 1e-9)}
    if over:
        parts = [f"{key}<={limit:g} cannot be met: the smallest achievable is {least:.6g}"
                 for key, (limit, least) in over.items()]
        raise ApiError(422, "; ".join(parts) + f" (every layer at {min(job.w_bits)} bits"
                       + (" except the pinned ones)" if job.pins else ")"),
                       "raise the budget, allow lower bit widths, or unpin layers", code="infeasible",
                       minimums={key: least for key, (_, least) in over.items()})
