"""Synthetic solver problems shared by the tests and the benches."""

from __future__ import annotations

import numpy as np

from solver import Problem
from solver.units import UnitProblem

GROUP_BITS = (2, 3, 4, 8)


def group_units_arrays(units: int, budgets: dict[str, float], seed: int = 0) -> UnitProblem:
    """Units of 128 weights (a group of input columns) at 2/3/4/8 bits: Omega = salience x 4^-w with a log-normal
    salience, size_bytes = 128 w / 8 + 2 (the packed weights and one fp16 scale per group), as arrays."""
    salience = np.random.default_rng(seed).lognormal(0.0, 1.5, units)
    bits = np.array(GROUP_BITS)
    return UnitProblem(salience[:, None] * 4.0 ** -bits, budgets, bits=bits, params=128,
                       cost={"size_bytes": 128 * bits / 8 + 2.0})


def group_units_problem(units: int, budgets: dict[str, float], seed: int = 0) -> Problem:
    """``group_units_arrays`` as a ``Problem`` (layers g0, g1, ...): the same numbers, as Python objects."""
    return group_units_arrays(units, budgets, seed).to_problem([f"g{i}" for i in range(units)])


def group_units_opposed(units: int, seed: int = 0, size: float = 0.95, latency: float = 0.8) -> UnitProblem:
    """``group_units_arrays`` with a latency cost that pulls against the size: low bits decode slower (2/3/4/8 bits:
    2, 1.8, 1, 0.8 x a per-unit factor in [0.5, 2]). Budgets: ``size`` x the all-3-bit size and ``latency`` x the
    all-3-bit latency, so that both bind and the plan must trade between them."""
    rng = np.random.default_rng(seed)
    salience = rng.lognormal(0.0, 1.5, units)
    bits = np.array(GROUP_BITS)
    size_bytes = 128 * bits / 8 + 2.0
    slow = rng.uniform(0.5, 2.0, units)[:, None] * np.array([2.0, 1.8, 1.0, 0.8])
    budgets = {"size_bytes": size * units * float(size_bytes[1]), "latency": latency * float(slow[:, 1].sum())}
    return UnitProblem(salience[:, None] * 4.0 ** -bits, budgets, bits=bits, params=128,
                       cost={"size_bytes": size_bytes, "latency": slow})
