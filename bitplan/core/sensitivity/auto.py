"""``auto``: pick the sensitivity method per model, and say why.

What the fidelity bench (bench/sensitivity_fidelity.py, README) measured: the KL damage of one layer
quantized alone, measured directly (``perturbation`` with ``loss=kl``), ranks the true damage best on
every model (Spearman 0.997 on MiniLM, where the cross-entropy Hessian trace reaches 0.32), and it is
the score ModelOpt's and AIMET's searches rely on. Its cost is one forward pass over the calibration
samples per (layer, bit width), so ``auto`` times one such pass and measures when the whole table is
predicted to fit ``measure_seconds`` (halving the samples, down to 32, while the prediction is over half of
it); otherwise (very deep models) it falls back to the Hessian
diagonal of the KL, whose cost does not grow with the number of bit widths.
"""

from __future__ import annotations

import time

import torch

from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import calibration_batches, reference_logp
from bitplan.core.sensitivity.hessian_trace import hessian_trace
from bitplan.core.sensitivity.perturbation import perturbation
from bitplan.methods import AutoParams, HessianTraceParams, PerturbationParams
from bitplan.schemas import SensitivityTable

#: the fewest calibration samples the measured choice is allowed to shrink to
MIN_SAMPLES = 32


@torch.no_grad()
def _forward_seconds(ctx: SensitivityContext, max_samples: int) -> float:
    batches = calibration_batches(ctx, 64, max_samples, use_kl=True)
    reference_logp(ctx, batches[:1])  # warm-up (first-call overheads)
    start = time.perf_counter()
    reference_logp(ctx, batches)
    return time.perf_counter() - start


def auto(ctx: SensitivityContext, params: AutoParams) -> SensitivityTable:
    start = time.perf_counter()
    options = len(ctx.scored_layers()) * len([b for b in ctx.w_bits if b < 16])
    samples = min(params.max_samples, len(ctx.data))
    per_pass = _forward_seconds(ctx, samples)
    # fewer samples (down to MIN_SAMPLES) before giving up on measuring: the pass time scales with them
    while options * per_pass > params.measure_seconds / 2 and samples > MIN_SAMPLES:
        per_pass *= max(samples // 2, MIN_SAMPLES) / samples
        samples = max(samples // 2, MIN_SAMPLES)
    predicted = options * per_pass
    if predicted <= params.measure_seconds:
        why = (f"auto: measured KL per option (perturbation, loss=kl): {options} options x {per_pass:.3f} s per pass "
               f"on {samples} samples ~ {predicted:.0f} s, within measure_seconds={params.measure_seconds:g}")
        inner = perturbation(ctx, PerturbationParams(loss="kl", max_samples=samples, screen=params.screen))
    else:
        why = (f"auto: Hessian diagonal of the KL (hessian_trace, loss=kl), because measuring {options} options "
               f"x {per_pass:.3f} s per pass ~ {predicted:.0f} s exceeds measure_seconds={params.measure_seconds:g}")
        inner = hessian_trace(ctx, HessianTraceParams(loss="kl"))
    return inner.model_copy(update={"method": "auto", "params": params.model_dump() | {"seed": ctx.seed,
                                                                                       "chose": inner.method},
                                    "notes": [why, *inner.notes], "seconds": time.perf_counter() - start})
