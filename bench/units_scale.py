"""Group-wise bits at LLM scale: the Lagrangian solver on 10^4 - 10^6 units, against the ILP where it finishes.

A unit is a group of 128 input columns of one output row block (SliM-LLM / MixLLM granularity): w_bits in
{2, 3, 4, 8}, objective salience x 4^-w (log-normal salience, as activation x weight salience spreads), and
size_bytes = 128 w / 8 + 2 (the packed weights and one fp16 scale per group). Budgets: avg_weight_bits <= 3.3
("one budget"), and that plus size_bytes <= 52 bytes per unit on average, which binds instead ("two budgets").

Columns: build s (making the Problem: Python objects, not the solver), lagrange s and its certified gap
(plan minus the Lagrangian bound, relative; an upper bound on the true gap), ilp s (HiGHS, --ilp-limit s
at most) and the Lagrangian plan's true gap to the ILP's optimum where the ILP proved one.

    python bench/units_scale.py [--sizes 10000,100000,1000000] [--ilp-max 100000] [--ilp-limit 300]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from solver import get_solver
from solver.ilp import silence_banner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.problems: the generator the tests use too
from tests.problems import group_units_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--ilp-max", type=int, default=100_000, help="largest size the ILP is run on")
    ap.add_argument("--ilp-limit", type=float, default=300.0)
    args = ap.parse_args()
    silence_banner()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| units | budgets | build s | lagrange s | certified gap | status | ilp s | ilp status | true gap |")
    print("| ---: | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |")
    for n in (int(s) for s in args.sizes.split(",")):
        for label, budgets in (("one", {"avg_weight_bits": 3.3}),
                               ("two", {"avg_weight_bits": 3.3, "size_bytes": 52.0 * n})):
            start = time.perf_counter()
            problem = group_units_problem(n, budgets)
            build = time.perf_counter() - start
            start = time.perf_counter()
            fast = get_solver("lagrange")(problem)
            took = time.perf_counter() - start
            ilp_s, ilp_status, true_gap = "-", "-", "-"
            if n <= args.ilp_max:
                start = time.perf_counter()
                exact = get_solver("ilp")(problem, backend="highs", time_limit=args.ilp_limit)
                ilp_s, ilp_status = f"{time.perf_counter() - start:.1f}", exact.status
                if exact.status == "optimal":
                    true_gap = f"{(fast.objective - exact.objective) / exact.objective:.2e}"
            print(f"| {n:,} | {label} | {build:.1f} | {took:.2f} | {fast.gap:.2e} | {fast.status} | {ilp_s} | "
                  f"{ilp_status} | {true_gap} |", flush=True)


if __name__ == "__main__":
    main()
