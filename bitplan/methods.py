"""Registry of sensitivity methods (torch-free, so the API can list them).

Each entry names its parameter model and the dotted path of its implementation,
which is imported only when a worker or the CLI runs it. Adding a method is one
implementation module plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitplan.errors import BitplanError
from bitplan.hutchinson import ProbeShard, join, split_probes, stop_point, summarise
from bitplan.params import parse_model
from bitplan.schemas import SensitivityLayer, SensitivityTable

#: The sensitivity method a plan uses when none is named (CLI, API, web form).
DEFAULT_SENSITIVITY = "auto"


class HessianTraceParams(BaseModel):
    """Hutchinson estimate of each layer's Hessian trace (HAWQ-V2/V3).

    Split over workers by probes (``shards``), every shard computes its passes of all ``max_probes`` probes
    and the merge keeps the ones where a single worker's stopping rule would have stopped: the same table,
    with probes computed and discarded when the rule fires early. ``activations=true`` cannot be split.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_probes: int = Field(48, ge=2, le=10_000, description="most Rademacher probes")
    min_probes: int = Field(8, ge=2, le=10_000, description="fewest probes before the stopping rule may fire")
    probes_per_pass: int = Field(4, ge=1, le=256, description="probes sharing one forward/backward graph per batch")
    tol: float = Field(0.1, gt=0, lt=10, description="stop when every layer's standard error <= tol x |mean trace|")
    batch_size: int = Field(32, ge=1, le=4096, description="micro-batch: bounds the double-backward graph's memory")
    max_samples: int = Field(256, ge=1, description="calibration samples used")
    loss: Literal["task", "kl"] = Field(
        "task", description="task: cross-entropy with targets, else KL to full precision; kl: always KL to full precision"
    )
    hvp: Literal["auto", "exact", "finite_difference", "forward_difference"] = Field(
        "auto", description="auto: exact double backward, else the math form of SDPA, else central finite "
                            "differences; on a GPU a model with fused attention uses forward_difference (one gradient "
                            "per probe on the fused kernels)"
    )
    activations: bool = Field(False, description="also score each layer's input activation (HAWQ-V2), for --abits choices")
    omega: Literal["diagonal", "trace"] = Field(
        "diagonal", description="diagonal: sum of diag(H) x squared error, weight by weight; trace: HAWQ-V3's "
                                "Tr(H)/n x ||Q(W) - W||^2")


class HessianEigenParams(BaseModel):
    """Top Hessian eigenvalue per layer by power iteration (HAWQ)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_iter: int = Field(20, ge=1, le=1000, description="power iterations at most")
    tol: float = Field(1e-3, gt=0, lt=1, description="stop a layer when its eigenvalue changes by less than tol (relative)")
    batch_size: int = Field(32, ge=1, le=4096)
    max_samples: int = Field(128, ge=1)
    loss: Literal["task", "kl"] = "task"
    hvp: Literal["auto", "exact", "finite_difference", "forward_difference"] = "auto"


class FisherParams(BaseModel):
    """Diagonal Fisher information from per-sample gradients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples: int = Field(256, ge=1, description="samples (one backward pass each)")
    labels: Literal["auto", "model"] = Field(
        "auto", description="auto: the targets if given (empirical Fisher), else sampled from the model; model: always sampled"
    )


class TaylorParams(BaseModel):
    """First-order Taylor term |g . dW| (needs targets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(64, ge=1, le=4096)
    max_samples: int = Field(256, ge=1)


class LRPParams(BaseModel):
    """Layer-wise relevance propagation contribution scores (LRP-QViT), AttnLRP's rules for transformers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: Literal["auto", "attnlrp", "zennit"] = Field(
        "auto", description="auto: zennit's composite where every op between layers is linear, ReLU or BatchNorm, "
                            "AttnLRP's rules otherwise (attention, LayerNorm, GELU, products of activations)")
    epsilon: float = Field(1e-6, gt=0, description="the epsilon rule's stabiliser (rules=attnlrp)")
    composite: Literal["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"] = Field(
        "epsilon_plus", description="zennit's rule set (rules=zennit)")
    batch_size: int = Field(32, ge=1, le=4096)
    max_samples: int = Field(256, ge=1)


class PerturbationParams(BaseModel):
    """Direct measurement: quantize one layer at a time (ZeroQ / AIMET)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(64, ge=1, le=4096)
    max_samples: int = Field(256, ge=1)
    loss: Literal["task", "kl"] = "task"
    screen: float = Field(0.0, ge=0, description="once a layer's measured damage is below this, its higher bit widths "
                                                 "are scaled from it by the quantization error, not measured")


class AutoParams(BaseModel):
    """Picks the method per model: measured KL per option when the work fits, else the KL Hessian diagonal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure_gmacs: float = Field(
        5_000.0, ge=0, description="measure every option when that takes at most this many giga multiply-accumulates "
                                    "(options x samples x the model's MACs per sample); about 100 s on 2 CPU cores")
    max_samples: int = Field(256, ge=1, description="calibration samples for the measurements at most (fewer - 128, "
                                                    "64 or 32 - when measuring on more would exceed half of "
                                                    "measure_gmacs)")
    screen: float = Field(1e-4, ge=0, description="the measured method's screen (see perturbation)")
    activations: bool = Field(False, description="also score activations, for --abits choices: uses hessian_trace "
                                                 "(loss=kl, activations=true), the method that scores them")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    params: type[BaseModel]
    impl: str  # "module:function", called as function(context, params) -> SensitivityTable
    # How the work splits over workers into shards that merge into exactly the one-run table (None: it does not).
    # "layers": a layer's scores do not depend on which other layers are scored (SensitivityContext.only; merge_shards).
    # "probes": random probes drawn from (seed, probe index), computed by ``probe_impl`` in whole passes and merged
    # with the one-run stopping rule (merge_probe_shards).
    shard_by: Literal["layers", "probes"] | None = None
    probe_impl: str | None = None  # "module:function", called as function(context, params, start, end) -> ProbeShard
    unshardable_if: tuple[str, ...] = ()  # boolean parameters that, when true, keep the run in one piece

    @property
    def shardable(self) -> bool:
        return self.shard_by is not None

    def load_probe_shard(self) -> Callable[..., ProbeShard]:
        if self.probe_impl is None:
            raise BitplanError(f"sensitivity method '{self.name}' cannot be split by probes")
        module, _, attr = self.probe_impl.partition(":")
        function: Callable[..., ProbeShard] = getattr(importlib.import_module(module), attr)
        return function

    def load(self) -> Callable[..., SensitivityTable]:
        module, _, attr = self.impl.partition(":")
        function: Callable[..., SensitivityTable] = getattr(importlib.import_module(module), attr)
        return function


METHODS: dict[str, MethodInfo] = {
    "hessian_trace": MethodInfo(
        "hessian_trace",
        "HAWQ-V2/V3: Omega = Tr(H)/n x ||Q_b(W) - W||^2, trace by Hutchinson with a standard-error stopping rule",
        HessianTraceParams,
        "bitplan.core.sensitivity.hessian_trace:hessian_trace",
        shard_by="probes",  # probe i is drawn from (seed, i); shards are whole passes (bitplan/hutchinson.py)
        probe_impl="bitplan.core.sensitivity.hessian_trace:hessian_trace_shard",
        unshardable_if=("activations",),  # the activation traces are one pass after the weight probes
    ),
    "hessian_eigen": MethodInfo(
        "hessian_eigen",
        "HAWQ: Omega = lambda_max(H) x ||Q_b(W) - W||^2, top eigenvalue per layer by power iteration",
        HessianEigenParams,
        "bitplan.core.sensitivity.hessian_eigen:hessian_eigen",
        shard_by="layers",  # each layer iterates alone, from a start vector drawn from (seed, layer index)
    ),
    "fisher": MethodInfo(
        "fisher",
        "diagonal Fisher from per-sample gradients: Omega = sum F (.) (Q_b(W) - W)^2",
        FisherParams,
        "bitplan.core.sensitivity.first_order:fisher",
    ),
    "taylor": MethodInfo(
        "taylor",
        "first-order Taylor |g . (Q_b(W) - W)| with the mean gradient (needs targets)",
        TaylorParams,
        "bitplan.core.sensitivity.first_order:taylor",
    ),
    "lrp": MethodInfo(
        "lrp",
        "LRP-QViT: share of relevance through each layer (AttnLRP rules on transformers, zennit on CNNs) "
        "x relative quantization error",
        LRPParams,
        "bitplan.core.sensitivity.lrp:lrp",
    ),
    "perturbation": MethodInfo(
        "perturbation",
        "ZeroQ/AIMET: measured loss increase with one layer quantized at a time (costly, closest to the truth)",
        PerturbationParams,
        "bitplan.core.sensitivity.perturbation:perturbation",
        shard_by="layers",  # each layer's loss increase is measured with that layer alone quantized
    ),
    "auto": MethodInfo(
        "auto",
        "the default: measured KL per (layer, bits) (perturbation, loss=kl) when that work fits measure_gmacs, else "
        "the Hessian diagonal of the KL (hessian_trace, loss=kl); the table's notes say which and why",
        AutoParams,
        "bitplan.core.sensitivity.auto:auto",
    ),
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise BitplanError(f"unknown sensitivity method '{name}'", "valid methods: " + ", ".join(METHODS),
                           code="unknown_method", field="sensitivity") from None


def parse_params(info: MethodInfo, raw: dict[str, Any]) -> BaseModel:
    """``raw`` checked against the method's parameters; errors list the valid ones with their ranges."""
    return parse_model(info.params, raw, f"sensitivity method '{info.name}'", "sensitivity")


def shardable_methods(by: str | None = None) -> list[str]:
    """The methods that can be split into shards (``by``: only those split by "layers" or by "probes")."""
    return [name for name, info in METHODS.items() if info.shardable and by in (None, info.shard_by)]


def check_shardable(info: MethodInfo, params: BaseModel) -> None:
    """Refuse to split a method (with these parameters) whose shards could not merge into the one-run table."""
    if not info.shardable:
        raise BitplanError(f"sensitivity method '{info.name}' cannot be split into shards",
                           "use shards=1, or one of: " + ", ".join(shardable_methods()), field="shards",
                           code="invalid_request")
    on = [name for name in info.unshardable_if if getattr(params, name)]
    if on:
        raise BitplanError(f"sensitivity method '{info.name}' with {', '.join(f'{n}=true' for n in on)} cannot be split "
                           "into shards", f"use shards=1, or {', '.join(f'{n}=false' for n in on)}", field="shards",
                           code="invalid_request")


def plan_shards(info: MethodInfo, params: BaseModel, layer_names: list[str], shards: int) -> list[dict[str, Any]]:
    """The shards of one run: ``{"layers": [names]}`` blocks, or ``{"probes": [start, end]}`` ranges of whole passes."""
    check_shardable(info, params)
    if info.shard_by == "probes":
        p = params.model_dump()
        return [{"probes": [start, end]} for start, end in split_probes(p["max_probes"], p["probes_per_pass"], shards)]
    return [{"layers": block} for block in shard_layers(layer_names, shards)]


def shard_layers(names: list[str], shards: int) -> list[list[str]]:
    """Split ``names`` into at most ``shards`` contiguous blocks whose sizes differ by at most one.

    Contiguous, so each shard's table is already in model order; never an empty block, because a
    worker with nothing to score would still pay for loading the model.
    """
    if shards < 1:
        raise BitplanError(f"shards must be at least 1, not {shards}")
    count = min(shards, len(names))
    size, extra = divmod(len(names), count) if count else (0, 0)
    blocks, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        blocks.append(list(names[start:end]))
        start = end
    return blocks


def merge_shards(tables: list[SensitivityTable], order: list[str]) -> SensitivityTable:
    """Join the tables of layer shards into the table one run over every layer would have given.

    Layers come out in ``order`` (the model's); seconds add up (the work done, not the wall time);
    notes are kept once each, in order of first appearance. Shards must come from one run: the same
    method and parameters, and every layer of ``order`` scored exactly once.
    """
    if not tables:
        raise BitplanError("no sensitivity shards to merge")
    first = tables[0]
    for t in tables[1:]:
        if t.method != first.method or t.params != first.params:
            raise BitplanError(f"sensitivity shards disagree: {first.method} {first.params} vs {t.method} {t.params}",
                               "merge only the shards of one run")
    if len(set(order)) != len(order):
        raise BitplanError("the layer order given to merge_shards names a layer twice")
    by_name: dict[str, SensitivityLayer] = {}
    for t in tables:
        for layer in t.layers:
            if layer.name in by_name:
                raise BitplanError(f"layer '{layer.name}' is scored by more than one sensitivity shard",
                                   "split the layers with shard_layers")
            by_name[layer.name] = layer
    missing = [name for name in order if name not in by_name]
    if missing:
        raise BitplanError(f"no sensitivity shard scored the layer(s) {missing}", "every layer must be in exactly one shard")
    unknown = sorted(set(by_name) - set(order))
    if unknown:
        raise BitplanError(f"sensitivity shards scored layer(s) {unknown} that are not in the model's order",
                           "merge with the model's own layer names")
    notes = list(dict.fromkeys(note for t in tables for note in t.notes))
    return SensitivityTable(method=first.method, params=first.params, seconds=sum(t.seconds for t in tables),
                            layers=[by_name[name] for name in order], notes=notes)


def merge_probe_shards(parts: list[ProbeShard], order: list[str] | None = None) -> SensitivityTable:
    """Join probe shards into the table one worker would have given for the same seed, float for float.

    The rows of all shards, in probe order, go through one worker's stopping rule at the same pass
    boundaries (the probes after the point where it stops are discarded) and the same summary; seconds
    add up (the work done, every probe computed included). ``order`` (the model's layers) is checked when
    given. Shards must come from one run and cover every probe of ``max_probes`` exactly once.
    """
    whole = join(parts)
    if order is not None and whole.layers != list(order):
        raise BitplanError("the probe shards' layers are not the model's", "merge with the model's own layer names")
    p = whole.params
    used = stop_point(whole.estimates, int(p["max_probes"]), int(p["min_probes"]), int(p["probes_per_pass"]),
                      float(p["tol"]))
    stats, omega, detail, notes = summarise(whole, used)
    layers = [SensitivityLayer(name=name, stat=stats[name], omega=omega[name], omega_act={}, detail=detail[name])
              for name in whole.layers]
    return SensitivityTable(method=whole.method, params=whole.params, seconds=whole.seconds, layers=layers, notes=notes)
