"""Plan files for tests that need one without running a search: the layers of a real module, with given widths."""

from __future__ import annotations

from typing import Any

from bitplan.schemas import PlanFile


def plan_for(module: Any, bits: dict[str, int | str] | None = None, a_bits: dict[str, int] | None = None, *,
             default: int = 4, fmt: str = "hf", model_type: str | None = "llama", granularity: str | None = None,
             kept: str = "uniform") -> PlanFile:
    """A bitplan.plan/v1 file over ``module``'s Linear and Conv layers (names as ``named_modules`` gives them):
    ``bits[name]`` weight bits or a number format's name (else ``default``), ``a_bits[name]`` activation bits
    (else 16)."""
    from torch import nn

    from bitplan.formats import choice_bits, choice_format

    bits, a_bits = bits or {}, a_bits or {}
    kinds = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Conv1d: "conv1d"}
    layers = []
    for name, sub in module.named_modules():
        kind = kinds.get(type(sub))
        if kind is None:
            continue
        layers.append({"name": name, "kind": kind, "params": int(sub.weight.numel()), "macs": None,
                       "w_bits": choice_bits(bits.get(name, default)), "w_format": choice_format(bits.get(name, default)),
                       "a_bits": a_bits.get(name, 16), "sensitivity": 0.0})
    metrics = {"loss": 1.0, "kl": 0.0, "top1_agreement": 1.0}
    units = None
    if granularity:
        units = {"granularity": granularity, "units": 1, "kept": kept, "message": "test", "measured_mixed": metrics,
                 "measured_uniform": metrics, "size_bytes": 1.0, "layers": []}
    data: dict[str, Any] = {
        "schema": "bitplan.plan/v1",
        "model": {"sha256": "0" * 64, "format": fmt, "name": "test-model", "model_type": model_type},
        "budget": {"avg_weight_bits": 4.0}, "w_bits_options": [2, 3, 4, 5, 6, 8], "a_bits_options": [8, 16],
        "seed": 0, "sensitivity": {"method": "test", "params": {}, "seconds": 0.0},
        "solver": {"method": "ilp", "status": "optimal", "seconds": 0.0, "objective": 0.0},
        "layers": layers, "cost": {"size_bytes": 1.0, "avg_weight_bits": 4.0, "bops": 0.0}, "measured": None,
        "units": units,
    }
    return PlanFile.model_validate(data)
