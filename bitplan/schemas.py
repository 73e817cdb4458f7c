"""The shared contract: one pydantic model per concept.

The CLI, the plan file and (later) the REST API and Celery payloads all use
these models, so a field means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bitplan.errors import BudgetError
from bitplan.formats import apply_target, check_formats, table_keys

PLAN_SCHEMA = "bitplan.plan/v1"
SENSITIVITY_SCHEMA = "bitplan.sensitivity/v1"

#: Bit widths a weight may take; 16 means "keep full precision" (counted as 16-bit).
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
#: the defaults of every entry point (CLI, API, web form): the one place they are written
DEFAULT_W_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
DEFAULT_A_BITS: tuple[int, ...] = (16,)
DEFAULT_SOLVER = "ilp"
#: Bit widths an activation may take; 16 means "keep full precision".
ACT_BITS = (4, 8, 16)

#: Where a run computes (``device``) and in which floating-point format (``dtype``); see bitplan/core/device.py.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[DtypeName, ...] = ("float32", "bfloat16", "float16")
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE: DtypeName = "float32"


def check_device(value: object) -> str:
    """``value`` as a device name (auto, cpu, cuda, cuda:N; case and spaces ignored), else ValueError saying why.

    Torch-free: the API checks a job's device with it before anything is queued; which devices this machine
    has is decided where the work runs (bitplan.core.device.resolve_device)."""
    text = str(value).strip().lower()
    kind, sep, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and sep and index.isdigit() and len(index) <= 3):
        return text if not sep else f"cuda:{int(index)}"
    raise ValueError(f"'{str(value)[:40]}' is not a device; choose {DEVICE_CHOICES}")


def needs_gpu(device: str, gpu_workers: bool = False) -> bool:
    """Whether a job asking for ``device`` must run on a GPU worker: cuda and cuda:N always; auto when the
    deployment has GPU workers (BITPLAN_GPU_WORKERS)."""
    device = check_device(device)
    return device.startswith("cuda") or (device == "auto" and gpu_workers)


BUDGET_KEYS = {
    "avg_weight_bits": "parameter-weighted mean weight bit width of the quantizable layers",
    "size_bytes": "model size: packed weights at their bits + per-channel fp32 scales + every other tensor",
    "bops": "bit operations per sample: sum over layers of MACs x w_bits x a_bits",
    "latency_ms": "sum of per-layer latencies from the lookup table given with --latency-table",
}


#: bits per layer, per output channel, or per group of N input columns (bitplan.core.units)
GRANULARITY_PATTERN = r"^(layer|channel|group:([1-9][0-9]{0,3}))$"

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Budget(_Frozen):
    """Upper bounds on plan costs; at least one must be set."""

    avg_weight_bits: float | None = Field(None, gt=0, le=32)
    size_bytes: float | None = Field(None, gt=0)
    bops: float | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, gt=0)

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @classmethod
    def parse_items(cls, items: list[str]) -> Budget:
        """Build from CLI strings like ``avg_weight_bits=4.5`` or ``size_bytes=2e6``."""
        values: dict[str, float] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise BudgetError(f"budget '{item}' is not KEY=VALUE", "e.g. --budget avg_weight_bits=4.5")
            if key not in BUDGET_KEYS:
                raise BudgetError(
                    f"unknown budget key '{key}'",
                    "valid keys: " + ", ".join(BUDGET_KEYS),
                )
            try:
                value = float(raw.strip().upper().replace("MB", "e6").replace("KB", "e3"))
            except ValueError:
                raise BudgetError(f"budget {key}='{raw}' is not a number", f"e.g. --budget {key}=4.5") from None
            if not value > 0 or value == float("inf"):
                raise BudgetError(f"budget {key}={raw} must be a positive, finite number")
            values[key] = value
        if not values:
            raise BudgetError("no budget given", "add e.g. --budget avg_weight_bits=4.5")
        return cls(**values)


class InputSpec(_Frozen):
    """One model input as the model expects it; ``None`` in ``shape`` is a free (batch) dim."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


class LayerInfo(_Frozen):
    """A quantizable layer, named by its qualified module path."""

    name: str
    kind: Literal["conv1d", "conv2d", "linear"]
    params: int = Field(description="weight elements (the quantized tensor)")
    out_channels: int = Field(description="output channels = per-channel scales stored")
    macs: int | None = Field(None, description="multiply-accumulates per sample, measured on data")
    reads: str | None = Field(None, description="the graph value the layer reads: layers that read the same one (an "
                                                "attention's q, k and v; an MLP's gate and up) can be fused by a runtime")


def shared_input_groups(layers: Sequence[LayerInfo]) -> tuple[tuple[str, ...], ...]:
    """The layers that read the same graph value, in groups of two or more (in layer order): what runtimes that
    fuse projections (vLLM's fused QKV and gate-up) need to give one format, so what ``tie_shared_inputs`` ties."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        if layer.reads:
            groups.setdefault(layer.reads, []).append(layer.name)
    return tuple(tuple(names) for names in groups.values() if len(names) > 1)


class ModelInfo(_Frozen):
    sha256: str
    format: Literal["pt2", "torchscript", "catalog", "hf"]
    name: str
    model_type: str | None = Field(None, description="a Hugging Face checkpoint's config model_type (llama, qwen2, ...); "
                                                     "the GGUF export maps tensor names by it")


class SensitivityLayer(_Frozen):
    name: str
    stat: float = Field(description="the method's per-layer statistic (e.g. Hessian trace)")
    omega: dict[int, float] = Field(description="predicted loss increase per weight bit width")
    omega_act: dict[int, float] = Field(default_factory=dict, description="the same per activation bit width, if measured")
    omega_format: dict[str, float] = Field(default_factory=dict,
                                           description="the same per number format (bitplan.formats), if asked for")
    detail: dict[str, float] = Field(default_factory=dict)

    @field_validator("omega", "omega_act", mode="before")
    @classmethod
    def _int_keys(cls, v: Any) -> dict[int, float]:
        return {int(k): float(x) for k, x in dict(v).items()}


class SensitivityTable(_Frozen):
    """Omega[layer][bits] on one scale: lower means safer to quantize."""

    schema_: str = Field(SENSITIVITY_SCHEMA, alias="schema")
    method: str
    params: dict[str, Any]
    seconds: float
    layers: list[SensitivityLayer]
    notes: list[str] = Field(default_factory=list)
    model_sha256: str | None = Field(None, description="the model it was computed for (bitplan sensitivity --out)")
    data_sha256: str | None = Field(None, description="the calibration data it was computed on")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def omega(self) -> dict[str, dict[int, float]]:
        return {layer.name: dict(layer.omega) for layer in self.layers}


class Cost(_Frozen):
    size_bytes: float
    avg_weight_bits: float
    bops: float
    latency_ms: float | None = None


class Metrics(_Frozen):
    loss: float
    kl: float
    top1_agreement: float
    accuracy: float | None = None


class Measured(_Frozen):
    data: str = Field(description="which data the figures were measured on")
    samples: int
    held_out: Literal["given", "split", "none"] = Field(
        "given", description="given: held-out data (--eval-data, or a catalog model's evaluation split); split: samples "
                             "kept aside from the calibration data, unseen by the search; none: too few samples to keep "
                             "some aside, so the figures are on the data the search used")
    loss_kind: Literal["cross_entropy", "kl"]
    fp: Metrics
    plan: Metrics
    uniform: Metrics | None
    uniform_w_bits: int | None
    uniform_a_bits: int | None = None
    uniform_format: str = Field("int", description="the uniform plan's number format (int: INT-uniform_w_bits)")
    uniform_cost: Cost | None


class UniformCheck(_Frozen):
    """How the returned plan compares with uniform precision at the same budget (the guarantee)."""

    outcome: Literal["plan_better", "plan_level", "refined", "uniform_returned", "no_uniform_fits"] = Field(
        description="plan_better / plan_level: the solver's plan measured better than / level with the best uniform "
                    "plan that fits (and the measured local search may have improved it further); refined: it "
                    "measured worse, and the measured refinement found one that is not; "
                    "uniform_returned: nothing better was found (on the search data, or on the held-out data), so the "
                    "best uniform plan is returned; no_uniform_fits: no single bit width fits the budget")
    message: str = Field(description="one sentence for people")
    uniform: str | None = Field(None, description="the best uniform plan that fits, e.g. 'uniform 4-bit'")
    search_data: str = Field(description="the data the comparison and refinement were measured on")
    search: dict[str, Metrics] = Field(default_factory=dict, description="measured on the search data, by label")
    solver_plan: dict[str, int | str] | None = Field(
        None, description="the solver's weight choice per layer (bits, or a format's name), when replaced")
    refine: dict[str, float | int | str] | None = Field(None, description="rounds, evaluations, seconds, stopped")


class PlanLayer(_Frozen):
    name: str
    kind: str
    params: int
    macs: int | None
    w_bits: int
    a_bits: int
    w_format: str = Field("int", description="int: INT-w_bits per output channel (16: full precision); else the "
                                             "number format (bitplan.formats: fp8_e4m3, mxfp4, nvfp4, nf4, ...)")
    sensitivity: float = Field(description="Omega of the chosen option (predicted loss increase)")

    @property
    def choice(self) -> int | str:
        """The weight choice: the INT width, or the format's name."""
        return self.w_bits if self.w_format == "int" else self.w_format


class UnitLayer(_Frozen):
    name: str
    layer_bits: int = Field(description="the layer plan's width for this layer")
    bits: list[int] = Field(description="each unit's weight bits: per block of input columns (group:N) or per "
                                        "output channel (channel), in order")
    predicted: float = Field(description="sum of the units' activation-weighted quantization error at these bits")
    predicted_uniform: float = Field(description="the same with every unit at layer_bits")
    gap: float | None = Field(None, description="the solver's certified optimality gap (relative)")


class UnitPlan(_Frozen):
    """Bits below a layer (``granularity`` group:N or channel): what was solved, measured and kept."""

    granularity: str
    units: int = Field(description="units solved, over every split layer")
    kept: Literal["mixed", "uniform"] = Field(description="mixed: the per-unit bits measured better than every unit "
                                                          "at its layer's width, and are the answer; uniform: not, "
                                                          "so every unit keeps its layer's width")
    message: str
    measured_mixed: Metrics
    measured_uniform: Metrics
    size_bytes: float = Field(description="the plan's size with per-unit scales (fp16 per row and group, or per row)")
    layers: list[UnitLayer]
    notes: list[str] = Field(default_factory=list)


class SolverInfo(_Frozen):
    method: str
    status: str = Field(description="optimal, heuristic, or time_limit: the time limit stopped the search "
                                    "(the plan is the best one found by then)")
    seconds: float
    objective: float
    gap: float | None = None
    time_limit_s: float | None = Field(None, description="the time limit the solver ran under (seconds), if any")


class SensitivityInfo(_Frozen):
    method: str
    params: dict[str, Any]
    seconds: float
    notes: list[str] = Field(default_factory=list)


class PlanFile(BaseModel):
    """What ``bitplan plan --out`` writes (schema ``bitplan.plan/v1``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(PLAN_SCHEMA, alias="schema")
    model: ModelInfo
    budget: dict[str, float]
    w_bits_options: list[int]
    a_bits_options: list[int]
    formats: list[str] = Field(default_factory=list, description="number formats the search could choose besides INT")
    target: str | None = Field(None, description="the runtime preset the choices came from (--target)")
    pins: dict[str, int] = Field(default_factory=dict)
    ties: list[list[str]] = Field(default_factory=list, description="groups of layers given one bit width, format and "
                                                                    "activation width "
                                                                    "(tie_shared_inputs)")
    seed: int
    clip: Literal["mse", "minmax"] = Field("mse", description="how the weights' ranges were chosen when the plan was "
                                                               "measured (bitplan apply quantizes with the same)")
    sensitivity: SensitivityInfo
    solver: SolverInfo
    layers: list[PlanLayer]
    cost: Cost
    measured: Measured | None
    uniform_check: UniformCheck | None = Field(None, description="how the plan compares with uniform precision")
    frontier: list[dict[str, Any]] | None = Field(
        None, description="non-dominated plans around the chosen one, if the solver gives them")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    units: UnitPlan | None = Field(None, description="bits below a layer, when the request's granularity asked")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


class PlanRequest(BaseModel):
    """Everything ``bitplan plan`` (and later a job) needs: the one spec of a planning run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="a .pt2 / TorchScript path, a Hugging Face checkpoint (directory or zip), "
                                   "or catalog:NAME")
    model_name: str | None = Field(None, description="the name the plan shows (default: the file name)")
    data: str | None = Field(None, description="calibration .npz/.safetensors (or .txt/.jsonl text for a Hugging Face "
                                               "checkpoint); a catalog model's own by default")
    eval_data: str | None = Field(None, description="held-out data for the measured figures; default: every 5th "
                                                      "calibration sample, kept aside from the search")
    budget: Budget
    w_bits: tuple[int, ...] = DEFAULT_W_BITS
    a_bits: tuple[int, ...] = DEFAULT_A_BITS
    formats: tuple[str, ...] = Field(
        (), description="number formats a layer may take besides INT-w_bits (bitplan.formats): fp8_e4m3, fp8_e5m2, "
                        "mxfp8, mxfp4, nvfp4, nf4")
    target: str | None = Field(
        None, description="a runtime preset (torchao, vllm, llamacpp, modelopt): w_bits and formats become what that "
                          "runtime executes, narrowed by any w_bits/formats also given")
    pins: dict[str, int] = Field(default_factory=dict)
    tie_shared_inputs: bool = Field(
        False, description="give layers that read the same value (q, k and v; gate and up) one bit width, format and "
                           "activation width, as runtimes that fuse them need (vLLM's fused QKV and gate-up projections)")
    sensitivity: str = "auto"  # bitplan.methods.DEFAULT_SENSITIVITY (methods imports this module)
    sensitivity_params: dict[str, Any] = Field(default_factory=dict)
    solver: str = DEFAULT_SOLVER
    solver_params: dict[str, Any] = Field(default_factory=dict)
    time_limit_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="seconds the run may take (a service job's limit): the solver stops by what is left of it, "
                    "or by its own time_limit parameter if that is smaller; none: only the solver's own limit")
    clip: Literal["mse", "minmax"] = "mse"
    distill: bool = Field(False, description="optimise the calibration inputs to match the model's BatchNorm "
                                             "statistics (ZeroQ's distilled data); without data, start from random "
                                             "inputs")
    latency_table: dict[str, dict[int | str, float]] | None = Field(
        None, description="milliseconds per layer, per weight bit width (and per format's name, when formats are "
                          "offered): {layer: {bits: ms}}")
    seed: int = 0
    seq_len: int = Field(128, ge=2, le=32_768, description="tokens per sample when the data is text (.txt/.jsonl), "
                                                            "tokenised with a Hugging Face checkpoint's tokenizer.json")
    granularity: str = Field("layer", pattern=GRANULARITY_PATTERN,
                             description="layer: one width per layer; channel: per output channel; group:N: per block "
                                         "of N input columns (linear layers; the layer plan's bit total is kept)")
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
    device: str = Field(DEFAULT_DEVICE, description="where the model runs: auto (cuda when this machine has a GPU, "
                                                    "else cpu), cpu, cuda or cuda:N")
    dtype: DtypeName = Field(
        DEFAULT_DTYPE, description="compute dtype: bfloat16/float16 run matmuls, convolutions and attention under "
                                   "autocast (weights, losses and the sensitivity sums stay float32); float16 needs a GPU")
    validate_plan: bool = True
    guarantee: bool = Field(
        True, description="measure the plan against the best uniform plan that fits; refine it or return uniform "
                          "precision when it is worse (needs validate_plan)")
    refine_seconds: float = Field(
        120.0, ge=0, le=86_400, allow_inf_nan=False,
        description="time cap of the measured refinement that runs when the plan measures worse than uniform "
                    "(0: return the best uniform plan at once)")
    refine_evaluations: int | None = Field(
        None, ge=1, le=1_000_000,
        description="cap on the plans the measured refinement measures (default: none, only refine_seconds): with it "
                    "the refinement does the same work on a fast and a loaded machine")

    @field_validator("w_bits")
    @classmethod
    def _check_w_bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in v if b not in WEIGHT_BITS]
        if bad or not v:
            raise ValueError(f"weight bits {bad or '[]'} not supported; choose from {list(WEIGHT_BITS)}")
        return tuple(sorted(set(v)))

    @field_validator("latency_table", mode="before")
    @classmethod
    def _table_keys(cls, v: Any) -> Any:
        return table_keys(v)

    @field_validator("formats", mode="before")
    @classmethod
    def _check_formats(cls, v: Any) -> tuple[str, ...]:
        return check_formats(v)

    @model_validator(mode="before")
    @classmethod
    def _apply_target(cls, data: Any) -> Any:
        """--target NAME: the runtime's widths and formats, narrowed by the ones also given."""
        if not isinstance(data, dict) or data.get("target") in (None, ""):
            return data
        name, widths, formats = apply_target(data["target"], data.get("w_bits"), data.get("formats"))
        return dict(data, target=name, w_bits=widths, formats=formats)

    @model_validator(mode="after")
    def _formats_need_layers(self) -> PlanRequest:
        if self.formats and self.granularity != "layer":
            raise ValueError(f"formats {list(self.formats)} are chosen per layer; use granularity layer with them "
                             f"(granularity {self.granularity} splits INT widths only)")
        return self

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, v: Any) -> str:
        return check_device(v)

    @field_validator("a_bits", mode="before")
    @classmethod
    def _check_a_bits(cls, v: Any) -> tuple[int, ...]:
        v = (v,) if isinstance(v, int) else tuple(v)
        bad = [b for b in v if b not in ACT_BITS]
        if bad or not v:
            raise ValueError(f"activation bits {bad or '[]'} not supported; choose from {list(ACT_BITS)}")
        return tuple(sorted(set(v)))
