"""Bits below a layer (SliM-LLM, MixLLM): after the layer plan is chosen, each linear layer's bits are
spread over its units, keeping the layer's weight-bit total, where its calibration activations say they
matter most.

Units (``granularity``):

* ``group:N``: blocks of N input columns, every output row (one bit width per column block, as a
  group-quantized kernel stores it); weights quantized with one scale per (row, group), fp16 in the cost;
* ``channel``: output rows (one bit width per output channel); one fp32 scale per row, as the layer plan.

Salience is activations x weights: the expected output error a unit's quantization causes, under a diagonal
approximation of the input's second moments, E||(Q_b(W) - W) x||^2 ~ sum_j E[x_j^2] ||Q_b(W)[:, j] - W[:, j]||^2,
summed over the unit's weights. Within a layer every unit is on that one scale, so the layer's units are
solved as one multiple-choice knapsack (``solver.units``, the Lagrangian with a certified gap) with the
layer's own average bits as the budget: the plan's weight-bit total is unchanged.

The result must beat what it replaces: the mixed units are measured (KL to full precision, on the held-out
data) against the same granularity with every unit at its layer's bits, and kept only when they measure
better; the plan's ``units`` says what was measured and which was kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from bitplan.core.evaluate import Reference, measure
from bitplan.core.quant import quantize_weight
from bitplan.errors import BitplanError
from bitplan.progress import ProgressFn, no_progress
from bitplan.schemas import GRANULARITY_PATTERN, UnitLayer, UnitPlan

GRANULARITY = re.compile(GRANULARITY_PATTERN)  # the request's own rule; group sizes are bounded below
SCALE_BYTES = 2  # one fp16 scale per (row, group), as group-quantized formats store them


def parse_granularity(text: str) -> tuple[str, int | None]:
    """('layer' | 'channel' | 'group', group size or None)."""
    match = GRANULARITY.match(text)
    if not match or (match.group(2) is not None and not 8 <= int(match.group(2)) <= 4096):
        raise BitplanError(f"granularity '{text}' is not one bitplan knows",
                           "use layer (one width per layer), channel (per output channel) or group:N "
                           "(per block of N input columns, 8 <= N <= 4096, e.g. group:128)", field="granularity")
    return ("group", int(match.group(2))) if match.group(2) else (text, None)


@dataclass
class _Layer:
    name: str
    key: str
    bits: int
    weight: torch.Tensor  # [out, in]
    energy: torch.Tensor  # [in]: E[x_j^2] over the calibration tokens


def quantize_groups(weight: torch.Tensor, bits: int, group: int, clip: str = "mse") -> torch.Tensor:
    """Q_b(W) with one scale per (output row, block of ``group`` input columns)."""
    out, cols = weight.shape
    blocks = weight.reshape(out, cols // group, group).reshape(-1, group)
    return quantize_weight(blocks, bits, clip).reshape(out, cols)


@torch.no_grad()
def input_energy(model, data, names: set[str], batch_size: int, limit: int = 256) -> dict[str, torch.Tensor]:
    """E[x_j^2] of each named linear layer's input feature j, over every calibration token."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def pre(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre

    for layer in model.layers:
        if layer.name in names:
            for probe in layer.probes:
                handles.append(probe.register_forward_pre_hook(hook(layer.name)))
    try:
        for batch in data.batches(batch_size, limit):
            model.call(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def unit_table(layer: _Layer, kind: str, group: int | None, options: list[int], clip: str
               ) -> tuple[np.ndarray, np.ndarray, dict[int, torch.Tensor]]:
    """(objective [units, options], weights per unit [units], Q_b(W) per option) of one layer."""
    w = layer.weight.float()
    quantized = {b: (quantize_groups(w, b, group, clip) if kind == "group" else quantize_weight(w, b, clip))
                 for b in options}
    columns = []
    for b in options:
        err = (quantized[b] - w).pow(2) * layer.energy  # [out, in], each weight's error weighted by its input
        if kind == "group":
            columns.append(err.sum(0).reshape(-1, group).sum(1))  # per column block
        else:
            columns.append(err.sum(1))  # per output row
    objective = torch.stack(columns, 1).double().numpy()
    units = objective.shape[0]
    per_unit = w.shape[0] * group if kind == "group" else w.shape[1]
    return objective, np.full(units, per_unit, dtype=np.float64), quantized


def _mixed(quantized: dict[int, torch.Tensor], bits: np.ndarray, kind: str, group: int | None) -> torch.Tensor:
    """The layer's weight with each unit quantized at its own bits."""
    out = next(iter(quantized.values())).clone()
    for b, q in quantized.items():
        mask = torch.from_numpy(bits == b)
        if kind == "group":
            cols = mask.repeat_interleave(group)
            out[:, cols] = q[:, cols]
        else:
            out[mask] = q[mask]
    return out


def plan_units(prep, request, assignment: dict[str, tuple[int, int]], progress: ProgressFn = no_progress) -> UnitPlan:
    """Spread each linear layer's bits over its units (see the module's docstring); measure, keep the better."""
    from solver.units import UnitProblem

    kind, group = parse_granularity(request.granularity)
    model = prep.model
    options = sorted(b for b in request.w_bits if b < 16)
    skipped: list[str] = []
    chosen: list[_Layer] = []
    for g in model.layers:
        bits = assignment[g.name][0]
        w = model.weight(g)
        if bits >= 16 or g.name in request.pins:
            continue
        if g.kind != "linear" or w.dim() != 2:
            skipped.append(f"{g.name} ({g.kind})")
            continue
        if kind == "group" and w.shape[1] % (group or 1):
            skipped.append(f"{g.name} ({w.shape[1]} inputs, not a multiple of {group})")
            continue
        chosen.append(_Layer(g.name, g.weight_key, bits, w.detach(), torch.empty(0)))
    notes = []
    if skipped:
        notes.append(f"kept at one width per layer: {', '.join(skipped[:6])}" + (" ..." if len(skipped) > 6 else "")
                     + " (units are for linear layers with full groups; pinned layers stay as pinned)")
    if not chosen:
        raise BitplanError(f"granularity {request.granularity}: no linear layer below 16 bits to split into units",
                           "use granularity layer for this model", field="granularity")
    progress("units", 0.0, f"activation energy of {len(chosen)} layers")
    energy = input_energy(model, prep.data, {c.name for c in chosen}, request.batch_size)
    layers, uniform_over, mixed_over = [], {}, {}
    total_units = 0
    for i, layer in enumerate(chosen):
        layer.energy = energy[layer.name].to(layer.weight.dtype)
        objective, params, quantized = unit_table(layer, kind, group, options, prep.bank.clip)
        problem = UnitProblem(objective, {"avg_weight_bits": float(layer.bits)}, bits=options, params=params)
        solution = problem.solve()
        bits = np.asarray(solution.w_bits)
        total_units += len(bits)
        at_layer = options.index(layer.bits)
        predicted_uniform = float(objective[:, at_layer].sum())
        layers.append(UnitLayer(name=layer.name, bits=[int(b) for b in bits], layer_bits=layer.bits,
                                predicted=float(problem.value(solution.choice)), predicted_uniform=predicted_uniform,
                                gap=solution.gap))
        uniform_over[layer.key] = quantized[layer.bits].to(layer.weight.dtype)
        mixed_over[layer.key] = _mixed(quantized, bits, kind, group).to(layer.weight.dtype)
        progress("units", 0.1 + 0.7 * (i + 1) / len(chosen), f"{layer.name}: {len(bits)} units")
    # the other layers as the layer plan has them
    rest = {g.weight_key: prep.bank.get(g.weight_key, assignment[g.name][0]) for g in model.layers
            if assignment[g.name][0] < 16 and g.weight_key not in mixed_over}
    progress("units", 0.85, "measuring the units against one width per layer")
    ref = Reference.compute(model, prep.eval_data, request.batch_size)
    uniform_m = measure(model, ref, rest | uniform_over)
    mixed_m = measure(model, ref, rest | mixed_over)
    kept = "mixed" if mixed_m.kl < uniform_m.kl else "uniform"
    if kept == "uniform":
        layers = [layer.model_copy(update={"bits": [layer.layer_bits] * len(layer.bits)}) for layer in layers]
    size = _size_bytes(prep, assignment, chosen, kind, group)
    progress("units", 1.0, kept)
    return UnitPlan(granularity=request.granularity, units=total_units, kept=kept, measured_mixed=mixed_m,
                    measured_uniform=uniform_m, size_bytes=size, layers=layers,
                    message=_message(kept, mixed_m.kl, uniform_m.kl, request.granularity), notes=notes)


def _size_bytes(prep, assignment, chosen: list[_Layer], kind: str, group: int | None) -> float:
    """The layer plan's size with each group-split layer's scales counted as stored: one fp16 scale per (row,
    group) instead of one fp32 scale per row. The bit total of each split layer is its layer's, and ``channel``
    keeps one scale per row, so only group scales change the size."""
    base = prep.costs.plan_cost(assignment).size_bytes
    if kind != "group" or not group:
        return float(base)
    for layer in chosen:
        out, cols = layer.weight.shape
        base += out * (cols // group) * SCALE_BYTES - out * 4
    return float(base)


def _message(kept: str, mixed: float, uniform: float, granularity: str) -> str:
    if kept == "mixed":
        return (f"bits per unit ({granularity}) measured better than one width per layer at the same bit total "
                f"(KL {mixed:.4g} vs {uniform:.4g}); kept")
    return (f"bits per unit ({granularity}) did not measure better than one width per layer at the same bit total "
            f"(KL {mixed:.4g} vs {uniform:.4g}); every unit keeps its layer's width")
