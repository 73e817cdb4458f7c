"""Multi-objective search with Optuna's NSGA-II: objective against the costs, budgets as constraints.

Each layer (a tie group as one) is a categorical choice among its options. NSGA-II (Deb et al.
2002) minimises (objective, cost_1, ..., cost_k); budgets enter through ``constraints_func`` so
infeasible plans lose to feasible ones. The first trials are the uniform plans (one per width)
and, with ``seed_plans``, the ILP and greedy plans.
``evaluate(choices) -> float`` may replace the predicted objective, e.g. by the measured loss of
the quantized model; it is called once per distinct plan.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from bitplan.errors import BitplanError
from solver.problem import AVG_BITS, Deadline, Option, Problem, Solution, frontier_point

if TYPE_CHECKING:
    import optuna

Evaluate = Callable[[dict[str, Option]], float]
_TOL = 1e-9
#: per unit (a layer, or a tie group): its trial parameter name and its options, each {layer name: option}
Units = Sequence[tuple[str, list[dict[str, Option]]]]


def solve_evolutionary(
    problem: Problem,
    trials: int = 200,
    seed: int = 0,
    evaluate: Evaluate | None = None,
    population: int = 50,
    costs: list[str] | None = None,
    seed_plans: bool = True,
    time_limit: float | None = None,
) -> Solution:
    """Best feasible plan found in ``trials`` NSGA-II trials; ``Solution.frontier`` holds the
    non-dominated feasible plans over (objective, *costs) (costs default to the budgeted ones).

    ``time_limit`` (seconds) bounds the search: the seeding ILP and greedy get at most a quarter of it
    each, the seed plans are all scored, and then the search stops after the trial during which the time
    ran out (status "time_limit"); each trial (one ``evaluate`` call at most) runs to its end."""
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    import optuna

    if trials < 1 or population < 2:
        raise BitplanError("evolutionary needs trials >= 1 and population >= 2")
    from solver.ilp import check_budgets

    check_budgets(problem)
    keys = _cost_keys(problem, costs)
    units = [(f"u{i}", problem.unit_options(group, pruned=evaluate is None)) for i, group in enumerate(problem.groups())]
    limits = {k: b for k, b in problem.budgets.items()}
    scores: dict[tuple[int, ...], float] = {}

    def plan_of(picks: Mapping[str, int]) -> dict[str, Option]:
        choices: dict[str, Option] = {}
        for name, options in units:
            choices.update(options[picks[name]])
        return {lay.name: choices[lay.name] for lay in problem.layers}

    def score(picks: tuple[int, ...], choices: dict[str, Option]) -> float:
        if picks not in scores:
            scores[picks] = float(evaluate(dict(choices))) if evaluate else sum(o.objective for o in choices.values())
        return scores[picks]

    def objective(trial: optuna.trial.Trial) -> tuple[float, ...]:
        picks = {name: trial.suggest_categorical(name, list(range(len(options)))) for name, options in units}
        choices = plan_of(picks)
        values = {k: problem.value(k, choices) for k in set(keys) | set(limits)}
        violation = [values[k] - b * (1 + _TOL) - _TOL for k, b in limits.items()]
        trial.set_user_attr("constraint", violation)
        if hasattr(trial, "set_constraint"):  # Optuna >= 5 reads constraints from the trial
            for k, v in zip(limits, violation):
                trial.set_constraint(k, v)
        return (score(tuple(picks[name] for name, _ in units), choices), *(values[k] for k in keys))

    def stop_at_deadline(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # the seed plans (a few: one per width, the ilp's, the greedy one) are scored even late, so a time
        # limit spent on seeding still ends with the ilp and greedy plans among the candidates
        if deadline.passed() and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            study.stop()

    if hasattr(optuna.trial.Trial, "set_constraint"):
        sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    else:  # Optuna < 5
        sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed,
                                                constraints_func=lambda t: t.user_attrs["constraint"])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(directions=["minimize"] * (1 + len(keys)), sampler=sampler)
            for plan in _seed_plans(problem, solvers=seed_plans, time_limit=time_limit):
                study.enqueue_trial(_picks(units, plan), skip_if_exists=True)
            study.optimize(objective, n_trials=trials, callbacks=[stop_at_deadline])
    finally:
        optuna.logging.set_verbosity(verbosity)

    ran = sum(t.values is not None for t in study.trials)
    stopped = deadline.hit and ran < trials
    done = [t for t in study.trials if t.values is not None and all(c <= 0 for c in t.user_attrs["constraint"])]
    if not done:
        raise BitplanError(
            f"evolutionary found no plan within the budgets in {ran} trials"
            + (f" (stopped at its time limit, {time_limit:g} s)" if stopped else ""),
            ("raise time_limit, " if stopped else "raise trials, ") + "keep seed_plans=True, or use the ilp solver")
    front = _non_dominated(done)
    best = min(done, key=lambda t: (t.values[0], t.number))
    choices = plan_of(best.params)
    return Solution(
        choices=choices,
        objective=best.values[0],
        cost=problem.totals(choices),
        status="time_limit" if stopped else "heuristic",
        seconds=time.perf_counter() - start,
        frontier=[frontier_point(problem.totals(c), t.values[0], c)
                  for t in front for c in [plan_of(t.params)]],
    )


def _cost_keys(problem: Problem, costs: list[str] | None) -> list[str]:
    if costs is None:
        return list(problem.budgets) or [AVG_BITS]
    known = {k for lay in problem.layers for o in lay.options for k in o.cost} | {AVG_BITS}
    unknown = [k for k in costs if k not in known]
    if unknown:
        raise BitplanError(f"costs {unknown} are not costs of this problem", "costs: " + ", ".join(sorted(known)))
    return list(costs)




def _seed_plans(problem: Problem, solvers: bool, time_limit: float | None = None) -> list[dict[str, Option]]:
    """One uniform plan per width (they spread along the cost axis), then the ILP and greedy plans
    (each given 30 s at most, and at most a quarter of ``time_limit``)."""
    from solver.greedy import greedy_choices, uniform_plans
    from solver.ilp import solve_ilp

    plans = list(uniform_plans(problem).values())
    if not solvers:
        return plans
    share = 30.0 if time_limit is None else min(30.0, time_limit / 4)
    try:
        plans.append(solve_ilp(problem, time_limit=share).choices)
    except BitplanError:
        pass
    greedy = greedy_choices(problem, deadline=Deadline(share))
    if greedy is not None:
        plans.append(greedy)
    return plans


def _picks(units: Units, plan: Mapping[str, Option]) -> dict[str, int]:
    """The trial parameters of ``plan``; a unit whose choice the search space lacks is left to the sampler."""
    picks: dict[str, int] = {}
    for name, options in units:
        for i, opt in enumerate(options):
            if all(plan[n] is o or plan[n] == o for n, o in opt.items()):
                picks[name] = i
                break
    return picks


def _non_dominated(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    front = [t for t in trials
             if not any(all(a <= b for a, b in zip(u.values, t.values)) and u.values != t.values for u in trials)]
    unique: dict[tuple[float, ...], optuna.trial.FrozenTrial] = {}
    for t in sorted(front, key=lambda t: (t.values[1:], t.values[0], t.number)):
        unique.setdefault(tuple(t.values), t)
    return list(unique.values())


__all__ = ["Evaluate", "solve_evolutionary"]
