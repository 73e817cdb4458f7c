"""Problems of many small units held as arrays: bits per group of input columns or per output channel.

A Llama-7B-sized layer table at group granularity (SliM-LLM, MixLLM) has 10^5 - 10^6 units; one Python
``Layer`` with ``Option`` objects per unit costs seconds to build and more to read back. ``UnitProblem`` holds
the same thing as arrays (units x options), validated once, and ``solver.lagrange.solve_units`` solves it with
no Python object per unit; ``UnitSolution`` is arrays too.

    problem = UnitProblem(objective,                       # [n, m]: each unit's objective at each option
                          {"avg_weight_bits": 3.3, "size_bytes": 5e7},
                          bits=[2, 3, 4, 8],               # [m] or [n, m]: the options' weight bits
                          params=128,                      # [n] or a number: weights per unit
                          cost={"size_bytes": 16.0 * np.array([2, 3, 4, 8]) + 2})  # [n, m], [m] or [n, 1]
    solution = problem.solve()                             # solution.choice[i]: unit i's option (a column)
    solution.w_bits                                        # [n]: each unit's bits

Budgets mean what they mean in ``Problem``: a cost total (plus ``fixed_cost``) within the budget, or
``avg_weight_bits``, the params-weighted mean of the chosen bits. ``allowed`` ([n, m] booleans) removes options
(a pin, or a unit with fewer options than the widest); ``ties`` ([n] labels) makes units with one label take
the same option column.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from bitplan.errors import BudgetError, InfeasibleError
from solver.problem import AVG_BITS, Layer, NonFiniteError, Option, Problem, fmt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
_T = TypeVar("_T", bound=np.generic)

_SHAPES = "an (n, m) array (units x options), an (m,) vector (per option) or an (n, 1) column (per unit)"


def _read_only(array: npt.NDArray[np.generic]) -> None:
    array.flags.writeable = False


def _numbers(what: str, value: npt.ArrayLike) -> FloatArray:
    try:
        array = np.array(value, dtype=np.float64)  # a copy: the caller's array may change later, this one not
    except (TypeError, ValueError) as exc:
        raise BudgetError(f"{what} is not an array of numbers ({exc})", _SHAPES) from None
    return array


def _broadcast(what: str, array: npt.NDArray[np.generic], shape: tuple[int, int]) -> npt.NDArray[np.generic]:
    try:
        out = np.broadcast_to(array, shape)
    except ValueError:
        raise BudgetError(f"{what}: shape {array.shape} does not fit (units, options) = {shape}", f"give {_SHAPES}") from None
    return out


def _first_bad(bad: BoolArray) -> tuple[int, int]:
    """The first (unit, option) where ``bad`` holds."""
    flat = int(np.argmax(bad.reshape(-1)))
    unit, option = divmod(flat, bad.shape[1])
    return unit, option


class UnitProblem:
    """Units x options as arrays, validated on construction; the arrays are copies, kept read-only.

    ``objective``: [n, m], the objective (e.g. the predicted loss increase) of unit i at option j.
    ``budgets``: key -> bound, as in ``Problem`` (a cost key, or ``avg_weight_bits``).
    ``cost``: key -> costs, [n, m], [m] (the same for every unit) or [n, 1]; keys beyond the budgets are
    reported in the totals. ``bits``: [m] or [n, m] weight bits of each option (needed for
    ``avg_weight_bits`` and ``UnitSolution.w_bits``). ``params``: [n] or a number, weights per unit (the
    average's weights; default 1). ``allowed``: [n, m] booleans, the options a unit may take (default all;
    objective and costs of the others are ignored, so they may be NaN). ``ties``: [n] integer labels; units
    that share one take the same option column. ``fixed_cost``: key -> a part outside the units.
    """

    def __init__(self, objective: npt.ArrayLike, budgets: Mapping[str, float], *,
                 cost: Mapping[str, npt.ArrayLike] | None = None, bits: npt.ArrayLike | None = None,
                 params: npt.ArrayLike | float | None = None, allowed: npt.ArrayLike | None = None,
                 ties: npt.ArrayLike | None = None, fixed_cost: Mapping[str, float] | None = None) -> None:
        obj = _numbers("objective", objective)
        if obj.ndim != 2 or obj.shape[0] < 1 or obj.shape[1] < 1:
            raise BudgetError(f"objective must be a 2-D array (units x options) with at least one of each, got shape "
                              f"{obj.shape}", "one row per unit, one column per option")
        shape: tuple[int, int] = (int(obj.shape[0]), int(obj.shape[1]))
        n, m = shape
        mask: BoolArray | None = None
        if allowed is not None:
            raw = np.array(allowed)
            if raw.dtype != np.bool_:
                raise BudgetError(f"allowed must be booleans, got {raw.dtype}", "True where a unit may take the option")
            mask = _broadcast("allowed", raw, shape).view()  # type: ignore[assignment]
            assert mask is not None
            empty = ~mask.any(axis=1)
            if empty.any():
                raise BudgetError(f"unit {int(np.argmax(empty))} has no allowed option",
                                  "allowed must leave every unit at least one option")
            _read_only(mask)
        self.objective: FloatArray = obj
        self.allowed: BoolArray | None = mask
        self._refuse_nonfinite(self.objective, "objective",
                               "the sensitivity scores contain NaN or infinity; mark options a unit lacks with allowed")
        _read_only(self.objective)

        self.cost: dict[str, FloatArray] = {}
        for key, value in (cost or {}).items():
            key = str(key)
            if key == AVG_BITS:
                raise BudgetError(f"'{AVG_BITS}' is no cost of its own", "it comes from bits and params; give bits")
            array = _broadcast(f"cost {key}", _numbers(f"cost {key}", value), shape).view()
            self._refuse_nonfinite(array, f"cost {key}", "costs must be finite numbers; check the layer sizes")  # type: ignore[arg-type]
            _read_only(array)
            self.cost[key] = array  # type: ignore[assignment]

        self.bits: IntArray | None = None
        if bits is not None:
            raw_bits = _numbers("bits", bits)
            if not np.all(np.isfinite(raw_bits)) or np.any(raw_bits != np.round(raw_bits)) or np.any(raw_bits < 0):
                raise BudgetError("bits must be whole numbers >= 0", "the weight bits of each option, e.g. [2, 3, 4, 8]")
            whole = _broadcast("bits", raw_bits.astype(np.int64), shape).view()
            _read_only(whole)
            self.bits = whole  # type: ignore[assignment]

        weights = _numbers("params", 1.0 if params is None else params)
        if weights.ndim > 1 or (weights.ndim == 1 and weights.shape[0] != n):
            raise BudgetError(f"params: shape {weights.shape} is not (units,) = ({n},)", "one count per unit, or one number")
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise BudgetError("params must be finite numbers > 0", "the number of weights in each unit")
        self.params: FloatArray = np.broadcast_to(weights, (n,))
        self.total_params = float(self.params.sum())

        self.ties: IntArray | None = None
        if ties is not None:
            labels = np.asarray(ties)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise BudgetError(f"ties must be ({n},) integer labels, got shape {labels.shape} of {labels.dtype}",
                                  "units with the same label take the same option")
            self.ties = labels.astype(np.int64)
            _read_only(self.ties)

        self.budgets: dict[str, float] = {}
        self.fixed_cost: dict[str, float] = {}
        for what, given, into in (("budget", budgets, self.budgets), ("fixed cost", fixed_cost or {}, self.fixed_cost)):
            for key, bound in given.items():
                try:
                    number = float(bound)
                except (TypeError, ValueError):
                    raise BudgetError(f"{what} {key} is {bound!r}", f"a {what} must be a finite number") from None
                if not np.isfinite(number):
                    raise BudgetError(f"{what} {key} is {number!r}", f"a {what} must be a finite number")
                into[str(key)] = number
        for key in self.budgets:
            if key == AVG_BITS and self.bits is None:
                raise BudgetError(f"budget {AVG_BITS} needs the options' bits", "pass bits=[...] (one per option)")
            if key != AVG_BITS and key not in self.cost:
                raise BudgetError(f"budget '{key}' has no cost in this problem",
                                  "costs present: " + ", ".join(sorted({*self.cost, AVG_BITS})))

    def _refuse_nonfinite(self, array: FloatArray, what: str, hint: str) -> None:
        bad = ~np.isfinite(array)
        if self.allowed is not None:
            bad &= self.allowed
        if bad.any():
            unit, option = _first_bad(bad)
            raise NonFiniteError(f"unit {unit}, option {option}: {what} is {float(array[unit, option])!r}", hint)

    # --- what a plan spends --------------------------------------------------------------------------------------

    @property
    def units(self) -> int:
        return int(self.objective.shape[0])

    @property
    def options(self) -> int:
        return int(self.objective.shape[1])

    def limit(self, key: str) -> float:
        """What the units together may spend of budget ``key`` (the budget less the fixed part)."""
        return self.budgets[key] - (0.0 if key == AVG_BITS else self.fixed_cost.get(key, 0.0))

    def costs(self, key: str) -> FloatArray:
        """[n, m]: what each option adds to ``key`` (``avg_weight_bits``: params x bits / total params)."""
        if key == AVG_BITS:
            if self.bits is None:
                raise BudgetError(f"{AVG_BITS} needs the options' bits")
            return self.params[:, None] * self.bits / self.total_params
        return self.cost[key]

    def _check_choice(self, choice: npt.ArrayLike) -> npt.NDArray[np.intp]:
        picked = np.asarray(choice)
        if picked.shape != (self.units,) or not np.issubdtype(picked.dtype, np.integer):
            raise BudgetError(f"a choice is ({self.units},) option indices, got shape {picked.shape} of {picked.dtype}")
        if picked.size and (picked.min() < 0 or picked.max() >= self.options):
            raise BudgetError(f"a choice's option indices lie in 0..{self.options - 1}")
        return picked.astype(np.intp, copy=False)

    def _at(self, array: npt.NDArray[_T], choice: npt.NDArray[np.intp]) -> npt.NDArray[_T]:
        return array[np.arange(self.units), choice]

    def value(self, choice: npt.ArrayLike) -> float:
        """The plan's objective (the sum over units)."""
        return float(self._at(self.objective, self._check_choice(choice)).sum())

    def totals(self, choice: npt.ArrayLike) -> dict[str, float]:
        """Every cost's total (fixed part included), and ``avg_weight_bits`` when the bits are known."""
        picked = self._check_choice(choice)
        out = {key: self.fixed_cost.get(key, 0.0) + float(self._at(array, picked).sum()) for key, array in self.cost.items()}
        if self.bits is not None:
            out[AVG_BITS] = float(np.dot(self.params, self._at(self.bits, picked))) / self.total_params
        return dict(sorted(out.items()))

    def feasible(self, choice: npt.ArrayLike, tol: float = 1e-9) -> bool:
        """Every budget holds (with ``Problem.feasible``'s slack), every unit takes an allowed option, and tied
        units take one column."""
        picked = self._check_choice(choice)
        if self.allowed is not None and not self._at(self.allowed, picked).all():
            return False
        if self.ties is not None:
            _, first, inverse = np.unique(self.ties, return_index=True, return_inverse=True)
            if np.any(picked != picked[first][inverse]):
                return False
        totals = self.totals(picked)
        return all(totals[key] <= bound * (1 + tol) + tol for key, bound in self.budgets.items())

    def w_bits(self, choice: npt.ArrayLike) -> IntArray:
        """[n]: each unit's weight bits under the plan."""
        if self.bits is None:
            raise BudgetError("this problem has no bits", "pass bits=[...] (one per option)")
        return self._at(self.bits, self._check_choice(choice))

    # --- for the solver ------------------------------------------------------------------------------------------

    def stacked(self) -> tuple[FloatArray, FloatArray, npt.NDArray[np.intp] | None]:
        """What the solver works on, option-major and contiguous: the objective [m, g] (+inf where an option is
        not allowed), each budget's costs [k, m, g] (budgets in order, 0 where not allowed), and for tied units the
        map unit -> group (None without ties: g = n). A tie group's row is the sum of its units' rows."""
        keys = list(self.budgets)
        m = self.options
        objective = np.ascontiguousarray(self.objective.T, dtype=np.float64)
        cost = np.empty((len(keys), m, self.units))
        for k, key in enumerate(keys):
            cost[k] = self.costs(key).T
        allowed = None if self.allowed is None else np.ascontiguousarray(self.allowed.T)
        inverse: npt.NDArray[np.intp] | None = None
        if self.ties is not None:
            labels: npt.NDArray[np.intp] = np.unique(self.ties, return_inverse=True)[1]
            inverse = labels
            groups = int(labels.max()) + 1
            if groups < self.units:

                def merge(rows: FloatArray) -> FloatArray:
                    return np.stack([np.bincount(labels, weights=row, minlength=groups).astype(np.float64) for row in rows])

                if allowed is not None:  # NaN where not allowed must not reach the sums
                    objective = np.where(allowed, objective, 0.0)
                    cost = np.where(allowed[None], cost, 0.0)
                    blocked = merge((~allowed).astype(np.float64))
                    allowed = blocked == 0
                    if not allowed.any(axis=0).all():
                        group = int(np.argmin(allowed.any(axis=0)))
                        members = np.flatnonzero(inverse == group)
                        listed = ", ".join(str(u) for u in members[:10]) + (", ..." if len(members) > 10 else "")
                        raise InfeasibleError(f"tied units {listed} share no allowed option",
                                              "untie them, or allow an option they all have")
                objective = merge(objective)
                cost = np.stack([merge(rows) for rows in cost]) if keys else np.empty((0, m, groups))
            else:
                inverse = None
        if allowed is not None:
            objective = np.where(allowed, objective, np.inf)
            cost = np.where(allowed[None], cost, 0.0)
        return objective, cost, inverse

    def minimums(self) -> dict[str, float]:
        """Each budget's smallest achievable value (allowed options and ties honoured, the other budgets not)."""
        objective, cost, _ = self.stacked()
        least = np.where(np.isfinite(objective)[None], cost, np.inf).min(axis=1).sum(axis=1)
        return {key: float(least[k]) + (0.0 if key == AVG_BITS else self.fixed_cost.get(key, 0.0))
                for k, key in enumerate(self.budgets)}

    def infeasible(self) -> InfeasibleError:
        """The error for budgets no plan meets: the first budget that cannot hold alone and its smallest value,
        else the budgets that cannot hold together."""
        minimums = self.minimums()
        for key, bound in self.budgets.items():
            if minimums[key] > bound * (1 + 1e-9) + 1e-9:
                return InfeasibleError(f"budget {key}={fmt(bound)} is infeasible: the smallest achievable {key} is "
                                       f"{fmt(minimums[key])}", f"raise it to at least {fmt(minimums[key])}", minimums)
        listing = ", ".join(f"{k} >= {fmt(v)}" for k, v in minimums.items())
        return InfeasibleError("the budgets cannot all hold at once, although each alone can (" + listing + ")",
                               "relax one of them", minimums)

    def solve(self, tol: float = 1e-4, rounds: int = 8, time_limit: float | None = None) -> UnitSolution:
        """``solver.lagrange.solve_units(self, ...)``."""
        from solver.lagrange import solve_units

        return solve_units(self, tol=tol, rounds=rounds, time_limit=time_limit)

    # --- to and from Problem (small problems: tests, the ILP) --------------------------------------------------

    def to_problem(self, names: Sequence[str] | None = None) -> Problem:
        """The same problem as ``Layer``/``Option`` objects (one layer per unit, its allowed options in column
        order), for the ILP and the tests. Needs whole params and, with ties, options whose bits tell the columns
        apart (``Problem`` ties layers by ``Option.tie_key``; these options are all INT at 16-bit activations)."""
        if self.bits is None:
            raise BudgetError("to_problem needs the options' bits")
        if np.any(self.params != np.round(self.params)):
            raise BudgetError("to_problem needs whole params (Layer.params is a count)")
        names = [f"u{i}" for i in range(self.units)] if names is None else list(names)
        if len(names) != self.units:
            raise BudgetError(f"to_problem: {len(names)} names for {self.units} units")
        allowed = np.ones(self.objective.shape, dtype=bool) if self.allowed is None else self.allowed
        keys = list(self.cost)
        # plain lists first (indexing numpy arrays one element at a time is slow), and no cyclic garbage collection
        # while millions of acyclic objects are made (it would scan them over and over: 2-3x the time)
        table = zip(self.objective.tolist(), self.bits.tolist(), allowed.tolist(), *(self.cost[k].tolist() for k in keys))
        layers = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            for name, params, (objective, bits, mask, *costs) in zip(names, self.params.astype(np.int64).tolist(), table):
                options = tuple(Option(w_bits=bits[j], objective=objective[j], cost={k: c[j] for k, c in zip(keys, costs)})
                                for j in range(len(mask)) if mask[j])
                layers.append(Layer(name, params, options))
        finally:
            if collecting:
                gc.enable()
        ties: tuple[tuple[str, ...], ...] = ()
        if self.ties is not None:
            _, inverse = np.unique(self.ties, return_inverse=True)
            groups: dict[int, list[int]] = {}
            for i, g in enumerate(inverse.tolist()):
                groups.setdefault(g, []).append(i)
            for members in groups.values():
                if len(members) < 2:
                    continue
                rows = self.bits[members]
                columns = allowed[members].any(axis=0)
                same = np.all(rows[:, columns] == rows[0, columns])
                distinct = len(set(rows[0, columns].tolist())) == int(columns.sum())
                if not (same and distinct):
                    raise BudgetError(f"to_problem: tied units {members[:10]} do not tell their options apart by bits")
                ties += (tuple(names[i] for i in members),)
        return Problem(tuple(layers), dict(self.budgets), fixed_cost=dict(self.fixed_cost), ties=ties)


@dataclass(frozen=True)
class UnitSolution:
    """A plan for a ``UnitProblem``: ``choice[i]`` is unit i's option (a column), ``w_bits`` its bits (None
    without bits); ``cost`` the totals as in ``Solution.cost``; ``gap`` (plan - bound) / |plan|, certified;
    ``bound`` the Lagrangian lower bound; ``prices`` the multipliers of the budgets at the end."""

    choice: npt.NDArray[np.intp]
    w_bits: IntArray | None
    objective: float
    cost: dict[str, float]
    status: str
    seconds: float
    gap: float | None
    bound: float | None = None
    prices: dict[str, float] = field(default_factory=dict)

