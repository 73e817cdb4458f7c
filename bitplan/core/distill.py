"""ZeroQ's distilled data: calibration inputs made from the model itself.

When a job has no calibration data, random inputs are a poor stand-in: their activations look nothing
like real ones. A model with BatchNorm stores what real activations look like (each BN layer's
running mean and variance per channel), so, as ZeroQ does, the float inputs are optimised until every
BatchNorm layer sees batch statistics that match its running statistics:

    min_x  sum_BN  ||mu_BN(x) - running_mean||^2 + ||sigma_BN(x) - sqrt(running_var + eps)||^2

Integer inputs (token ids) are left as they are, and a model without BatchNorm keeps its random inputs
(the note says so).
"""

from __future__ import annotations

import torch

from bitplan.core.data import POSITIONAL, Dataset
from bitplan.core.loading import LoadedModel

aten = torch.ops.aten
#: BatchNorm in inference graphs: op -> (index of running_mean, index of running_var, index of eps)
_BN_OPS = {
    aten.batch_norm.default: (3, 4, 7),
    aten._native_batch_norm_legit_no_training.default: (3, 4, 6),
}


def batchnorm_count(model: LoadedModel) -> int:
    return sum(1 for n in model.gm.graph.nodes if n.op == "call_function" and n.target in _BN_OPS)


class _Statistics(torch.fx.Interpreter):
    """Runs the graph and adds up how far each BatchNorm's batch statistics are from its running ones."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.loss: torch.Tensor | float = 0.0

    def call_function(self, target, args, kwargs):
        if target in _BN_OPS and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            i_mean, i_var, i_eps = _BN_OPS[target]
            x, mean, var = args[0], args[i_mean], args[i_var]
            eps = float(args[i_eps]) if len(args) > i_eps else 1e-5
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                dims = [d for d in range(x.dim()) if d != 1]
                mu = x.mean(dims)
                sigma = (x.var(dims, unbiased=False) + eps).sqrt()
                self.loss = self.loss + (mu - mean).pow(2).sum() + (sigma - (var + eps).sqrt()).pow(2).sum()
        return super().call_function(target, args, kwargs)


def distil(model: LoadedModel, data: Dataset, steps: int = 200, lr: float = 0.1,
           batch_size: int = 64) -> tuple[Dataset, str]:
    """``data``'s float inputs optimised to match the model's BatchNorm statistics; the note says what was done."""
    count = batchnorm_count(model)
    floats = [k for k, v in data.inputs.items() if v.is_floating_point()]
    if count == 0 or not floats:
        why = "the model has no BatchNorm layer" if count == 0 else "the model has no float input"
        return data, f"calibration data: random inputs, not distilled ({why})"
    out = {k: v.clone() for k, v in data.inputs.items()}
    first = last = 0.0
    for start in range(0, len(data), batch_size):
        end = min(start + batch_size, len(data))
        params = {k: out[k][start:end].clone().requires_grad_(True) for k in floats}
        opt = torch.optim.Adam(params.values(), lr=lr)
        for step in range(steps):
            opt.zero_grad()
            inputs = {k: params[k] if k in params else out[k][start:end] for k in out}
            # the graph's placeholders, in order: the one positional input, or the named inputs
            flat = [inputs[POSITIONAL]] if POSITIONAL in inputs else [inputs[spec.name] for spec in model.inputs]
            interp = _Statistics(model.gm)
            interp.run(*flat)
            loss = interp.loss
            if step == 0:
                first += float(loss.detach()) * (end - start)
            loss.backward()
            opt.step()
        last += float(loss.detach()) * (end - start)
        for k in floats:
            out[k][start:end] = params[k].detach()
    n = len(data)
    note = (f"calibration data: {n} random inputs distilled to the model's BatchNorm statistics (ZeroQ; {count} "
            f"BatchNorm layers, {steps} Adam steps): statistics mismatch {first / n:.4g} -> {last / n:.4g}")
    return Dataset(out, data.targets, f"{data.source} [distilled]", data.sha256 + ":distilled"), note

