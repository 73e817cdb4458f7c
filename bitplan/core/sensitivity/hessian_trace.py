"""``hessian_trace``: HAWQ-V2's Hutchinson estimate of each layer's Hessian
trace, turned into HAWQ-V3's score Omega(l, b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2.

One Rademacher probe v over all quantizable weights gives, for every layer l,
v_l . (Hv)_l, an unbiased estimate of Tr(H_ll) (cross-layer terms vanish in
expectation). Hv is accumulated over micro-batches, so memory is bounded by one
batch's double-backward graph, and several probes share that graph. Probing
stops once every layer's standard error is within ``tol`` of its mean.

With ``activations=true`` the same estimator runs on each layer's input
activation (HAWQ-V2's extension): Omega_act(l, a) = Tr(H_x)/n_x * E||Q_a(x) - x||^2
per sample, so a plan can choose activation bits too.
"""

from __future__ import annotations

import math

import torch

from bitplan.core.evaluate import calibrate_activations
from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa
from bitplan.core.quant import fake_quant_activation
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, loss_name, loss_of, reference_logp, table, weights_of
from bitplan.core.sensitivity.hvp import HessianOracle, NoDoubleBackward, has_sdpa, is_missing_derivative
from bitplan.methods import HessianTraceParams
from bitplan.schemas import ACT_BITS, SensitivityTable


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.dtype)


def hessian_trace(ctx: SensitivityContext, params: HessianTraceParams) -> SensitivityTable:
    clock = Clock()
    layers = ctx.model.layers
    weights = weights_of(ctx)
    keys = list(weights)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples, use_kl=params.loss == "kl")
    refs = reference_logp(ctx, batches)
    gen = torch.Generator().manual_seed(ctx.seed)
    estimates: list[list[float]] = []  # one row per probe, one column per layer
    bits = list(ctx.w_bits)
    # diagonal weighting: per probe, sum_i v_i (Hv)_i (Q_b(W) - W)_i^2 for every bit width b
    err2 = {key: {b: (ctx.bank.get(key, b) - weights[key]).double().pow(2) for b in bits} for key in keys} \
        if params.omega == "diagonal" else {}
    weighted: dict[str, dict[int, float]] = {key: {b: 0.0 for b in bits} for key in keys}
    with HessianOracle(ctx, batches, refs, weights, params.hvp) as oracle:
        while len(estimates) < params.max_probes:
            k = min(params.probes_per_pass, params.max_probes - len(estimates))
            probes = [{key: rademacher(weights[key], gen) for key in keys} for _ in range(k)]
            for v, hv in zip(probes, oracle.joint(probes)):
                estimates.append([float((v[key] * hv[key]).sum()) for key in keys])
                for key in err2:
                    diag = (v[key] * hv[key]).double()
                    for b in bits:
                        weighted[key][b] += float((diag * err2[key][b]).sum())
            worst = worst_relative_se(estimates)
            ctx.progress("sensitivity", len(estimates) / params.max_probes,
                         f"{len(estimates)} random probes; the noisiest layer is known to ±{100 * min(worst, 9.99):.0f}% "
                         f"(stops at ±{100 * params.tol:.0f}%)")
            if len(estimates) >= params.min_probes and worst <= params.tol:
                break
        notes = oracle.notes

    n_probes = len(estimates)
    n_samples = sum(b.size for b in batches)
    notes.append(f"Hessian of {loss_name(batches)}; {n_probes} probes on {n_samples} samples; "
                 f"stopping rule: rel. SE <= {params.tol}")
    stats, omega, detail, clamped = {}, {}, {}, []
    for j, layer in enumerate(layers):
        column = [row[j] for row in estimates]
        mean = sum(column) / n_probes
        if mean < 0:
            clamped.append(layer.name)
        n = weights[layer.weight_key].numel()
        stats[layer.name] = mean
        if params.omega == "diagonal":
            omega[layer.name] = {b: max(weighted[layer.weight_key][b] / n_probes, 0.0) for b in ctx.w_bits}
        else:
            omega[layer.name] = {b: max(mean, 0.0) / n * ctx.bank.error_sq(layer.weight_key, b) for b in ctx.w_bits}
        detail[layer.name] = {"trace_se": std(column) / math.sqrt(n_probes), "probes": n_probes, "params": n}
    if params.omega == "diagonal":
        notes.append("Omega = sum_i diag(H)_i (Q_b(W) - W)_i^2, the Hutchinson diagonal weighted by each weight's own "
                     "error (invariant to per-channel scales such as a BatchNorm folded into the conv)")
    elif clamped:
        notes.append("negative trace estimates (non-convex loss) clamped to 0 for: " + ", ".join(clamped))
    omega_act = None
    if params.activations:
        omega_act = activation_omega(ctx, params, batches, refs, gen, detail, notes)
    return table("hessian_trace", params, ctx, clock, stats, omega, notes, detail, omega_act)


def activation_omega(ctx, params, batches, refs, gen, detail, notes) -> dict[str, dict[int, float]]:
    """Hutchinson trace of the Hessian w.r.t. each layer's input activation, per sample."""
    model = ctx.model
    calibrate_activations(model, ctx.data, params.batch_size, params.max_samples)
    probes = [p for g in model.layers for p in g.probes]
    owner = [g.name for g in model.layers for _ in g.probes]
    sums = {g.name: 0.0 for g in model.layers}
    sq_err = {g.name: {a: 0.0 for a in ACT_BITS} for g in model.layers}
    numel = {g.name: 0 for g in model.layers}
    n_samples = sum(b.size for b in batches)
    n_probes = max(params.min_probes, min(params.max_probes, 16))
    swapped = 0
    try:
        for bi, (batch, ref) in enumerate(zip(batches, refs)):
            while True:
                for p in probes:
                    p.inputs = []
                try:
                    xs, hvs_per_probe = _activation_hvps(ctx, batch, ref, probes, n_probes, gen)
                    break
                except NoDoubleBackward as exc:
                    if swapped or not has_sdpa(model.gm):
                        notes.append(f"activation sensitivity needs a second derivative: {exc}")
                        raise
                    swapped = replace_sdpa_with_math(model.gm)
            for i, (name, x) in enumerate(zip(owner, xs)):
                estimate = sum(float((v[i] * hv[i]).sum()) for v, hv in hvs_per_probe) / n_probes
                sums[name] += estimate * batch.size / n_samples
                numel[name] = x[0].numel()
                lo, hi = probes[i].act_range
                for a in ACT_BITS:
                    if a < 16:
                        err = (fake_quant_activation(x.detach(), lo, hi, a) - x.detach()).pow(2).sum()
                        sq_err[name][a] += float(err) / n_samples
            ctx.progress("sensitivity", (bi + 1) / len(batches), "activation traces")
    finally:
        for p in probes:
            p.inputs = None
        if swapped:
            restore_sdpa(model.gm)
    notes.append(f"activation traces: {n_probes} probes per batch on {n_samples} samples "
                 "(HAWQ-V2's activation extension)")
    out = {}
    for name in sums:
        detail[name]["act_trace"] = sums[name]
        out[name] = {a: max(sums[name], 0.0) / max(numel[name], 1) * sq_err[name][a] for a in ACT_BITS}
    return out


def _activation_hvps(ctx, batch, ref, probes, n_probes, gen):
    loss = loss_of(ctx, batch, ref)
    xs = [p.inputs[0] if p.inputs else None for p in probes]
    live = [i for i, x in enumerate(xs) if x is not None and x.requires_grad]
    try:
        grads = torch.autograd.grad(loss, [xs[i] for i in live], create_graph=True, allow_unused=True)
        out = []
        for _ in range(n_probes):
            v = {i: rademacher(xs[i], gen) for i in live}
            use = [(i, g) for i, g in zip(live, grads) if g is not None and g.requires_grad]
            hv = torch.autograd.grad([g for _, g in use], [xs[i] for i, _ in use], [v[i] for i, _ in use],
                                     retain_graph=True, allow_unused=True)
            full_v = [v.get(i, torch.zeros_like(x)) if x is not None else torch.zeros(1) for i, x in enumerate(xs)]
            full_hv = [torch.zeros_like(t) for t in full_v]
            for (i, _), h in zip(use, hv):
                if h is not None:
                    full_hv[i] = h.detach()
            out.append((full_v, full_hv))
        return [x if x is not None else torch.zeros(1, 1) for x in xs], out
    except RuntimeError as exc:
        if is_missing_derivative(exc):
            raise NoDoubleBackward(str(exc).splitlines()[0]) from None
        raise


def std(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def worst_relative_se(estimates: list[list[float]]) -> float:
    n = len(estimates)
    if n < 2:
        return float("inf")
    columns = list(zip(*estimates))
    means = [abs(sum(c) / n) for c in columns]
    floor = 1e-6 * max(means + [1e-30])
    return max(std(list(c)) / math.sqrt(n) / max(m, floor) for c, m in zip(columns, means))
