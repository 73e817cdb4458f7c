"""Lagrangian relaxation for problems too large for the ILP (10^5 - 10^6 units: bits per group of columns).

The problem is a multiple-choice knapsack: each unit (a layer, or a tie group) takes one option, and the
summed costs must stay within the budgets. Pricing each budget at a multiplier lambda_k >= 0 splits it into
independent choices, argmin_j objective_j + sum_k lambda_k cost_kj per unit, and

    L(lambda) = sum_units min_j (objective_j + lambda . cost_j) - lambda . limits

is a lower bound on the optimum for every lambda >= 0 (weak duality). The search maximises L one price at a
time, exactly: along price k (the others held) every unit's priced objective is the lower envelope of its
options' lines, whose breakpoints are where the unit steps to a cheaper option; walking the envelopes (a few
array passes) and finding the breakpoint where budget k's spend first fits (a weighted selection, not a
bisection) gives the maximising price, L there, and a plan: the steps in order of price up to the first one
that fits. With one budget that is the LP relaxation's bound and the plan is within one unit's step of it.
With several, each budget alone first: when one binds, as one usually does, its plan meets the others and its
bound certifies it. When two pull against each other (size against latency: low bits are small but slow), the
search turns the direction of their two prices, each ray maximised exactly as above, until the plans on either
side of the best direction break one budget or the other by about a unit's step; a repair (the switches that
save the broken budget at the least priced cost, or one or two switches that trade between the budgets) makes
them meet both. More than two budgets: the pairs the single-budget plans break, then cycles over the prices.
The plan that meets every budget spends what the budgets still allow on the upgrades that buy the most
objective per cost, and the solver reports the gap between that plan and the best bound it found: a certified
gap, not an estimate.

All work is on option-major arrays (options x units, padded), so 10^6 units take a few seconds. Problems built
as arrays (``solver.units.UnitProblem``) go straight in (``solve_units``); a ``Problem`` (``solve_lagrange``)
is turned into the same arrays first. The ILP stays the exact solver for small problems.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter, methodcaller

import numpy as np
import numpy.typing as npt

from bitplan.errors import BitplanError
from solver.problem import AVG_BITS, Deadline, Option, Problem, Solution
from solver.units import UnitProblem, UnitSolution

Array = npt.NDArray[np.float64]
Choice = npt.NDArray[np.intp]
#: relative: scores this close count as equal, and the cheaper option (by the tie-break) wins
_TIE = 1e-12


def _first_min(x: Array) -> Choice:
    """Per column, the first row holding the column's least value (argmin along axis 0, without numpy's slow
    short-axis reduction)."""
    least = np.minimum.reduce(x)
    out = np.full(x.shape[1], x.shape[0] - 1, dtype=np.intp)
    for j in range(x.shape[0] - 2, -1, -1):
        np.copyto(out, j, where=x[j] == least)
    return out


def _argmin(score: Array, tiebreak: Array) -> Choice:
    """Per column, the row with the least score; among scores within _TIE of it, the least tie-break."""
    best = np.minimum.reduce(score)
    near = score <= best + _TIE * np.maximum(1.0, np.abs(best))
    return _first_min(np.where(near, tiebreak, np.inf))


def _least_covering(t: Array, weight: Array, need: float) -> float | None:
    """The least value v of ``t`` with sum(weight[t <= v]) >= need (weights > 0), or None when the whole weight
    falls short. While the candidates are many, a strided sample's weighted quantile brackets the answer and only
    the bracket is kept (one pass, usually); then the rest is sorted."""
    if float(weight.sum()) < need:
        return None
    below = 0.0  # the weight of the candidates dropped below the bracket
    for _ in range(40):
        if t.size <= 65_536:
            break
        stride = t.size // 4096
        sample, mass = t[::stride], weight[::stride]
        order = np.argsort(sample)
        cum = np.cumsum(mass[order])
        at = int(np.searchsorted(cum, (need - below) / float(weight.sum()) * float(cum[-1])))
        low = float(sample[order[max(at - 96, 0)]])
        high = float(sample[order[min(at + 96, len(order) - 1)]])
        under = t < low
        got = float(weight[under].sum())
        if below + got >= need:  # the bracket missed low: keep what is under it
            t, weight = t[under], weight[under]
            continue
        inside = ~under & (t <= high)
        more = float(weight[inside].sum())
        if below + got + more >= need:
            if inside.all():
                break
            below += got
            t, weight = t[inside], weight[inside]
        else:  # missed high: keep what is over it
            below += got + more
            over = t > high
            t, weight = t[over], weight[over]
    order = np.argsort(t)
    cum = below + np.cumsum(weight[order])
    return float(t[order[min(int(np.searchsorted(cum, need)), len(t) - 1)]])


class _Core:
    """What the search works on, option-major: the objective [m, U] (+inf where an option is not allowed), each
    budget's costs [K, m, U] (0 there), what the units may spend of each budget (``limits``) and the most that
    still counts as within it (``caps``: ``Problem.feasible``'s 1e-9 slack)."""

    def __init__(self, objective: Array, cost: Array, limits: Array, caps: Array) -> None:
        self.objective = objective
        self.cost = cost
        self.limits = limits
        self.caps = caps
        self.units = int(objective.shape[1])
        self.columns = np.arange(self.units)
        self.scale = np.maximum(np.abs(limits), 1e-12)

    def at(self, rows: Array, choice: Choice) -> Array:
        """Each unit's entry of ``rows`` ([m, U]) at its chosen option."""
        return rows.reshape(-1).take(choice * self.units + self.columns)

    def spend(self, choice: Choice) -> Array:
        flat = choice * self.units + self.columns
        return np.array([float(rows.reshape(-1).take(flat).sum()) for rows in self.cost])

    def fits(self, choice: Choice) -> bool:
        return bool(np.all(self.spend(choice) <= self.caps))

    def value(self, choice: Choice) -> float:
        return float(self.at(self.objective, choice).sum())

    def least(self) -> Array:
        """Each budget's least spend alone."""
        allowed = np.isfinite(self.objective)
        return np.array([float(np.minimum.reduce(np.where(allowed, rows, np.inf)).sum()) for rows in self.cost])

    def priced(self, prices: Array, skip: int | None = None) -> Array:
        """objective + sum_k prices_k cost_k, budget ``skip`` left out."""
        score = self.objective.copy()
        for k, price in enumerate(prices.tolist()):
            if k != skip and price != 0.0:
                score += price * self.cost[k]
        return score

    def pick(self, prices: Array) -> Choice:
        """Each unit's best option at ``prices`` (near ties: the cheaper, by the priced cost, or at zero prices by
        the costs relative to their limits)."""
        weights = prices if np.any(prices > 0) else 1.0 / self.scale
        tiebreak = np.zeros_like(self.objective)
        for k, weight in enumerate(weights.tolist()):
            tiebreak += weight * self.cost[k]
        return _argmin(self.priced(prices), tiebreak)

    def dual(self, prices: Array) -> float:
        """L(prices): a lower bound on every plan within the budgets."""
        return float(np.minimum.reduce(self.priced(prices)).sum() - prices @ self.limits)

    def line(self, held: Array, direction: Array) -> tuple[float, Choice, float]:
        """The step t >= 0 along ``direction`` (from the prices ``held``) that maximises L(held + t direction): the
        least at which the direction's combined budget (sum_k direction_k cost_k <= sum_k direction_k limit_k)
        holds. Returns t, the plan (each unit's envelope steps in order of price, up to the first prefix within the
        combined budget) and L there. With direction e_k and price k out of ``held``, it is the exact maximisation
        of L along price k; with several budgets in the direction, it solves their surrogate (one weighted budget)."""
        base = self.priced(held)
        cost = np.zeros_like(base)
        for k, weight in enumerate(direction.tolist()):
            if weight != 0.0:
                cost += weight * self.cost[k]
        limit, scale = float(direction @ self.limits), float(np.abs(direction) @ self.scale)
        held_part = float(held @ self.limits)
        m, units = base.shape
        current = _argmin(base, cost)
        value, spent = self.at(base, current), self.at(cost, current)
        need = float(spent.sum()) - limit
        if need <= 1e-12 * scale:
            return 0.0, current, float(np.minimum.reduce(base).sum()) - held_part
        # the envelope: the options a unit takes as the price rises, and the prices (steps) and savings (drops)
        path = np.empty((m, units), dtype=np.intp)
        path[0] = current
        steps = np.full((max(m - 1, 0), units), np.inf)
        drops = np.zeros((max(m - 1, 0), units))
        last = np.zeros(units)
        t = np.empty_like(base)
        for s in range(m - 1):
            drop = spent - cost
            cheaper = drop > 1e-12 * np.abs(spent)
            t.fill(np.inf)
            np.divide(base - value, drop, out=t, where=cheaper)
            live = np.minimum.reduce(t) < np.inf
            if not live.any():
                path[s + 1:] = current
                break
            nxt = _argmin(t, cost)
            step = np.maximum(self.at(t, nxt), last)
            steps[s] = np.where(live, step, np.inf)
            after = self.at(cost, nxt)
            drops[s] = np.where(live, spent - after, 0.0)
            current = np.where(live, nxt, current)
            path[s + 1] = current
            value = np.where(live, self.at(base, nxt), value)
            spent = np.where(live, after, spent)
            last = np.where(live, step, last)
        finite = steps < np.inf
        found = _least_covering(steps[finite], drops[finite], need)
        price = float(steps[finite].max(initial=0.0)) if found is None else found
        below = steps < price
        count = below.sum(axis=0)
        rest = need - float(np.where(below, drops, 0.0).sum())
        if rest > 0:  # steps at exactly the price, in order (a unit's in its own order), until the budget fits
            at = np.flatnonzero(steps == price)
            take = min(int(np.searchsorted(np.cumsum(drops.reshape(-1)[at]), rest)) + 1, len(at))
            count += np.bincount(at[:take] % units, minlength=units)
        plan = path.reshape(-1).take(count * units + self.columns)
        bound = float(np.minimum.reduce(base + price * cost).sum()) - price * limit - held_part
        return price, plan, bound


class _Found:
    """What a search has found: the best bound and its prices, the best few plans within every budget, and per
    budget the plan that breaks it (most) by the least (material for the repair). Plans are kept by the handful:
    at 10^6 units each is 8 MB."""

    def __init__(self, core: _Core, bound: float, prices: Array, tol: float) -> None:
        self.core, self.bound, self.prices, self.tol = core, bound, prices, tol
        self.plans: list[tuple[float, Choice]] = []
        self.near: dict[int, tuple[float, Choice]] = {}
        self.repairs = 6  # repairs left to try during the search (each costs about a line search)

    def add(self, prices: Array, plan: Choice, seen: float) -> bool:
        """Note a plan and the bound ``seen`` at ``prices``; True once the best plan is within ``tol`` of the bound."""
        if seen > self.bound:
            self.bound, self.prices = seen, prices.copy()
        excess = (self.core.spend(plan) - self.core.caps) / self.core.scale
        if np.all(excess <= 0):
            value = self.core.value(plan)
            if all(value != v or not np.array_equal(plan, p) for v, p in self.plans):
                self.plans = sorted([*self.plans, (value, plan)], key=lambda item: item[0])[:3]
        else:
            k = int(np.argmax(excess))
            if k not in self.near or excess[k] < self.near[k][0]:
                self.near[k] = (float(excess[k]), plan)
        return self.done()

    def done(self) -> bool:
        if not self.plans:
            return False
        value = self.plans[0][0]
        return value - self.bound <= self.tol * max(abs(value), 1e-12)

    def note(self, line: _Core, prices: Array, plan: Choice, seen: float) -> bool:
        """``add`` a line search's result on ``line`` (the problem, or its tightened budgets: then the bound does
        not count), and repair the plan at once when it breaks a budget by so little that the repaired plan should
        be within ``tol`` (its objective plus the overshoot at ``prices``). True once done."""
        if self.add(prices, plan, seen if line is self.core else -np.inf):
            return True
        over = np.maximum(self.core.spend(plan) - self.core.caps, 0.0)
        if self.repairs > 0 and over.any():
            value = self.core.value(plan)
            if value + float(prices @ over) - self.bound <= self.tol * max(abs(value), 1e-12):
                self.repairs -= 1
                repaired = _repair(self.core, plan, prices)
                if repaired is None:
                    repaired = _exchange(self.core, plan, prices)
                if repaired is not None:
                    return self.add(prices, repaired, -np.inf)
        return False


def _search(core: _Core, rounds: int, tol: float, deadline: Deadline) -> tuple[list[Choice], float, Array]:
    """Plans within every budget, the best bound seen and the prices that gave it.

    The plan at zero prices if it fits. Else each budget's price alone (the others zero), stopping once a plan
    is within ``tol`` of the bound (when one budget binds, its plan meets the others and its bound certifies it).
    Else a search over the direction of two budgets' prices (the others zero): along each direction the line
    search gives the best point of L on that ray (the surrogate of the two budgets weighted by it), and the
    budget its plan breaks says which way the direction must turn; with more than two budgets, for each budget
    the one its plan alone breaks most (the budget with the highest bound alone first), then cycles of exact
    one-price maximisations (until a fixed point, ``rounds`` cycles or ``tol``). The plans these give break
    some budget by about one unit's step when the budgets pull against each other (the LP's optimum mixes
    plans): they are repaired, and if that fails the search runs again on budgets tightened by what the plans
    broke them by (its plans count when they meet the real budgets; its bounds do not count)."""
    keys = len(core.limits)
    zero = np.zeros(keys)
    first = core.pick(zero)
    if keys == 0 or core.fits(first):
        return [first], core.dual(zero), zero
    found = _Found(core, core.dual(zero), zero, tol)
    ends: list[Array] = []
    alone: list[Choice] = []
    pairs: list[tuple[float, tuple[int, int]]] = []
    for k in range(keys):
        direction = np.zeros(keys)
        direction[k] = 1.0
        price, plan, seen = core.line(zero, direction)
        ends.append(price * direction)
        alone.append(plan)
        if found.add(price * direction, plan, seen) or deadline.passed() or keys == 1:
            return [plan for _, plan in found.plans], found.bound, found.prices
        excess = (core.spend(plan) - core.caps) / core.scale
        excess[k] = -np.inf
        j = int(np.argmax(excess))
        if excess[j] > 0 and all(pair != (min(k, j), max(k, j)) for _, pair in pairs):
            pairs.append((-seen, (min(k, j), max(k, j))))  # the budget whose bound alone is highest binds most

    def explore(line: _Core) -> None:
        for _, (a, b) in sorted(pairs) if keys > 2 else [(0.0, (0, 1))]:
            _pair(line, found, deadline, a, b, (alone[a], alone[b]) if line is core else None)
            if found.done() or deadline.passed():
                return
        if keys > 2:
            _cycles(line, found, deadline, rounds)

    explore(core)
    shrink = np.zeros(keys)
    for _ in range(3):
        if found.done() or deadline.passed():
            break
        for _, plan in list(found.near.values()):
            repaired = _repair(core, plan, found.prices)
            if repaired is None:
                repaired = _exchange(core, plan, found.prices)
            if repaired is not None:
                found.add(found.prices, repaired, -np.inf)
        if found.plans:
            break
        for k, (broken, _) in found.near.items():
            shrink[k] += broken * core.scale[k] * (1 + 1e-9)
        tight = _Core(core.objective, core.cost, core.limits - shrink, core.caps - shrink)
        if np.any(tight.least() > tight.caps):
            break
        explore(tight)
    if not found.plans:  # last resort: raise all prices together until no budget breaks
        for trial in [found.prices, *ends]:
            plan_or_none = _feasible(core, trial, deadline)
            if plan_or_none is not None:
                found.add(trial, plan_or_none, -np.inf)
                break
    return [plan for _, plan in found.plans], found.bound, found.prices


def _pair(line: _Core, found: _Found, deadline: Deadline, a: int, b: int, ends: tuple[Choice, Choice] | None,
          steps: int = 60) -> None:
    """Budgets ``a`` and ``b`` (the others' prices zero): search the direction w(s) = (1 - s) e_a / scale_a +
    s e_b / scale_b of the prices, s in [0, 1] (s = 0: budget a alone, whose plan breaks budget b; s = 1 the
    other way round; ``ends``: those two plans, when known). The best of L along a ray is quasi-concave in the
    direction, and at the best direction the surrogate's plan meets both budgets (within a unit's step); f(s),
    budget a's relative excess less budget b's, rises with s and crosses zero there, so s is found by regula
    falsi on f (Illinois: the bracket's retained end is halved in weight), which converges far faster than
    bisection at scale, where f is nearly smooth. The line searches run on ``line`` (the problem, or its
    tightened budgets: see ``_Found.note``). Stops when the plans on either side stop changing and the bound
    with them."""
    keys = len(line.limits)
    zero = np.zeros(keys)

    def excess(plan: Choice) -> float:
        over = (line.spend(plan) - line.limits) / line.scale
        return float(over[a] - over[b])

    def direction(s: float) -> Array:
        out = np.zeros(keys)
        out[a], out[b] = (1 - s) / line.scale[a], s / line.scale[b]
        return out

    if ends is None:
        rays = [(direction(s), *line.line(zero, direction(s))) for s in (0.0, 1.0)]
        for ray, price, plan, seen in rays:
            found.note(line, price * ray, plan, seen)
        ends = (rays[0][2], rays[1][2])
    low, high, f_low, f_high = 0.0, 1.0, excess(ends[0]), excess(ends[1])
    falsi = f_low < 0 < f_high
    last: dict[bool, Choice] = {}
    best, stale, kept = -np.inf, 0, 0
    for _ in range(steps):
        width = high - low
        if width <= 1e-12 or stale >= 3 or deadline.passed():
            return
        s = low - f_low * width / (f_high - f_low) if falsi else 0.5 * (low + high)
        s = min(max(s, low + 1e-9 * width), high - 1e-9 * width)
        ray = direction(s)
        price, plan, seen = line.line(zero, ray)
        if found.note(line, price * ray, plan, seen):
            return
        f = excess(plan)
        side = f > 0
        if side:
            high, f_high = s, f
            kept = kept + 1 if kept > 0 else 1  # the low end kept again: weigh it less
            if kept > 1:
                f_low *= 0.5
        else:
            low, f_low = s, f
            kept = kept - 1 if kept < 0 else -1
            if kept < -1:
                f_high *= 0.5
        falsi = falsi and f_low < 0 < f_high
        same = side in last and np.array_equal(last[side], plan)
        stale = stale + 1 if same and seen <= best + 1e-12 * abs(best) else 0
        last[side], best = plan, max(best, seen)


def _cycles(line: _Core, found: _Found, deadline: Deadline, rounds: int = 8) -> None:
    """Cycles of exact one-price maximisations of L (each price the least at which its budget holds, the others
    held), until a fixed point, ``rounds`` cycles, a plan within ``tol`` or the deadline. ``line``: as for
    ``_pair``."""
    keys = len(line.limits)
    prices = np.zeros(keys)
    for _ in range(rounds):
        before = prices.copy()
        for k in range(keys):
            held = prices.copy()
            held[k] = 0.0
            direction = np.zeros(keys)
            direction[k] = 1.0
            prices[k], plan, seen = line.line(held, direction)
            if found.note(line, prices, plan, seen) or deadline.passed():
                return
        if np.all(np.abs(prices - before) <= 1e-9 * np.maximum(np.abs(prices), 1e-30)):
            return  # a fixed point: each price maximises L given the others


def _repair(core: _Core, choice: Choice, prices: Array, passes: int = 4) -> Choice | None:
    """A plan that breaks some budgets brought within all of them (None if that fails). For the budget broken
    most, each unit's switch that saves it at the least priced cost per saving (the objective, plus the other
    budgets' extra at their prices ``prices``: near a maximum of L these are the switches the LP trades between
    budgets at), taken in that order, skipping any that would break another budget, until the excess is
    covered; again while some budget breaks. When budgets pull against each other and the others have no slack
    left, this fails, and ``_exchange`` trades between them."""
    units = core.units
    for _ in range(passes):
        spent = core.spend(choice)
        over = spent - core.caps
        if np.all(over <= 0):
            return choice
        v = int(np.argmax(over / core.scale))
        room = np.maximum(core.caps - spent, 0.0)
        saving = core.at(core.cost[v], choice) - core.cost[v]
        useful = (saving > 1e-15 * core.scale[v]) & np.isfinite(core.objective)
        charge = core.objective - core.at(core.objective, choice)
        others = [k for k in range(len(core.limits)) if k != v]
        extras = []
        for k in others:
            extra = core.cost[k] - core.at(core.cost[k], choice)
            useful &= extra <= room[k]
            charge += prices[k] * extra
            extras.append(extra)
        ratio = np.where(useful, charge / np.where(useful, saving, 1.0), np.inf)
        best = _first_min(ratio)
        flat = best * units + core.columns
        rated = ratio.reshape(-1).take(flat)
        movers = np.flatnonzero(rated < np.inf)
        if not len(movers):
            return None
        order = movers[np.argsort(rated[movers], kind="stable")]
        saved = saving.reshape(-1).take(flat[order])
        # the first few times what covers the excess without skipping: plain floats, one at a time from there
        enough = min(len(order), 4 * (int(np.searchsorted(np.cumsum(saved), over[v])) + 1) + 1024)
        moves = zip(order[:enough].tolist(), saved[:enough].tolist(),
                    *(extra.reshape(-1).take(flat[order[:enough]]).tolist() for extra in extras))
        need, left = float(over[v]), [float(room[k]) for k in others]
        taken = []
        for unit, save, *adds in moves:
            if all(add <= free for add, free in zip(adds, left)):
                taken.append(unit)
                need -= save
                left = [free - add for add, free in zip(adds, left)]
                if need <= 0:
                    break
        if not taken:
            return None
        choice = choice.copy()
        choice[taken] = best[taken]
    return choice if core.fits(choice) else None


def _exchange(core: _Core, choice: Choice, prices: Array, moves: int = 1024) -> Choice | None:
    """A plan that breaks some budgets by little brought within all of them by one switch or two (None if no
    such fix is found): among the ``moves`` switches of least reduced cost at ``prices`` (the units nearest to
    switching), the single switch, or the pair on two units, of least objective increase whose cost changes
    cover every budget's excess. Budgets that pull against each other need the pairs: one unit up, another
    down, where no single switch saves both."""
    units = core.units
    spent = core.spend(choice)
    over = spent - core.caps  # what the switches must save (negative: what they may add)
    score = core.priced(prices)
    flat = choice * units + core.columns
    reduced = score - score.reshape(-1).take(flat)
    reduced.reshape(-1)[flat] = np.inf
    finite = int(np.isfinite(reduced).sum())
    if finite == 0:
        return None
    picked = np.argpartition(reduced.reshape(-1), min(moves, finite) - 1)[:min(moves, finite)]
    picked = picked[np.isfinite(reduced.reshape(-1)[picked])]
    option, unit = np.divmod(picked, units)
    gain = core.objective.reshape(-1)[picked] - core.objective.reshape(-1)[flat[unit]]
    delta = np.stack([rows.reshape(-1)[picked] - rows.reshape(-1)[flat[unit]] for rows in core.cost])  # K x M
    single = np.all(delta <= -over[:, None], axis=0)
    best: tuple[float, list[int]] | None = None
    if single.any():
        i = int(np.argmin(np.where(single, gain, np.inf)))
        best = (float(gain[i]), [i])
    ok = unit[:, None] != unit[None, :]
    for k in range(len(over)):
        ok &= delta[k][:, None] + delta[k][None, :] <= -over[k]
    if ok.any():
        total = np.where(ok, gain[:, None] + gain[None, :], np.inf)
        i, j = divmod(int(np.argmin(total)), len(picked))
        if best is None or total[i, j] < best[0]:
            best = (float(total[i, j]), [i, j])
    if best is None:
        return None
    out = choice.copy()
    out[unit[best[1]]] = option[best[1]]
    return out if core.fits(out) else None


def _feasible(core: _Core, prices: Array, deadline: Deadline) -> Choice | None:
    """The plan at ``prices`` scaled up until no budget breaks (None if none is found)."""
    choice = core.pick(prices)
    if core.fits(choice):
        return choice
    base = np.where(prices > 0, prices, 1e-12 + prices.max(initial=0.0) * 1e-6)
    scale = 2.0
    while not core.fits(core.pick(base * scale)):
        scale *= 2.0
        if scale > 1e30 or deadline.passed():
            return None
    low, high = scale / 2, scale
    for _ in range(40):
        mid = 0.5 * (low + high)
        if core.fits(core.pick(base * mid)):
            high = mid
        else:
            low = mid
    return core.pick(base * high)


def _fill(core: _Core, choice: Choice, passes: int = 6) -> Choice:
    """Spend the budgets' slack on the switches that lower the objective most per (normalised) cost, in rounds:
    each round takes, in order of that ratio, every unit's best switch while the running totals fit."""
    units = core.units
    for _ in range(passes):
        slack = core.caps - core.spend(choice)
        if np.any(slack < 0):
            return choice
        gain = core.at(core.objective, choice) - core.objective  # > 0: the option is better
        useful = gain > 1e-15
        weight = np.zeros_like(gain)
        extras = []
        for k, rows in enumerate(core.cost):
            extra = rows - core.at(rows, choice)
            useful &= extra <= slack[k]
            weight += np.maximum(extra, 0.0) / core.scale[k]
            extras.append(extra)
        if not useful.any():
            return choice
        ratio = np.where(useful, gain / np.maximum(weight, 1e-300), -np.inf)
        best = _first_min(-ratio)
        flat = best * units + core.columns
        movers = np.flatnonzero(useful.reshape(-1).take(flat))
        order = movers[np.argsort(-ratio.reshape(-1).take(flat[movers]), kind="stable")]
        spent = np.cumsum(np.stack([extra.reshape(-1).take(flat[order]) for extra in extras]), axis=1)
        ok = np.all(spent <= slack[:, None], axis=0)
        # the longest prefix whose running totals fit (later ones may have been cheaper: the next pass takes them)
        cut = int(np.argmin(ok)) if not ok.all() else len(ok)
        if cut == 0:
            return choice
        choice = choice.copy()
        choice[order[:cut]] = best[order[:cut]]
    return choice


def _run(core: _Core, tol: float, rounds: int, deadline: Deadline) -> tuple[Choice, float, Array]:
    """The plan (filled), the best bound and its prices."""
    plans, bound, prices = _search(core, rounds, tol, deadline)
    if not plans:
        raise BitplanError("the Lagrangian search found no plan within every budget (the budgets pull against each "
                           "other)", "the ilp solver finds the best plan whenever one exists", field="solver")
    plans.sort(key=core.value)
    choice = min((_fill(core, plan) for plan in plans[:3]), key=core.value)
    return choice, bound, prices


def _caps(budgets: dict[str, float] | Sequence[tuple[str, float]], fixed: dict[str, float]) -> Array:
    items = budgets.items() if isinstance(budgets, dict) else budgets
    return np.array([bound * (1 + 1e-9) + 1e-9 - (0.0 if key == AVG_BITS else fixed.get(key, 0.0)) for key, bound in items])


def _gap(plan: float, bound: float) -> float | None:
    return max(0.0, plan - bound) / max(abs(plan), 1e-12) if np.isfinite(bound) else None


def solve_units(problem: UnitProblem, tol: float = 1e-4, rounds: int = 8, time_limit: float | None = None) -> UnitSolution:
    """The plan for an array problem and its certified gap (``gap``: (plan - bound) / |plan|); status "optimal"
    when the gap is within ``tol``, else "heuristic" (or "time_limit")."""
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    objective, cost, groups = problem.stacked()
    keys = list(problem.budgets)
    core = _Core(objective, cost, np.array([problem.limit(key) for key in keys]), _caps(problem.budgets, problem.fixed_cost))
    if np.any(core.least() > core.caps):
        raise problem.infeasible()
    picked, bound, prices = _run(core, tol, rounds, deadline)
    choice = picked if groups is None else picked[groups]
    value = problem.value(choice)
    gap = _gap(value, bound)
    status = "time_limit" if deadline.hit else ("optimal" if gap is not None and gap <= tol else "heuristic")
    return UnitSolution(choice, None if problem.bits is None else problem.w_bits(choice), value, problem.totals(choice),
                        status, time.perf_counter() - start, gap, bound, dict(zip(keys, prices.tolist())))


Unit = Sequence[Option] | list[dict[str, Option]]


def _problem_core(problem: Problem) -> tuple[_Core, list[Unit]] | None:
    """The arrays of a ``Problem`` and each unit's options (a lone layer's allowed options, or a tie group's mixes:
    one option per member), or None when some tie group has no option (they share no allowed ``Option.tie_key``)."""
    keys = list(problem.budgets)
    groups = problem.groups() if problem.ties else None
    units: list[Unit] = ([problem.allowed(layer) for layer in problem.layers] if groups is None else
                         [problem.allowed(problem.layer(group[0])) if len(group) == 1 else problem.unit_options(group)
                          for group in groups])
    if any(not unit for unit in units):
        return None
    counts = np.fromiter(map(len, units), dtype=np.intp, count=len(units))
    size, width, total = int(counts.sum()), int(counts.max(initial=1)), problem.total_params
    objective = np.empty(size)
    cost = np.empty((len(keys), size))
    if groups is None or len(groups) == len(problem.layers):  # every unit a layer: read option by option at C speed
        flat = list(chain.from_iterable(units))
        objective[:] = np.fromiter(map(attrgetter("objective"), flat), dtype=np.float64, count=size)
        for k, key in enumerate(keys):
            if key == AVG_BITS:
                params = np.fromiter(map(attrgetter("params"), problem.layers), dtype=np.float64, count=len(units))
                bits = np.fromiter(map(attrgetter("w_bits"), flat), dtype=np.float64, count=size)
                cost[k] = np.repeat(params, counts) * bits / total
            else:
                cost[k] = np.fromiter(map(methodcaller("get", key, 0.0), map(attrgetter("cost"), flat)),
                                      dtype=np.float64, count=size)
    else:
        i = 0
        for group, unit in zip(groups, units):
            for choice in (unit if isinstance(unit, list) else [{group[0]: o} for o in unit]):
                objective[i] = sum(o.objective for o in choice.values())
                for k, key in enumerate(keys):
                    cost[k, i] = sum(problem.contribution(key, problem.layer(n), o) for n, o in choice.items())
                i += 1
    unit_of = np.repeat(np.arange(len(units)), counts)
    slot = np.arange(size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.full((width, len(units)), np.inf)
    padded[slot, unit_of] = objective
    costs = np.zeros((len(keys), width, len(units)))
    costs[:, slot, unit_of] = cost
    limits = np.array([problem.limit(key) for key in keys], dtype=np.float64)
    return _Core(padded, costs, limits, _caps(dict(problem.budgets), dict(problem.fixed_cost))), units


def _totals(problem: Problem, chosen: list[Option]) -> dict[str, float]:
    """``problem.totals`` of a plan given as one option per layer (in layer order), without its per-layer calls."""
    total = problem.total_params
    keys = set().union(*map(attrgetter("cost"), chosen)) - {AVG_BITS}
    out = {key: problem.fixed_cost.get(key, 0.0) + sum(map(methodcaller("get", key, 0.0), map(attrgetter("cost"), chosen)))
           for key in keys}
    out[AVG_BITS] = sum(layer.params * option.w_bits / total for layer, option in zip(problem.layers, chosen))
    return dict(sorted(out.items()))


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

    built = _problem_core(problem)
    if built is None:
        check_budgets(problem)  # names the tie group with no common width
        raise AssertionError("unreachable: a unit without options")
    core, units = built
    if np.any(core.least() > core.caps):  # some budget alone cannot hold: say which, and by how much
        raise explain_infeasible(problem)
    picked, bound, _ = _run(core, tol, rounds, deadline)
    choices: dict[str, Option] = {}
    if len(units) == len(problem.layers):
        chosen = [options[j] for options, j in zip(units, picked.tolist())]
        choices = {layer.name: option for layer, option in zip(problem.layers, chosen)}
        totals = _totals(problem, chosen)
    else:
        for group, unit, j in zip(problem.groups(), units, picked.tolist()):
            choices.update(unit[j] if isinstance(unit, list) else {group[0]: unit[j]})
        totals = problem.totals(choices)
    value = sum(o.objective for o in choices.values())
    gap = _gap(value, bound)
    status = "time_limit" if deadline.hit else ("optimal" if gap is not None and gap <= tol else "heuristic")
    return Solution(choices, value, totals, status, time.perf_counter() - start, gap)
