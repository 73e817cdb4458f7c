"""Predicted against measured latency: each catalog model profiled on this machine (``bitplan profile``), planned
under three ``latency_ms`` budgets with that table, then each plan applied to the model with torchao's ``quantize_``
(the torchao export) and the whole forward pass timed.

The table covers the quantizable layers only, so the comparison is of differences from full precision: the plan's
predicted change (its latency_ms minus the table's all-16-bit sum) against the measured change (the quantized
model's forward minus the float model's). Widths 4 and 8 (on a CPU where torchao's integer path is slower than float,
a choice that includes 16 bits is all-16 at any latency budget); budgets at 25 %, 50 % and 90 % of the way from
the fastest to the slowest 4/8-bit assignment in the table; fisher scores (the bench is about time, not accuracy).

Columns: model, budget ms, the plan's widths (layers x bits), predicted change ms, measured change ms, float
forward ms, quantized forward ms (median of --runs calls, batch 1).

    python bench/latency_check.py [--models digits_cnn,digits_vit,tiny_gpt] [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections import Counter

import torch

from bitplan.catalog import get_entry
from bitplan.core.pipeline import make_plan, prepare
from bitplan.core.profile import profile_layers
from bitplan.errors import ExportError
from bitplan.exports import export_plan
from bitplan.schemas import Budget, PlanRequest


def forward_ms(model: torch.nn.Module, batch, runs: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            start = time.perf_counter()
            model(*batch.args, **batch.kwargs)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits_cnn,digits_vit,tiny_gpt")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | budget ms | widths | predicted change ms | measured change ms | float ms | quantized ms |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        entry = get_entry(name)
        prep = prepare(f"catalog:{name}", None)
        table, _ = profile_layers(prep, [4, 8], runs=args.runs)
        fast = sum(min(row[4], row[8]) for row in table.values())
        slow = sum(max(row[4], row[8]) for row in table.values())
        base = sum(row[16] for row in table.values())
        batch = entry.dataset("calib").slice(0, 1)
        float_ms = forward_ms(entry.build().eval(), batch, args.runs)
        for frac in (0.25, 0.5, 0.9):
            budget = fast + frac * (slow - fast)
            request = PlanRequest(model=f"catalog:{name}", budget=Budget(latency_ms=budget), w_bits=(4, 8),
                                  latency_table=table, sensitivity="fisher", sensitivity_params={"max_samples": 32},
                                  validate_plan=False)
            plan = make_plan(request)
            model = entry.build().eval()
            try:
                config = config_from_dict(json.loads(export_plan(plan, "torchao").text))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_(model, config, filter_fn=None)
            except ExportError:  # nothing torchao quantizes: the float model
                pass
            quant_ms = forward_ms(model, batch, args.runs)
            widths = ", ".join(f"{n}x{b}" for b, n in sorted(Counter(la.w_bits for la in plan.layers).items()))
            print(f"| {name} | {budget:.4f} | {widths} | {plan.cost.latency_ms - base:+.4f} | "
                  f"{quant_ms - float_ms:+.4f} | {float_ms:.4f} | {quant_ms:.4f} |")


if __name__ == "__main__":
    main()
