"""Plan quality with number formats as options (FLIQS) against INT only, at the same size budget.

For each catalog model and size budget, one sensitivity table is computed with every format scored (the INT scores
in it are the ones an INT-only run computes), then two plans are made from it: INT widths only (2,3,4,5,6,8), and
the same widths plus every format (fp8_e4m3, fp8_e5m2, mxfp8, mxfp4, nvfp4, nf4). Both go through the whole
pipeline (solver, the measured check against every uniform plan that fits, held-out validation). Budgets: the size
of uniform INT3, of uniform INT4, and of uniform INT4 plus 10 % (room for the block formats' scales).

Columns: model, budget (kB), held-out KL to full precision of the INT-only plan and of the plan with formats
(lower is better), their ratio, the held-out task loss of both (cross-entropy on the targets), the formats the plan
chose (layers per format), the guarantee's outcome for the plan with formats (uniform_returned: a uniform plan,
possibly in a format, measured better), the best uniform plan that fits with its KL, and seconds for both plans.

    python bench/formats_quality.py [--models digits_cnn,digits_resnet,digits_mobilenet,digits_vit,tiny_gpt,minilm]
                                    [--sensitivity auto]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from bitplan.core.pipeline import make_plan, prepare
from bitplan.core.sensitivity import run_sensitivity
from bitplan.formats import FORMATS, size_bytes
from bitplan.schemas import Budget, PlanRequest

W_BITS = (2, 3, 4, 5, 6, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits_cnn,digits_resnet,digits_mobilenet,digits_vit,tiny_gpt,minilm")
    ap.add_argument("--sensitivity", default="auto")
    args = ap.parse_args()
    formats = tuple(FORMATS)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}; sensitivity "
          f"{args.sensitivity}; formats {', '.join(formats)}")
    print("| model | budget kB | KL INT only | KL with formats | ratio | loss INT only | loss with formats | "
          "formats chosen | outcome | best uniform (KL) | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |")
    for name in args.models.split(","):
        run_model(name, args.sensitivity, formats)


def run_model(name: str, sensitivity: str, formats: tuple[str, ...]) -> None:
    model = f"catalog:{name}"
    try:
        prep = prepare(model, None)
    except Exception as exc:  # minilm needs its optional package
        print(f"| {name} | - | - | - | - | not run: {exc} | - | - |")
        return

    def uniform_size(choice: int | str) -> float:
        return prep.costs.fixed_bytes + sum(size_bytes(choice, la.params, la.out_channels) for la in prep.layers)

    tables: dict[str, Any] = {}

    def scored(p: Any, ctx: Any) -> Any:  # one table for both runs: every format scored once
        if "t" not in tables:
            tables["t"] = run_sensitivity(sensitivity, {}, replace(ctx, formats=formats))
        return tables["t"]

    for budget in (uniform_size(3), uniform_size(4), uniform_size(4) * 1.1):
        start = time.perf_counter()
        plans = {}
        for label, fmts in (("int", ()), ("formats", formats)):
            request = PlanRequest(model=model, budget=Budget(size_bytes=budget), w_bits=W_BITS, formats=fmts,
                                  sensitivity=sensitivity)
            plans[label] = make_plan(request, sensitivity=scored)
        took = time.perf_counter() - start
        a, b = plans["int"].measured, plans["formats"].measured
        chosen = Counter(la.w_format for la in plans["formats"].layers if la.w_format != "int")
        check = plans["formats"].uniform_check
        uni = check.uniform if check else "-"
        print(f"| {name} | {budget / 1e3:.1f} | {a.plan.kl:.4g} | {b.plan.kl:.4g} | "
              f"{b.plan.kl / max(a.plan.kl, 1e-30):.3f} | {a.plan.loss:.4g} | {b.plan.loss:.4g} | "
              f"{', '.join(f'{f} x{n}' for f, n in chosen.items()) or 'none'} | {check.outcome if check else '-'} | "
              f"{uni} ({b.uniform.kl:.4g}) | {took:.1f} |", flush=True)

if __name__ == "__main__":
    main()
