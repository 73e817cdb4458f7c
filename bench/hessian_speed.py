"""Our per-layer ``hessian_trace`` against PyHessian's whole-model trace.

Same process, same model, same data, same parameters (the quantizable layers'
weights), same number of Rademacher probes, no early stopping on either side.
PyHessian returns one trace for all of them; ours returns one per layer, whose
sum estimates the same number.

    python bench/hessian_speed.py [--probes 64] [--models digits_cnn,digits_resnet,minilm]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from pyhessian import hessian as PyHessian

from bitplan.catalog import get_entry
from bitplan.core.data import POSITIONAL
from bitplan.core.pipeline import prepare
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity


class Stacked(torch.nn.Module):
    """PyHessian feeds one tensor; keyword-input models get theirs stacked along dim 0."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x):
        return self.model(**{n: x[i] for i, n in enumerate(self.names)})


def pyhessian_trace(name, prep, batch_size, probes):
    module = get_entry(name).build().eval()
    keys = {g.weight_key for g in prep.model.layers}
    for key, p in module.named_parameters():
        p.requires_grad_(key in keys)
    data = prep.data
    names = [k for k in data.inputs if k != POSITIONAL]
    if names:
        module = Stacked(module, names)
        inputs = torch.stack([data.inputs[n] for n in names])
        batches = [(inputs[:, i:i + batch_size], data.targets[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    else:
        x = data.inputs[POSITIONAL]
        batches = [(x[i:i + batch_size], data.targets[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    # PyHessian cannot take parameters the loss does not reach (MiniLM's pooler): leave those out
    module.zero_grad()
    F.cross_entropy(module(batches[0][0]), batches[0][1]).backward()
    for p in module.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    torch.manual_seed(0)
    start = time.perf_counter()
    if len(batches) == 1:
        comp = PyHessian(module, F.cross_entropy, data=batches[0], cuda=False)
    else:
        comp = PyHessian(module, F.cross_entropy, dataloader=batches, cuda=False)
    samples = comp.trace(maxIter=probes, tol=-1.0)  # a negative tolerance never stops early
    return time.perf_counter() - start, float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def ours(prep, batch_size, probes):
    ctx = SensitivityContext(prep.model, prep.data, [4], prep.bank, 0)
    params = {"max_probes": probes, "min_probes": probes, "probes_per_pass": min(16, probes), "tol": 1e-9,
              "batch_size": batch_size, "max_samples": len(prep.data)}
    start = time.perf_counter()
    table = run_sensitivity("hessian_trace", params, ctx)
    return time.perf_counter() - start, sum(layer.stat for layer in table.layers), table.notes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_cnn,digits_resnet,minilm")
    parser.add_argument("--probes", type=int, default=64)
    args = parser.parse_args()
    print("| model | data | probes | PyHessian s | ours s | ratio ours/PyHessian | PyHessian trace (± SE) "
          "| ours (sum of layers) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        prep = prepare(f"catalog:{name}", None)
        n = len(prep.data)
        probes = args.probes if name != "minilm" else min(args.probes, 16)
        for batch_size in (n, max(n // 8, 1)):
            label = f"{n} samples, " + ("one batch" if batch_size == n else f"batches of {batch_size}")
            t_ours, tr_ours, _ = ours(prep, batch_size, probes)
            try:
                t_py, tr_py, se_py = pyhessian_trace(name, prep, batch_size, probes)
                row = f"{t_py:.2f} | {t_ours:.2f} | {t_ours / t_py:.2f} | {tr_py:.4g} ± {se_py:.2g}"
            except (RuntimeError, AssertionError) as exc:
                row = f"fails: {str(exc).splitlines()[0][:90]} | {t_ours:.2f} | – | –"
            print(f"| {name} | {label} | {probes} | {row} | {tr_ours:.4g} |", flush=True)


if __name__ == "__main__":
    main()
