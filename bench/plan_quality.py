"""Measured quality of the plans each solver makes from the same hessian_trace table.

For budgets of 3, 4, 5 and 6 average weight bits on the reference models: the
held-out loss, KL to full precision and accuracy of the uniform, greedy, ilp,
pareto-chosen and evolutionary plans (evolutionary scores its candidates by the
measured calibration loss of the quantized model, EMQ/APQ style).

    python bench/plan_quality.py [--models digits_cnn,digits_resnet,minilm] [--budgets 3,4,5,6] [--trials 60]
"""

from __future__ import annotations

import argparse
import time

from bitplan.core.evaluate import Reference, measure
from bitplan.core.pipeline import build_problem, measured_evaluator, overrides_for, prepare
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.errors import BitplanError
from bitplan.schemas import Budget, PlanRequest
from solver import get_solver

SOLVERS = ["uniform", "greedy", "ilp", "pareto", "evolutionary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_cnn,digits_resnet,minilm")
    parser.add_argument("--budgets", default="3,4,5,6")
    parser.add_argument("--wbits", default="2,3,4,5,6,8")
    parser.add_argument("--trials", type=int, default=60, help="evolutionary trials per budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    w_bits = tuple(int(b) for b in args.wbits.split(","))
    print("| model | avg bits | solver | held-out loss | KL | accuracy | avg bits used | solve s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        prep = prepare(f"catalog:{name}", None)
        ctx = SensitivityContext(prep.model, prep.data, list(w_bits), prep.bank, args.seed)
        table = run_sensitivity("hessian_trace", {}, ctx)
        ref = Reference.compute(prep.model, prep.eval_data, 64)
        fp = measure(prep.model, ref)
        print(f"| {name} | – | full precision | {fp.loss:.5f} | 0 | {fp.accuracy:.4f} | 32 | – |", flush=True)
        for bits in (float(b) for b in args.budgets.split(",")):
            request = PlanRequest(model=f"catalog:{name}", budget=Budget(avg_weight_bits=bits), w_bits=w_bits)
            problem = build_problem(prep, table, request)
            for solver in SOLVERS:
                params = {"seed": args.seed, "trials": args.trials, "evaluate": measured_evaluator(prep, request)} \
                    if solver == "evolutionary" else {}
                start = time.perf_counter()
                try:
                    solution = get_solver(solver)(problem, **params)
                except BitplanError as exc:
                    print(f"| {name} | {bits:g} | {solver} | {exc.message} | | | | |", flush=True)
                    continue
                seconds = time.perf_counter() - start
                assignment = {n: (o.w_bits, o.a_bits) for n, o in solution.choices.items()}
                m = measure(prep.model, ref, overrides_for(prep, assignment))
                used = prep.costs.plan_cost(assignment).avg_weight_bits
                print(f"| {name} | {bits:g} | {solver} | {m.loss:.5f} | {m.kl:.5f} | {m.accuracy:.4f} | {used:.3f} | "
                      f"{seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
