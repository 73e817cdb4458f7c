"""Synthetic solver problems shared by the tests and the benches."""

from __future__ import annotations

import random

from solver import Layer, Option, Problem


def group_units_problem(units: int, budgets: dict[str, float], seed: int = 0) -> Problem:
    """Units of 128 weights (a group of input columns) at 2/3/4/8 bits: Omega = salience x 4^-w with a log-normal
    salience, size_bytes = 128 w / 8 + 2 (the packed weights and one fp16 scale per group)."""
    rnd = random.Random(seed)
    layers = []
    for i in range(units):
        salience = rnd.lognormvariate(0, 1.5)
        layers.append(Layer(f"g{i}", 128, tuple(
            Option(w_bits=w, objective=salience * 4.0 ** -w, cost={"size_bytes": 128 * w / 8 + 2.0}) for w in (2, 3, 4, 8))))
    return Problem(tuple(layers), budgets)
