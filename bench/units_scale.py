"""Group-wise bits at LLM scale: the Lagrangian solver on 10^4 - 10^6 units, against the ILP where it finishes.

A unit is a group of 128 input columns of one output row block (SliM-LLM / MixLLM granularity): w_bits in
{2, 3, 4, 8}, objective salience x 4^-w (log-normal salience, as activation x weight salience spreads), and
size_bytes = 128 w / 8 + 2 (the packed weights and one fp16 scale per group). Budgets: avg_weight_bits <= 3.3
("one budget"), and that plus size_bytes <= 52 bytes per unit on average, which binds instead ("two budgets");
"opposed": size_bytes <= 95 % and latency <= 80 % of the all-3-bit plan's, where low bits decode slower (2, 1.8,
1, 0.8 x a per-unit factor at 2/3/4/8 bits), so both bind and the plan must trade units between them.

Columns: the array path (``solver.units.UnitProblem``, solved by ``solve_units``): build s (making the arrays),
solve s and its certified gap (plan minus the Lagrangian bound, relative; an upper bound on the true gap) and
status; the Problem path (the same numbers as ``Layer``/``Option`` objects, solved by the registered "lagrange"
solver): build s and solve s, up to --problem-max units; ilp s (HiGHS, --ilp-limit s at most, up to --ilp-max
units, --ilp-opposed-max for the opposed rows: on 10^5 opposed units HiGHS 1.16 stayed in its root-node
rounding for over 15 minutes, past its time limit), its status, and the array plan's true gap to the ILP's
optimum where the ILP proved one.

    python bench/units_scale.py [--sizes 10000,100000,1000000] [--ilp-max 100000] [--ilp-opposed-max 10000]
                                [--ilp-limit 300] [--problem-max N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from solver import get_solver
from solver.ilp import silence_banner
from solver.lagrange import solve_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.problems: the generator the tests use too
from tests.problems import group_units_arrays, group_units_opposed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--ilp-max", type=int, default=100_000, help="largest size the ILP is run on")
    ap.add_argument("--ilp-opposed-max", type=int, default=10_000, help="largest size the ILP is run on, opposed rows")
    ap.add_argument("--ilp-limit", type=float, default=300.0)
    ap.add_argument("--problem-max", type=int, default=1_000_000, help="largest size the Problem path is run on")
    args = ap.parse_args()
    silence_banner()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| units | budgets | arrays build s | arrays solve s | certified gap | status | Problem build s | "
          "Problem solve s | ilp s | ilp status | true gap |")
    print("| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for n in (int(s) for s in args.sizes.split(",")):
        for label, make in (("one", lambda n: group_units_arrays(n, {"avg_weight_bits": 3.3})),
                            ("two", lambda n: group_units_arrays(n, {"avg_weight_bits": 3.3, "size_bytes": 52.0 * n})),
                            ("opposed", group_units_opposed)):
            start = time.perf_counter()
            units = make(n)
            build = time.perf_counter() - start
            start = time.perf_counter()
            fast = solve_units(units)
            took = time.perf_counter() - start
            assert units.feasible(fast.choice)
            problem = None
            problem_build, problem_took = "-", "-"
            if n <= max(args.problem_max, args.ilp_max):
                start = time.perf_counter()
                problem = units.to_problem([f"g{i}" for i in range(n)])
                problem_build = f"{time.perf_counter() - start:.1f}"
            if problem is not None and n <= args.problem_max:
                start = time.perf_counter()
                slow = get_solver("lagrange")(problem)
                problem_took = f"{time.perf_counter() - start:.2f}"
                if abs(slow.objective - fast.objective) > 1e-9 * abs(fast.objective):
                    print(f"# {n} {label}: the Problem path's plan {slow.objective} differs from the arrays' "
                          f"{fast.objective}", file=sys.stderr)
            ilp_s, ilp_status, true_gap = "-", "-", "-"
            if problem is not None and n <= (args.ilp_opposed_max if label == "opposed" else args.ilp_max):
                start = time.perf_counter()
                exact = get_solver("ilp")(problem, backend="highs", time_limit=args.ilp_limit)
                ilp_s, ilp_status = f"{time.perf_counter() - start:.1f}", exact.status
                if exact.status == "optimal":
                    gap = (fast.objective - exact.objective) / exact.objective
                    true_gap = "0" if abs(gap) < 1e-12 else f"{gap:.1e}"  # below that: rounding in the sums
            print(f"| {n:,} | {label} | {build:.2f} | {took:.2f} | {fast.gap:.1e} | {fast.status} | {problem_build} | "
                  f"{problem_took} | {ilp_s} | {ilp_status} | {true_gap} |", flush=True)
            del problem


if __name__ == "__main__":
    main()
