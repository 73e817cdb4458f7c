"""Objective vs one cost: the frontier of plans, and the best plan at the budget.

exact  Layers (tie groups as one super-layer whose options are its common ``Option.tie_key``s) are merged one at
       a time: the Minkowski sum of the plans so far with the next layer's options, keeping only
       non-dominated (cost, other budgets..., objective) points and dropping plans that can no
       longer meet another budget. What is left at the end is the exact frontier; the chosen plan
       is its lowest objective whose cost fits. Exact, but the frontier of continuous costs grows
       fast (random layer sizes: ~270k points at 50 layers), so it stops past ``max_states``.
hull   The supported points of that frontier (its lower convex hull): merging every layer's hull
       segments by slope gives them all in O(N log N), and each is the optimal plan at its own
       cost. The chosen plan at the budget comes from the ILP, which is exact.
auto   exact when the frontier stays under ``max_states`` (and is traced within half the time limit),
       else hull.

``time_limit`` (seconds) bounds the whole call: the exact merge checks it after every layer (and
inside its slowest step), the ILP of hull mode gets what is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from bitplan.errors import BitplanError
from solver.problem import AVG_BITS, Deadline, Option, Problem, Solution, frontier_point, objective_of

METHODS = ("auto", "exact", "hull")
_TOL = 1e-9

#: per unit (a layer, or a tie group): its options, each {layer name: option}
Units = Sequence[list[dict[str, Option]]]


class _TooLarge(Exception):
    pass


class _OutOfTime(Exception):
    pass


def solve_pareto(
    problem: Problem,
    cost_key: str | None = None,
    method: str = "auto",
    max_states: int = 100_000,
    points: int | None = 50,
    backend: str = "cbc",
    time_limit: float | None = None,
) -> Solution:
    """Best plan at the budget, with ``Solution.frontier`` holding up to ``points`` frontier plans
    (spread evenly over cost, the chosen one always among them; None for all). ``backend`` and
    ``time_limit`` go to the ILP that finds the plan at the budget in hull mode."""
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    key = _frontier_key(problem, cost_key)
    if method not in METHODS:
        raise BitplanError(f"unknown pareto method '{method}'", "valid methods: " + ", ".join(METHODS))
    from solver.ilp import check_budgets

    check_budgets(problem)
    # options are pruned by dominance on the budgets; the frontier's cost must be one of them (with a
    # bound every plan meets: the problem refuses an infinite one)
    traced = problem if key in problem.budgets else Problem(
        problem.layers, {**problem.budgets, key: _most(problem, key)}, problem.fixed_cost, problem.pins, problem.ties)
    units = [traced.unit_options(group) for group in problem.groups()]
    if method in ("auto", "exact"):
        # auto keeps half the time for the hull and its ILP, should the exact merge not finish
        exact_deadline = deadline if method == "exact" or time_limit is None else Deadline(time_limit / 2)
        try:
            frontier = _exact(problem, key, units, max_states, foresee=method == "auto", deadline=exact_deadline)
        except _TooLarge as exc:
            if method == "exact":
                raise BitplanError(
                    f"the exact frontier passed max_states={max_states} plans ({exc})",
                    "raise max_states, or use method='hull' (supported points + exact plan at the budget)",
                ) from None
        except _OutOfTime as exc:
            if method == "exact":
                raise BitplanError(
                    f"the exact frontier was not traced within time_limit={time_limit:g} s ({exc})",
                    "raise time_limit, or use method='hull' (supported points + exact plan at the budget)",
                ) from None
        else:
            return _finish(problem, key, frontier, None, points, start)
    frontier = _hull(problem, key, units)
    from solver.ilp import solve_ilp

    at_budget = solve_ilp(problem, time_limit=deadline.left(), backend=backend)
    return _finish(problem, key, frontier, at_budget, points, start)


def _most(problem: Problem, key: str) -> float:
    """The largest value ``key`` can take: a budget on it that every plan meets."""
    fixed = 0.0 if key == AVG_BITS else problem.fixed_cost.get(key, 0.0)
    return fixed + sum(max((problem.contribution(key, lay, o) for o in lay.options), default=0.0) for lay in problem.layers)


def _frontier_key(problem: Problem, cost_key: str | None) -> str:
    if cost_key is not None:
        known = {k for lay in problem.layers for o in lay.options for k in o.cost} | {AVG_BITS}
        if cost_key not in known:
            raise BitplanError(f"cost_key '{cost_key}' is not a cost of this problem", "costs: " + ", ".join(sorted(known)))
        return cost_key
    if len(problem.budgets) == 1:
        return next(iter(problem.budgets))
    raise BitplanError(
        f"pareto traces one cost but the problem has {len(problem.budgets)} budgets",
        "name the frontier's cost with cost_key=...; the other budgets then must hold along it",
    )




def _vectors(problem: Problem, keys: list[str], options: list[dict[str, Option]]) -> tuple[np.ndarray, np.ndarray]:
    """Per option of a unit: its contributions to ``keys`` and its objective."""
    costs = np.array([[sum(problem.contribution(k, problem.layer(n), o) for n, o in opt.items()) for k in keys]
                      for opt in options], dtype=float).reshape(len(options), len(keys))
    objective = np.array([sum(o.objective for o in opt.values()) for opt in options], dtype=float)
    return costs, objective


class _Frontier:
    """Frontier points in cost order: the cost on the frontier key, the objective, whether the other
    budgets hold, and a way to rebuild any point's plan."""

    def __init__(self, cost: np.ndarray, objective: np.ndarray, fits: np.ndarray,
                 plan: Callable[[int], dict[str, Option]]) -> None:
        self.cost, self.objective, self.fits, self.plan = cost, objective, fits, plan


def _exact(problem: Problem, key: str, units: Units, max_states: int, foresee: bool = False,
           deadline: Deadline | None = None) -> _Frontier:
    """The exact frontier, found by merging units one at a time. With ``foresee`` it gives up as soon
    as linear growth from here would pass ``max_states`` (frontiers grow at least that fast); past
    ``deadline`` it gives up with _OutOfTime."""
    deadline = deadline or Deadline(None)
    others = [k for k in problem.budgets if k != key]
    keys = [key, *others]
    vectors = [_vectors(problem, keys, opts) for opts in units]
    limits = np.array([problem.limit(k) for k in others])
    rest = np.zeros((len(units) + 1, len(others)))  # least the units after i can add to each other budget
    for i in range(len(units) - 1, -1, -1):
        rest[i] = rest[i + 1] + vectors[i][0][:, 1:].min(axis=0)
    cost, objective = np.zeros((1, len(keys))), np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []  # per unit: (previous point, option) of each point
    for i, (c, v) in enumerate(vectors):
        if deadline.passed():
            raise _OutOfTime(f"{len(objective)} plans after {i} of {len(units)} layers")
        n_prev, n_opt = len(objective), len(v)
        cost = (cost[:, None, :] + c[None, :, :]).reshape(-1, len(keys))
        objective = (objective[:, None] + v[None, :]).ravel()
        prev, pick = np.repeat(np.arange(n_prev), n_opt), np.tile(np.arange(n_opt), n_prev)
        if others:  # a plan that cannot meet another budget even at its cheapest rest goes
            fits = np.all(cost[:, 1:] + rest[i + 1] <= limits * (1 + _TOL) + _TOL + 1e-12 * np.abs(limits), axis=1)
            cost, objective, prev, pick = cost[fits], objective[fits], prev[fits], pick[fits]
        keep = _undominated(cost, objective, deadline)
        if keep is None:
            raise _OutOfTime(f"in layer {i + 1} of {len(units)}")
        cost, objective, prev, pick = cost[keep], objective[keep], prev[keep], pick[keep]
        if len(objective) * (len(units) / (i + 1) if foresee else 1) > max_states:
            raise _TooLarge(f"{len(objective)} after {i + 1} of {len(units)} layers")
        steps.append((prev, pick))

    def plan(end: int) -> dict[str, Option]:
        choices: dict[str, Option] = {}
        for i in range(len(units) - 1, -1, -1):
            prev, pick = steps[i]
            choices.update(units[i][pick[end]])
            end = prev[end]
        return {lay.name: choices[lay.name] for lay in problem.layers}

    # several budgets leave points that another point beats on the frontier key: keep the frontier,
    # and drop a point when the next one costs the same up to rounding (Problem.feasible's tolerance)
    undominated = _undominated(cost[:, :1], objective) if len(objective) else None
    key_only = undominated if undominated is not None else np.zeros(0, dtype=int)
    costs = cost[key_only, 0]
    key_only = key_only[np.append(costs[1:] > costs[:-1] * (1 + _TOL) + _TOL, True)] if len(costs) else key_only
    return _Frontier(cost[key_only, 0], objective[key_only], np.ones(len(key_only), bool),
                     lambda j: plan(int(key_only[j])))


def _undominated(cost: np.ndarray, objective: np.ndarray, deadline: Deadline | None = None) -> np.ndarray | None:
    """Indices (sorted by cost) of points no other point matches or beats in every coordinate
    (of exact equals, the first stays); None if ``deadline`` passed during the (quadratic) search
    over three or more coordinates."""
    order = np.lexsort((objective, *cost.T[::-1]))
    sorted_obj = objective[order]
    if cost.shape[1] == 1:
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], sorted_obj[:-1]]))
        return order[sorted_obj < best_before]
    # Sorted lexicographically, a point can only be beaten by one before it.
    sorted_cost = cost[order]
    if cost.shape[1] == 2:
        return order[~_beaten_before(sorted_cost[:, 1], sorted_obj)]
    points = np.column_stack([sorted_cost, sorted_obj])
    kept: list[int] = []
    for i in range(len(points)):
        if deadline is not None and i % 256 == 0 and deadline.passed():
            return None
        if not kept or not np.any(np.all(points[kept] <= points[i], axis=1)):
            kept.append(i)
    kept_index: npt.NDArray[np.intp] = np.array(kept, dtype=int)
    return order[kept_index]


def _beaten_before(second: np.ndarray, objective: np.ndarray, leaf: int = 64) -> npt.NDArray[np.bool_]:
    """For points in order: is there an earlier one with second <= and objective <=? Divide and
    conquer: each half's answer, plus a prefix-minimum of the left half's objectives by ``second``."""
    beaten = np.zeros(len(objective), dtype=bool)

    def visit(lo: int, hi: int) -> None:
        if hi - lo <= leaf:
            a, b = second[lo:hi], objective[lo:hi]
            earlier = np.tri(hi - lo, k=-1, dtype=bool)
            beaten[lo:hi] |= ((a[None, :] <= a[:, None]) & (b[None, :] <= b[:, None]) & earlier).any(axis=1)
            return
        mid = (lo + hi) // 2
        visit(lo, mid)
        visit(mid, hi)
        order = np.argsort(second[lo:mid], kind="stable")
        least = np.minimum.accumulate(objective[lo:mid][order])
        count = np.searchsorted(second[lo:mid][order], second[mid:hi], side="right")
        best = np.where(count > 0, least[np.maximum(count - 1, 0)], np.inf)
        beaten[mid:hi] |= best <= objective[mid:hi]

    visit(0, len(objective))
    return beaten


def _hull(problem: Problem, key: str, units: Units) -> _Frontier:
    """The supported frontier: every unit at its cheapest hull point, then hull segments by slope."""
    others = [k for k in problem.budgets if k != key]
    keys = [key, *others]
    segments = []  # (slope, unit, to option, change of each key, change of objective)
    first, base_cost, base_objective = [], np.zeros(len(keys)), 0.0
    for u, opts in enumerate(units):
        c, v = _vectors(problem, keys, opts)
        hull = _lower_hull(c[:, 0], v)
        first.append(hull[0])
        base_cost += c[hull[0]]
        base_objective += v[hull[0]]
        for a, b in zip(hull, hull[1:]):
            segments.append(((v[b] - v[a]) / (c[b, 0] - c[a, 0]), u, b, c[b] - c[a], v[b] - v[a]))
    segments.sort(key=lambda s: (s[0], s[1]))
    cost = np.vstack([base_cost, *(s[3] for s in segments)]).cumsum(axis=0)
    objective = np.concatenate([[base_objective], [s[4] for s in segments]]).cumsum()
    limits = np.array([problem.limit(k) for k in others])
    fits = np.all(cost[:, 1:] <= limits * (1 + _TOL) + _TOL, axis=1)

    def plan(j: int) -> dict[str, Option]:
        choices: dict[str, Option] = {}
        for u, i in enumerate(first):
            choices.update(units[u][i])
        for _, u, b, _, _ in segments[:j]:
            choices.update(units[u][b])
        return {lay.name: choices[lay.name] for lay in problem.layers}

    return _Frontier(cost[:, 0], objective, fits, plan)


def _lower_hull(cost: np.ndarray, objective: np.ndarray) -> list[int]:
    """Indices of the lower-left convex hull, cost ascending and objective descending."""
    order = np.lexsort((objective, cost))
    hull: list[int] = []
    for i in order:
        if hull and objective[i] >= objective[hull[-1]]:
            continue  # costs more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-i (or on it): not a vertex
            if (objective[b] - objective[a]) * (cost[i] - cost[a]) >= (objective[i] - objective[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        if hull and cost[i] == cost[hull[-1]]:
            hull.pop()
        hull.append(int(i))
    return hull


def _finish(problem: Problem, key: str, frontier: _Frontier, at_budget: Solution | None, points: int | None,
            start: float) -> Solution:
    """Pick the best frontier plan that meets every budget (unless the ILP gave it), and thin the
    frontier for the report."""
    chosen = None if at_budget is None else at_budget.choices
    if chosen is None:
        limit = problem.budgets.get(key)
        fit = frontier.fits & (frontier.cost <= (np.inf if limit is None else problem.limit(key) * (1 + _TOL) + _TOL))
        for j in np.flatnonzero(fit)[np.argsort(frontier.objective[fit], kind="stable")]:
            plan = frontier.plan(int(j))
            if problem.feasible(plan):
                chosen = plan
                break
        else:
            from solver.ilp import explain_infeasible

            raise explain_infeasible(problem)
    index = np.flatnonzero(frontier.fits)
    if points is not None and len(index) > points:
        targets = np.linspace(frontier.cost[index[0]], frontier.cost[index[-1]], max(points - 1, 2))
        index = np.unique(index[np.minimum(np.searchsorted(frontier.cost[index], targets), len(index) - 1)])
    plans = [frontier.plan(int(j)) for j in index]
    plans = [p for p in plans if objective_of(p) != objective_of(chosen) or p != chosen] + [chosen]
    plans.sort(key=lambda p: (problem.value(key, p), objective_of(p)))
    return Solution(
        choices=chosen,
        objective=objective_of(chosen),
        cost=problem.totals(chosen),
        status="optimal" if at_budget is None else at_budget.status,
        seconds=time.perf_counter() - start,
        gap=0.0 if at_budget is None else at_budget.gap,
        frontier=[frontier_point(problem.totals(p), objective_of(p), p)
                  for p in plans],
    )




__all__ = ["METHODS", "solve_pareto"]
