"""``bitplan profile``: each layer's time at each weight width, measured on the machine it runs on, written as the
latency table that ``latency_ms`` budgets read (``{"layer": {"4": ms, "8": ms, "16": ms}}``, bitplan.costs).

Each quantizable layer is rebuilt as a real module (``nn.Linear`` / ``nn.Conv*``, with the layer's own weight, bias,
stride, padding and groups) and run on the input the layer sees on the calibration data (one micro-batch of
``batch`` samples, captured from a forward pass). 16 bits is the float module; a lower width is the module after
torchao's ``quantize_`` with ``IntxWeightOnlyConfig(int{b}, PerAxis(0))``, the kernels the torchao export deploys.
torchao has no integer convolution: conv layers are timed in float at every width, and the notes say so. A layer
used by several ops sums them. Times are the median of ``runs`` calls after two warm-up calls, one thread count as
torch has it (``torch.get_num_threads()``); absolute times depend on the machine and its load, which is why the
table is measured where the model will run.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bitplan.core.graph import module_for
from bitplan.core.pipeline import Prepared
from bitplan.errors import BitplanError

FULL_PRECISION = 16
WARMUP = 2
MAX_CALLS = 64


def _median_ms(fn: Callable[[], object], runs: int, cuda: bool) -> float:
    times = []
    for i in range(WARMUP + runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return times[len(times) // 2]


def _quantized(module: nn.Module, bits: int) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    out = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(out, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0)),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return out


def profile_layers(prep: Prepared, w_bits: list[int], batch: int = 1, runs: int = 20,
                   progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, dict[int, float]], list[str]]:
    """({layer: {bits: ms}}, notes) for every quantizable layer of ``prep.model`` at each of ``w_bits`` and 16."""
    model = prep.model
    if any(b < FULL_PRECISION for b in w_bits):
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise BitplanError("timing quantized layers needs torchao, which is not installed",
                               "pip install 'bitplan[deploy]' (torchao), or time full precision only (--wbits 16)") from None
    calls: dict[str, list[tuple[object, tuple, dict]]] = {layer.name: [] for layer in model.layers}
    hooks = []
    for layer in model.layers:
        for probe in layer.probes:
            def keep(module: nn.Module, args: tuple, kwargs: dict, name: str = layer.name) -> None:
                if len(calls[name]) < MAX_CALLS:  # every call of the layer's ops in one forward pass
                    calls[name].append((module.op, tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                         for a in args), dict(kwargs)))
            hooks.append(probe.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.inference_mode():
            model.call(prep.data.slice(0, min(batch, len(prep.data))))
    finally:
        for hook in hooks:
            hook.remove()
    widths = sorted({*w_bits, FULL_PRECISION})
    cuda = model.device.type == "cuda"
    table: dict[str, dict[int, float]] = {}
    convs = []
    for i, layer in enumerate(model.layers):
        row = dict.fromkeys(widths, 0.0)
        for op, args, kwargs in calls[layer.name]:
            x, weight, rest = args[0], args[1], args[2:]
            module = module_for(op, weight, rest, kwargs).to(weight.device).eval()
            for bits in widths:
                quantizable = bits < FULL_PRECISION and isinstance(module, nn.Linear)
                run = _quantized(module, bits) if quantizable else module
                with torch.inference_mode():
                    row[bits] += _median_ms(lambda run=run, x=x: run(x), runs, cuda)
        if layer.kind != "linear":
            convs.append(layer.name)
        table[layer.name] = {b: round(ms, 6) for b, ms in row.items()}
        if progress is not None:
            progress(i + 1, len(model.layers))
    notes = [f"median of {runs} calls per layer and width, batch {batch}, {torch.get_num_threads()} threads, "
             f"on {model.device}"]
    if convs:
        notes.append(f"{len(convs)} conv layer(s) timed in float at every width: torchao has no integer convolution "
                     "kernels")
    return table, notes
