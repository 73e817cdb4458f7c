"""Planning without calibration data: real data vs random inputs vs ZeroQ-distilled inputs.

For each CNN of the catalog and each budget, the whole default pipeline (auto sensitivity, ILP, the
uniform check with its measured local search) runs on one of three calibration sets, and the returned
plan is measured on the model's real held-out split:

* real: the catalog's 256 calibration images (with targets dropped, so every stage uses KL);
* random: 128 standard-normal inputs (what the service used before distillation);
* distilled: the same random inputs optimised to the model's BatchNorm statistics (ZeroQ).

    python bench/data_free.py [--models digits_cnn,digits_resnet,digits_mobilenet] [--budgets 3,4]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from bitplan.core.distill import distil
from bitplan.core.pipeline import build_problem, check_against_uniform, prepare, random_inputs, validate
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.schemas import Budget, PlanRequest
from solver import get_solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_cnn,digits_resnet,digits_mobilenet")
    parser.add_argument("--budgets", default="3,4")
    parser.add_argument("--refine-seconds", type=float, default=30.0)
    args = parser.parse_args()
    print("| model | avg bits | calibration data | held-out KL | held-out accuracy | uniform KL | vs uniform | outcome | "
          "seconds |")
    print("|" + " --- |" * 9)
    for name in args.models.split(","):
        base = prepare(f"catalog:{name}", None)
        random = random_inputs(base.model, 128, 0)
        start = time.perf_counter()
        distilled, _ = distil(base.model, random)
        distill_s = time.perf_counter() - start
        sets = {"real": replace(base.data, targets=None), "random": random,
                f"distilled ({distill_s:.0f} s)": distilled}
        for label, data in sets.items():
            prep = replace(base, data=data)
            ctx = SensitivityContext(prep.model, prep.data, [2, 3, 4, 5, 6, 8], prep.bank, 0)
            table = run_sensitivity("auto", {}, ctx)
            for bits in (float(b) for b in args.budgets.split(",")):
                start = time.perf_counter()
                request = PlanRequest(model=f"catalog:{name}", budget=Budget(avg_weight_bits=bits))
                solution = get_solver("ilp")(build_problem(prep, table, request))
                first = {n: (o.w_bits, o.a_bits) for n, o in solution.choices.items()}
                plan, check = check_against_uniform(prep, request, first, args.refine_seconds)
                m = validate(prep, request, plan)
                print(f"| {name} | {bits:g} | {label} | {m.plan.kl:.5f} | {m.plan.accuracy:.4f} | {m.uniform.kl:.5f} | "
                      f"{m.plan.kl / m.uniform.kl:.3f} | {check.outcome} | {table.seconds + time.perf_counter() - start:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
