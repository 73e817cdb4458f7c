"""The search problem, independent of how the scores were made.

Each layer picks exactly one option; an option carries its objective (e.g. the
predicted loss increase Omega) and additive costs. Budgets are upper bounds on
a cost total (plus the problem's fixed part) or on ``avg_weight_bits``, the
parameter-weighted mean of the chosen w_bits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from itertools import product
from typing import Any

from bitplan.errors import BudgetError

AVG_BITS = "avg_weight_bits"


class NonFiniteError(BudgetError):
    """An objective or cost that is NaN or infinite: no solver can rank such options (and HiGHS once
    spun for minutes on them), so the problem is refused before any search starts."""

    code = "bad_data"


class Deadline:
    """When a solver's ``time_limit`` (seconds; None: never) runs out, measured from construction."""

    def __init__(self, time_limit: float | None) -> None:
        self.time_limit = time_limit
        self.end = None if time_limit is None else time.perf_counter() + time_limit
        #: True once a check found the time up, i.e. once some search stopped because of it
        self.hit = False

    def left(self) -> float | None:
        """Seconds left (never below zero), or None when unbounded."""
        return None if self.end is None else max(0.0, self.end - time.perf_counter())

    def passed(self) -> bool:
        if self.end is not None and time.perf_counter() >= self.end:
            self.hit = True
        return self.hit


@dataclass(frozen=True)
class Option:
    w_bits: int
    a_bits: int = 16
    objective: float = 0.0
    cost: Mapping[str, float] = field(default_factory=dict)
    #: the number format: "int" (INT-w_bits), or a format's name (bitplan.formats) whose element width is w_bits;
    #: pins are by w_bits (a pinned width keeps every format of it), ties by ``tie_key`` (one width, format and
    #: activation width)
    fmt: str = "int"

    @property
    def choice(self) -> int | str:
        """The weight choice this option stands for: the INT width, or the format's name."""
        return self.w_bits if self.fmt == "int" else self.fmt

    @property
    def tie_key(self) -> tuple[int, str, int]:
        """What tied layers share: the weight width, its format and the activation width (they read one input, and a
        runtime that fuses them, e.g. vLLM's qkv_proj, runs one scheme for all), sortable by weight width."""
        return (self.w_bits, self.fmt, self.a_bits)


def frontier_point(cost: dict[str, float], objective: float, choices: Mapping[str, Option]) -> dict[str, Any]:
    """One frontier entry: totals, objective, each layer's w_bits, and its format where any is not INT."""
    point: dict[str, Any] = {"cost": cost, "objective": objective, "w_bits": {n: o.w_bits for n, o in choices.items()}}
    if any(o.fmt != "int" for o in choices.values()):
        point["formats"] = {n: o.fmt for n, o in choices.items()}
    return point


@dataclass(frozen=True)
class Layer:
    name: str
    params: int
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Solution:
    choices: dict[str, Option]
    objective: float
    cost: dict[str, float]
    status: str
    seconds: float
    gap: float | None = None
    #: Plans along objective vs one cost (solvers that trace a frontier fill it): each point is
    #: ``{"cost": {key: total, ...}, "objective": float, "w_bits": {layer: bits}}``, cost ascending.
    frontier: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Problem:
    layers: tuple[Layer, ...]
    budgets: Mapping[str, float]
    fixed_cost: Mapping[str, float] = field(default_factory=dict)
    pins: Mapping[str, int] = field(default_factory=dict)
    ties: tuple[tuple[str, ...], ...] = ()
    #: "Smallest plan whose predicted loss increase <= epsilon": when set, the solver minimises the
    #: total of ``minimize`` (a cost key or avg_weight_bits) subject to sum(objective) <= this bound.
    max_objective: float | None = None
    minimize: str = "size_bytes"

    def __post_init__(self) -> None:
        self._check_finite()
        names = [layer.name for layer in self.layers]
        known = set(names)
        if len(known) != len(names):
            raise BudgetError("layer names must be unique")
        for name, bits in self.pins.items():
            if name not in known:
                raise BudgetError(f"pin names unknown layer '{name}'", "layer names: " + ", ".join(names[:20]))
            layer = self.layer(name)
            if not any(o.w_bits == bits for o in layer.options):
                have = sorted({o.w_bits for o in layer.options})
                raise BudgetError(f"pin {name}={bits}: that layer has no {bits}-bit option", f"options are {have}")
        for group in self.ties:
            for name in group:
                if name not in known:
                    raise BudgetError(f"tie names unknown layer '{name}'")
        cost_keys = {key for layer in self.layers for o in layer.options for key in o.cost}
        for key in self.budgets:
            if key != AVG_BITS and key not in cost_keys:
                raise BudgetError(
                    f"budget '{key}' has no cost in this problem",
                    "costs present: " + ", ".join(sorted(cost_keys | {AVG_BITS})),
                )

    def _check_finite(self) -> None:
        """Refuse NaN and infinity in objectives, costs, budgets, fixed costs and max_objective, naming the first."""
        for layer in self.layers:
            for o in layer.options:
                label = f"{o.w_bits}-bit" if o.a_bits == 16 else f"w{o.w_bits}/a{o.a_bits}"
                if not _finite(o.objective):
                    raise NonFiniteError(
                        f"layer {layer.name}, {label} option: objective is {_shown(o.objective)}",
                        "the sensitivity scores contain NaN or infinity; check the calibration data",
                    )
                for key, value in o.cost.items():
                    if not _finite(value):
                        raise NonFiniteError(
                            f"layer {layer.name}, {label} option: cost {key} is {_shown(value)}",
                            "costs must be finite numbers; check the latency table and the layer sizes",
                        )
        for what, values in (("budget", self.budgets), ("fixed cost", self.fixed_cost)):
            for key, value in values.items():
                if not _finite(value):
                    raise BudgetError(f"{what} {key} is {_shown(value)}", f"a {what} must be a finite number")
        if self.max_objective is not None and not _finite(self.max_objective):
            raise BudgetError(f"max_objective is {_shown(self.max_objective)}", "the bound must be a finite number")

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    def layer(self, name: str) -> Layer:
        return self._by_name[name]

    def allowed(self, layer: Layer) -> tuple[Option, ...]:
        """The options a layer may take once pins apply."""
        pinned = self.pins.get(layer.name)
        return layer.options if pinned is None else tuple(o for o in layer.options if o.w_bits == pinned)

    @cached_property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers) or 1

    def limit(self, key: str) -> float:
        """What the layers together may spend of budget ``key`` (the budget less the fixed part)."""
        return self.budgets[key] - (0.0 if key == AVG_BITS else self.fixed_cost.get(key, 0.0))

    @cached_property
    def tied(self) -> frozenset[str]:
        return frozenset(name for group in self.groups() if len(group) > 1 for name in group)

    def unit_options(self, group: list[str], pruned: bool = True) -> list[dict[str, Option]]:
        """A layer's options, or a tie group's: for each common ``tie_key``, every mix of its layers' options.
        ``pruned``: the candidates (dominated options dropped), else every allowed option."""
        layers = [self.layer(n) for n in group]
        options = {lay.name: self.candidates(lay) if pruned else self.allowed(lay) for lay in layers}
        if len(group) == 1:
            return [{group[0]: o} for o in options[group[0]]]
        shared = sorted(set.intersection(*({o.tie_key for o in opts} for opts in options.values())))
        return [dict(zip(group, combo)) for key in shared
                for combo in product(*([o for o in options[n] if o.tie_key == key] for n in group))]

    def candidates(self, layer: Layer) -> tuple[Option, ...]:
        """Allowed options that no other allowed option beats: an option goes when another has an
        objective and every budgeted contribution no larger (the first of exact equals stays).
        A tied layer compares only options of equal ``tie_key``, so the tie still sees every choice."""
        keys = list(self.budgets)
        allowed = self.allowed(layer)
        scored = sorted(
            ((o.objective, *(self.contribution(k, layer, o) for k in keys)), i, o) for i, o in enumerate(allowed)
        )
        tied = layer.name in self.tied
        kept: list[tuple[tuple[float, ...], int, Option]] = []
        for vector, i, option in scored:
            if not any((not tied or o.tie_key == option.tie_key) and all(a <= b for a, b in zip(v, vector))
                       for v, _, o in kept):
                kept.append((vector, i, option))
        return tuple(o for _, _, o in sorted(kept, key=lambda item: item[1]))

    def contribution(self, key: str, layer: Layer, option: Option) -> float:
        """What ``option`` adds to budget ``key`` (avg bits as params x bits / total params)."""
        if key == AVG_BITS:
            return layer.params * option.w_bits / self.total_params
        return option.cost.get(key, 0.0)

    def value(self, key: str, choices: Mapping[str, Option]) -> float:
        fixed = 0.0 if key == AVG_BITS else self.fixed_cost.get(key, 0.0)
        return fixed + sum(self.contribution(key, layer, choices[layer.name]) for layer in self.layers)

    def totals(self, choices: Mapping[str, Option]) -> dict[str, float]:
        keys = {key for o in choices.values() for key in o.cost} | {AVG_BITS}
        return {key: self.value(key, choices) for key in sorted(keys)}

    def feasible(self, choices: Mapping[str, Option], tol: float = 1e-9) -> bool:
        return all(self.value(k, choices) <= b * (1 + tol) + tol for k, b in self.budgets.items())

    def minimum(self, key: str, use_pins: bool = True) -> float:
        """Smallest achievable value of budget ``key`` alone (honouring ties, and pins if asked)."""
        problem = self if use_pins else Problem(self.layers, {}, self.fixed_cost, {}, self.ties)
        total = 0.0 if key == AVG_BITS else self.fixed_cost.get(key, 0.0)
        for group in problem.groups():
            layers = [problem.layer(n) for n in group]
            common = set.intersection(*({o.tie_key for o in problem.allowed(lay)} for lay in layers))
            best = min(
                sum(min(problem.contribution(key, lay, o) for o in problem.allowed(lay) if o.tie_key == tk) for lay in layers)
                for tk in common
            ) if common else float("inf")
            total += best
        return total

    def groups(self) -> list[list[str]]:
        """Layers partitioned into tie groups (singletons for untied layers)."""
        return [list(group) for group in self._groups]

    @cached_property
    def _groups(self) -> tuple[tuple[str, ...], ...]:
        if not self.ties:
            return tuple((layer.name,) for layer in self.layers)
        parent = {layer.name: layer.name for layer in self.layers}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for group in self.ties:
            for a, b in zip(group, group[1:]):
                parent[find(a)] = find(b)
        out: dict[str, list[str]] = {}
        for layer in self.layers:
            out.setdefault(find(layer.name), []).append(layer.name)
        return tuple(tuple(group) for group in out.values())

    def brute_force(self) -> tuple[float, dict[str, Option]] | None:
        """Exhaustive optimum, for tests on tiny problems only."""
        best: tuple[float, dict[str, Option]] | None = None
        for combo in product(*(self.allowed(layer) for layer in self.layers)):
            choices = {layer.name: o for layer, o in zip(self.layers, combo)}
            if any(len({choices[n].tie_key for n in g}) > 1 for g in self.ties):
                continue
            if not self.feasible(choices):
                continue
            obj = sum(o.objective for o in combo)
            if best is None or obj < best[0]:
                best = (obj, choices)
        return best

    # --- JSON form -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Problem:
        try:
            layers = tuple(
                Layer(
                    name=str(lay["name"]),
                    params=int(lay.get("params", 1)),
                    options=tuple(
                        Option(
                            w_bits=int(o["w_bits"]),
                            a_bits=int(o.get("a_bits", 16)),
                            objective=float(o.get("objective", 0.0)),
                            cost={str(k): float(v) for k, v in o.get("cost", {}).items()},
                            fmt=str(o.get("format", "int")),
                        )
                        for o in lay["options"]
                    ),
                )
                for lay in raw["layers"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BudgetError(
                f"problem JSON is malformed ({exc!r})",
                'expected {"layers": [{"name", "options": [{"w_bits", "objective", "cost": {...}}]}], "budgets": {...}}',
            ) from None
        return cls(
            layers=layers,
            budgets={str(k): float(v) for k, v in raw.get("budgets", {}).items()},
            fixed_cost={str(k): float(v) for k, v in raw.get("fixed_cost", {}).items()},
            pins={str(k): int(v) for k, v in raw.get("pins", {}).items()},
            ties=tuple(tuple(str(n) for n in g) for g in raw.get("ties", [])),
            max_objective=None if raw.get("max_objective") is None else float(raw["max_objective"]),
            minimize=str(raw.get("minimize", "size_bytes")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {
                    "name": lay.name,
                    "params": lay.params,
                    "options": [
                        {"w_bits": o.w_bits, "a_bits": o.a_bits, "objective": o.objective, "cost": dict(o.cost),
                         **({"format": o.fmt} if o.fmt != "int" else {})}
                        for o in lay.options
                    ],
                }
                for lay in self.layers
            ],
            "budgets": dict(self.budgets),
            "fixed_cost": dict(self.fixed_cost),
            "pins": dict(self.pins),
            "ties": [list(g) for g in self.ties],
            **({"max_objective": self.max_objective, "minimize": self.minimize} if self.max_objective is not None else {}),
        }

    def swapped(self) -> tuple[Problem, dict[int, Option]]:
        """The accuracy-bounded form as an ordinary problem: objective := the cost to minimise,
        and the predicted loss becomes a budgeted cost ``objective`` <= max_objective.
        Returns it with a map from each new option's id to the original option."""
        assert self.max_objective is not None
        keys = {key for layer in self.layers for o in layer.options for key in o.cost} | {AVG_BITS}
        if self.minimize not in keys:
            raise BudgetError(f"cannot minimise '{self.minimize}': no such cost", "costs: " + ", ".join(sorted(keys)))
        back: dict[int, Option] = {}
        layers = []
        for layer in self.layers:
            options = []
            for o in layer.options:
                new = Option(w_bits=o.w_bits, a_bits=o.a_bits, objective=self.contribution(self.minimize, layer, o),
                             cost={**o.cost, "objective": o.objective}, fmt=o.fmt)
                back[id(new)] = o
                options.append(new)
            layers.append(Layer(layer.name, layer.params, tuple(options)))
        budgets = {**self.budgets, "objective": self.max_objective}
        return Problem(tuple(layers), budgets, self.fixed_cost, self.pins, self.ties), back

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def objective_of(choices: Mapping[str, Option]) -> float:
    """A plan's objective: the sum of its options' Omega."""
    return sum(o.objective for o in choices.values())


def fmt(value: float) -> str:
    """A number in a message: 4 significant digits, 6 for large values."""
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:  # not a number at all: the solver's arithmetic will say so
        return True


def _shown(value: object) -> str:
    return repr(float(value)) if isinstance(value, (int, float)) else repr(value)
