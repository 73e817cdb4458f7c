"""Every model, whatever its file format, becomes one ``torch.fx.GraphModule``
(the module form of a ``torch.export`` program). Each quantizable op in it
(aten linear / conv1d / conv2d whose weight is a stored tensor) is routed
through a :class:`LayerProbe`, which can fake-quantize the op's input
activation, observe its range and count MACs. Weights are quantized by
substituting tensors with ``torch.func.functional_call``, so the same graph
serves full precision, any plan, and Hessian-vector products.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from bitplan.core.quant import fake_quant_activation

aten = torch.ops.aten

_LAYER_OPS = {
    aten.linear.default: "linear",
    aten.conv1d.default: "conv1d",
    aten.conv2d.default: "conv2d",
    aten.conv1d.padding: "conv1d",
    aten.conv2d.padding: "conv2d",
    aten.convolution.default: None,  # kind from the weight's rank; transposed convs are skipped
}


class LayerProbe(nn.Module):
    """Stands in for one quantizable op call inside the graph."""

    def __init__(self, op, layer: str) -> None:
        super().__init__()
        self.op = op
        self.layer = layer
        self.a_bits = 16
        self.act_range: tuple[float, float] | None = None
        self.observe = False
        self.count_macs = False
        self.macs_total = 0
        self.inputs: list[torch.Tensor] | None = None  # when a list: every call's input is kept
        self.as_module: nn.Module | None = None  # when set: run this real nn.Linear/Conv instead (for LRP rules)
        self.wrap_output = None  # when set: applied to the op's output (LRP's epsilon rule)

    def forward(self, x, weight, *args, **kwargs):
        if self.inputs is not None and x.is_floating_point() and torch.is_grad_enabled():
            # A tensor of this op's own, so that gradients w.r.t. it count only what flows through this
            # op: q, k and v projections (or a residual branch) often read the same activation.
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            self.inputs.append(x)
        if self.observe:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.act_range = (lo, hi) if self.act_range is None else (min(lo, self.act_range[0]), max(hi, self.act_range[1]))
        if self.a_bits < 16 and self.act_range is not None:
            x = fake_quant_activation(x, *self.act_range, self.a_bits)
        if self.as_module is not None:
            y = self.as_module(x)
        else:
            y = self.op(x, weight, *args, **kwargs)
        if self.wrap_output is not None:
            y = self.wrap_output(y)
        if self.count_macs:
            # per call: one MAC per output element per weight element feeding it
            self.macs_total += y.numel() * weight[0].numel()
        return y


def module_for(op, weight: torch.Tensor, args: tuple, kwargs: dict) -> nn.Module:
    """A real nn.Linear / nn.Conv1d / nn.Conv2d computing ``op(x, weight, *args)``, with copies of its tensors."""
    bias = args[0] if args else kwargs.get("bias")
    if op is aten.linear.default:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        names = ["stride", "padding", "dilation", "groups"]
        if op is aten.convolution.default:  # (bias, stride, padding, dilation, transposed, output_padding, groups)
            values = dict(zip(names[:3], args[1:4])) | {"groups": args[6] if len(args) > 6 else 1}
        else:
            values = dict(zip(names, args[1:])) | {k: v for k, v in kwargs.items() if k in names}
        conv = nn.Conv1d if weight.dim() == 3 else nn.Conv2d
        module = conv(weight.shape[1] * int(values.get("groups", 1)), weight.shape[0], tuple(weight.shape[2:]),
                      bias=bias is not None, **{k: v for k, v in values.items() if k != "groups"},
                      groups=int(values.get("groups", 1)))
    with torch.no_grad():
        module.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone())
    return module


@dataclass
class GraphLayer:
    """A quantizable layer: its weight tensor's name in the graph and the probes that use it."""

    name: str
    kind: str
    weight_key: str
    probes: list[LayerProbe] = field(default_factory=list)
    #: the graph value its (first) use reads; layers that read the same one can be fused by a runtime
    reads: str = ""


def get_tensor(module: nn.Module, key: str) -> torch.Tensor:
    return operator.attrgetter(key)(module)


def instrument(gm: torch.fx.GraphModule) -> list[GraphLayer]:
    """Route every quantizable op through a LayerProbe; return the layers in graph order."""
    layers: dict[str, GraphLayer] = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LAYER_OPS or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        tensor = get_tensor(gm, weight.target)
        if not tensor.is_floating_point():
            continue
        kind = _LAYER_OPS[node.target]
        if kind is None:
            transposed = len(node.args) > 6 and bool(node.args[6])
            if transposed or tensor.dim() not in (3, 4):
                continue
            kind = "conv1d" if tensor.dim() == 3 else "conv2d"
        name = weight.target[: -len(".weight")] if weight.target.endswith(".weight") else weight.target
        source = node.args[0]
        probe = LayerProbe(node.target, name)
        probe_name = f"bitplan_probe_{count}"
        count += 1
        gm.add_submodule(probe_name, probe)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(probe_name, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        layer = layers.setdefault(name, GraphLayer(name, kind, weight.target,
                                                   reads=source.name if isinstance(source, torch.fx.Node) else ""))
        layer.probes.append(probe)
    gm.recompile()
    return list(layers.values())


def move_graph(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Move ``gm`` to ``device``: its parameters and buffers, the tensor constants it holds as plain attributes
    (an unlifted export program keeps them so; ``Module.to`` does not see them), and the devices written into
    its nodes (``arange(..., device=cpu)`` and ``to(..., device=cpu)`` in a causal mask, traced on the CPU).
    Trace-time metadata assertions (``_assert_tensor_metadata``) are dropped: they check the device and dtype
    the graph was traced with, which a moved graph, or one run under autocast, no longer has. Nested graphs (the
    bodies of higher-order ops such as ``wrap_with_set_grad_enabled``, which a rotary embedding's ``no_grad``
    becomes) are moved the same way."""
    gm.to(device)
    registered = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    for sub in [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]:
        for node in list(sub.graph.nodes):
            if node.op == "get_attr":
                owner, _, name = node.target.rpartition(".")
                module = sub.get_submodule(owner) if owner else sub
                value = getattr(module, name, None)
                if isinstance(value, torch.Tensor) and id(value) not in registered and value.device != device:
                    setattr(module, name, value.to(device))
            elif node.op == "call_function":
                if node.target is aten._assert_tensor_metadata.default and not node.users:
                    sub.graph.erase_node(node)
                    continue
                node.args = torch.fx.node.map_aggregate(node.args, lambda a: _on(a, device))
                node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: _on(a, device))
        sub.recompile()


def _on(value, device: torch.device):
    return device if isinstance(value, torch.device) else value


def replace_sdpa_with_math(gm: torch.fx.GraphModule) -> int:
    """Swap fused scaled-dot-product attention for its composite math form.

    The fused CPU/GPU kernels have no double backward, so exact Hessian-vector
    products fail on them; the math form is differentiable twice. Returns how
    many nodes changed.
    """
    return _retarget(gm, aten.scaled_dot_product_attention.default, _sdpa_math)


def restore_sdpa(gm: torch.fx.GraphModule) -> int:
    """Undo :func:`replace_sdpa_with_math`."""
    return _retarget(gm, _sdpa_math, aten.scaled_dot_product_attention.default)


def _retarget(gm: torch.fx.GraphModule, old, new) -> int:
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is old:
            node.target = new
            changed += 1
    if changed:
        gm.recompile()
    return changed


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]
