"""Torch-free search for the bit-width plan: Problem in, Solution out.

Solvers register by name; the CLI (and later the API) read this registry.
"""

from __future__ import annotations

from collections.abc import Callable

from bitplan.errors import BitplanError
from solver.problem import Layer, Option, Problem, Solution

SolveFn = Callable[..., Solution]


def _ilp(problem: Problem, **params) -> Solution:
    from solver.ilp import solve_ilp

    return solve_ilp(problem, **params)


SOLVERS: dict[str, tuple[SolveFn, str]] = {
    "ilp": (_ilp, "integer linear program (PuLP + CBC): provably optimal sum of Omega under every budget"),
}


def get_solver(name: str) -> SolveFn:
    try:
        return SOLVERS[name][0]
    except KeyError:
        raise BitplanError(f"unknown solver '{name}'", "valid solvers: " + ", ".join(SOLVERS)) from None


__all__ = ["Layer", "Option", "Problem", "Solution", "SOLVERS", "get_solver"]
