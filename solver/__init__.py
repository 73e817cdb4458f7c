"""Torch-free search for the bit-width plan: Problem in, Solution out.

Solvers register by name with a summary and a pydantic ``Params`` model, as the sensitivity methods
do in ``bitplan.methods``: the CLI, the API (``GET /v1/methods``, ``POST /v1/jobs``) and ``make_plan``
all read this one registry. ``parse_solver_params`` turns JSON parameters into a validated model and
names the field at fault otherwise. A solver is called as ``get_solver(name)(problem, **params)``:
the keyword parameters are validated by the same model, so an unknown one is refused with the list of
valid ones. Python-only arguments (the evolutionary solver's ``evaluate`` callable) are no field of any
model: they are passed beside the parameters and never come from JSON.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitplan.errors import BitplanError
from bitplan.params import parse_model
from solver.problem import Layer, NonFiniteError, Option, Problem, Solution

SolveFn = Callable[..., Solution]

# --- parameter models -------------------------------------------------------------------------------------


class SolverParams(BaseModel):
    """Base of the solvers' parameter models: frozen, no unknown fields, finite numbers. Every model ends with
    ``time_limit: float | None = _time_limit()`` (declared in each, not here, so that it is listed last)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _time_limit() -> Any:  # pydantic's Field() is typed Any, so that it fits any annotation
    return Field(None, gt=0, le=7 * 24 * 3600,
                 description="seconds the search may take, then the best plan found is returned (status 'time_limit'); "
                             "none: unbounded")


Backend = Literal["cbc", "highs"]


class ILPParams(SolverParams):
    """Integer linear program (PuLP + CBC or HiGHS)."""

    backend: Backend = Field("cbc", description="MIP solver: cbc (bundled with PuLP) or highs (highspy)")
    reduce: bool = Field(True, description="before the MIP, drop options no optimal plan needs (dominance, and "
                                           "reduced-cost fixing against the greedy plan)")
    time_limit: float | None = _time_limit()


class ParetoParams(SolverParams):
    """Frontier of Omega vs one cost, and the best plan at the budget."""

    cost_key: str | None = Field(None, max_length=64,
                                 description="the cost the frontier is traced along (a cost such as size_bytes, or "
                                             "avg_weight_bits); default: the only budget")
    method: Literal["auto", "exact", "hull"] = Field(
        "auto", description="exact: the whole frontier; hull: its convex hull (any size) with the ILP's plan at the "
                            "budget; auto: exact unless it passes max_states or half the time limit")
    max_states: int = Field(100_000, ge=1, le=2_000_000, description="most frontier plans the exact merge may hold")
    points: int | None = Field(50, ge=1, le=100_000, description="frontier plans reported (spread over the cost); "
                                                                 "none: all")
    backend: Backend = Field("cbc", description="MIP solver of the ILP that finds the plan at the budget in hull mode")
    time_limit: float | None = _time_limit()


class EvolutionaryParams(SolverParams):
    """NSGA-II (Optuna) over Omega and the costs."""

    trials: int = Field(200, ge=1, le=100_000, description="NSGA-II trials (plans scored)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampler seed")
    population: int = Field(50, ge=2, le=10_000, description="NSGA-II population size")
    costs: list[str] | None = Field(None, max_length=8,
                                    description="costs minimised beside Omega (default: the budgeted ones)")
    seed_plans: bool = Field(True, description="start from the ilp and greedy plans as well as the uniform ones")
    measured: bool = Field(True, description="bitplan plan and jobs: score each plan by the measured calibration "
                                             "loss of the quantized model instead of the predicted Omega "
                                             "(bitplan solve has no model, so it ignores this)")
    time_limit: float | None = _time_limit()


class GreedyParams(SolverParams):
    """AIMET-AMP-style greedy lowering."""

    fill: bool = Field(True, description="after the budgets hold, spend the slack on the steps back up that "
                                         "buy the most objective")
    time_limit: float | None = _time_limit()


class LagrangeParams(SolverParams):
    """Lagrangian relaxation with a certified gap, for 10^5 - 10^6 units."""

    tol: float = Field(1e-4, ge=0, le=1, description="the status is 'optimal' when the certified gap (plan minus the "
                                                      "Lagrangian bound, relative) is within this")
    rounds: int = Field(8, ge=1, le=100, description="with several budgets: cycles of one-multiplier bisections")
    time_limit: float | None = _time_limit()


class UniformParams(SolverParams):
    """One width for every layer."""

    time_limit: float | None = _time_limit()


# --- registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverEntry:
    """A registered solver; calling it solves: ``info(problem, **params)``."""

    name: str
    summary: str
    params: type[SolverParams]
    impl: str  # "module:function", called as function(problem, **fields, **hooks) -> Solution
    #: Python-only keyword arguments of the function (callables): never a field of ``params``, never from JSON
    hooks: tuple[str, ...] = ()
    #: fields of ``params`` that the caller acts on (``make_plan``), not passed to the function
    caller_fields: tuple[str, ...] = ()

    def load(self) -> SolveFn:
        """The implementation, imported on first use (Optuna and PuLP load slowly)."""
        module, _, attr = self.impl.partition(":")
        function: SolveFn = getattr(importlib.import_module(module), attr)
        return function

    def __call__(self, problem: Problem, **kwargs: Any) -> Solution:
        hooks = {k: kwargs.pop(k) for k in self.hooks if k in kwargs}
        return self.run(problem, parse_solver_params(self.name, kwargs), **hooks)

    def run(self, problem: Problem, params: SolverParams, **hooks: Any) -> Solution:
        """Solve with already validated ``params`` (a ``self.params``) and the Python-only ``hooks``."""
        if not isinstance(params, self.params):
            raise TypeError(f"solver '{self.name}' takes {self.params.__name__}, not {type(params).__name__}")
        unknown = sorted(set(hooks) - set(self.hooks))
        if unknown:
            raise BitplanError(f"solver '{self.name}' takes no Python argument(s) {', '.join(unknown)}")
        values = {k: getattr(params, k) for k in type(params).model_fields if k not in self.caller_fields}
        return self.load()(problem, **values, **hooks)

    def __iter__(self) -> Iterator[SolverEntry | str]:
        """The older ``(solve, summary)`` pair, so ``for name, (solve, summary) in SOLVERS.items()`` still reads."""
        return iter((self, self.summary))


SOLVERS: dict[str, SolverEntry] = {
    info.name: info
    for info in (
        SolverEntry("ilp", "integer linear program (PuLP + CBC or HiGHS): provably optimal sum of Omega under every budget",
                   ILPParams, "solver.ilp:solve_ilp"),
        SolverEntry("pareto", "frontier of Omega vs one cost (exact merge, or convex hull at scale) and the optimal plan "
                             "at the budget", ParetoParams, "solver.pareto:solve_pareto"),
        SolverEntry("evolutionary", "NSGA-II (Optuna) over Omega and the costs, seeded with ilp and greedy; can score by "
                                   "measured loss", EvolutionaryParams, "solver.evolutionary:solve_evolutionary",
                   hooks=("evaluate",), caller_fields=("measured",)),
        SolverEntry("greedy", "AIMET-AMP-style: lower the layer with least Omega increase per cost saved until the "
                             "budgets hold", GreedyParams, "solver.greedy:solve_greedy"),
        SolverEntry("lagrange", "Lagrangian relaxation (bisection on each budget's price) with a certified gap: "
                               "10^6 units in seconds, for bits per group of columns", LagrangeParams,
                   "solver.lagrange:solve_lagrange"),
        SolverEntry("uniform", "the highest single bit width for every layer that fits the budgets (baseline)",
                   UniformParams, "solver.greedy:solve_uniform"),
    )
}


def get_info(name: str) -> SolverEntry:
    try:
        return SOLVERS[name]
    except KeyError:
        raise BitplanError(f"unknown solver '{name}'", "valid solvers: " + ", ".join(SOLVERS), code="unknown_method",
                           field="solver") from None


def get_solver(name: str) -> SolverEntry:
    """The solver ``name``, called as ``get_solver(name)(problem, **params)``."""
    return get_info(name)


def solver_params(name: str) -> dict[str, object]:
    """The parameters solver ``name`` takes, with their defaults, as JSON."""
    return get_info(name).params().model_dump(mode="json")


def parse_solver_params(name: str, raw: Mapping[str, Any]) -> SolverParams:
    """``raw`` (JSON-typed parameters) validated by solver ``name``'s model; a BitplanError names the field at
    fault and what it expects, or, for unknown fields, lists the valid ones."""
    info = get_info(name)
    hooks = [k for k in (raw if isinstance(raw, Mapping) else ()) if k in info.hooks]
    extra = f" ({', '.join(hooks)}: a Python callable, never a parameter; see 'measured')" if hooks else ""
    return parse_model(info.params, raw, f"solver '{name}'", "solver", extra_hint=extra)


__all__ = ["Layer", "NonFiniteError", "Option", "Problem", "Solution", "SOLVERS", "SolverEntry", "SolverParams",
           "get_info", "get_solver", "parse_solver_params", "solver_params"]
