"""Integer linear program for the plan (HAWQ-V3's formulation), solved with PuLP + CBC or HiGHS.

    minimise   sum_{l,o} Omega[l,o] * x[l,o]
    subject to sum_o x[l,o] = 1                            for every layer l
               fixed_k + sum_{l,o} cost_k[l,o] x[l,o] <= B_k   for every budget k
               x[l,o] = 0                                   for options a pin excludes
               sum_{o: k(o)=k} x[a,o] = sum_{o: k(o)=k} x[b,o]  for tied layers a, b and each
                                                  k = (width, format, activation width): ``Option.tie_key``

Before the model is built, two reductions drop options no optimal plan needs:
  * dominance: an option whose objective and every budgeted cost another option of the layer
    matches or beats (``Problem.candidates``);
  * reduced-cost fixing: with multipliers lambda >= 0 on the budgets (from the LP relaxation),
    every plan x has  Omega(x) >= D(lambda) + sum_l rc[l, x_l]  where
    rc[l,o] = Omega[l,o] + lambda.cost[l,o] - min_o'(Omega[l,o'] + lambda.cost[l,o']) >= 0 and
    D(lambda) = sum_l min_o(...) - lambda.B  is the Lagrangian bound. So once a plan worth U is
    known (the greedy one), an option with rc > U - D is in no plan better than U and goes.
    Layers left with one option become constants, and the solver sees a much smaller model.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import pulp

from bitplan.errors import BitplanError, InfeasibleError
from solver.problem import Deadline, Option, Problem, Solution, fmt, objective_of

if TYPE_CHECKING:
    import highspy

#: Objective coefficients are rescaled so the largest is this, keeping the solvers' tolerances meaningful.
_OBJECTIVE_SCALE = 1e6
#: Relative optimality gap the backends must close before they call a plan optimal.
_GAP_REL = 1e-9
BACKENDS = ("cbc", "highs")


def explain_infeasible(problem: Problem) -> InfeasibleError:
    """Say which budget cannot hold and the smallest value it could take."""
    minimums = {key: problem.minimum(key) for key in problem.budgets}
    for key, limit in problem.budgets.items():
        if minimums[key] > limit * (1 + 1e-9) + 1e-9:
            unpinned = problem.minimum(key, use_pins=False)
            hint = f"raise it to at least {fmt(minimums[key])}"
            if problem.pins and unpinned <= limit:
                hint += f", or drop pins (without pins the smallest is {fmt(unpinned)})"
            return InfeasibleError(
                f"budget {key}={fmt(limit)} is infeasible: the smallest achievable {key} is {fmt(minimums[key])}",
                hint,
                minimums,
            )
    listing = ", ".join(f"{k} >= {fmt(v)}" for k, v in minimums.items())
    return InfeasibleError(
        "the budgets cannot all hold at once, although each alone can (" + listing + ")",
        "relax one of them",
        minimums,
    )


def check_budgets(problem: Problem) -> None:
    """Raise InfeasibleError when tied layers share no width, or some budget alone is below its
    smallest achievable value."""
    for group in problem.groups():
        if not set.intersection(*({o.tie_key for o in problem.allowed(problem.layer(n))} for n in group)):
            raise InfeasibleError(f"tied layers {', '.join(group)} share no allowed width, format and activation width",
                                  "untie them, or offer them a width and format they all take")
    for key, limit in problem.budgets.items():
        if problem.minimum(key) > limit * (1 + 1e-9) + 1e-9:
            raise explain_infeasible(problem)


def solve_ilp(
    problem: Problem,
    time_limit: float | None = None,
    msg: bool = False,
    backend: str = "cbc",
    reduce: bool = True,
) -> Solution:
    """Optimal plan; with ``time_limit`` (seconds) the best plan found, status "time_limit", and its gap.

    The limit covers the whole call: the greedy incumbent, the LP relaxation behind the reduced-cost
    fixing (HiGHS's own time limit) and the MIP (CBC's or HiGHS's), which gets what is left (at least
    half a second, so a plan is found). ``msg`` prints the MIP solver's log (Python callers only).
    With ``problem.max_objective`` set, the plan minimises ``problem.minimize`` instead, subject to the
    predicted loss increase (the summed objective) staying within that bound.
    """
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    if backend not in BACKENDS:
        raise BitplanError(f"unknown ilp backend '{backend}'", "valid backends: " + ", ".join(BACKENDS))
    if problem.max_objective is not None:
        swapped, back = problem.swapped()
        inner = solve_ilp(swapped, time_limit, msg, backend, reduce)
        choices = {name: back[id(o)] for name, o in inner.choices.items()}
        return Solution(choices=choices, objective=objective_of(choices), cost=problem.totals(choices),
                        status=inner.status, seconds=time.perf_counter() - start, gap=inner.gap)
    check_budgets(problem)
    options = {layer.name: problem.candidates(layer) for layer in problem.layers}
    incumbent, bound = None, None
    if reduce:
        from solver.greedy import greedy_choices

        incumbent = greedy_choices(problem, deadline=deadline)
        if incumbent is not None and not deadline.passed():
            options, bound = reduced_options(problem, options, objective_of(incumbent), time_limit=deadline.left())

    left = deadline.left()
    model = _Model(problem, options)
    found = model.solve(backend, None if left is None else max(0.5, left), msg, incumbent)
    if found is None:
        if model.infeasible:
            raise explain_infeasible(problem)
        if incumbent is None:
            raise InfeasibleError(f"{backend} found no plan within the time limit", "raise time_limit or relax the budgets")
        found = (incumbent, False, None)
    choices, proven, solver_bound = found
    if not proven and incumbent is not None and objective_of(incumbent) < objective_of(choices):
        choices = incumbent  # stopped before it beat the greedy plan
    objective = objective_of(choices)
    bounds = [b for b in (bound, solver_bound) if b is not None]
    gap = 0.0 if proven else (max(0.0, objective - max(bounds)) / max(abs(objective), 1e-300) if bounds else None)
    return Solution(
        choices=choices,
        objective=objective,
        cost=problem.totals(choices),
        status="optimal" if proven else "time_limit",
        seconds=time.perf_counter() - start,
        gap=gap,
    )


def lagrangian_multipliers(problem: Problem, options: Mapping[str, tuple[Option, ...]],
                           time_limit: float | None = None) -> dict[str, float]:
    """Budget multipliers lambda >= 0 from the LP relaxation (HiGHS, stopped at ``time_limit`` seconds);
    any lambda >= 0 gives a valid bound, so an LP stopped early still gives a usable (weaker) one."""
    import numpy as np

    keys = list(problem.budgets)
    if not keys:
        return {}
    highs = _new_highs()
    if time_limit is not None:
        highs.setOptionValue("time_limit", float(max(time_limit, 0.01)))
    objs: list[float] = []
    layer_rows: list[tuple[int, int]] = []
    cols = 0
    contrib: dict[str, list[float]] = {k: [] for k in keys}
    for layer in problem.layers:
        opts = options[layer.name]
        layer_rows.append((cols, len(opts)))
        for o in opts:
            objs.append(o.objective)
            for k in keys:
                contrib[k].append(problem.contribution(k, layer, o))
        cols += len(opts)
    scale = _scale(objs)
    inf = highspy_inf()
    highs.addVars(cols, np.zeros(cols), np.ones(cols))
    highs.changeColsCost(cols, np.arange(cols, dtype=np.int32), np.asarray(objs) * scale)
    starts = np.array([s for s, _ in layer_rows], dtype=np.int32)
    highs.addRows(len(layer_rows), np.ones(len(layer_rows)), np.ones(len(layer_rows)), cols,
                  starts, np.arange(cols, dtype=np.int32), np.ones(cols))
    for k in keys:
        highs.addRow(-inf, problem.limit(k), cols, np.arange(cols, dtype=np.int32), np.asarray(contrib[k]))
    highs.run()
    duals = list(highs.getSolution().row_dual)[len(layer_rows):]
    return {k: max(0.0, -d) / scale if math.isfinite(d) else 0.0 for k, d in zip(keys, duals)}


def reduced_options(
    problem: Problem, options: Mapping[str, tuple[Option, ...]], upper: float, time_limit: float | None = None
) -> tuple[dict[str, tuple[Option, ...]], float]:
    """Keep only options that can appear in a plan with objective <= ``upper``; also return the bound D(lambda)."""
    try:
        lam = lagrangian_multipliers(problem, options, time_limit)
    except ImportError:  # without highspy, lambda = 0 still gives a (weak) valid bound
        lam = {k: 0.0 for k in problem.budgets}
    priced = []
    bound = -sum(lam[k] * problem.limit(k) for k in lam)
    for layer in problem.layers:
        values = [o.objective + sum(lam[k] * problem.contribution(k, layer, o) for k in lam) for o in options[layer.name]]
        least = min(values)
        bound += least
        priced.append([v - least for v in values])
    slack = upper - bound
    tol = 1e-9 * (abs(upper) + abs(bound) + 1.0) + 1e-6 * max(slack, 0.0)
    kept = {
        layer.name: tuple(o for o, rc in zip(options[layer.name], rcs) if rc <= slack + tol)
        for layer, rcs in zip(problem.layers, priced)
    }
    return kept, bound


class _Model:
    """The PuLP model over the options left; single-option layers are folded into constants."""

    def __init__(self, problem: Problem, options: Mapping[str, tuple[Option, ...]]) -> None:
        self.problem = problem
        self.options = options
        self.infeasible = False
        self.constant = 0.0
        self.scale = _scale([o.objective for opts in options.values() for o in opts])
        self.prob = prob = pulp.LpProblem("bitplan", pulp.LpMinimize)
        self.x: dict[str, list[pulp.LpVariable]] = {}
        objective: list[tuple[pulp.LpVariable, float]] = []
        spent: dict[str, list[tuple[pulp.LpVariable, float]]] = {k: [] for k in problem.budgets}
        fixed_spend = dict.fromkeys(problem.budgets, 0.0)
        for li, layer in enumerate(problem.layers):
            opts = options[layer.name]
            if len(opts) == 1:
                self.constant += opts[0].objective
                for k in problem.budgets:
                    fixed_spend[k] += problem.contribution(k, layer, opts[0])
                continue
            index = {id(o): oi for oi, o in enumerate(layer.options)}
            xs = [prob.add_variable(f"x_{li}_{index[id(o)]}", cat=pulp.LpBinary) for o in opts]
            self.x[layer.name] = xs
            prob.addConstraint(pulp.LpAffineExpression([(v, 1.0) for v in xs]) == 1, f"one_{li}")
            objective.extend((v, o.objective * self.scale) for v, o in zip(xs, opts))
            for k in problem.budgets:
                spent[k].extend((v, problem.contribution(k, layer, o)) for v, o in zip(xs, opts))
        prob.setObjective(pulp.LpAffineExpression(objective))
        for k in problem.budgets:
            prob.addConstraint(pulp.LpAffineExpression(spent[k]) <= problem.limit(k) - fixed_spend[k],
                               _name(f"budget_{k}"))
        self._ties()

    def _ties(self) -> None:
        for gi, group in enumerate(g for g in self.problem.groups() if len(g) > 1):
            keys = sorted({o.tie_key for n in group for o in self.options[n]})
            for a, b in zip(group, group[1:]):
                for key in keys:
                    sides = [self._width(n, key) for n in (a, b)]
                    if all(isinstance(s, float) for s in sides):
                        self.infeasible |= sides[0] != sides[1]
                        continue
                    self.prob.addConstraint(sides[0] == sides[1], _name(f"tie_{gi}_{a}_{b}_" + "_".join(map(str, key))))

    def _width(self, name: str, key: tuple[int, str, int]) -> float | pulp.LpAffineExpression:
        """1 when layer ``name`` takes ``key`` (``Option.tie_key``; an expression, or a constant 0.0/1.0)."""
        opts = self.options[name]
        if name not in self.x:
            return float(opts[0].tie_key == key)
        return pulp.LpAffineExpression([(v, 1.0) for v, o in zip(self.x[name], opts) if o.tie_key == key])

    def solve(self, backend: str, time_limit: float | None, msg: bool,
              start: Mapping[str, Option] | None) -> tuple[dict[str, Option], bool, float | None] | None:
        """(choices, proven optimal, lower bound or None), or None when no plan was found."""
        if self.infeasible:
            return None
        if not self.x:  # every layer down to one option: the plan is settled
            choices = self._choices()
            self.infeasible = not self.problem.feasible(choices)
            return None if self.infeasible else (choices, True, None)
        with warnings.catch_warnings():  # PuLP 3 warns that its bundled CBC leaves in 4.0; we pin <4
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                solver_bound = (self._solve_cbc(time_limit, msg, start) if backend == "cbc"
                                else self._solve_highs(time_limit, msg))
            except pulp.PulpSolverError:
                if backend != "cbc":
                    raise
                # CBC 2.10.3 with preprocessing off segfaults writing the solution file when its bound
                # tightening proves the model infeasible (test_solvers_family found one); ask HiGHS.
                solver_bound = self._solve_highs(time_limit, msg)
        if pulp.LpStatus[self.prob.status] == "Infeasible":
            self.infeasible = True
            return None
        if self.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return None
        choices = self._choices()
        if not self.problem.feasible(choices):
            return None
        proven = self.prob.sol_status == pulp.LpSolutionOptimal
        bound = None if solver_bound is None else solver_bound / self.scale + self.constant
        return choices, proven, bound

    def _solve_cbc(self, time_limit: float | None, msg: bool, start: Mapping[str, Option] | None) -> float | None:
        # The bundled CBC 2.10.3's preprocessing can return a suboptimal plan marked "optimal" on
        # these knapsack-like problems (tests/unit/test_solver.py found one); it stays off.
        # The known plan (greedy) is CBC's MIP start.
        warm = start is not None
        if start is not None:
            for name, xs in self.x.items():
                for v, o in zip(xs, self.options[name]):
                    v.setInitialValue(1.0 if o is start[name] else 0.0)
        fd, log = tempfile.mkstemp(suffix=".log", prefix="bitplan_cbc_")
        os.close(fd)
        try:
            self.prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=_GAP_REL, warmStart=warm,
                                              options=["preprocess off"], logPath=log))
            text = open(log, errors="replace").read()
        finally:
            os.unlink(log)
        if msg:
            print(text)
        found = re.search(r"^Lower bound:\s*(-?[\d.eE+-]+)", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def _solve_highs(self, time_limit: float | None, msg: bool) -> float | None:
        # No MIP start: HiGHS 1.16 handed the greedy start back as "optimal" on a 5-layer problem
        # whose optimum is 13% lower (tests/unit/test_solvers_family.py, seed 9397).
        solver = _HiGHS(msg=msg, timeLimit=time_limit, gapRel=_GAP_REL)
        self.prob.solve(solver)
        info = self.prob.solverModel.getInfo()
        bound: float = info.mip_dual_bound
        return bound if bound > -1e300 else None

    def _choices(self) -> dict[str, Option]:
        choices: dict[str, Option] = {}
        for layer in self.problem.layers:
            opts = self.options[layer.name]
            xs = self.x.get(layer.name)
            choices[layer.name] = opts[0] if xs is None else opts[max(range(len(xs)), key=lambda i: xs[i].value() or 0)]
        return choices


class _HiGHS(pulp.HiGHS):  # type: ignore[misc]  # pulp ships no type information: its classes are Any
    """PuLP's HiGHS, built silent (``output_flag`` off)."""

    def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:
        _new_highs()
        super().createAndConfigureSolver(lp)


def _new_highs() -> highspy.Highs:
    """A highspy.Highs with its log off. The library prints a banner on stdout the first time a process
    constructs one; entry points that own stdout call :func:`silence_banner` first, at a moment when no other
    thread writes (this function never touches file descriptors: it may run inside a threaded server)."""
    import highspy

    highs = highspy.Highs()  # type: ignore[no-untyped-call]  # highspy: Highs.__init__ is unannotated
    highs.setOptionValue("output_flag", False)
    return highs


def silence_banner() -> None:
    """Have HiGHS print its once-per-process banner into /dev/null.

    It swaps file descriptor 1 for a moment, so call it only where nothing else can write to stdout: a
    command-line entry point before it starts work, or the sandbox's zygote before it forks children."""
    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()  # type: ignore[no-untyped-call]  # highspy: Highs.__init__ is unannotated
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def highspy_inf() -> float:
    import highspy

    return highspy.kHighsInf




def _scale(objectives: Iterable[float]) -> float:
    largest = max((abs(v) for v in objectives), default=0.0)
    return _OBJECTIVE_SCALE / largest if largest > 0 else 1.0


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)




__all__ = ["BACKENDS", "check_budgets", "explain_infeasible", "reduced_options", "solve_ilp"]
