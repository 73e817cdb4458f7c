"""``hessian_eigen``: the top eigenvalue of each layer's Hessian block by power
iteration (HAWQ, v1), Omega(l, b) = lambda_max(H_ll) * ||Q_b(W_l) - W_l||^2.

All layers iterate together: each data pass builds one double-backward graph per
micro-batch and takes every unconverged layer's block product from it.
"""

from __future__ import annotations

import torch

from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, loss_name, reference_logp, table, weights_of
from bitplan.core.sensitivity.hvp import HessianOracle
from bitplan.methods import HessianEigenParams
from bitplan.schemas import SensitivityTable


def hessian_eigen(ctx: SensitivityContext, params: HessianEigenParams) -> SensitivityTable:
    clock = Clock()
    weights = weights_of(ctx)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples, use_kl=params.loss == "kl")
    refs = reference_logp(ctx, batches)
    gen = torch.Generator().manual_seed(ctx.seed)
    vectors = {}
    for k, w in weights.items():
        v = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        vectors[k] = v / v.norm()
    eigen = {k: 0.0 for k in weights}
    iterations = {k: 0 for k in weights}
    active = list(weights)
    with HessianOracle(ctx, batches, refs, weights, params.hvp) as oracle:
        for it in range(params.max_iter):
            products = oracle.blocks([(k, vectors[k]) for k in active])
            still = []
            for k, hv in zip(active, products):
                value = float((vectors[k] * hv).sum())
                norm = hv.norm()
                converged = it > 0 and abs(value - eigen[k]) <= params.tol * max(abs(value), 1e-12)
                eigen[k], iterations[k] = value, it + 1
                if norm > 0:
                    vectors[k] = hv / norm
                if not converged and norm > 0:
                    still.append(k)
            active = still
            ctx.progress("sensitivity", (it + 1) / params.max_iter, f"iteration {it + 1}, {len(active)} layers left")
            if not active:
                break
        notes = oracle.notes
    notes.append(f"power iteration on the Hessian of {loss_name(batches)}, {sum(b.size for b in batches)} samples, "
                 f"tol {params.tol}; {len(active)} layer(s) stopped at max_iter")
    stats, omega, detail = {}, {}, {}
    for g in ctx.model.layers:
        lam = eigen[g.weight_key]
        stats[g.name] = lam
        omega[g.name] = {b: max(lam, 0.0) * ctx.bank.error_sq(g.weight_key, b) for b in ctx.w_bits}
        detail[g.name] = {"iterations": iterations[g.weight_key]}
    return table("hessian_eigen", params, ctx, clock, stats, omega, notes, detail)
