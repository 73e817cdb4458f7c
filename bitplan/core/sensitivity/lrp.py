"""``lrp``: layer-wise relevance propagation as in LRP-QViT.

Relevance starts at the output (the logit of the true class, or of the predicted
class without targets) and is propagated back with zennit's standard rules
(epsilon for linear layers, z+ for convolutions, by default). For the duration,
every quantizable op in the graph runs as a real nn.Linear / nn.Conv module so
that zennit can attach its rules. A layer's contribution score is the share of
total absolute relevance that flows through its input; Omega(l, b) multiplies it
by the layer's relative quantization error ||Q_b(W) - W||^2 / ||W||^2.
"""

from __future__ import annotations

import sys
import types

import torch

from bitplan.core.evaluate import flat, logits_of
from bitplan.core.graph import module_for
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import Clock, calibration_batches, table, weights_of
from bitplan.errors import BitplanError
from bitplan.methods import LRPParams
from bitplan.schemas import SensitivityTable


def _zennit_composites():
    """Import zennit's composites.

    zennit's package ``__init__`` imports torchvision's ResNet blocks for an optional
    canonizer that bitplan never uses, and torchvision from PyPI cannot be installed beside
    every torch build (it drags in its own torch). Where it is missing or broken, a
    placeholder module stands in for the duration of the import only.
    """
    if "zennit.composites" in sys.modules:
        return sys.modules["zennit.composites"]
    try:
        import torchvision.models.resnet  # noqa: F401
        stubs = {}
    except Exception:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
        resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        package = types.ModuleType("torchvision")
        package.models = models
        stubs = {"torchvision": package, "torchvision.models": models, "torchvision.models.resnet": resnet}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from zennit import composites
    except ImportError as exc:
        raise BitplanError(f"the lrp method needs the package zennit ({exc})",
                           "install it with: pip install --no-deps zennit==0.5.1 pillow") from None
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return composites


def _composite(name: str):
    composites = _zennit_composites()
    return {"epsilon_plus": composites.EpsilonPlus, "epsilon_plus_flat": composites.EpsilonPlusFlat,
            "epsilon_alpha2_beta1": composites.EpsilonAlpha2Beta1}[name]()


def _modules_as_real(ctx: SensitivityContext, batch) -> list:
    """Record each op's arguments once, then attach a real module computing the same op."""
    probes = [p for g in ctx.model.layers for p in g.probes]
    recorded = {}
    originals = {}
    for p in probes:
        originals[p] = p.op

        def recorder(x, weight, *args, _p=p, **kwargs):
            recorded.setdefault(_p, (weight, args, kwargs))
            return originals[_p](x, weight, *args, **kwargs)

        p.op = recorder
    try:
        with torch.no_grad():
            ctx.model.call(batch)
    finally:
        for p in probes:
            p.op = originals[p]
    for p in probes:
        if p in recorded:
            weight, args, kwargs = recorded[p]
            p.as_module = module_for(p.op, weight, args, kwargs)
    return probes


def lrp(ctx: SensitivityContext, params: LRPParams) -> SensitivityTable:
    clock = Clock()
    weights = weights_of(ctx)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples)
    probes = _modules_as_real(ctx, batches[0])
    owner = {id(p): g.name for g in ctx.model.layers for p in g.probes}
    relevance = {g.name: 0.0 for g in ctx.model.layers}
    composite = _composite(params.composite)
    try:
        with composite.context(ctx.model.gm):
            for i, batch in enumerate(batches):
                for p in probes:
                    p.inputs = []
                with torch.enable_grad():
                    logits = flat(logits_of(ctx.model.call(batch)))
                    target = batch.targets.reshape(-1) if batch.targets is not None else logits.argmax(-1)
                    selector = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
                    xs = [(p, x) for p in probes for x in (p.inputs or []) if x.requires_grad]
                    grads = torch.autograd.grad(logits, [x for _, x in xs], grad_outputs=selector, allow_unused=True)
                for (p, _), g in zip(xs, grads):
                    if g is not None:
                        relevance[owner[id(p)]] += float(g.abs().sum())
                ctx.progress("sensitivity", (i + 1) / len(batches), "relevance")
    finally:
        for p in probes:
            p.inputs, p.as_module = None, None
    total = sum(relevance.values()) or 1.0
    stats, omega = {}, {}
    for g in ctx.model.layers:
        share = relevance[g.name] / total
        w = weights[g.weight_key]
        energy = float(w.double().pow(2).sum()) or 1.0
        stats[g.name] = share
        omega[g.name] = {b: share * ctx.bank.error_sq(g.weight_key, b) / energy for b in ctx.w_bits}
    n = sum(b.size for b in batches)
    notes = [f"zennit composite {params.composite}; relevance from the "
             f"{'target' if ctx.data.targets is not None else 'predicted'} class logit on {n} samples; "
             "stat = the layer's share of input relevance (LRP-QViT contribution score)"]
    return table("lrp", params, ctx, clock, stats, omega, notes)
