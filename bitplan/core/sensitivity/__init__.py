"""Sensitivity methods: each turns (model, data, bit options) into a table
Omega[layer][w_bits] on one scale, lower meaning safer to quantize (and Omega[layer][format] for the number
formats a job offers: each method scores ``ctx.choices``, and ``common.table`` files the two apart)."""

from __future__ import annotations

from dataclasses import dataclass

from bitplan.core.data import Dataset
from bitplan.core.graph import GraphLayer
from bitplan.core.loading import LoadedModel
from bitplan.core.quant import WeightBank
from bitplan.errors import BitplanError
from bitplan.formats import WeightChoice
from bitplan.hutchinson import ProbeShard
from bitplan.methods import check_shardable, get_method, parse_params, shardable_methods
from bitplan.progress import ProgressFn, no_progress
from bitplan.schemas import SensitivityTable


@dataclass
class SensitivityContext:
    model: LoadedModel
    data: Dataset
    w_bits: list[int]
    bank: WeightBank
    seed: int = 0
    progress: ProgressFn = no_progress
    only: frozenset[str] | None = None  # layer names to score (one shard of the work); None = every layer
    formats: tuple[str, ...] = ()  # number formats to score besides the INT widths (bitplan.formats)

    @property
    def choices(self) -> list[WeightChoice]:
        """Every weight choice a method scores: the INT widths, then the formats."""
        return [*self.w_bits, *self.formats]

    def scored_layers(self) -> list[GraphLayer]:
        """The layers this run scores, in model order."""
        return [g for g in self.model.layers if self.only is None or g.name in self.only]


def run_sensitivity(name: str, params: dict, ctx: SensitivityContext) -> SensitivityTable:
    info = get_method(name)
    parsed = parse_params(info, params)
    if ctx.only is not None:
        _check_shard(info.name, info.shard_by == "layers", ctx)
    return info.load()(ctx, parsed)


def run_probe_shard(name: str, params: dict, ctx: SensitivityContext, start: int, end: int) -> ProbeShard:
    """Probes ``[start, end)`` of a method split by probes (``bitplan.methods.plan_shards``), over every layer."""
    info = get_method(name)
    parsed = parse_params(info, params)
    check_shardable(info, parsed)
    if info.shard_by != "probes":
        raise BitplanError(f"{name} is not split by probes", "methods split by probes: "
                           + ", ".join(shardable_methods("probes")))
    return info.load_probe_shard()(ctx, parsed, start, end)


def _check_shard(method: str, shardable: bool, ctx: SensitivityContext) -> None:
    """Refuse a layer subset that would not reproduce the one-run scores, or names no layer of the model."""
    if not shardable:
        raise BitplanError(f"{method} scores all layers jointly, so it cannot score a subset of them",
                           "methods that can be split by layer: " + ", ".join(shardable_methods("layers")))
    names = [g.name for g in ctx.model.layers]
    unknown = sorted(ctx.only - set(names))
    if unknown:
        raise BitplanError(f"layer(s) {unknown} are not in the model", "layers: " + ", ".join(names))
    if not ctx.only:
        raise BitplanError("the layer subset to score is empty", "give at least one layer, or None for all")
