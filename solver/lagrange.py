"""Lagrangian relaxation for problems too large for the ILP (10^5 - 10^6 units: bits per group of columns).

The problem is a multiple-choice knapsack: each unit (a layer, or a tie group) takes one option, and the
summed costs must stay within the budgets. Pricing each budget at a multiplier lambda_k >= 0 splits it into
independent choices, argmin_j objective_j + sum_k lambda_k cost_kj per unit, and

    L(lambda) = sum_units min_j (objective_j + lambda . cost_j) - lambda . limits

is a lower bound on the optimum for every lambda >= 0 (weak duality). The solver searches lambda (bisection
for one budget; for several, each budget's price alone, then cycles of one-price bisections), takes the
plans those prices give that meet every budget, spends what the budgets still allow on the upgrades that buy the
most objective per cost, and reports the gap between that plan and the best bound it found: a certified
gap, not an estimate. With one budget the bound is the LP relaxation's, and the gap is at most what one
unit's step is worth, so it shrinks as the units grow in number.

All work is on arrays (units x options, padded), so 10^6 units take seconds; the ILP stays the exact solver
for small problems.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bitplan.errors import BitplanError
from solver.problem import AVG_BITS, Deadline, Option, Problem, Solution

Array = npt.NDArray[np.float64]
_TOL = 1e-9


@dataclass
class _Arrays:
    """Every unit's options, padded to the widest unit: objective (U x m), costs (K x U x m), and the options."""

    names: list[list[str]]
    #: a lone layer's allowed options, or a tie group's mixes (one option per member)
    options: list[tuple[Option, ...] | list[dict[str, Option]]]
    objective: Array
    cost: Array
    limits: Array
    keys: list[str]

    def pick(self, prices: Array) -> npt.NDArray[np.intp]:
        """Each unit's best option at ``prices`` (ties: the cheaper, by the priced cost)."""
        priced = np.tensordot(prices, self.cost, axes=1) if len(prices) else np.zeros_like(self.objective)
        score = self.objective + priced
        best = score.min(axis=1, keepdims=True)
        near = score <= best + 1e-12 * np.maximum(1.0, np.abs(best))
        return np.where(near, priced, np.inf).argmin(axis=1)  # type: ignore[no-any-return]

    def spend(self, choice: npt.NDArray[np.intp]) -> Array:
        rows = np.arange(len(choice))
        return self.cost[:, rows, choice].sum(axis=1)  # type: ignore[no-any-return]

    def value(self, choice: npt.NDArray[np.intp]) -> float:
        return float(self.objective[np.arange(len(choice)), choice].sum())

    def bound(self, prices: Array) -> float:
        priced = np.tensordot(prices, self.cost, axes=1) if len(prices) else 0.0
        return float((self.objective + priced).min(axis=1).sum() - prices @ self.limits)


def _arrays(problem: Problem) -> _Arrays | None:
    """The arrays, or None when some tie group has no option (they share no allowed width)."""
    keys = list(problem.budgets)
    groups = problem.groups()
    # A lone layer takes its allowed options as they are (the argmin needs no dominance pruning); a tie group
    # takes every mix of its layers' options at each common width.
    options: list[tuple[Option, ...] | list[dict[str, Option]]] = [
        problem.allowed(problem.layer(group[0])) if len(group) == 1 else problem.unit_options(group) for group in groups]
    if any(not unit for unit in options):
        return None
    width = max((len(o) for o in options), default=1)
    count = len(options)
    total = problem.total_params
    # flat (unit, slot, objective, costs...) rows, filled in one pass of plain Python, then scattered
    units: list[int] = []
    slots: list[int] = []
    values: list[float] = []
    costs: list[list[float]] = [[] for _ in keys]
    avg = [k for k, key in enumerate(keys) if key == AVG_BITS]
    other = [(k, key) for k, key in enumerate(keys) if key != AVG_BITS]
    for u, (group, unit) in enumerate(zip(groups, options)):
        if isinstance(unit, tuple):  # a lone layer: the common case, kept to plain loops
            share = problem.layer(group[0]).params / total
            for j, option in enumerate(unit):
                units.append(u)
                slots.append(j)
                values.append(option.objective)
                for k in avg:
                    costs[k].append(share * option.w_bits)
                for k, key in other:
                    costs[k].append(option.cost.get(key, 0.0))
            continue
        for j, choice in enumerate(unit):
            units.append(u)
            slots.append(j)
            values.append(sum(o.objective for o in choice.values()))
            for k, key in enumerate(keys):
                if key == AVG_BITS:
                    costs[k].append(sum(problem.layer(n).params * o.w_bits for n, o in choice.items()) / total)
                else:
                    costs[k].append(sum(o.cost.get(key, 0.0) for o in choice.values()))
    objective = np.full((count, width), np.inf)
    cost = np.zeros((len(keys), count, width))
    objective[units, slots] = values
    for k in range(len(keys)):
        cost[k, units, slots] = costs[k]
    limits = np.array([problem.limit(k) for k in keys], dtype=float)
    return _Arrays(groups, options, objective, cost, limits, keys)


def solve_lagrange(problem: Problem, tol: float = 1e-4, rounds: int = 8, time_limit: float | None = None) -> Solution:
    """The plan and its certified gap (``Solution.gap``: (plan - bound) / |plan|); status "optimal" when the gap
    is within ``tol``, else "heuristic" (or "time_limit")."""
    if problem.max_objective is not None:
        swapped, back = problem.swapped()
        solution = solve_lagrange(swapped, tol, rounds, time_limit)
        original = {name: back[id(o)] for name, o in solution.choices.items()}
        return Solution(original, sum(o.objective for o in original.values()), problem.totals(original),
                        solution.status, solution.seconds, solution.gap)
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    from solver.ilp import check_budgets, explain_infeasible

    data = _arrays(problem)
    if data is None:
        check_budgets(problem)  # names the tie group with no common width
        raise AssertionError("unreachable: a unit without options")
    least = data.cost.min(axis=2, initial=np.inf, where=np.isfinite(data.objective)[None]).sum(axis=1)
    if np.any(least > data.limits * (1 + 1e-9) + 1e-9):  # some budget alone cannot hold: say which, and by how much
        raise explain_infeasible(problem)
    trials, bound = _search(data, rounds, tol, deadline)
    plans = [_fill(data, choice) for prices in trials if (choice := _feasible(data, prices, deadline)) is not None]
    if not plans:
        raise BitplanError("the Lagrangian search found no plan within every budget (the budgets pull against each "
                           "other)", "the ilp solver finds the best plan whenever one exists", field="solver")
    choice = min(plans, key=data.value)
    plan_value = data.value(choice)
    gap = max(0.0, plan_value - bound) / max(abs(plan_value), 1e-12) if np.isfinite(bound) else None
    status = "time_limit" if deadline.hit else ("optimal" if gap is not None and gap <= tol else "heuristic")
    choices: dict[str, Option] = {}
    for u, j in enumerate(choice.tolist()):
        unit = data.options[u]
        if isinstance(unit, tuple):
            choices[data.names[u][0]] = unit[j]
        else:
            choices.update(unit[j])
    return Solution(choices, sum(o.objective for o in choices.values()), problem.totals(choices), status,
                    time.perf_counter() - start, gap)


def _search(data: _Arrays, rounds: int, tol: float, deadline: Deadline) -> tuple[list[Array], float]:
    """Multipliers to take plans from, and the best bound seen. Each budget alone first (other prices zero): when
    one budget binds, as one usually does, its plan meets the others too and its bound is that budget's LP bound.
    With several, cycles of one-price bisections (each price the least at which its budget holds, the others
    held) add the point they reach, unless a budget alone already gave a plan within ``tol`` of the bound."""
    keys = len(data.keys)
    prices = np.zeros(keys)
    best = data.bound(prices)
    if keys == 0 or np.all(data.spend(data.pick(prices)) <= data.limits + _TOL * np.maximum(1.0, np.abs(data.limits))):
        return [prices], best
    trials = []
    for k in range(keys if keys > 1 else 0):
        alone = np.zeros(keys)
        alone[k], seen = _bisect(data, alone, k, deadline)
        trials.append(alone)
        best = max(best, seen)
    for alone in trials:
        choice = data.pick(alone)
        if np.all(data.spend(choice) <= data.limits * (1 + 1e-9) + 1e-9):
            value = data.value(choice)  # the fill can only lower it
            if value - best <= tol * max(abs(value), 1e-12):
                return trials, best
    for _ in range(rounds if keys > 1 else 1):
        before = prices.copy()
        for k in range(keys):
            prices[k], seen = _bisect(data, prices, k, deadline)
            best = max(best, seen)
            if deadline.passed():
                return [*trials, prices], best
        if np.all(np.abs(prices - before) <= 1e-9 * np.maximum(np.abs(prices), 1e-30)):
            break  # a fixed point: each price is the least at which its budget holds, given the others
    return [*trials, prices], max(best, data.bound(prices))


def _bisect(data: _Arrays, prices: Array, k: int, deadline: Deadline, steps: int = 60) -> tuple[float, float]:
    """The smallest price of budget ``k`` (others held) at which its priced plan fits, and the best bound seen."""
    trial = prices.copy()

    def over(price: float) -> bool:
        trial[k] = price
        return bool(data.spend(data.pick(trial))[k] > data.limits[k] * (1 + 1e-9) + 1e-9)

    trial[k] = 0.0
    best = data.bound(trial)
    if not over(0.0):
        return 0.0, best
    low, high = 0.0, 1.0
    while over(high):
        low, high = high, high * 4
        if high > 1e30:
            return high, best
    for _ in range(steps):
        if deadline.passed():
            break
        mid = 0.5 * (low + high)
        if over(mid):
            low = mid
        else:
            high = mid
        trial[k] = low
        best = max(best, data.bound(trial))
        if high - low <= 1e-12 * max(1.0, high):
            break
    return high, best


def _feasible(data: _Arrays, prices: Array, deadline: Deadline) -> npt.NDArray[np.intp] | None:
    """The priced plan; if it breaks a budget (several budgets interact), the plan at prices scaled up until
    none breaks."""

    def fits(choice: npt.NDArray[np.intp]) -> bool:
        return bool(np.all(data.spend(choice) <= data.limits * (1 + 1e-9) + 1e-9))

    choice = data.pick(prices)
    if fits(choice):
        return choice
    base = np.where(prices > 0, prices, 1e-12 + prices.max(initial=0.0) * 1e-6)
    scale = 2.0
    while not fits(data.pick(base * scale)):
        scale *= 2.0
        if scale > 1e30 or deadline.passed():
            return None
    low, high = scale / 2, scale
    for _ in range(40):
        mid = 0.5 * (low + high)
        if fits(data.pick(base * mid)):
            high = mid
        else:
            low = mid
    return data.pick(base * high)


def _fill(data: _Arrays, choice: npt.NDArray[np.intp], passes: int = 6) -> npt.NDArray[np.intp]:
    """Spend the budgets' slack on the switches that lower the objective most per (normalised) cost, in rounds:
    each round takes, in order of that ratio, every unit's best switch while the running totals fit."""
    rows = np.arange(len(choice))
    scale = np.maximum(np.abs(data.limits), 1e-12)[:, None, None]
    for _ in range(passes):
        slack = data.limits - data.spend(choice)
        if np.any(slack < 0):
            return choice
        gain = data.objective[rows, choice][:, None] - data.objective  # > 0: the option is better
        extra = data.cost - data.cost[:, rows, choice][:, :, None]  # K x U x m
        weight = (np.maximum(extra, 0.0) / scale).sum(axis=0)
        fits_alone = np.all(extra <= slack[:, None, None] + 1e-12, axis=0)
        useful = (gain > 1e-15) & fits_alone & np.isfinite(data.objective)
        if not useful.any():
            return choice
        ratio = np.where(useful, gain / np.maximum(weight, 1e-300), -np.inf)
        best = ratio.argmax(axis=1)
        units = np.flatnonzero(useful[rows, best])
        order = units[np.argsort(-ratio[units, best[units]], kind="stable")]
        spent = np.cumsum(extra[:, order, best[order]], axis=1)
        ok = np.all(spent <= slack[:, None] + 1e-12, axis=0)
        if not ok.any():
            return choice
        # the longest prefix whose running totals fit (later ones may have been cheaper: the next pass takes them)
        cut = int(np.argmin(ok)) if not ok.all() else len(ok)
        if cut == 0:
            return choice
        choice = choice.copy()
        choice[order[:cut]] = best[order[:cut]]
    return choice
