"""Sensitivity methods: each turns (model, data, bit options) into a table
Omega[layer][w_bits] on one scale, lower meaning safer to quantize."""

from __future__ import annotations

from dataclasses import dataclass

from bitplan.core.data import Dataset
from bitplan.core.loading import LoadedModel
from bitplan.core.quant import WeightBank
from bitplan.methods import get_method, parse_params
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


def run_sensitivity(name: str, params: dict, ctx: SensitivityContext) -> SensitivityTable:
    info = get_method(name)
    return info.load()(ctx, parse_params(info, params))
