"""``perturbation``: quantize one layer at a time to each bit width and measure
the loss increase on the calibration data (ZeroQ's and AIMET's direct
measurement). Costly — layers x bit widths forward passes — and the closest
to the truth a per-layer score can be."""

from __future__ import annotations

import torch

from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, loss_name, loss_of, reference_logp, table
from bitplan.methods import PerturbationParams
from bitplan.schemas import SensitivityTable


@torch.no_grad()
def perturbation(ctx: SensitivityContext, params: PerturbationParams) -> SensitivityTable:
    clock = Clock()
    batches = calibration_batches(ctx, params.batch_size, params.max_samples, use_kl=params.loss == "kl")
    refs = reference_logp(ctx, batches)
    n = sum(b.size for b in batches)

    def loss(overrides=None) -> float:
        return sum(float(loss_of(ctx, b, r, overrides)) * b.size for b, r in zip(batches, refs)) / n

    base = loss()
    layers = ctx.scored_layers()  # each layer is measured alone, so a shard's scores equal the one-run ones
    bits = [b for b in ctx.w_bits if b < 16]
    stats, omega = {}, {}
    done, total = 0, len(layers) * max(len(bits) + len(ctx.formats), 1)
    estimated = 0
    for g in layers:
        omega[g.name] = {16: 0.0} if 16 in ctx.w_bits else {}
        last = None  # the last measured (bits, damage)
        # ascending widths (the damage falls as the bits rise), then the formats: each measured, unless the layer's
        # damage is already below the screen, the quadratic regime where it scales with ||Q(W) - W||^2
        for b in [*bits, *ctx.formats]:
            if last is not None and abs(last[1]) < params.screen:
                ratio = ctx.bank.error_sq(g.weight_key, b) / max(ctx.bank.error_sq(g.weight_key, last[0]), 1e-30)
                omega[g.name][b] = last[1] * ratio
                estimated += 1
            else:
                omega[g.name][b] = loss({g.weight_key: ctx.bank.get(g.weight_key, b)}) - base
                if not isinstance(b, str):
                    last = (b, omega[g.name][b])
            done += 1
            ctx.progress("sensitivity", done / total, f"{g.name} in {b}" if isinstance(b, str) else f"{g.name} at {b} bits")
        stats[g.name] = omega[g.name][min(bits)] if bits else 0.0
    notes = [f"measured increase of {loss_name(batches)} ({base:.5g} at full precision) with one layer quantized at a "
             f"time, on {n} samples; stat = increase at {min(bits) if bits else 16} bits"]
    if estimated:
        notes.append(f"{estimated} of {total} options scaled from a measured damage below the screen "
                     f"({params.screen:g}) by the quantization error instead of measured")
    return table("perturbation", params, ctx, clock, stats, omega, notes)
