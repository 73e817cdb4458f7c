"""Cost model for a plan (torch-free).

size_bytes  packed weights at their bits + one fp32 scale per output channel for
            quantized layers (a number format: its own scales, bitplan.formats) + every
            other floating tensor of the model as stored
avg_weight_bits  parameter-weighted mean of w_bits over the quantizable layers
bops        sum of MACs x w_bits x a_bits per sample (16 stands for full precision)
latency_ms  sum of the user's per-layer lookup table entries, as HAWQ-V3 did

A weight choice is an INT width (an int) or a number format's name (bitplan.formats).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.errors import BudgetError
from bitplan.formats import WeightChoice, choice_bits, table_key
from bitplan.formats import size_bytes as weight_bytes
from bitplan.schemas import Cost, LayerInfo

SCALE_BYTES = 4
FULL_PRECISION = 16


@dataclass(frozen=True)
class CostModel:
    layers: tuple[LayerInfo, ...]
    fixed_bytes: float = 0.0
    latency: dict[str, dict[WeightChoice, float]] | None = field(default=None)

    def option_cost(self, layer: LayerInfo, w_bits: WeightChoice, a_bits: int) -> dict[str, float]:
        """Additive costs of running ``layer`` at (w_bits, a_bits); ``w_bits`` may name a number format."""
        size = weight_bytes(w_bits, layer.params, layer.out_channels, SCALE_BYTES)
        cost = {"size_bytes": size, "bops": float(layer.macs or 0) * choice_bits(w_bits) * a_bits}
        if self.latency is not None:
            cost["latency_ms"] = self._latency(layer.name, w_bits)
        return cost

    def fixed_cost(self) -> dict[str, float]:
        fixed = {"size_bytes": float(self.fixed_bytes), "bops": 0.0}
        if self.latency is not None:
            fixed["latency_ms"] = 0.0
        return fixed

    def plan_cost(self, assignment: Mapping[str, tuple[WeightChoice, int]]) -> Cost:
        """Totals for ``{layer: (w_bits, a_bits)}``; every layer must be assigned."""
        totals = self.fixed_cost()
        bit_params = 0.0
        for layer in self.layers:
            w_bits, a_bits = assignment[layer.name]
            for key, value in self.option_cost(layer, w_bits, a_bits).items():
                totals[key] += value
            bit_params += layer.params * choice_bits(w_bits)
        n_params = sum(layer.params for layer in self.layers) or 1
        return Cost(
            size_bytes=totals["size_bytes"],
            avg_weight_bits=bit_params / n_params,
            bops=totals["bops"],
            latency_ms=totals.get("latency_ms"),
        )

    def _latency(self, name: str, w_bits: WeightChoice) -> float:
        assert self.latency is not None
        row = self.latency.get(name)
        if row is None or w_bits not in row:
            at = f"in {w_bits}" if isinstance(w_bits, str) else f"at {w_bits} bits"
            raise BudgetError(
                f"latency table has no entry for layer '{name}' {at}",
                "give every layer a time for every allowed weight bit width and format",
                field="latency_table",
            )
        return row[w_bits]


def load_latency_table(path: str | Path) -> dict[str, dict[WeightChoice, float]]:
    """Read ``{"layer": {"4": 0.12, "8": 0.2, "nvfp4": 0.1, ...}, ...}`` (milliseconds)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BudgetError(f"latency table '{path}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BudgetError(f"latency table '{path}' is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BudgetError("latency table must be a JSON object {layer: {bits: ms}}")
    table: dict[str, dict[WeightChoice, float]] = {}
    for name, row in raw.items():
        if not isinstance(row, dict):
            raise BudgetError(f"latency table entry for '{name}' must be an object {{bits: ms}}")
        try:
            table[name] = {table_key(bits): float(ms) for bits, ms in row.items()}
        except (TypeError, ValueError):
            raise BudgetError(f"latency table entry for '{name}' must map bit widths to milliseconds") from None
    return table
