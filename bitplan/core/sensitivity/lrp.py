"""``lrp``: layer-wise relevance propagation as in LRP-QViT, with AttnLRP's rules for transformers.

Relevance starts at the output (the logit of the true class, or of the predicted class without
targets, scaled to 1 per sample) and flows back to every quantizable layer. A layer's contribution
score is the share of the total absolute relevance that enters it; Omega(l, b) multiplies that share
by the layer's relative quantization error ||Q_b(W) - W||^2 / ||W||^2.

Two rule sets:

* ``attnlrp`` (default). The rules are written into the gradients, so that input x gradient at any
  tensor is that tensor's relevance (the way AttnLRP computes LRP in one backward pass): linear and
  conv layers use the epsilon rule; GELU, tanh, SiLU and similar use the identity rule (relevance
  passes unchanged); LayerNorm/RMSNorm hold their standard deviation constant (identity rule on the
  normalisation), and so does any division by an activation (e.g. L2 normalisation); softmax is
  propagated by its gradient, which is AttnLRP's softmax rule; products of two activations (q.k^T,
  attention.v, gates) give each side half (AttnLRP's uniform rule); attention is computed in that form.
  Linear ops (residual additions, pooling, reshapes, BatchNorm in inference) need no rule: input x
  gradient conserves relevance through them. The rules live in this module (they act on the aten ops
  of the exported graph, which zennit's and lxt's module hooks do not see).
* ``zennit``: zennit's composites (``composite``: epsilon rule for linear layers, z+ for convolutions,
  ...) attached to every quantizable op run as a real nn.Linear / nn.Conv module; every other op passes
  relevance as a plain gradient, which is wrong for attention, LayerNorm and residual additions.
"""

from __future__ import annotations

import math
import sys
import types
from collections import Counter

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


aten = torch.ops.aten


def _active(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class _Epsilon(torch.autograd.Function):
    """Identity forward; backward scales by z / (z + eps*sign(z)): the epsilon rule's stabiliser."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * z / (z + ctx.eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)), None


def _uniform(fn):
    """A product of two activations: each side gets half the relevance (AttnLRP's uniform rule)."""

    def rule(a, b, *args, **kwargs):
        if _active(a) and _active(b):
            return 0.5 * fn(a, b.detach(), *args, **kwargs) + 0.5 * fn(a.detach(), b, *args, **kwargs)
        return fn(a, b, *args, **kwargs)

    return rule


def _identity(fn):
    """An elementwise nonlinearity with f(0) = 0: relevance passes through unchanged."""

    def rule(x, *args, **kwargs):
        y = fn(x, *args, **kwargs)
        if not _active(x):
            return y
        xd = x.detach()
        ratio = torch.where(xd.abs() > 1e-12, y.detach() / torch.where(xd.abs() > 1e-12, xd, 1.0), 0.0)
        return x * ratio

    return rule


def _constant(fn):
    """A statistic (norm, variance, 1/sqrt): held constant, so no relevance flows into it."""

    def rule(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(o.detach() for o in out) if isinstance(out, (tuple, list)) else out.detach()

    return rule


def _normalise(x, dims, eps, weight, bias, centre=True):
    xd = x.detach()
    if centre:
        x = x - x.mean(dims, keepdim=True)
        scale = torch.rsqrt(xd.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        scale = torch.rsqrt(xd.pow(2).mean(dims, keepdim=True) + eps)
    y = x * scale
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, scale


def _layer_norm(x, shape, weight=None, bias=None, eps=1e-5, *_args, **_kwargs):
    dims = tuple(range(-len(shape), 0))
    return _normalise(x, dims, eps, weight, bias)[0]


def _native_layer_norm(x, shape, weight, bias, eps):
    dims = tuple(range(-len(shape), 0))
    y, scale = _normalise(x, dims, eps, weight, bias)
    return y, x.detach().mean(dims, keepdim=True), scale


def _rms_norm(x, shape, weight=None, eps=None):
    dims = tuple(range(-len(shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _normalise(x, dims, eps, weight, None, centre=False)[0]


def _divide(a, b, *args, **kwargs):
    return aten.div.Tensor(a, b.detach() if _active(b) else b, *args, **kwargs)


_matmul = _uniform(torch.matmul)


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention in AttnLRP form: uniform rule on both products, softmax by its gradient."""
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = _matmul(q, k.transpose(-2, -1)) * scale
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask
    return _matmul(torch.softmax(scores, -1), v)


def _attention_math(*args, **kwargs):
    return (_attention(*args[:5], **{k: v for k, v in kwargs.items() if k != "dropout_mask"}), None)


#: aten op -> (what the note calls it, the function computing it with its relevance rule)
RULES = {
    aten.scaled_dot_product_attention.default: ("attention", _attention),
    aten._scaled_dot_product_attention_math.default: ("attention", _attention_math),
    aten.layer_norm.default: ("LayerNorm", _layer_norm),
    aten.native_layer_norm.default: ("LayerNorm", _native_layer_norm),
    aten.gelu.default: ("identity", _identity(aten.gelu.default)),
    aten.tanh.default: ("identity", _identity(aten.tanh.default)),
    aten.silu.default: ("identity", _identity(aten.silu.default)),
    aten.elu.default: ("identity", _identity(aten.elu.default)),
    aten.hardswish.default: ("identity", _identity(aten.hardswish.default)),
    aten.mish.default: ("identity", _identity(aten.mish.default)),
    aten.mul.Tensor: ("product", _uniform(aten.mul.Tensor)),
    aten.matmul.default: ("product", _uniform(aten.matmul.default)),
    aten.bmm.default: ("product", _uniform(aten.bmm.default)),
    aten.mm.default: ("product", _uniform(aten.mm.default)),
    aten.div.Tensor: ("division", _divide),
    aten.linalg_vector_norm.default: ("statistic", _constant(aten.linalg_vector_norm.default)),
    aten.rsqrt.default: ("statistic", _constant(aten.rsqrt.default)),
    aten.var.correction: ("statistic", _constant(aten.var.correction)),
    aten.std.correction: ("statistic", _constant(aten.std.correction)),
}
_DECISIVE = {"attention", "LayerNorm", "RMSNorm", "identity"}
if hasattr(aten, "rms_norm"):
    RULES[aten.rms_norm.default] = ("RMSNorm", _rms_norm)


def _with_rules(gm: torch.fx.GraphModule) -> tuple[dict, Counter]:
    """Point the graph's nonlinear ops at their rule functions; returns what to undo and a count per rule."""
    swapped, counts = {}, Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in RULES:
            label, rule = RULES[node.target]
            swapped[node] = node.target
            node.target = rule
            counts[label] += 1
    if swapped:
        gm.recompile()
    return swapped, counts


def _undo(gm: torch.fx.GraphModule, swapped: dict) -> None:
    for node, target in swapped.items():
        node.target = target
    if swapped:
        gm.recompile()


def _rule_note(counts: Counter) -> str:
    parts = {
        "attention": "attention (softmax by its gradient, q.k and attention.v split evenly)",
        "LayerNorm": "LayerNorm (standard deviation held constant)",
        "RMSNorm": "RMSNorm (RMS held constant)",
        "identity": "elementwise nonlinearities (identity rule)",
        "product": "products of two activations (split evenly)",
        "division": "divisions (denominator held constant)",
        "statistic": "norms/variances (held constant)",
    }
    ruled = [f"{counts[k]} {text}" for k, text in parts.items() if counts.get(k)]
    return "AttnLRP rules: epsilon rule on every quantizable layer" + (f"; {', '.join(ruled)}" if ruled else "")


def _selector(logits: torch.Tensor, batch, eps: float) -> torch.Tensor:
    """One-hot at the target (or predicted) class, divided by that logit: relevance 1 per sample."""
    target = batch.targets.reshape(-1) if batch.targets is not None else logits.argmax(-1)
    z = logits.detach().gather(1, target[:, None])
    scale = 1.0 / (z + eps * torch.where(z >= 0, 1.0, -1.0))
    return torch.zeros_like(logits).scatter_(1, target[:, None], scale)


def _relevance_attnlrp(ctx: SensitivityContext, params: LRPParams, batches, probes, owner, relevance) -> str:
    gm = ctx.model.gm
    swapped, counts = _with_rules(gm)
    try:
        for p in probes:
            p.wrap_output = lambda z: _Epsilon.apply(z, params.epsilon)
        for i, batch in enumerate(batches):
            for p in probes:
                p.inputs = []
            with torch.enable_grad():
                logits = flat(logits_of(ctx.model.call(batch)))
                xs = [(p, x) for p in probes for x in (p.inputs or []) if x.requires_grad]
                grads = torch.autograd.grad(logits, [x for _, x in xs],
                                            grad_outputs=_selector(logits, batch, params.epsilon), allow_unused=True)
            for (p, x), g in zip(xs, grads):
                if g is not None:
                    relevance[owner[id(p)]] += float((x.detach() * g).abs().sum())
            ctx.progress("sensitivity", (i + 1) / len(batches), "relevance")
    finally:
        for p in probes:
            p.inputs, p.wrap_output = None, None
        _undo(gm, swapped)
    return _rule_note(counts)


def _relevance_zennit(ctx: SensitivityContext, params: LRPParams, batches, probes, owner, relevance) -> str:
    _modules_as_real(ctx, batches[0])
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
                # zennit's hooks hand back relevance itself as the gradient
                for (p, _), g in zip(xs, grads):
                    if g is not None:
                        relevance[owner[id(p)]] += float(g.abs().sum())
                ctx.progress("sensitivity", (i + 1) / len(batches), "relevance")
    finally:
        for p in probes:
            p.inputs, p.as_module = None, None
    return f"zennit composite {params.composite} (other ops pass relevance as plain gradients)"


def lrp(ctx: SensitivityContext, params: LRPParams) -> SensitivityTable:
    clock = Clock()
    weights = weights_of(ctx)
    batches = calibration_batches(ctx, params.batch_size, params.max_samples)
    probes = [p for g in ctx.model.layers for p in g.probes]
    owner = {id(p): g.name for g in ctx.model.layers for p in g.probes}
    relevance = {g.name: 0.0 for g in ctx.model.layers}
    rules = params.rules
    why = ""
    if rules == "auto":
        # products, divisions and statistics may act on constants only, so they do not decide
        needing = sorted({RULES[n.target][0] for n in ctx.model.gm.graph.nodes if n.op == "call_function"
                          and n.target in RULES and RULES[n.target][0] in _DECISIVE})
        rules = "attnlrp" if needing else "zennit"
        why = (f" (rules=auto, as the graph has {', '.join(needing)} ops)" if needing else
               " (rules=auto, as no op between layers needs AttnLRP's rules)")
    run = _relevance_attnlrp if rules == "attnlrp" else _relevance_zennit
    how = run(ctx, params, batches, probes, owner, relevance) + why
    total = sum(relevance.values()) or 1.0
    stats, omega = {}, {}
    for g in ctx.model.layers:
        share = relevance[g.name] / total
        w = weights[g.weight_key]
        energy = float(w.double().pow(2).sum()) or 1.0
        stats[g.name] = share
        omega[g.name] = {b: share * ctx.bank.error_sq(g.weight_key, b) / energy for b in ctx.choices}
    n = sum(b.size for b in batches)
    notes = [f"{how}; relevance from the {'target' if ctx.data.targets is not None else 'predicted'} class "
             f"logit on {n} samples; stat = the layer's share of input relevance (LRP-QViT contribution score)"]
    return table("lrp", params, ctx, clock, stats, omega, notes)
