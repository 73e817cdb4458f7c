"""First-order methods: diagonal Fisher information (``fisher``) and the
first-order Taylor term (``taylor``).

fisher: F = mean over samples of g_i (.) g_i, g_i the per-sample gradient of the
log-likelihood (with targets: of the true label, the empirical Fisher; without:
of a label sampled from the model's own output distribution, the true Fisher).
Omega(l, b) = sum F_l (.) (Q_b(W_l) - W_l)^2 — the second-order loss increase
the Fisher predicts, weight by weight (GWQ / Fisher-based sensitivity).

taylor: Omega(l, b) = |g_l . (Q_b(W_l) - W_l)| with g the mean gradient of the
cross-entropy on the targets; it needs targets (at a full-precision optimum of
an unlabelled KL loss the gradient is zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitplan.core.device import accumulator
from bitplan.core.evaluate import flat, logits_of
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, table, weights_of
from bitplan.errors import BitplanError
from bitplan.methods import FisherParams, TaylorParams
from bitplan.schemas import SensitivityTable


def _sample_grads(ctx: SensitivityContext, batch, weights, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {k: w.detach().requires_grad_(True) for k, w in weights.items()}
    logits = flat(logits_of(ctx.model.call(batch, leaves)))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(w) if g is None else g for (k, w), g in zip(weights.items(), grads)}


def fisher(ctx: SensitivityContext, params: FisherParams) -> SensitivityTable:
    clock = Clock()
    weights = weights_of(ctx)
    batches = calibration_batches(ctx, 1, params.max_samples)  # per-sample gradients
    gen = torch.Generator().manual_seed(ctx.seed)
    use_targets = ctx.data.targets is not None and params.labels != "model"
    diag = {k: accumulator(w) for k, w in weights.items()}
    for i, batch in enumerate(batches):
        if use_targets:
            labels = batch.targets.reshape(-1)
        else:
            with torch.no_grad():
                probs = F.softmax(flat(logits_of(ctx.model.call(batch))), -1)
            # drawn on the CPU with the seeded generator: the same labels on any device
            labels = torch.multinomial(probs.cpu(), 1, generator=gen).reshape(-1).to(probs.device)
        for k, g in _sample_grads(ctx, batch, weights, labels).items():
            diag[k] += g.pow(2) / len(batches)
        if i % 16 == 0 or i == len(batches) - 1:
            ctx.progress("sensitivity", (i + 1) / len(batches), f"{i + 1} samples")
    stats, omega = {}, {}
    for g in ctx.model.layers:
        fish = diag[g.weight_key]
        stats[g.name] = float(fish.sum())
        omega[g.name] = {b: float((fish * (ctx.bank.get(g.weight_key, b) - weights[g.weight_key]).pow(2)).sum())
                         for b in ctx.choices}
    kind = "empirical Fisher (true labels)" if use_targets else "Fisher with labels sampled from the model"
    notes = [f"{kind}; per-sample gradients on {len(batches)} samples; stat = trace of the diagonal Fisher"]
    return table("fisher", params, ctx, clock, stats, omega, notes)


def taylor(ctx: SensitivityContext, params: TaylorParams) -> SensitivityTable:
    if ctx.data.targets is None:
        raise BitplanError("taylor needs calibration data with 'targets'",
                           "add integer 'targets' to the data, or use fisher or hessian_trace, which work without")
    clock = Clock()
    weights = weights_of(ctx)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples)
    n = sum(b.size for b in batches)
    grad = {k: accumulator(w) for k, w in weights.items()}
    for i, batch in enumerate(batches):
        for k, g in _sample_grads(ctx, batch, weights, batch.targets.reshape(-1)).items():
            grad[k] += g / n
        ctx.progress("sensitivity", (i + 1) / len(batches), "gradients")
    stats, omega = {}, {}
    for g in ctx.model.layers:
        gl = grad[g.weight_key]
        stats[g.name] = float(gl.norm())
        omega[g.name] = {b: abs(float((gl * (ctx.bank.get(g.weight_key, b) - weights[g.weight_key])).sum()))
                         for b in ctx.choices}
    notes = [f"mean cross-entropy gradient on {n} samples; stat = gradient norm"]
    return table("taylor", params, ctx, clock, stats, omega, notes)
