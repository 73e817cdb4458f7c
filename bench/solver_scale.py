"""How the solver family scales: random problems of 100, 1,000 and 10,000 layers x 7 widths.

Each problem: w_bits 2..8 per layer, objective sensitivity x params x 4^-w (per-layer log-normal
sensitivity, small noise), costs size_bytes (packed weights + one fp32 scale per output channel)
and bops (MACs x w x 8), budgets avg_weight_bits <= 4.5 and size_bytes <= 35% of the way from the
all-2-bit to the all-8-bit size. Columns:

  ilp cbc / ilp highs  our ILP (dominance + reduced-cost fixing, then the backend) to proven optimality
  hawq-v3 cbc          the plain one-hot model HAWQ-V3 published (a binary per option, sum == 1,
                       the budgets) handed to PuLP's CBC with its defaults; x = its time / ilp cbc
  pareto               objective vs size_bytes alone (size budget only), method auto: past ~30 layers
                       that is the convex-hull frontier plus the ILP's plan at the budget, so its
                       time is mostly that ILP's, shown as "ilp 1-budget s" (CBC)
  greedy / evo         their objective's relative gap to the optimum; evo is NSGA-II with --trials
                       trials started from the uniform plans only (with seed_plans it starts at the
                       ILP optimum, so its gap would be 0 by construction)

Every solve has --time-limit seconds (status "time_limit" marks one that ran out).

    python bench/solver_scale.py [--sizes 100,1000,10000] [--seed 0] [--time-limit 120] [--trials 200]
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time
import warnings

import pulp

from solver import Layer, Option, Problem, get_solver
from solver.problem import AVG_BITS

WIDTHS = range(2, 9)


def random_problem(n: int, seed: int, budgets=(AVG_BITS, "size_bytes")) -> Problem:
    rnd = random.Random(seed)
    layers = []
    for i in range(n):
        params = int(math.exp(rnd.uniform(math.log(1e3), math.log(5e6))))
        out_channels = max(8, int(math.sqrt(params)))
        macs = params * rnd.choice((1, 4, 16, 64, 196))
        sensitivity = math.exp(rnd.gauss(0, 2))
        options = tuple(
            Option(w_bits=w, a_bits=8, objective=sensitivity * params * 4.0 ** -w * math.exp(rnd.gauss(0, 0.1)),
                   cost={"size_bytes": params * w / 8 + out_channels * 4, "bops": float(macs * w * 8)})
            for w in WIDTHS)
        layers.append(Layer(f"layer{i}", params, options))
    free = Problem(tuple(layers), {})
    low = free.minimum("size_bytes")
    high = sum(max(o.cost["size_bytes"] for o in lay.options) for lay in layers)
    limits = {AVG_BITS: 4.5, "size_bytes": low + 0.35 * (high - low)}
    return Problem(tuple(layers), {k: limits[k] for k in budgets})


def hawq_v3_cbc(problem: Problem, time_limit: float) -> tuple[float, str, float]:
    """The published one-hot formulation, CBC defaults: (seconds, status, objective)."""
    start = time.perf_counter()
    prob = pulp.LpProblem("hawq_v3", pulp.LpMinimize)
    x = [[prob.add_variable(f"x_{li}_{oi}", cat=pulp.LpBinary) for oi in range(len(lay.options))]
         for li, lay in enumerate(problem.layers)]
    for li, xs in enumerate(x):
        prob += pulp.lpSum(xs) == 1, f"one_{li}"
    prob += pulp.lpSum(o.objective * v for lay, xs in zip(problem.layers, x) for o, v in zip(lay.options, xs))
    for key in problem.budgets:
        prob += pulp.lpSum(problem.contribution(key, lay, o) * v for lay, xs in zip(problem.layers, x)
                           for o, v in zip(lay.options, xs)) <= problem.limit(key), f"budget_{key}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    seconds = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return seconds, "no plan", math.nan
    objective = sum(o.objective for lay, xs in zip(problem.layers, x) for o, v in zip(lay.options, xs)
                    if (v.value() or 0) > 0.5)
    return seconds, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit", objective


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def gap(value: float, best: float) -> str:
    return f"{(value - best) / abs(best):.2e}" if best else f"{value - best:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--evo-max-layers", type=int, default=1000,
                    help="skip evolutionary above this many layers (Optuna takes ~65 ms a trial at 1,000 layers)")
    args = ap.parse_args()
    limit = args.time_limit
    print(f"# python bench/solver_scale.py --sizes {args.sizes} --seed {args.seed} --time-limit {limit:g} "
          f"--trials {args.trials}   ({platform.processor() or platform.machine()}, PuLP {pulp.__version__})")
    head = ("layers", "ilp cbc s", "ilp highs s", "hawq-v3 cbc s", "x", "pareto s", "ilp 1-budget s", "greedy s",
            "greedy gap",
            "evo s", "evo gap", "optimum")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        problem = random_problem(n, args.seed)
        t_cbc, cbc = timed(get_solver("ilp"), problem, backend="cbc", time_limit=limit)
        t_highs, highs = timed(get_solver("ilp"), problem, backend="highs", time_limit=limit)
        t_hawq, hawq_status, hawq_obj = hawq_v3_cbc(problem, limit)
        one = random_problem(n, args.seed, budgets=("size_bytes",))
        t_pareto, pareto = timed(get_solver("pareto"), one, time_limit=limit)
        t_one, at_budget = timed(get_solver("ilp"), one, time_limit=limit)
        pareto_ok = abs(pareto.objective - at_budget.objective) <= 1e-9 * pareto.objective
        t_greedy, greedy = timed(get_solver("greedy"), problem)
        best = min(cbc.objective, highs.objective)
        if n <= args.evo_max_layers:
            t_evo, evo = timed(get_solver("evolutionary"), problem, trials=args.trials, seed=args.seed, seed_plans=False)
            evo_cells = (f"{t_evo:.2f}", gap(evo.objective, best))
        else:
            evo_cells = ("-", "-")
        mark = lambda s: "" if s.status == "optimal" else f" ({s.status}, gap {s.gap:.1e})"  # noqa: E731
        hawq_note = "" if hawq_status == "optimal" else f" ({hawq_status})"
        if hawq_status != "no plan" and abs(hawq_obj - best) > 1e-6 * best:
            hawq_note += f" obj {gap(hawq_obj, best)} off"
        rows.append((
            f"{n:,}", f"{t_cbc:.2f}{mark(cbc)}", f"{t_highs:.2f}{mark(highs)}", f"{t_hawq:.2f}{hawq_note}",
            f"{t_hawq / t_cbc:.1f}", f"{t_pareto:.2f}{'' if pareto_ok else ' (MISMATCH)'}", f"{t_one:.2f}{mark(at_budget)}",
            f"{t_greedy:.2f}", gap(greedy.objective, best), *evo_cells,
            f"{best:.6g}" + ("" if abs(cbc.objective - highs.objective) <= 1e-9 * best else " (backends differ)"),
        ))
        print("  done", n, "layers", flush=True)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
