"""``bitplan profile``: each layer's time at each weight width (and number format), measured on the machine it runs
on, written as the latency table that ``latency_ms`` budgets read (``{"layer": {"4": ms, "8": ms, "16": ms,
"fp8_e4m3": ms}}``, bitplan.costs).

Each quantizable layer is rebuilt as a real module (``nn.Linear`` / ``nn.Conv*``, with the layer's own weight, bias,
stride, padding and groups) and run on the input the layer sees on the calibration data (one micro-batch of
``batch`` samples, captured from a forward pass). 16 bits is the float module; a lower width is the module after
torchao's ``quantize_`` with ``IntxWeightOnlyConfig(int{b}, PerAxis(0))``, the kernels the torchao export deploys;
fp8_e4m3 uses ``Float8WeightOnlyConfig`` (what that export writes for it). The other formats (fp8_e5m2, MX, NVFP4,
NF4) have no stable torchao config, so the export leaves them float and they are timed in float here; so are conv
layers (torchao has no integer convolution). The notes say which. A layer
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
from bitplan.formats import WeightChoice, choice_label

#: the formats torchao's stable configs run (the torchao export's mapping), and the torch dtype of their weights
TORCHAO_FORMATS = {"fp8_e4m3": "float8_e4m3fn"}

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


def _quantized(module: nn.Module, choice: WeightChoice) -> nn.Module:
    from torchao.quantization import Float8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, quantize_

    out = copy.deepcopy(module)
    if isinstance(choice, str):
        config = Float8WeightOnlyConfig(weight_dtype=getattr(torch, TORCHAO_FORMATS[choice]))
    else:
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{choice}"), granularity=PerAxis(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(out, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return out


def _timed_quantized(module: nn.Module, choice: WeightChoice) -> bool:
    """Whether ``choice`` on ``module`` runs a torchao kernel (else the float module is timed)."""
    if not isinstance(module, nn.Linear) or choice == FULL_PRECISION:
        return False
    return not isinstance(choice, str) or choice in TORCHAO_FORMATS


def profile_layers(prep: Prepared, w_bits: list[WeightChoice], batch: int = 1, runs: int = 20,
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[dict[str, dict[WeightChoice, float]], list[str]]:
    """({layer: {choice: ms}}, notes) for every quantizable layer of ``prep.model`` at each of ``w_bits`` (INT widths
    and format names) and 16."""
    model = prep.model
    if any(b in TORCHAO_FORMATS if isinstance(b, str) else b < FULL_PRECISION for b in w_bits):
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
    ints = sorted({b for b in w_bits if not isinstance(b, str)} | {FULL_PRECISION})
    widths: list[WeightChoice] = [*ints, *dict.fromkeys(b for b in w_bits if isinstance(b, str))]
    cuda = model.device.type == "cuda"
    table: dict[str, dict[WeightChoice, float]] = {}
    convs = []
    for i, layer in enumerate(model.layers):
        row = dict.fromkeys(widths, 0.0)
        for op, args, kwargs in calls[layer.name]:
            x, weight, rest = args[0], args[1], args[2:]
            module = module_for(op, weight, rest, kwargs).to(weight.device).eval()
            for bits in widths:
                run = _quantized(module, bits) if _timed_quantized(module, bits) else module
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
    floats = [choice_label(b) for b in widths if isinstance(b, str) and b not in TORCHAO_FORMATS]
    if floats:
        notes.append(f"{', '.join(floats)} timed in float: torchao has no stable config for them (the torchao export "
                     "leaves such layers float too)")
    return table, notes
