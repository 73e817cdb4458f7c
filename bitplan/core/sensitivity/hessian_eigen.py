"""``hessian_eigen``: the top eigenvalue of each layer's Hessian block by power
iteration (HAWQ, v1), Omega(l, b) = lambda_max(H_ll) * ||Q_b(W_l) - W_l||^2.

All layers iterate together: each data pass builds one double-backward graph per
micro-batch and takes every unconverged layer's block product from it.

A layer's iteration depends on nothing but its own block and its own start
vector, drawn from (seed, layer index): scoring a subset of the layers
(``SensitivityContext.only``) gives bit for bit the scores of a run over all.
"""

from __future__ import annotations

import hashlib

import torch

from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, loss_name, reference_logp, table, weights_of
from bitplan.core.sensitivity.hvp import HessianOracle
from bitplan.methods import HessianEigenParams
from bitplan.schemas import SensitivityTable


def layer_seed(seed: int, index: int) -> int:
    """A generator seed per (run seed, layer index), so no layer's start depends on the layers drawn before it."""
    digest = hashlib.sha256(f"hessian_eigen:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def start_vector(like: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(layer_seed(seed, index))  # drawn on the CPU: the same start on any device
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    return v / v.norm()


def hessian_eigen(ctx: SensitivityContext, params: HessianEigenParams) -> SensitivityTable:
    clock = Clock()
    weights = weights_of(ctx)  # every layer's: the loss graph is the same whichever layers are scored
    batches = calibration_batches(ctx, params.batch_size, params.max_samples, use_kl=params.loss == "kl")
    refs = reference_logp(ctx, batches)
    vectors = {g.weight_key: start_vector(weights[g.weight_key], ctx.seed, i)
               for i, g in enumerate(ctx.model.layers) if ctx.only is None or g.name in ctx.only}
    eigen = {k: 0.0 for k in vectors}
    iterations = {k: 0 for k in vectors}
    done = {k: False for k in vectors}  # converged, or a zero product: stopped before max_iter
    active = list(vectors)
    with HessianOracle(ctx, batches, refs, weights, params.hvp) as oracle:
        if ctx.only is not None:
            # a run over every layer settles exact vs. fallback products on all of them; so must a shard
            oracle.settle([g.weight_key for g in ctx.model.layers])
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
                else:
                    done[k] = True
            active = still
            ctx.progress("sensitivity", (it + 1) / params.max_iter, f"iteration {it + 1}, {len(active)} layers left")
            if not active:
                break
        notes = oracle.notes
    notes.append(f"power iteration on the Hessian of {loss_name(batches)}, {sum(b.size for b in batches)} samples, "
                 f"tol {params.tol}, at most {params.max_iter} iterations; detail.converged = 0 marks a layer "
                 "stopped at max_iter")
    stats, omega, detail = {}, {}, {}
    for g in ctx.scored_layers():
        lam = eigen[g.weight_key]
        stats[g.name] = lam
        omega[g.name] = {b: max(lam, 0.0) * ctx.bank.error_sq(g.weight_key, b) for b in ctx.choices}
        detail[g.name] = {"iterations": iterations[g.weight_key], "converged": float(done[g.weight_key])}
    return table("hessian_eigen", params, ctx, clock, stats, omega, notes, detail)
