"""``hessian_trace``: HAWQ-V2's Hutchinson estimate of each layer's Hessian
trace, turned into HAWQ-V3's score Omega(l, b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2.

One Rademacher probe v over all quantizable weights gives, for every layer l,
v_l . (Hv)_l, an unbiased estimate of Tr(H_ll) (cross-layer terms vanish in
expectation). Hv is accumulated over micro-batches, so memory is bounded by one
batch's double-backward graph, and several probes share that graph. Probing
stops once every layer's standard error is within ``tol`` of its mean.

Hessian-vector products are exact (double backward) when the model allows it.
Fused scaled-dot-product attention has no double backward; it is swapped for
its math form (the same function) while the trace is computed. Any other op
without a second derivative falls back to central finite differences of
gradients, and the table's notes say so.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bitplan.core.evaluate import batch_loss, flat, logits_of
from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa
from bitplan.core.sensitivity import SensitivityContext
from bitplan.errors import BitplanError
from bitplan.methods import HessianTraceParams
from bitplan.schemas import SensitivityLayer, SensitivityTable

_FD_REL_STEP = 1e-3


class _NoDoubleBackward(Exception):
    pass


def _is_missing_derivative(exc: RuntimeError) -> bool:
    text = str(exc)
    return "derivative for" in text and "not implemented" in text or "double backward" in text.lower()


def hessian_trace(ctx: SensitivityContext, params: HessianTraceParams) -> SensitivityTable:
    start = time.perf_counter()
    model, layers = ctx.model, ctx.model.layers
    keys = [layer.weight_key for layer in layers]
    weights = {k: ctx.bank.weights[k].detach() for k in keys}
    batches = list(ctx.data.batches(params.batch_size, params.max_samples))
    n_samples = sum(b.size for b in batches)
    use_kl = params.loss == "kl" or ctx.data.targets is None
    if use_kl:
        batches = [replace(b, targets=None) for b in batches]
    refs = _reference_logp(ctx, batches)
    gen = torch.Generator().manual_seed(ctx.seed)
    notes: list[str] = []

    mode = "exact" if params.hvp in ("auto", "exact") else "finite_difference"
    estimates: list[list[float]] = []  # one row per probe, one column per layer
    with contextlib.ExitStack() as stack:
        while len(estimates) < params.max_probes:
            k = min(params.probes_per_pass, params.max_probes - len(estimates))
            probes = [{key: _rademacher(weights[key], gen) for key in keys} for _ in range(k)]
            while True:
                try:
                    hvs = _accumulate(ctx, batches, refs, weights, probes, mode, n_samples)
                    break
                except _NoDoubleBackward as exc:
                    mode, note = _fallback(model.gm, stack, mode, str(exc), params.hvp)
                    notes.append(note)
            for v, hv in zip(probes, hvs):
                estimates.append([float((v[key] * hv[key]).sum()) for key in keys])
            worst = _worst_relative_se(estimates)
            ctx.progress("sensitivity", len(estimates) / params.max_probes,
                         f"{len(estimates)} probes, worst rel. SE {worst:.3f}")
            if len(estimates) >= params.min_probes and worst <= params.tol:
                break

    notes.insert(0, {
        "exact": "Hessian-vector products: exact (double backward)",
        "exact_sdpa_math": "Hessian-vector products: exact, with scaled_dot_product_attention in its math form",
        "finite_difference": "Hessian-vector products: central finite differences of gradients",
    }[mode])
    n_probes = len(estimates)
    loss_name = "KL(full precision || model)" if use_kl else "cross-entropy on the targets"
    notes.append(f"Hessian of {loss_name}; {n_probes} probes on {n_samples} samples; stopping rule: rel. SE <= {params.tol}")
    table_layers, clamped = [], []
    for j, layer in enumerate(layers):
        column = [row[j] for row in estimates]
        mean = sum(column) / n_probes
        se = _std(column) / math.sqrt(n_probes)
        if mean < 0:
            clamped.append(layer.name)
        n = weights[layer.weight_key].numel()
        omega = {b: max(mean, 0.0) / n * ctx.bank.error_sq(layer.weight_key, b) for b in ctx.w_bits}
        table_layers.append(SensitivityLayer(name=layer.name, stat=mean, omega=omega,
                                             detail={"trace_se": se, "probes": n_probes, "params": n}))
        ctx.progress("sensitivity", 1.0, f"scoring {layer.name}")
    if clamped:
        notes.append("negative trace estimates (non-convex loss) clamped to 0 for: " + ", ".join(clamped))
    return SensitivityTable(
        method="hessian_trace",
        params=params.model_dump() | {"seed": ctx.seed},
        seconds=time.perf_counter() - start,
        layers=table_layers,
        notes=notes,
    )


def _reference_logp(ctx: SensitivityContext, batches) -> list[torch.Tensor | None]:
    """Full-precision log-probabilities, the KL target when the data has no labels."""
    if batches and batches[0].targets is not None:
        return [None] * len(batches)
    with torch.no_grad():
        return [F.log_softmax(flat(logits_of(ctx.model.call(b))), -1) for b in batches]


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.dtype)


def _accumulate(ctx, batches, refs, weights, probes, mode, n_samples) -> list[dict[str, torch.Tensor]]:
    """H v for each probe, H the Hessian of the mean loss over all batches."""
    total = [{k: torch.zeros_like(w) for k, w in weights.items()} for _ in probes]
    for batch, ref in zip(batches, refs):
        part = _hvp_fd(ctx, batch, ref, weights, probes) if mode == "finite_difference" \
            else _hvp_exact(ctx, batch, ref, weights, probes)
        for acc, hv in zip(total, part):
            for k in acc:
                acc[k] += hv[k] * (batch.size / n_samples)
    return total


def _hvp_exact(ctx, batch, ref, weights, probes):
    params = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    keys = list(params)
    loss = batch_loss(logits_of(ctx.model.call(batch, params)), batch, ref)
    try:
        grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = []
        for v in probes:
            hv = torch.autograd.grad([grads[i] for i in live], [params[keys[i]] for i in live],
                                     grad_outputs=[v[keys[i]] for i in live], retain_graph=True, allow_unused=True)
            row = {k: torch.zeros_like(weights[k]) for k in keys}
            for i, h in zip(live, hv):
                if h is not None:
                    row[keys[i]] = h.detach()
            out.append(row)
        return out
    except RuntimeError as exc:
        if _is_missing_derivative(exc):
            raise _NoDoubleBackward(str(exc).splitlines()[0]) from None
        raise


def _grad(ctx, batch, ref, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    loss = batch_loss(logits_of(ctx.model.call(batch, leaves)), batch, ref)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), grads)}


def _hvp_fd(ctx, batch, ref, weights, probes):
    """(g(w + e.v) - g(w - e.v)) / 2, per-layer steps e_l, divided back per layer."""
    steps = {k: _FD_REL_STEP * float(w.pow(2).mean().sqrt().clamp_min(1e-8)) for k, w in weights.items()}
    out = []
    for v in probes:
        plus = _grad(ctx, batch, ref, {k: w + steps[k] * v[k] for k, w in weights.items()})
        minus = _grad(ctx, batch, ref, {k: w - steps[k] * v[k] for k, w in weights.items()})
        out.append({k: (plus[k] - minus[k]) / (2 * steps[k]) for k in weights})
    return out


def _has_sdpa(gm) -> bool:
    return any(n.op == "call_function" and n.target is torch.ops.aten.scaled_dot_product_attention.default
               for n in gm.graph.nodes)


def _fallback(gm, stack: contextlib.ExitStack, mode: str, reason: str, requested: str) -> tuple[str, str]:
    """The next way to get H v after ``mode`` failed for want of a second derivative."""
    if mode == "exact" and _has_sdpa(gm):
        count = replace_sdpa_with_math(gm)
        stack.callback(restore_sdpa, gm)
        return "exact_sdpa_math", (f"double backward failed ({reason}); {count} scaled_dot_product_attention "
                                   "node(s) computed in their math form while tracing the Hessian")
    if requested == "exact":
        raise BitplanError(f"exact Hessian-vector products are impossible for this model: {reason}",
                           "use hvp=auto or hvp=finite_difference")
    return "finite_difference", f"double backward failed ({reason}); fell back to finite differences"


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _worst_relative_se(estimates: list[list[float]]) -> float:
    n = len(estimates)
    if n < 2:
        return float("inf")
    columns = list(zip(*estimates))
    means = [abs(sum(c) / n) for c in columns]
    floor = 1e-6 * max(means + [1e-30])
    return max(_std(list(c)) / math.sqrt(n) / max(m, floor) for c, m in zip(columns, means))
