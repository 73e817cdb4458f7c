"""``POST /v1/jobs``: the request body, and the checks that can be made before any
work is queued (method names and parameters, bit widths, pins, whether the
budget can be met at all, from the layer table measured on upload, and whether
the data fits the model's inputs, from both descriptions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bitplan.costs import CostModel
from bitplan.errors import BitplanError
from bitplan.formats import FORMATS, TARGETS, apply_target, check_formats, choice_bits, table_keys
from bitplan.inputs import match_inputs
from bitplan.methods import DEFAULT_SENSITIVITY, check_shardable, get_method, parse_params
from bitplan.params import cut
from bitplan.schemas import (
    ACT_BITS,
    BUDGET_KEYS,
    DEFAULT_A_BITS,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_SOLVER,
    DEFAULT_W_BITS,
    GRANULARITY_PATTERN,
    WEIGHT_BITS,
    Budget,
    DtypeName,
    LayerInfo,
    check_device,
    shared_input_groups,
)
from service.errors import ApiError


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (a ValueError's gets "Value error, " in front)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


def _valid_w_bits(v: list[int]) -> list[int]:
    bad = [b for b in v if b not in WEIGHT_BITS]
    if bad:
        raise _invalid(f"weight bits {bad} not supported; choose from {list(WEIGHT_BITS)}")
    return sorted(set(v))


def _valid_device(v: Any) -> str:
    try:
        return check_device(v)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _valid_formats(v: Any) -> list[str]:
    try:
        return list(check_formats(v))
    except (ValueError, TypeError) as exc:
        raise _invalid(str(exc)) from None


def _valid_callback(v: str | None) -> str | None:
    if v is not None and not v.startswith(("http://", "https://")):
        raise _invalid("callback_url must be an http:// or https:// URL")
    return v


WBits = Annotated[list[int], AfterValidator(_valid_w_bits)]
Device = Annotated[str, BeforeValidator(_valid_device)]
Formats = Annotated[list[str], BeforeValidator(_valid_formats)]
CallbackUrl = Annotated[str | None, AfterValidator(_valid_callback)]
FiniteMs = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Budgets(Budget):
    """Upper bounds on plan costs: at least one, each a positive finite number."""

    # As the CLI's Budget, but JSON's NaN, Infinity and 1e400 are refused here rather than by the solver,
    # an empty object is refused rather than queued, and an unknown key is named with the valid ones.

    model_config = ConfigDict(allow_inf_nan=False, title="Budget")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(str(k) for k in value if k not in BUDGET_KEYS)
            if unknown:
                raise _invalid(f"unknown budget key(s) {_some(unknown)}; valid keys: {', '.join(BUDGET_KEYS)}")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> Budgets:
        if not self.limits():
            raise _invalid("no budget given; set at least one of " + ", ".join(BUDGET_KEYS))
        return self


class MethodChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class JobCreate(BaseModel):
    """A planning job. Only ``model_id`` and ``budgets`` are required."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model_id: str = Field(max_length=64)
    dataset_id: str = Field("synthetic", max_length=64,
                            description="an uploaded dataset, or 'synthetic' (random inputs shaped like the model's)")
    eval_dataset_id: str | None = Field(None, max_length=64, description="held-out data for the measured figures")
    budgets: Budgets
    w_bits: WBits = Field(list(DEFAULT_W_BITS), min_length=1, max_length=8)
    formats: Formats = Field(default_factory=list, max_length=8,
                               description="number formats a layer may take besides INT: " + ", ".join(FORMATS))
    target: str | None = Field(None, max_length=32, description="runtime preset (" + ", ".join(TARGETS) + "): w_bits "
                                                                 "and formats become what it runs, narrowed by any given")
    a_bits: list[int] = Field(list(DEFAULT_A_BITS), min_length=1, max_length=3)
    pins: dict[str, int] = Field(default_factory=dict)
    granularity: str = Field("layer", pattern=GRANULARITY_PATTERN,
                             description="layer: one width per layer; channel: per output channel; group:N: per block "
                                         "of N input columns (linear layers, after the layer plan, keeping its bit "
                                         "total; kept only if measured better)")
    tie_shared_inputs: bool = Field(False, description="give layers that read the same value (q, k and v; gate and up) "
                                                       "one bit width, as runtimes that fuse them need (vLLM)")
    sensitivity: MethodChoice = MethodChoice(method=DEFAULT_SENSITIVITY)
    solver: MethodChoice = MethodChoice(method=DEFAULT_SOLVER)
    clip: Literal["mse", "minmax"] = "mse"
    latency_table: dict[str, dict[int | str, FiniteMs]] | None = None

    @field_validator("latency_table", mode="before")
    @classmethod
    def _table_keys(cls, v: Any) -> Any:
        try:
            return table_keys(v)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Device = Field(DEFAULT_DEVICE, max_length=16,
                        description="auto, cpu, cuda or cuda:N: a job asking for cuda (or auto, where the deployment has "
                                    "GPU workers) runs on a GPU worker")
    dtype: DtypeName = Field(
        DEFAULT_DTYPE, description="compute dtype: bfloat16/float16 run the model under autocast (weights and the "
                                   "sensitivity sums stay float32); float16 needs a GPU")
    seq_len: int = Field(128, ge=2, le=32_768, description="tokens per sample when the dataset is text, tokenised with "
                                                            "the Hugging Face checkpoint's tokenizer.json")
    validate_plan: bool = Field(True, alias="validate", description="measure the plan on the eval data (and check it "
                                                                    "against uniform precision)")
    refine_seconds: float = Field(120.0, ge=0, le=3600, allow_inf_nan=False,
                                  description="time cap of the measured refinement that runs when the plan measures "
                                              "worse than uniform precision (0: return the best uniform plan at once)")
    refine_evaluations: int | None = Field(None, ge=1, le=1_000_000,
                                           description="also stop the refinement after measuring this many plans "
                                                       "(default: no cap): the same work on a fast and a loaded machine")
    shards: int = Field(1, ge=1, le=64, description="split a shardable method's sensitivity work over this many workers")
    synthetic_samples: int = Field(64, ge=1, le=4096)
    distill: bool | None = Field(None, description="optimise the calibration inputs to match the model's BatchNorm "
                                                   "statistics (ZeroQ); default: true for synthetic data, else false")
    reuse_sensitivity: bool = Field(True, description="reuse a cached sensitivity table computed with the same inputs")
    callback_url: CallbackUrl = Field(None, max_length=2000, description="POSTed the job JSON when the job ends")

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        problem = _unstorable(value)
        if problem is not None:
            raise _invalid(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("target") in (None, ""):
            return value
        try:
            name, widths, formats = apply_target(value["target"], value.get("w_bits"), value.get("formats"))
        except (ValueError, TypeError) as exc:
            raise _invalid(str(exc)) from None
        return dict(value, target=name, w_bits=list(widths), formats=list(formats))

    @model_validator(mode="after")
    def _formats_per_layer(self) -> JobCreate:
        if self.formats and self.granularity != "layer":
            raise _invalid(f"formats {self.formats} are chosen per layer; use granularity layer with them")
        return self

    @field_validator("a_bits")
    @classmethod
    def _a_bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ACT_BITS]
        if bad:
            raise _invalid(f"activation bits {bad} not supported; choose from {list(ACT_BITS)}")
        return sorted(set(v))



class ProfileCreate(BaseModel):
    """``POST /v1/profiles``: time each layer of an uploaded model at each weight width on a worker (``bitplan
    profile`` as a job); the result, ``GET /v1/jobs/{id}/latency``, is the ``latency_table`` a plan job's
    ``latency_ms`` budget reads. It runs on a worker of the kind ``device`` asks for (cuda: the GPU queue)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(max_length=64)
    dataset_id: str = Field("synthetic", max_length=64,
                            description="the inputs the layers are timed on: an uploaded dataset, or 'synthetic'")
    w_bits: WBits = Field(list(DEFAULT_W_BITS), min_length=1, max_length=8,
                          description="the weight widths to time (16, float, is always timed)")
    formats: Formats = Field(default_factory=list, max_length=8,
                               description="number formats to time too (" + ", ".join(FORMATS) + "): fp8_e4m3 runs "
                                           "torchao's float8 kernel, the others are timed in float (no stable torchao "
                                           "config)")
    batch: int = Field(1, ge=1, le=1024, description="samples per timed call")
    runs: int = Field(20, ge=1, le=200, description="timed calls per layer and width (the median is kept)")
    device: Device = Field(DEFAULT_DEVICE, max_length=16, description="auto, cpu, cuda or cuda:N: where the timing runs")
    seq_len: int = Field(128, ge=2, le=32_768, description="tokens per sample when the dataset is text")
    synthetic_samples: int = Field(8, ge=1, le=4096)
    callback_url: CallbackUrl = Field(None, max_length=2000, description="POSTed the job JSON when the job ends")



class ApplyCreate(BaseModel):
    """``POST /v1/jobs/{id}/apply``: quantize the plan job's Hugging Face checkpoint by its plan on a worker
    (``bitplan apply`` as a job): a compressed-tensors checkpoint (``GET /v1/jobs/{id}/checkpoint``, a zip) and
    its real size beside the plan's prediction (``GET /v1/jobs/{id}/report``)."""

    model_config = ConfigDict(extra="forbid")

    latency: bool = Field(False, description="also time a forward pass in float and with torchao on the worker's CPU")
    callback_url: CallbackUrl = Field(None, max_length=2000, description="POSTed the job JSON when the job ends")



MAX_DEPTH = 32


def _unstorable(value: object) -> str | None:
    """What in a JSON body no database, log or JSON answer can hold, said with where it is; else None.

    A NUL character (PostgreSQL refuses it in text and JSON), an unpaired surrogate such as JSON's
    "\\ud800" (it cannot be encoded as UTF-8, not even in an error message) and nesting deeper than
    MAX_DEPTH (pydantic will not serialise it) would each end as a 500 after the body was accepted.
    A loop, not recursion: a deeply nested body must not exhaust the stack either.
    """
    stack: list[tuple[str, object, int]] = [("", value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"{_shown(path) or 'the body'} is nested more than {MAX_DEPTH} levels deep"
        if isinstance(item, str):
            if not _plain(item):
                return f"{_shown(path) or 'the body'} contains a NUL character or an unpaired surrogate (\\ud800-\\udfff)"
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in pairs:
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _plain(key):
                return f"the key {_shown(here)} contains a NUL character or an unpaired surrogate (\\ud800-\\udfff)"
            stack.append((here, child, depth + 1))
    return None


def _plain(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str) -> str:
    """``text`` with NULs and surrogates escaped, so an error message can quote it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


SHOWN_NAMES = 10  # an error message names at most this many layers or parameters, each cut to NAME_CHARS
NAME_CHARS = 60


def _cut(name: str) -> str:
    return cut(name, NAME_CHARS)


def _some(names: Sequence[object], as_list: bool = False) -> str:
    """A few of ``names`` and how many more ("a, b and 3 more", or "['a', 'b'] and 3 more"): not all 50,000 of them."""
    names = list(names)
    shown = [repr(_cut(str(n))) if as_list else _shown(_cut(str(n))) for n in names[:SHOWN_NAMES]]
    text = f"[{', '.join(shown)}]" if as_list else ", ".join(shown)
    return text + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def check_methods(job: JobCreate) -> dict[str, Any]:
    """Names and parameters of the sensitivity method and solver; returns the normalised request."""
    from solver import SOLVERS, parse_solver_params

    try:
        info = get_method(job.sensitivity.method)
    except BitplanError as exc:
        raise ApiError.from_error(exc) from None
    _refuse_non_finite(job.sensitivity.params, "sensitivity.params")
    _refuse_non_finite(job.solver.params, "solver.params")
    try:  # unknown names, types and bounds: refused here, not by a failed job
        parse_params(info, job.sensitivity.params)
    except BitplanError as exc:
        raise ApiError.from_error(exc) from None
    if job.solver.method not in SOLVERS:
        raise ApiError(422, f"unknown solver '{job.solver.method}'", "valid solvers: " + ", ".join(SOLVERS),
                       code="unknown_method", field="solver")
    try:  # types and bounds too: {"time_limit": "abc"} is refused here, not by a failed job
        parse_solver_params(job.solver.method, job.solver.params)
    except BitplanError as exc:
        raise ApiError.from_error(exc) from None
    if job.shards > 1:  # not every method splits, nor every parameter choice (hessian_trace's activations=true)
        try:
            check_shardable(info, parse_params(info, job.sensitivity.params))
        except BitplanError as exc:
            raise ApiError.from_error(exc) from None
    request = job.model_dump(mode="json", by_alias=True)
    request["budgets"] = job.budgets.limits()
    return request


def _refuse_non_finite(params: dict[str, Any], where: str) -> None:
    """NaN and Infinity parse from JSON into floats no method or solver can use; name them here, not in a failed job."""
    bad = sorted(f"{where}.{k}" for k, v in params.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise ApiError(422, ", ".join(bad) + (" must be a finite number" if len(bad) == 1 else " must be finite numbers"),
                       "send ordinary numbers (not NaN or Infinity)", code="invalid_request", field=where.split(".")[0])


def check_against_model(job: JobCreate, model: dict[str, Any],
                        dataset: Callable[[str], dict[str, Any]] | None = None) -> None:
    """Pins name real layers, the latency table covers them, the budget is achievable, and the data fits.

    ``model`` is the model's JSON (``GET /v1/models/{id}``; a bare stored description works too);
    ``dataset`` looks up a dataset's JSON by id, raising 404 for one the team does not own. Without
    it the data is checked by the worker only.
    """
    _check_budget(job, model)
    if job.dataset_id == "synthetic" and model.get("format") == "hf":
        raise ApiError(422, "a Hugging Face checkpoint needs calibration text: random token ids make no sample of a "
                       "language's text", "upload text (.txt, or .jsonl with a \"text\" field per line) as the dataset, "
                       "or token ids (.npz with 'inputs.input_ids' and 'targets')", code="bad_data", field="dataset_id")
    if dataset is None:
        return
    for role, data_id in (("dataset", job.dataset_id), ("eval dataset", job.eval_dataset_id)):
        if data_id and data_id != "synthetic":
            check_data_fits(model, dataset(data_id), role, "dataset_id" if role == "dataset" else "eval_dataset_id")


def _check_budget(job: JobCreate, description: dict[str, Any]) -> None:
    try:
        layers = tuple(LayerInfo(**row) for row in description.get("layers", []))
    except ValidationError:
        return  # an old description; the worker checks again
    names = {layer.name for layer in layers}
    unknown = sorted(set(job.pins) - names)
    if unknown:
        raise ApiError(422, f"pins name unknown layer(s) {_some(unknown, as_list=True)}",
                       "the model's layers are listed by GET /v1/models/{id}", code="invalid_request", field="pins")
    bad_bits = {n: b for n, b in job.pins.items() if b not in WEIGHT_BITS}
    if bad_bits:
        shown = "{" + ", ".join(f"{_cut(n)!r}: {b}" for n, b in list(bad_bits.items())[:SHOWN_NAMES]) + "}"
        more = f" and {len(bad_bits) - SHOWN_NAMES} more" if len(bad_bits) > SHOWN_NAMES else ""
        raise ApiError(422, f"pinned bit widths {shown}{more} not supported", f"choose from {list(WEIGHT_BITS)}",
                       code="invalid_request", field="pins")
    limits = job.budgets.limits()
    if "latency_ms" in limits and job.latency_table is None:
        raise ApiError(422, "a latency_ms budget needs a latency_table", "add latency_table: {layer: {bits: ms}}",
                       code="invalid_request", field="latency_table")
    costs = CostModel(layers, float(description.get("other_bytes") or 0.0), job.latency_table)
    pins = dict(job.pins)
    for group in shared_input_groups(layers) if job.tie_shared_inputs else ():
        pinned = {pins[name] for name in group if name in pins}
        if len(pinned) > 1:
            raise ApiError(422, f"pins give the tied layers {_some(group, as_list=True)} different bit widths "
                           f"{sorted(pinned)}", "pin them alike, or leave tie_shared_inputs off", code="invalid_request",
                           field="pins")
        pins |= dict.fromkeys(group, pinned.pop()) if pinned else {}
    least = _least_costs(job, layers, costs, pins)
    over = {key: (limit, least[key]) for key, limit in limits.items()
            if least.get(key) is not None and least[key] > limit * (1 + 1e-9)}
    if over:
        parts = [f"{key}<={limit:g} cannot be met: the smallest achievable is {low:.6g}"
                 for key, (limit, low) in over.items()]
        raise ApiError(422, "; ".join(parts) + " (each layer at its cheapest allowed width"
                       + (", the pinned ones as pinned)" if job.pins else ")"),
                       "raise the budget, allow lower bit widths, or unpin layers", code="infeasible", field="budgets",
                       minimums={key: low for key, (_, low) in over.items()})


def _least_costs(job: JobCreate, layers: Sequence[LayerInfo], costs: CostModel, pins: dict[str, int]) -> dict[str, float]:
    """Each budget's smallest achievable total (``solver.Problem.minimum``: every layer at its own cheapest option for
    that budget, pins and shared widths honoured; a latency table need not fall with the bits)."""
    from solver import Layer, Option, Problem

    choices: list[int | str] = [*job.w_bits, *job.formats]
    try:
        problem = Problem(
            layers=tuple(Layer(layer.name, layer.params, tuple(
                Option(w_bits=choice_bits(w), a_bits=a, cost=costs.option_cost(layer, w, a),
                       fmt=w if isinstance(w, str) else "int")
                for w in ([pins[layer.name]] if layer.name in pins else choices) for a in job.a_bits))
                for layer in layers),
            budgets={}, fixed_cost=costs.fixed_cost(),
            ties=shared_input_groups(layers) if job.tie_shared_inputs else ())
        # 12 significant digits: the per-layer sum of params x bits / total is 2 - 2e-16 for "every layer at 2 bits"
        return {key: float(f"{problem.minimum(key):.12g}") for key in job.budgets.limits()}
    except BitplanError as exc:
        raise ApiError.from_error(exc) from None


def check_data_fits(model: dict[str, Any], data: dict[str, Any], role: str = "dataset", field: str = "dataset_id") -> None:
    """Refuse data the worker would refuse, from the two stored descriptions, without torch: the same rule
    (``bitplan.inputs.match_inputs``) that ``conform()`` applies to the tensors. A TorchScript model is traced
    again with the job's data, so only its input names are fixed. Descriptions without inputs (older rows) are
    left to the worker. Errors name ``field``, the request field they are about."""
    if data.get("text") and model.get("format") != "hf":
        raise ApiError(422, f"{role} '{data.get('name') or ''}' is text, and only a Hugging Face checkpoint has a "
                       "tokenizer to turn text into model inputs",
                       "send arrays (.npz or .safetensors with 'inputs'), or a zipped checkpoint with its tokenizer.json",
                       code="needs_tokenizer", field=field)
    spec, given = model.get("inputs") or [], data.get("inputs") or []
    if not spec or not given:
        return
    label = f"{role} '{data.get('name') or ''}' ({data.get('id') or '?'})"
    try:
        match_inputs([(s["name"], s["shape"], s["dtype"]) for s in spec],
                     {d["name"]: (d["shape"], d["dtype"]) for d in given}, label, field,
                     check_shapes=model.get("format") != "torchscript")
    except BitplanError as exc:
        raise ApiError.from_error(exc) from None
