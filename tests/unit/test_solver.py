import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BudgetError, InfeasibleError
from solver import Layer, Option, Problem
from solver.ilp import solve_ilp

BITS = (2, 4, 8)


def _problem(seed: int, n: int = 5, avg: float | None = 4.0, size: float | None = None, **kw) -> Problem:
    rnd = random.Random(seed)
    layers = []
    for i in range(n):
        params = rnd.randint(10, 1000)
        sens = rnd.random()
        layers.append(Layer(f"l{i}", params, tuple(
            Option(w_bits=b, objective=sens * 4.0 ** -b, cost={"size_bytes": params * b / 8}) for b in BITS)))
    budgets = {k: v for k, v in (("avg_weight_bits", avg), ("size_bytes", size)) if v is not None}
    return Problem(tuple(layers), budgets, **kw)


def test_cbc_preprocessing_bug_case_is_solved_optimally():
    """CBC 2.10.3 with preprocessing called a worse plan optimal on exactly this instance."""
    problem = _problem(502, avg=3.0)
    total = sum(lay.params for lay in problem.layers)
    problem = Problem(problem.layers, {"avg_weight_bits": 3.0, "size_bytes": 0.30078125 * total})
    assert solve_ilp(problem).objective == pytest.approx(problem.brute_force()[0], rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), avg=st.floats(2.0, 8.0), size_frac=st.floats(0.3, 1.2))
def test_ilp_matches_brute_force(seed, avg, size_frac):
    problem = _problem(seed, avg=avg)
    total = sum(lay.params for lay in problem.layers)
    problem = Problem(problem.layers, {"avg_weight_bits": avg, "size_bytes": size_frac * total})
    best = problem.brute_force()
    if best is None:
        with pytest.raises(InfeasibleError):
            solve_ilp(problem)
        return
    solution = solve_ilp(problem)
    assert solution.status == "optimal"
    assert problem.feasible(solution.choices)
    assert solution.objective == pytest.approx(best[0], rel=1e-6, abs=1e-12)


def test_infeasible_budget_names_smallest_achievable_value():
    problem = _problem(0, avg=1.5)
    with pytest.raises(InfeasibleError) as err:
        solve_ilp(problem)
    assert "smallest achievable avg_weight_bits is 2" in err.value.message
    assert err.value.minimums["avg_weight_bits"] == pytest.approx(2.0)


def test_infeasibility_caused_by_pins_says_so():
    problem = _problem(0, avg=2.5, pins={"l0": 8, "l1": 8})
    with pytest.raises(InfeasibleError) as err:
        solve_ilp(problem)
    assert "drop pins" in err.value.hint


def test_pins_and_ties_are_honoured():
    problem = _problem(3, n=6, avg=4.0, pins={"l2": 8}, ties=(("l0", "l1"),))
    solution = solve_ilp(problem)
    assert solution.choices["l2"].w_bits == 8
    assert solution.choices["l0"].tie_key == solution.choices["l1"].tie_key
    assert solution.objective == pytest.approx(problem.brute_force()[0])


def test_pin_to_missing_option_is_refused():
    with pytest.raises(BudgetError, match="no 3-bit option"):
        _problem(0, pins={"l0": 3})


def test_json_round_trip_keeps_the_optimum():
    problem = _problem(7, avg=3.0)
    again = Problem.from_dict(json.loads(problem.to_json()))
    assert solve_ilp(again).objective == pytest.approx(solve_ilp(problem).objective)


def test_fixed_cost_counts_against_size_budget():
    base = _problem(1, avg=None, size=10_000.0)
    minimum = base.minimum("size_bytes")
    shifted = Problem(base.layers, {"size_bytes": minimum + 5}, fixed_cost={"size_bytes": 10.0})
    with pytest.raises(InfeasibleError):
        solve_ilp(shifted)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), eps_frac=st.floats(0.0, 1.0))
def test_smallest_plan_within_a_loss_bound_matches_brute_force(seed, eps_frac):
    from itertools import product

    base = _problem(seed, n=5, avg=None)
    lowest = sum(min(o.objective for o in lay.options) for lay in base.layers)
    highest = sum(max(o.objective for o in lay.options) for lay in base.layers)
    eps = lowest + eps_frac * (highest - lowest)
    problem = Problem(base.layers, {}, max_objective=eps, minimize="size_bytes")
    best = min(sum(o.cost["size_bytes"] for o in combo)
               for combo in product(*(lay.options for lay in base.layers))
               if sum(o.objective for o in combo) <= eps * (1 + 1e-9) + 1e-12)
    solution = solve_ilp(problem)
    assert solution.objective <= eps * (1 + 1e-6) + 1e-12
    assert solution.cost["size_bytes"] == pytest.approx(best)


def test_loss_bound_below_reach_names_the_smallest_predicted_loss():
    base = _problem(0, avg=None)
    lowest = sum(min(o.objective for o in lay.options) for lay in base.layers)
    with pytest.raises(InfeasibleError, match="smallest achievable objective"):
        solve_ilp(Problem(base.layers, {}, max_objective=lowest / 2))
