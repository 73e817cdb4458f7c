"""Torch-free search for the bit-width plan: Problem in, Solution out.

Solvers register by name; the CLI (and later the API) read this registry. Every solver is called
as ``solver(problem, **params)`` with keyword parameters that all have defaults; an unknown
parameter is refused with the list of valid ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from bitplan.errors import BitplanError
from solver.problem import Layer, Option, Problem, Solution

SolveFn = Callable[..., Solution]


def _lazy(module: str, function: str, name: str) -> SolveFn:
    """Import the solver's module on first call (Optuna and PuLP load slowly) and check its params."""

    def solve(problem: Problem, **params) -> Solution:
        fn = getattr(importlib.import_module(module), function)
        check_params(name, fn, params)
        return fn(problem, **params)

    solve.__name__ = f"solve_{name}"
    solve.__doc__ = f"{module}.{function}(problem, **params)"
    return solve


def solver_params(name: str) -> dict[str, object]:
    """The keyword parameters solver ``name`` takes, with their defaults."""
    module, function = _WHERE[name]
    fn = getattr(importlib.import_module(module), function)
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:]}


def check_params(name: str, fn: Callable, params: dict) -> None:
    valid = [p.name for p in list(inspect.signature(fn).parameters.values())[1:]]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise BitplanError(
            f"solver '{name}' has no parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
            f"valid parameters of '{name}': " + (", ".join(valid) or "none"),
        )


_WHERE = {
    "ilp": ("solver.ilp", "solve_ilp"),
    "pareto": ("solver.pareto", "solve_pareto"),
    "evolutionary": ("solver.evolutionary", "solve_evolutionary"),
    "greedy": ("solver.greedy", "solve_greedy"),
    "uniform": ("solver.greedy", "solve_uniform"),
}

_SUMMARY = {
    "ilp": "integer linear program (PuLP + CBC or HiGHS): provably optimal sum of Omega under every budget",
    "pareto": "frontier of Omega vs one cost (exact merge, or convex hull at scale) and the optimal plan at the budget",
    "evolutionary": "NSGA-II (Optuna) over Omega and the costs, seeded with ilp and greedy; can score by measured loss",
    "greedy": "AIMET-AMP-style: lower the layer with least Omega increase per cost saved until the budgets hold",
    "uniform": "the highest single bit width for every layer that fits the budgets (baseline)",
}

SOLVERS: dict[str, tuple[SolveFn, str]] = {name: (_lazy(*_WHERE[name], name), _SUMMARY[name]) for name in _WHERE}


def get_solver(name: str) -> SolveFn:
    try:
        return SOLVERS[name][0]
    except KeyError:
        raise BitplanError(f"unknown solver '{name}'", "valid solvers: " + ", ".join(SOLVERS)) from None


__all__ = ["Layer", "Option", "Problem", "Solution", "SOLVERS", "check_params", "get_solver", "solver_params"]
