"""``hessian_trace``: HAWQ-V2's Hutchinson estimate of each layer's Hessian
trace, turned into HAWQ-V3's score Omega(l, b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2.

One Rademacher probe v over all quantizable weights gives, for every layer l,
v_l . (Hv)_l, an unbiased estimate of Tr(H_ll) (cross-layer terms vanish in
expectation). Hv is accumulated over micro-batches, so memory is bounded by one
batch's double-backward graph, and several probes share that graph. Probing
stops once every layer's standard error is within ``tol`` of its mean.

Probe i is drawn from its own generator, seeded from (seed, i), so the probes can
be split over workers (``hessian_trace_shard``: whole passes of ``probes_per_pass``,
one row per probe) and merged into exactly this table: the merge adds the rows up
in probe order and applies the same stopping rule at the same pass boundaries, so
it keeps the same probes (``bitplan/hutchinson.py`` says why passes, not single
probes, are the unit). A sharded run computes all ``max_probes`` probes and
discards those after the point where one worker would have stopped; with
``activations=true`` it cannot be sharded at all.

With ``activations=true`` the same estimator runs on each layer's input
activation (HAWQ-V2's extension): Omega_act(l, a) = Tr(H_x)/n_x * E||Q_a(x) - x||^2
per sample, so a plan can choose activation bits too.
"""

from __future__ import annotations

import contextlib

import torch

from bitplan.core.device import float32_compute
from bitplan.core.evaluate import calibrate_activations
from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa
from bitplan.core.quant import fake_quant_activation
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, loss_name, loss_of, reference_logp, table, weights_of
from bitplan.core.sensitivity.hvp import (
    HessianOracle,
    NoDoubleBackward,
    float32_redo,
    has_sdpa,
    is_missing_derivative,
)
from bitplan.errors import BitplanError
from bitplan.hutchinson import ProbeShard, probe_seed, stops, summarise
from bitplan.methods import HessianTraceParams
from bitplan.schemas import ACT_BITS, SensitivityTable


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """±1 shaped like ``like``, on its device, drawn on the CPU from ``gen``: a GPU run probes with the same signs."""
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(device=like.device, dtype=like.dtype)


def hessian_trace(ctx: SensitivityContext, params: HessianTraceParams) -> SensitivityTable:
    clock = Clock()
    rows, batches, refs = probe_rows(ctx, params, 0, params.max_probes, stop=True)
    stats, omega, detail, notes = summarise(rows, len(rows.estimates))
    omega_act = None
    if params.activations:  # its own generator: the weight probes drawn before it do not move its draws
        gen = torch.Generator().manual_seed(probe_seed(ctx.seed, "activations"))
        omega_act = activation_omega(ctx, params, batches, refs, gen, detail, notes)
    return table("hessian_trace", params, ctx, clock, stats, omega, notes, detail, omega_act)


def hessian_trace_shard(ctx: SensitivityContext, params: HessianTraceParams, start: int, end: int) -> ProbeShard:
    """Probes ``[start, end)`` of the run (whole passes), one row each and no stopping rule: the merge
    (``bitplan.methods.merge_probe_shards``) applies the rule to the rows of all shards in probe order."""
    if params.activations:
        raise BitplanError("hessian_trace with activations=true cannot be split into probe shards: the activation "
                           "traces are one more pass over the data, after the weight probes",
                           "use shards=1, or activations=false", field="shards", code="invalid_request")
    if ctx.only is not None:
        raise BitplanError("a hessian_trace probe shard scores every layer", "give no layer subset")
    ppp = params.probes_per_pass
    if not (0 <= start < end <= params.max_probes) or start % ppp or (end % ppp and end != params.max_probes):
        raise BitplanError(f"probes [{start}, {end}) are not whole passes of {ppp} within max_probes={params.max_probes}",
                           "split the probes with bitplan.hutchinson.split_probes")
    return probe_rows(ctx, params, start, end, stop=False)[0]


def probe_rows(ctx: SensitivityContext, params: HessianTraceParams, start: int, end: int,
               stop: bool) -> tuple[ProbeShard, list, list]:
    """One row per probe of ``[start, end)``, a pass at a time; with ``stop`` (a whole run from probe 0), only until
    the stopping rule fires at a pass boundary. Also the calibration batches and references, for the activations."""
    clock = Clock()
    layers = ctx.model.layers
    weights = weights_of(ctx)
    keys = list(weights)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples, use_kl=params.loss == "kl")
    refs = reference_logp(ctx, batches)
    estimates: list[list[float]] = []  # one row per probe, one column per layer
    bits = ctx.choices
    diagonal = params.omega == "diagonal"
    # diagonal weighting: per probe, sum_i v_i (Hv)_i (Q_b(W) - W)_i^2 for every layer and bit width b
    err2 = {key: {b: (ctx.bank.get(key, b) - weights[key]).double().pow(2) for b in bits} for key in keys} \
        if diagonal else {}
    weighted: list[list[list[float]]] = []
    at = start
    with HessianOracle(ctx, batches, refs, weights, params.hvp) as oracle:
        while at < end:
            k = min(params.probes_per_pass, end - at)  # a pass: the same probes whichever worker computes it
            probes = []
            for i in range(at, at + k):
                gen = torch.Generator().manual_seed(probe_seed(ctx.seed, i))
                probes.append({key: rademacher(weights[key], gen) for key in keys})
            for v, hv in zip(probes, oracle.joint(probes)):
                diag = {key: (v[key] * hv[key]) for key in keys}
                estimates.append([float(diag[g.weight_key].sum()) for g in layers])
                if diagonal:
                    weighted.append([[float((diag[g.weight_key].double() * err2[g.weight_key][b]).sum()) for b in bits]
                                     for g in layers])
            at += k
            if stop:
                done, worst = stops(estimates, params.min_probes, params.tol)
                ctx.progress("sensitivity", len(estimates) / params.max_probes,
                             f"{len(estimates)} random probes; the noisiest layer is known to ±{100 * min(worst, 9.99):.0f}% "
                             f"(stops at ±{100 * params.tol:.0f}%)")
                if done:
                    break
            else:
                ctx.progress("sensitivity", (at - start) / (end - start),
                             f"probes {start + 1}-{at} of this shard's {start + 1}-{end} (of {params.max_probes})")
        notes = oracle.notes
    rows = ProbeShard(
        params=params.model_dump() | {"seed": ctx.seed}, start=start, end=at, layers=[g.name for g in layers],
        numel=[weights[g.weight_key].numel() for g in layers], w_bits=bits,
        error_sq=[] if diagonal else [[ctx.bank.error_sq(g.weight_key, b) for b in bits] for g in layers],
        estimates=estimates, weighted=weighted, notes=notes, loss=loss_name(batches),
        samples=sum(b.size for b in batches), batch_sizes=[b.size for b in batches], seconds=clock.seconds())
    return rows, batches, refs


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
    in_float32 = False  # the compute dtype's double backward failed (hvp.float32_redo): autocast off
    try:
        for bi, (batch, ref) in enumerate(zip(batches, refs)):
            while True:
                for p in probes:
                    p.inputs = []
                try:
                    with float32_compute(model) if in_float32 else contextlib.nullcontext():
                        xs, hvs_per_probe = _activation_hvps(ctx, batch, ref, probes, n_probes, gen)
                    break
                except NoDoubleBackward as exc:
                    if swapped or not has_sdpa(model.gm):
                        notes.append(f"activation sensitivity needs a second derivative: {exc}")
                        raise
                    swapped = replace_sdpa_with_math(model.gm)
                except RuntimeError as exc:
                    reason = None if in_float32 else float32_redo(model, exc)
                    if reason is None:
                        raise
                    in_float32 = True
                    notes.append(f"activation traces: {reason}; computed in float32 (autocast off)")
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
