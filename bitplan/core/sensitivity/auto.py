"""``auto``: pick the sensitivity method per model, and say why.

What the fidelity bench (bench/sensitivity_fidelity.py, README) measured: the KL damage of one layer
quantized alone, measured directly (``perturbation`` with ``loss=kl``), ranks the true damage best on
every model (Spearman 0.997 on MiniLM, where the cross-entropy Hessian trace reaches 0.32), and it is
the score ModelOpt's and AIMET's searches rely on. Its cost is one forward pass over the calibration
samples per (layer, bit width), so ``auto`` measures when that work, counted in multiply-accumulates
(options x samples x the model's MACs per sample, measured on data), is within ``measure_gmacs``;
otherwise (very large models) it falls back to the Hessian diagonal of the KL, whose cost does not grow
with the number of bit widths. The choice is counted, not timed, so the same job makes the same choice
on a busy machine and an idle one.
"""

from __future__ import annotations

import time

from bitplan.core.evaluate import measure_macs
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.hessian_trace import hessian_trace
from bitplan.core.sensitivity.perturbation import perturbation
from bitplan.methods import AutoParams, HessianTraceParams, PerturbationParams
from bitplan.schemas import SensitivityTable


def auto(ctx: SensitivityContext, params: AutoParams) -> SensitivityTable:
    start = time.perf_counter()
    options = len(ctx.scored_layers()) * len([b for b in ctx.choices if b != 16])
    macs = sum(measure_macs(ctx.model, ctx.data.slice(0, min(len(ctx.data), 4))).values())
    # the most samples (max_samples, 128, 64 or 32, at most the data's) whose measuring stays within half the budget:
    # small models measure on all their calibration data, large ones on fewer samples before giving up on measuring
    ladder = [params.max_samples] + [n for n in (128, 64, 32) if n < params.max_samples]
    sizes = [min(n, len(ctx.data)) for n in ladder]
    samples = next((n for n in sizes if options * n * macs / 1e9 <= params.measure_gmacs / 2), sizes[-1])
    gmacs = options * samples * macs / 1e9
    if params.activations:
        why = ("auto: Hessian diagonal of the KL with activation traces (hessian_trace, loss=kl, activations=true), "
               "because activation bits are to be chosen and only hessian_trace scores them")
        inner = hessian_trace(ctx, HessianTraceParams(loss="kl", activations=True))
    elif gmacs <= params.measure_gmacs:
        why = (f"auto: measured KL per option (perturbation, loss=kl): {options} options x {samples} samples x "
               f"{macs / 1e6:.3g} MMAC = {gmacs:.4g} GMAC, within measure_gmacs={params.measure_gmacs:g}")
        inner = perturbation(ctx, PerturbationParams(loss="kl", max_samples=samples, screen=params.screen))
    else:
        why = (f"auto: Hessian diagonal of the KL (hessian_trace, loss=kl), because measuring {options} options x "
               f"{samples} samples x {macs / 1e6:.3g} MMAC = {gmacs:.4g} GMAC exceeds measure_gmacs="
               f"{params.measure_gmacs:g}")
        inner = hessian_trace(ctx, HessianTraceParams(loss="kl"))
    return inner.model_copy(update={"method": "auto", "params": params.model_dump() | {"seed": ctx.seed,
                                                                                       "chose": inner.method},
                                    "notes": [why, *inner.notes], "seconds": time.perf_counter() - start})
