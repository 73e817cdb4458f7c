"""Baselines: AIMET-AMP-style greedy lowering, and one width for every layer.

greedy   start every layer at its highest width; while a budget is exceeded, take the cheapest
         step down: the one with the least objective increase per unit of (normalised) cost saved
         on the exceeded budgets. A tie group steps as one. Then, optionally, spend what the
         budgets still allow on the steps back up that buy the most objective per unit of cost.
uniform  the highest single w_bits every layer can take whose plan fits (pins kept).
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Iterator, Mapping

from bitplan.errors import BitplanError, InfeasibleError
from solver.problem import Deadline, Layer, Option, Problem, Solution, fmt

_TOL = 1e-9

#: new options for some layers: {layer name: option}
Move = dict[str, Option]


def solve_greedy(problem: Problem, fill: bool = True, time_limit: float | None = None) -> Solution:
    """The greedy plan. Past ``time_limit`` seconds the lowering stops with an error (its plan does not
    meet the budgets yet), and the filling stops with the plan so far (status "time_limit")."""
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    choices = greedy_choices(problem, fill=fill, deadline=deadline)
    if choices is None:
        from solver.ilp import check_budgets

        check_budgets(problem)
        if deadline.hit:
            raise BitplanError(f"greedy stopped at its time limit ({time_limit:g} s) before the budgets held",
                               "raise time_limit, or use the ilp solver")
        raise BitplanError(
            "greedy found no plan that meets every budget by lowering bits (the budgets pull against each other)",
            "the ilp solver finds the best plan whenever one exists",
        )
    return _solution(problem, choices, start, "time_limit" if deadline.hit else "heuristic")


def solve_uniform(problem: Problem, time_limit: float | None = None) -> Solution:
    """One width for every layer; ``time_limit`` is accepted like every solver's (the search is one pass
    per width, well under a second even for thousands of layers)."""
    start = time.perf_counter()
    from solver.ilp import check_budgets

    check_budgets(problem)
    plans = uniform_plans(problem)
    for choices in plans.values():
        if problem.feasible(choices):
            return _solution(problem, choices, start)
    lowest = min(plans, key=lambda k: (k[0], [problem.value(b, plans[k]) for b in problem.budgets])) if plans else None
    totals = {k: problem.value(k, plans[lowest]) for k in problem.budgets} if lowest else {}
    over = ", ".join(f"{k} is {fmt(v)} > {fmt(problem.budgets[k])}" for k, v in totals.items()
                     if v > problem.budgets[k] * (1 + _TOL) + _TOL)
    label = "" if lowest is None else f"{lowest[0]} bits" + ("" if lowest[1] == "int" else f" ({lowest[1]})")
    raise InfeasibleError(
        f"no single width fits every budget: at the lowest, {label}, {over}" if plans
        else "no width is offered by every layer, so no uniform plan exists",
        "use a mixed-precision solver (ilp, pareto, greedy) or relax the budget",
        totals,
    )


def uniform_plans(problem: Problem) -> dict[tuple[int, str, int], dict[str, Option]]:
    """For each width, format and activation width every free layer offers, highest width first (and within a
    width, least predicted loss first): the plan with all of them at it, keyed ``Option.tie_key``. Pinned layers
    keep their pinned width, in the plan's format and activation width where they offer them (else INT, else the
    pair of least loss), and so do the layers tied to them; tied layers always share one pair."""
    held = {}
    for group in problem.groups():
        pins = {problem.pins[n] for n in group if n in problem.pins}
        if len(pins) > 1:
            return {}
        if pins:
            held.update(dict.fromkeys(group, pins.pop()))
    free = [{o.tie_key for o in lay.options} for lay in problem.layers if lay.name not in held]
    keys = set.intersection(*free) if free else {(0, "int", 16)}  # all held: the one plan the pins leave
    plans = {}
    for w, form, a in keys:
        choices: dict[str, Option] = {}
        for group in problem.groups():
            width = held.get(group[0], w)  # a group is held whole
            options = {n: [o for o in problem.allowed(problem.layer(n)) if o.w_bits == width] for n in group}
            shared = set.intersection(*({(o.fmt, o.a_bits) for o in opts} for opts in options.values()))
            if not shared:
                break
            # a held group keeps the plan's format and activation width where it offers them, else INT at that
            # activation width, else the pair of least loss; a tied group takes one pair whichever it is
            pick = (form, a) if (form, a) in shared else ("int", a) if ("int", a) in shared else min(
                sorted(shared), key=lambda fa: sum(min(o.objective for o in opts if (o.fmt, o.a_bits) == fa)
                                                   for opts in options.values()))
            for n, opts in options.items():
                layer = problem.layer(n)
                choices[n] = min((o for o in opts if (o.fmt, o.a_bits) == pick),
                                 key=functools.partial(_rank, problem, layer))
        else:
            plans[w, form, a] = {layer.name: choices[layer.name] for layer in problem.layers}
    order = sorted(plans, key=lambda k: (-k[0], sum(o.objective for o in plans[k].values()), k[1:]))
    return {k: plans[k] for k in order}


def greedy_choices(problem: Problem, fill: bool = True, deadline: Deadline | None = None) -> dict[str, Option] | None:
    """The greedy plan, or None when lowering alone cannot meet the budgets (or ``deadline`` passed
    before they held; past it, filling stops where it is)."""
    deadline = deadline or Deadline(None)
    units = _units(problem)
    if any(not unit.tie_keys for unit in units.values()):
        return None  # a tie group without a common width
    scale = _scales(problem)
    choices: dict[str, Option] = {}
    for unit in units.values():
        choices.update(unit.highest())
    totals = {k: problem.value(k, choices) for k in problem.budgets}
    while True:
        over = {k for k in problem.budgets if totals[k] > _ceiling(problem, k)}
        if not over:
            break
        if deadline.passed():
            return None
        weights = {k: 1.0 / scale[k] for k in over}
        room = functools.partial(_room, problem, totals, over)
        heap = []
        for uid, unit in units.items():
            step = unit.best_step(choices, weights, room())
            if step is not None:
                heap.append((step[0], uid, step[1]))
        heapq.heapify(heap)
        changed = False  # each unit has one entry in the heap, renewed when it moves
        while heap:
            if deadline.passed():
                return None
            _, uid, move = heapq.heappop(heap)
            if not units[uid].fits(choices, move, room()):  # the slack it counted on is gone
                step = units[uid].best_step(choices, weights, room())
                if step is not None:
                    heapq.heappush(heap, (step[0], uid, step[1]))
                continue
            _apply(problem, choices, totals, move)
            changed = True
            if any(totals[k] <= _ceiling(problem, k) for k in over):
                break  # a budget now holds: the weights change
            step = units[uid].best_step(choices, weights, room())
            if step is not None:
                heapq.heappush(heap, (step[0], uid, step[1]))
        if not changed:
            return None
    if fill:
        _fill(problem, units, choices, totals, scale, deadline)
    return {lay.name: choices[lay.name] for lay in problem.layers}


def _fill(problem: Problem, units: Mapping[str, _Unit], choices: dict[str, Option], totals: dict[str, float],
          scale: Mapping[str, float], deadline: Deadline) -> None:
    """Spend the slack: take the steps up that fit, the most objective bought per unit cost first."""
    weights = {k: 1.0 / scale[k] for k in problem.budgets}
    for _ in range(len(units) + 1):
        if deadline.passed():
            return
        steps = sorted(((ratio, uid, move, d_cost) for uid, unit in units.items()
                        for ratio, move, d_cost in unit.up_steps(choices, weights)), key=lambda s: (s[0], s[1]))
        changed = False
        touched: set[str] = set()
        for _, uid, move, d_cost in steps:
            if uid in touched:
                continue
            if all(totals[k] + d <= _ceiling(problem, k) for k, d in zip(problem.budgets, d_cost)):
                _apply(problem, choices, totals, move)
                touched.add(uid)
                changed = True
        if not changed:
            return


def _room(problem: Problem, totals: Mapping[str, float], over: set[str]) -> list[float]:
    """How much each budget may still grow: nothing for an exceeded one, the slack for the others."""
    return [0.0 if k in over else _ceiling(problem, k) - totals[k] for k in problem.budgets]


def _ceiling(problem: Problem, key: str) -> float:
    """The largest total budget ``key`` lets through (with Problem.feasible's tolerance)."""
    return problem.budgets[key] * (1 + _TOL) + _TOL


def _apply(problem: Problem, choices: dict[str, Option], totals: dict[str, float], move: Mapping[str, Option]) -> None:
    for name, option in move.items():
        layer = problem.layer(name)
        for k in totals:
            totals[k] += problem.contribution(k, layer, option) - problem.contribution(k, layer, choices[name])
        choices[name] = option


class _Unit:
    """A layer, or a tie group whose layers move to a new width together."""

    def __init__(self, problem: Problem, names: list[str]) -> None:
        self.problem = problem
        self.keys = list(problem.budgets)
        self.options = {n: problem.candidates(problem.layer(n)) for n in names}
        #: the choices (``Option.tie_key``) every member offers: tied layers move between them together
        self.tie_keys = sorted(set.intersection(*({o.tie_key for o in opts} for opts in self.options.values())))
        #: (objective, budgeted contributions...) of every option, by identity
        self.vector = {id(o): (o.objective, *(problem.contribution(k, problem.layer(n), o) for k in self.keys))
                       for n, opts in self.options.items() for o in opts}

    def highest(self) -> dict[str, Option]:
        """The unit at its highest width, in the format (one for a tie group) of least predicted loss."""
        top = self.tie_keys[-1][0]

        def least(key: tuple[int, str, int], opts: tuple[Option, ...]) -> Option:
            return min((o for o in opts if o.tie_key == key), key=lambda o: o.objective)

        best = min((k for k in self.tie_keys if k[0] == top),
                   key=lambda k: sum(least(k, opts).objective for opts in self.options.values()))
        return {n: least(best, opts) for n, opts in self.options.items()}

    def moves(self, choices: Mapping[str, Option], weights: Mapping[str, float]) -> Iterator[Move]:
        """Every other plan for this unit: single-layer swaps within a width and format, and whole-unit changes of
        width or format."""
        names = list(self.options)
        current = choices[names[0]].tie_key
        for n, opts in self.options.items():
            for o in opts:
                if o is not choices[n] and (len(names) == 1 or o.tie_key == current):
                    yield {n: o}
        if len(names) > 1:
            weight = [weights.get(k, 0.0) for k in self.keys]
            for key in self.tie_keys:
                if key != current:
                    yield {n: min((o for o in opts if o.tie_key == key),
                                  key=lambda o: (sum(a * b for a, b in zip(self.vector[id(o)][1:], weight)), o.objective))
                           for n, opts in self.options.items()}

    def _delta(self, choices: Mapping[str, Option], move: Move) -> list[float]:
        """Change of (objective, budgeted contributions...) if ``move`` is made."""
        delta = [0.0] * (len(self.keys) + 1)
        for n, o in move.items():
            new, old = self.vector[id(o)], self.vector[id(choices[n])]
            for i in range(len(delta)):
                delta[i] += new[i] - old[i]
        return delta

    def fits(self, choices: Mapping[str, Option], move: Move, room: list[float]) -> bool:
        return all(d <= r for d, r in zip(self._delta(choices, move)[1:], room))

    def best_step(self, choices: Mapping[str, Option], weights: Mapping[str, float],
                  room: list[float]) -> tuple[float, Move] | None:
        """The cheapest step down: exceeded budgets shrink (one strictly), the others stay within
        their limits; (objective added per weighted cost saved, move) or None."""
        weight = [weights.get(k, 0.0) for k in self.keys]
        best: tuple[float, Move] | None = None
        for move in self.moves(choices, weights):
            d_obj, *d_cost = self._delta(choices, move)
            if any(d > r for d, r in zip(d_cost, room)):
                continue
            saved = -sum(d * w for d, w in zip(d_cost, weight))
            if saved <= 0:
                continue
            ratio = d_obj / saved
            if best is None or ratio < best[0]:
                best = (ratio, move)
        return best

    def up_steps(self, choices: Mapping[str, Option],
                 weights: Mapping[str, float]) -> Iterator[tuple[float, Move, list[float]]]:
        """Steps that lower the objective, as (cost added per objective bought, move, cost change)."""
        weight = [weights.get(k, 0.0) for k in self.keys]
        for move in self.moves(choices, weights):
            d_obj, *d_cost = self._delta(choices, move)
            if d_obj >= 0:
                continue
            added = sum(max(d, 0.0) * w for d, w in zip(d_cost, weight))
            yield (added / -d_obj, move, d_cost)


def _units(problem: Problem) -> dict[str, _Unit]:
    return {group[0]: _Unit(problem, group) for group in problem.groups()}


def _scales(problem: Problem) -> dict[str, float]:
    """A budget's natural unit: the spread between its smallest and largest achievable totals."""
    out = {}
    for k in problem.budgets:
        lo = sum(min(problem.contribution(k, lay, o) for o in problem.allowed(lay)) for lay in problem.layers)
        hi = sum(max(problem.contribution(k, lay, o) for o in problem.allowed(lay)) for lay in problem.layers)
        out[k] = (hi - lo) or abs(hi) or 1.0
    return out


def _rank(problem: Problem, layer: Layer, option: Option) -> tuple[float, float]:
    return _price(problem, layer, option), option.objective


def _price(problem: Problem, layer: Layer, option: Option, weights: Mapping[str, float] | None = None) -> float:
    keys = weights if weights is not None else {k: 1.0 / (abs(v) or 1.0) for k, v in problem.budgets.items()}
    return sum(problem.contribution(k, layer, option) * w for k, w in keys.items())


def _solution(problem: Problem, choices: dict[str, Option], start: float, status: str = "heuristic") -> Solution:
    return Solution(
        choices=choices,
        objective=sum(o.objective for o in choices.values()),
        cost=problem.totals(choices),
        status=status,
        seconds=time.perf_counter() - start,
    )

