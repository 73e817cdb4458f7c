"""Integer linear program for the plan (HAWQ-V3's formulation), solved with PuLP + CBC.

    minimise   sum_{l,o} Omega[l,o] * x[l,o]
    subject to sum_o x[l,o] = 1                            for every layer l
               fixed_k + sum_{l,o} cost_k[l,o] x[l,o] <= B_k   for every budget k
               x[l,o] = 0                                   for options a pin excludes
               sum_{o: w(o)=w} x[a,o] = sum_{o: w(o)=w} x[b,o]  for tied layers a, b
"""

from __future__ import annotations

import time
import warnings

import pulp

from bitplan.errors import InfeasibleError
from solver.problem import AVG_BITS, Problem, Solution

#: Objective coefficients are rescaled so the largest is this, keeping CBC's tolerances meaningful.
_OBJECTIVE_SCALE = 1e6


def explain_infeasible(problem: Problem) -> InfeasibleError:
    """Say which budget cannot hold and the smallest value it could take."""
    minimums = {key: problem.minimum(key) for key in problem.budgets}
    for key, limit in problem.budgets.items():
        if minimums[key] > limit * (1 + 1e-9) + 1e-9:
            unpinned = problem.minimum(key, use_pins=False)
            hint = f"raise it to at least {_fmt(minimums[key])}"
            if problem.pins and unpinned <= limit:
                hint += f", or drop pins (without pins the smallest is {_fmt(unpinned)})"
            return InfeasibleError(
                f"budget {key}={_fmt(limit)} is infeasible: the smallest achievable {key} is {_fmt(minimums[key])}",
                hint,
                minimums,
            )
    listing = ", ".join(f"{k} >= {_fmt(v)}" for k, v in minimums.items())
    return InfeasibleError(
        "the budgets cannot all hold at once, although each alone can (" + listing + ")",
        "relax one of them",
        minimums,
    )


def solve_ilp(problem: Problem, time_limit: float | None = None, msg: bool = False) -> Solution:
    start = time.perf_counter()
    for key, limit in problem.budgets.items():
        if problem.minimum(key) > limit * (1 + 1e-9) + 1e-9:
            raise explain_infeasible(problem)

    largest = max((abs(o.objective) for lay in problem.layers for o in lay.options), default=0.0)
    scale = _OBJECTIVE_SCALE / largest if largest > 0 else 1.0

    prob = pulp.LpProblem("bitplan", pulp.LpMinimize)
    x: dict[tuple[int, int], pulp.LpVariable] = {}
    for li, layer in enumerate(problem.layers):
        allowed = set(map(id, problem.allowed(layer)))
        for oi, option in enumerate(layer.options):
            if id(option) in allowed:
                x[li, oi] = prob.add_variable(f"x_{li}_{oi}", cat="Binary")
        prob += pulp.lpSum(x[li, oi] for oi in range(len(layer.options)) if (li, oi) in x) == 1, f"one_{li}"

    prob += pulp.lpSum(
        layer.options[oi].objective * scale * var for (li, oi), var in x.items() for layer in [problem.layers[li]]
    )

    for key, limit in problem.budgets.items():
        fixed = 0.0 if key == AVG_BITS else problem.fixed_cost.get(key, 0.0)
        terms = [
            problem.contribution(key, problem.layers[li], problem.layers[li].options[oi]) * var
            for (li, oi), var in x.items()
        ]
        prob += pulp.lpSum(terms) <= limit - fixed, f"budget_{key}"

    index = {layer.name: li for li, layer in enumerate(problem.layers)}
    for gi, group in enumerate(problem.ties):
        bits = {o.w_bits for n in group for o in problem.layer(n).options}
        for a, b in zip(group, group[1:]):
            for w in bits:
                side = [
                    pulp.lpSum(x[index[n], oi] for oi, o in enumerate(problem.layer(n).options)
                               if o.w_bits == w and (index[n], oi) in x)
                    for n in (a, b)
                ]
                prob += side[0] == side[1], f"tie_{gi}_{a}_{b}_{w}".replace(".", "_")

    with warnings.catch_warnings():  # PuLP 3 warns that its bundled CBC leaves in 4.0; we pin <4
        warnings.simplefilter("ignore", DeprecationWarning)
        # The bundled CBC 2.10.3's preprocessing can return a suboptimal plan marked "optimal" on
        # these knapsack-like problems (tests/unit/test_solver.py found one); it stays off.
        prob.solve(pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, options=["preprocess off"]))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        raise explain_infeasible(problem)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise InfeasibleError(f"CBC found no plan (status {status})", "raise the time limit or relax the budgets")

    choices = {}
    for li, layer in enumerate(problem.layers):
        picked = [oi for oi in range(len(layer.options)) if (li, oi) in x and (x[li, oi].value() or 0) > 0.5]
        choices[layer.name] = layer.options[picked[0]]
    objective = sum(o.objective for o in choices.values())
    proven = prob.sol_status == pulp.LpSolutionOptimal
    return Solution(
        choices=choices,
        objective=objective,
        cost=problem.totals(choices),
        status="optimal" if proven else "time_limit",
        seconds=time.perf_counter() - start,
        gap=0.0 if proven else None,
    )


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"
