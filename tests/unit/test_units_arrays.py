"""Array-native unit problems (solver.units.UnitProblem) and the Lagrangian solver on them: against brute force
and the ILP, against the Problem path, and refusing bad arrays."""

import random
from functools import cache
from itertools import product

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError, BudgetError, InfeasibleError
from solver import get_solver
from solver.lagrange import solve_lagrange, solve_units
from solver.problem import NonFiniteError
from solver.units import UnitProblem, UnitSolution
from tests.problems import group_units_arrays, group_units_opposed

WIDTHS = (2, 3, 4, 6, 8)
seeds = st.integers(0, 2**31)
examples = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def random_units(seed: int, ties: bool = True) -> UnitProblem:
    """Up to 6 units x up to 4 options: objectives on a coarse grid (ties happen), some options not allowed (NaN
    there), one to three budgets among avg_weight_bits, size_bytes and bops, sometimes a tie group."""
    rnd = random.Random(seed)
    n, m = rnd.randint(1, 6), rnd.randint(1, 4)
    bits = np.array([sorted(rnd.sample(WIDTHS, m)) for _ in range(n)]) if rnd.random() < 0.5 else np.array(
        sorted(rnd.sample(WIDTHS, m)))
    full = np.broadcast_to(bits, (n, m))
    params = np.array([rnd.randint(1, 64) for _ in range(n)])
    sens = np.array([rnd.randint(1, 5) for _ in range(n)])
    objective = sens[:, None] * (np.array([[rnd.randint(0, 4) for _ in range(m)] for _ in range(n)]) + 8 - full)
    size = params[:, None] * full / 8 + 2
    bops = np.array([[rnd.randint(1, 16) * w * rnd.choice((8, 16)) for w in row] for row in full], dtype=float)
    allowed = np.array([[rnd.random() < 0.8 for _ in range(m)] for _ in range(n)])
    allowed[np.arange(n), [rnd.randrange(m) for _ in range(n)]] = True
    objective = np.where(allowed, objective.astype(float), np.nan)  # NaN where not allowed is fine
    labels = None
    if ties and n >= 2 and rnd.random() < 0.4:
        labels = np.arange(n)
        members = rnd.sample(range(n), rnd.randint(2, min(3, n)))
        labels[members] = members[0]
    free = UnitProblem(objective, {}, cost={"size_bytes": size, "bops": bops}, bits=bits, params=params,
                       allowed=allowed, ties=labels, fixed_cost={"size_bytes": 10.0})
    budgets = {}
    for key in rnd.sample(("avg_weight_bits", "size_bytes", "bops"), rnd.randint(1, 3)):
        costs = np.where(allowed, free.costs(key), np.nan)
        fixed = free.fixed_cost.get(key, 0.0)
        low, high = np.nanmin(costs, axis=1).sum() + fixed, np.nanmax(costs, axis=1).sum() + fixed
        budgets[key] = float(low + rnd.uniform(-0.05, 1.0) * (high - low))
    return UnitProblem(objective, budgets, cost={"size_bytes": size, "bops": bops}, bits=bits, params=params,
                       allowed=allowed, ties=labels, fixed_cost={"size_bytes": 10.0})


def brute_force(problem: UnitProblem) -> float | None:
    """The optimum over every plan (None: no plan meets the budgets)."""
    plans = np.array(list(product(range(problem.options), repeat=problem.units)))
    rows = np.arange(problem.units)
    ok = np.ones(len(plans), dtype=bool)
    if problem.allowed is not None:
        ok &= problem.allowed[rows, plans].all(axis=1)
    if problem.ties is not None:
        for label in np.unique(problem.ties):
            members = np.flatnonzero(problem.ties == label)
            ok &= (plans[:, members] == plans[:, members[:1]]).all(axis=1)
    for key, bound in problem.budgets.items():
        total = np.where(ok[:, None], problem.costs(key)[rows, plans], 0.0).sum(axis=1)
        ok &= total + problem.fixed_cost.get(key, 0.0) * (key != "avg_weight_bits") <= bound * (1 + 1e-9) + 1e-9
    if not ok.any():
        return None
    return float(np.where(ok[:, None], problem.objective[rows, plans], 0.0).sum(axis=1)[ok].min())


def encloses(solution: UnitSolution, best: float) -> bool:
    """plan >= optimum >= the certified bound (plan - gap |plan|), and the solution's bound is that bound."""
    bound = solution.objective - solution.gap * max(abs(solution.objective), 1e-12)
    slack = 1e-6 * max(1.0, abs(best))
    return solution.objective >= best - 1e-9 and bound <= best + slack and solution.bound <= best + slack


# --- against brute force and the ILP ----------------------------------------------------------------------------


@examples
@given(seed=seeds)
def test_plan_and_certified_bound_enclose_the_brute_force_optimum(seed):
    problem = random_units(seed)
    best = brute_force(problem)
    if best is None:
        with pytest.raises(BitplanError):
            solve_units(problem)
        return
    try:
        solution = solve_units(problem)
    except InfeasibleError:
        raise
    except BitplanError:
        assert len(problem.budgets) > 1  # several budgets can defeat the price search; the ilp then decides
        return
    assert problem.feasible(solution.choice)
    assert encloses(solution, best), (solution.objective, solution.gap, best)
    assert solution.objective == pytest.approx(problem.value(solution.choice))
    assert (solution.status == "optimal") == (solution.gap <= 1e-4)
    assert np.array_equal(solution.w_bits, problem.w_bits(solution.choice))


def test_one_budget_always_finds_a_plan_when_one_exists():
    found = 0
    for seed in range(400):
        problem = random_units(seed)
        if len(problem.budgets) == 1 and brute_force(problem) is not None:
            assert problem.feasible(solve_units(problem).choice)
            found += 1
    assert found > 50


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds)
def test_array_and_problem_paths_agree(seed):
    """Without ties the Problem path builds the same arrays: the same plan, objective and gap."""
    units = random_units(seed, ties=False)
    problem = units.to_problem()
    try:
        expected = solve_units(units)
    except BitplanError as exc:
        with pytest.raises(type(exc)):
            solve_lagrange(problem)
        return
    solution = solve_lagrange(problem)
    assert [solution.choices[f"u{i}"].w_bits for i in range(units.units)] == expected.w_bits.tolist()
    assert solution.objective == pytest.approx(expected.objective, rel=1e-12, abs=1e-12)
    assert solution.gap == pytest.approx(expected.gap, rel=1e-9, abs=1e-12)
    assert solution.status == expected.status
    for key, total in solution.cost.items():
        assert expected.cost[key] == pytest.approx(total, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("budgets", [{"avg_weight_bits": 3.3}, {"avg_weight_bits": 3.3, "size_bytes": 1500 * 52.0},
                                     {"avg_weight_bits": 3.1, "size_bytes": 1500 * 54.0}])
def test_certified_gap_bounds_the_true_gap_to_the_ilp(budgets):
    units = group_units_arrays(1500, budgets, seed=3)
    fast = solve_units(units)
    exact = get_solver("ilp")(units.to_problem(), backend="highs")
    assert exact.status == "optimal" and units.feasible(fast.choice)
    true_gap = (fast.objective - exact.objective) / abs(fast.objective)
    assert -1e-9 <= true_gap <= fast.gap + 1e-9
    assert fast.bound <= exact.objective * (1 + 1e-9)
    assert fast.gap < 1e-3


def test_group_units_at_scale_are_solved_to_a_tiny_certified_gap():
    n = 200_000
    for budgets in ({"avg_weight_bits": 3.3}, {"avg_weight_bits": 3.3, "size_bytes": 52.0 * n}):
        units = group_units_arrays(n, budgets)
        solution = solve_units(units)
        assert units.feasible(solution.choice)
        assert solution.status == "optimal" and solution.gap < 1e-6, solution.gap
        assert set(np.unique(solution.w_bits).tolist()) <= {2, 3, 4, 8}
        assert solution.cost["avg_weight_bits"] <= 3.3 * (1 + 1e-9)


def test_budgets_that_pull_apart_get_a_plan_near_the_ilp_optimum():
    """Size against latency (low bits decode slower): both budgets bind, no single price binds alone, and the
    plan needs units traded between them."""
    units = group_units_opposed(1000)
    fast = solve_units(units)
    assert units.feasible(fast.choice) and all(price > 0 for price in fast.prices.values())
    exact = get_solver("ilp")(units.to_problem(), backend="highs")
    assert exact.status == "optimal"
    assert fast.bound <= exact.objective * (1 + 1e-9) <= fast.objective * (1 + 2e-9)
    assert (fast.objective - exact.objective) / exact.objective <= min(fast.gap + 1e-9, 2e-3)


def test_budgets_that_pull_apart_are_solved_to_tol_at_scale():
    units = group_units_opposed(60_000)
    solution = solve_units(units)
    assert units.feasible(solution.choice) and all(price > 0 for price in solution.prices.values())
    assert solution.status == "optimal" and solution.gap <= 1e-4, solution.gap


def test_ties_take_one_column_and_ilp_agrees():
    rnd = np.random.default_rng(7)
    n = 40
    bits = np.array([2, 4, 8])
    labels = np.arange(n)
    labels[10:20] = 10  # ten units share one choice
    units = UnitProblem(rnd.lognormal(0, 1, n)[:, None] * 4.0 ** -bits, {"avg_weight_bits": 4.0}, bits=bits,
                        params=rnd.integers(1, 50, n), cost={"size_bytes": bits / 8.0 * 100}, ties=labels)
    solution = solve_units(units)
    assert len(set(solution.choice[10:20].tolist())) == 1 and units.feasible(solution.choice)
    exact = get_solver("ilp")(units.to_problem(), backend="highs")
    assert solution.objective >= exact.objective - 1e-12
    assert solution.bound <= exact.objective + 1e-12


def test_unit_problem_solve_and_registry_plan_agree():
    units = group_units_arrays(3000, {"avg_weight_bits": 3.5})
    via_method = units.solve(tol=1e-6)
    via_registry = get_solver("lagrange")(units.to_problem(), tol=1e-6)
    assert via_method.objective == pytest.approx(via_registry.objective, rel=1e-12)
    assert via_method.prices["avg_weight_bits"] > 0


def test_loose_budgets_give_the_best_options_and_zero_prices():
    units = group_units_arrays(100, {"avg_weight_bits": 8.0, "size_bytes": 1e9})
    solution = solve_units(units)
    assert (solution.w_bits == 8).all() and solution.gap == 0 and set(solution.prices.values()) == {0.0}


# --- refusing bad arrays -----------------------------------------------------------------------------------------


def _ok(**changes):
    base = dict(objective=np.ones((3, 2)), budgets={"size_bytes": 10.0}, cost={"size_bytes": np.array([1.0, 2.0])},
                bits=[2, 4])
    base.update(changes)
    return UnitProblem(base.pop("objective"), base.pop("budgets"), **base)


@pytest.mark.parametrize("changes, error, match", [
    ({"objective": np.ones(3)}, BudgetError, r"2-D array .* got shape \(3,\)"),
    ({"objective": np.ones((0, 2))}, BudgetError, "at least one of each"),
    ({"objective": [["a", "b"]]}, BudgetError, "objective is not an array of numbers"),
    ({"objective": np.array([[1.0, 1.0], [1.0, np.nan], [1.0, 1.0]])}, NonFiniteError, r"unit 1, option 1: objective is nan"),
    ({"cost": {"size_bytes": np.array([1.0, np.inf])}}, NonFiniteError, r"unit 0, option 1: cost size_bytes is inf"),
    ({"cost": {"size_bytes": np.ones(3)}}, BudgetError,
     r"cost size_bytes: shape \(3,\) does not fit \(units, options\) = \(3, 2\)"),
    ({"budgets": {"latency": 1.0}}, BudgetError, "budget 'latency' has no cost in this problem"),
    ({"budgets": {"size_bytes": float("nan")}}, BudgetError, "budget size_bytes is nan"),
    ({"budgets": {"size_bytes": "lots"}}, BudgetError, "budget size_bytes is 'lots'"),
    ({"fixed_cost": {"size_bytes": float("inf")}}, BudgetError, "fixed cost size_bytes is inf"),
    ({"budgets": {"avg_weight_bits": 3.0}, "bits": None}, BudgetError, "avg_weight_bits needs the options' bits"),
    ({"cost": {"avg_weight_bits": np.ones(2)}}, BudgetError, "no cost of its own"),
    ({"bits": [2.5, 4]}, BudgetError, "bits must be whole numbers"),
    ({"params": [1, 2]}, BudgetError, r"params: shape \(2,\) is not \(units,\) = \(3,\)"),
    ({"params": [1, 0, 2]}, BudgetError, "params must be finite numbers > 0"),
    ({"allowed": np.ones((3, 2))}, BudgetError, "allowed must be booleans"),
    ({"allowed": np.array([[True, True], [False, False], [True, False]])}, BudgetError, "unit 1 has no allowed option"),
    ({"ties": [0, 0]}, BudgetError, r"ties must be \(3,\) integer labels"),
    ({"ties": [0.0, 0.0, 1.0]}, BudgetError, "integer labels"),
])
def test_bad_arrays_are_refused_with_a_clear_message(changes, error, match):
    with pytest.raises(error, match=match):
        _ok(**changes)


def test_nan_where_not_allowed_is_accepted_and_never_chosen():
    objective = np.array([[np.nan, 1.0], [0.0, 5.0]])
    units = _ok(objective=objective, allowed=np.array([[False, True], [True, True]]), budgets={"size_bytes": 3.0})
    solution = solve_units(units)
    assert solution.choice.tolist() == [1, 0] and solution.objective == 1.0


def test_arrays_are_read_only_and_the_callers_are_not():
    objective = np.ones((3, 2))
    units = _ok(objective=objective)
    with pytest.raises(ValueError):
        units.objective[0, 0] = 5.0
    objective[0, 0] = np.nan  # the caller's own array stays writable, and the problem keeps what it validated
    assert units.objective[0, 0] == 1.0


def test_infeasible_budgets_name_the_budget_and_its_minimum():
    message = r"budget size_bytes=2 is infeasible: the smallest achievable size_bytes is 3"
    with pytest.raises(InfeasibleError, match=message) as info:
        solve_units(_ok(budgets={"size_bytes": 2.0}))
    assert info.value.minimums == {"size_bytes": 3.0}
    fixed = _ok(budgets={"size_bytes": 5.0}, fixed_cost={"size_bytes": 4.0})
    with pytest.raises(InfeasibleError, match="smallest achievable size_bytes is 7"):
        solve_units(fixed)


def test_tied_units_without_a_common_option_are_infeasible():
    units = _ok(allowed=np.array([[True, False], [False, True], [True, True]]), ties=[0, 0, 1], budgets={"size_bytes": 9.0})
    with pytest.raises(InfeasibleError, match="tied units 0, 1 share no allowed option"):
        solve_units(units)


def test_bad_choices_are_refused():
    units = _ok()
    with pytest.raises(BudgetError, match="option indices"):
        units.value([0, 1])
    with pytest.raises(BudgetError, match="lie in 0..1"):
        units.totals(np.array([0, 2, 0]))
