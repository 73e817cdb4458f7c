"""``make_plan``: load -> layers -> sensitivity -> solve -> validate, the whole
planning run behind ``bitplan plan`` (and, later, a service job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bitplan.core.data import Dataset, conform, load_data
from bitplan.core.evaluate import Reference, calibrate_activations, check_targets, measure, measure_macs, set_activation_bits
from bitplan.core.loading import LoadedModel, load_model
from bitplan.core.quant import WeightBank
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.costs import CostModel
from bitplan.errors import BitplanError
from bitplan.progress import ProgressFn, no_progress
from bitplan.schemas import (
    LayerInfo,
    Measured,
    PlanFile,
    PlanLayer,
    PlanRequest,
    SensitivityInfo,
    SensitivityTable,
    SolverInfo,
)
from solver import Layer, Option, Problem, SolverParams, get_info, get_solver, parse_solver_params


@dataclass
class Prepared:
    """A loaded model with its data, layer table and cost model."""

    model: LoadedModel
    data: Dataset
    eval_data: Dataset
    layers: list[LayerInfo]
    costs: CostModel
    bank: WeightBank


def resolve_data(model_ref: str, path: str | None, split: str) -> Dataset:
    if path is not None:
        return load_data(path)
    if model_ref.startswith("catalog:"):
        from bitplan.catalog import get_entry

        return get_entry(model_ref.removeprefix("catalog:")).dataset(split)
    raise BitplanError("no calibration data given", "pass --data FILE (.npz or .safetensors with 'inputs' [and 'targets'])")


def prepare(model_ref: str, data_path: str | None, eval_path: str | None = None,
            latency_table: dict | None = None, clip: str = "mse", model_name: str | None = None) -> Prepared:
    """Load the model and its data, check them against each other, measure the layer table.

    ``model_name`` replaces the file name in the plan (the service stores uploads under their sha256).
    """
    data = resolve_data(model_ref, data_path, "calib")
    model = load_model(model_ref, sample=data)
    if model_name:
        model.info = model.info.model_copy(update={"name": model_name})
    data = conform(data, model.inputs)
    if eval_path is None and data_path is None and model_ref.startswith("catalog:"):
        eval_data = conform(resolve_data(model_ref, None, "eval"), model.inputs)
    elif eval_path is not None:
        eval_data = conform(load_data(eval_path), model.inputs)
    else:
        eval_data = data
    check_targets(model, data)
    check_targets(model, eval_data)
    macs = measure_macs(model, data.slice(0, min(len(data), 4)))
    layers = [
        LayerInfo(name=g.name, kind=g.kind, params=model.weight(g).numel(), out_channels=model.weight(g).shape[0],
                  macs=macs[g.name])
        for g in model.layers
    ]
    costs = CostModel(tuple(layers), model.fixed_bytes(), latency_table)
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers}, clip=clip)
    return Prepared(model, data, eval_data, layers, costs, bank)


def build_problem(prep: Prepared, table: SensitivityTable, request: PlanRequest) -> Problem:
    omega = table.omega()
    limits = request.budget.limits()
    if "latency_ms" in limits and request.latency_table is None:
        raise BitplanError("a latency_ms budget needs a latency lookup table", "pass --latency-table FILE")
    choose_a = len(request.a_bits) > 1
    if choose_a and not all(layer.omega_act for layer in table.layers):
        raise BitplanError(f"choosing activation bits from {list(request.a_bits)} needs activation sensitivity",
                           "use --sensitivity hessian_trace --param activations=true, or give one --abits value")
    omega_act = {layer.name: layer.omega_act for layer in table.layers}
    layers = tuple(
        Layer(
            name=info.name,
            params=info.params,
            options=tuple(
                Option(w_bits=b, a_bits=a,
                       objective=omega[info.name][b] + (omega_act[info.name][a] if choose_a else 0.0),
                       cost=prep.costs.option_cost(info, b, a))
                for b in request.w_bits for a in request.a_bits
            ),
        )
        for info in prep.layers
    )
    return Problem(layers=layers, budgets=limits, fixed_cost=prep.costs.fixed_cost(), pins=request.pins)


def uniform_baseline(prep: Prepared, request: PlanRequest) -> tuple[int, int] | None:
    """The highest single (w_bits, a_bits) whose plan fits every budget."""
    limits = request.budget.limits()
    for bits in sorted(request.w_bits, reverse=True):
        for a_bits in sorted(request.a_bits, reverse=True):
            cost = prep.costs.plan_cost({info.name: (bits, a_bits) for info in prep.layers})
            if all(getattr(cost, key) <= limit * (1 + 1e-9) for key, limit in limits.items()):
                return bits, a_bits
    return None


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


#: How a caller may supply the sensitivity table (the service looks in its cache first).
SensitivitySource = Callable[[Prepared, SensitivityContext], SensitivityTable]


def compute_sensitivity(prep: Prepared, ctx: SensitivityContext, request: PlanRequest) -> SensitivityTable:
    return run_sensitivity(request.sensitivity, request.sensitivity_params, ctx)


#: The least time a solver is given when the run's own limit is (nearly) spent: enough to return a plan.
MIN_SOLVER_SECONDS = 1.0


def solver_params_for(request: PlanRequest, elapsed: float = 0.0) -> SolverParams:
    """The request's solver parameters, validated, with ``time_limit`` the smaller of the solver's own and
    what is left of ``request.time_limit_s`` after ``elapsed`` seconds (at least MIN_SOLVER_SECONDS)."""
    params = parse_solver_params(request.solver, request.solver_params)
    limits = [params.time_limit] if params.time_limit is not None else []
    if request.time_limit_s is not None:
        limits.append(max(MIN_SOLVER_SECONDS, request.time_limit_s - elapsed))
    return params.model_copy(update={"time_limit": min(limits)}) if limits else params


def make_plan(request: PlanRequest, progress: ProgressFn = no_progress,
              sensitivity: SensitivitySource | None = None) -> PlanFile:
    started = time.perf_counter()
    parse_solver_params(request.solver, request.solver_params)  # fail fast, before loading anything
    torch.manual_seed(request.seed)
    timer = Timer()
    with timer.stage("load"):
        progress("load", 0.0, request.model_name or request.model)
        prep = prepare(request.model, request.data, request.eval_data, request.latency_table, request.clip,
                       request.model_name)
        progress("load", 1.0, f"{len(prep.layers)} layers")
    unknown = sorted(set(request.pins) - {info.name for info in prep.layers})
    if unknown:
        raise BitplanError(f"--pin names unknown layer(s) {unknown}", "see the names with: bitplan inspect MODEL")
    with timer.stage("sensitivity"):
        ctx = SensitivityContext(prep.model, prep.data, list(request.w_bits), prep.bank, request.seed, progress)
        table = sensitivity(prep, ctx) if sensitivity else compute_sensitivity(prep, ctx, request)
    with timer.stage("solve"):
        progress("solve", 0.0, request.solver)
        problem = build_problem(prep, table, request)
        params = solver_params_for(request, time.perf_counter() - started)
        hooks = {}
        if request.solver == "evolutionary" and params.measured:
            progress("solve", 0.05, "evolutionary search scored by measured calibration loss")
            hooks["evaluate"] = measured_evaluator(prep, request)
        solution = get_info(request.solver).run(problem, params, **hooks)
        frontier = solution.frontier
        if frontier is None:
            left = None if request.time_limit_s is None else request.time_limit_s - (time.perf_counter() - started)
            frontier = frontier_around(problem, time_limit=None if left is None else max(MIN_SOLVER_SECONDS, left))
        progress("solve", 1.0, solution.status)
    assignment = {name: (o.w_bits, o.a_bits) for name, o in solution.choices.items()}
    measured = None
    if request.validate_plan:
        with timer.stage("validate"):
            measured = validate(prep, request, assignment, progress)
    return PlanFile(
        model=prep.model.info,
        budget=request.budget.limits(),
        w_bits_options=list(request.w_bits),
        a_bits_options=list(request.a_bits),
        pins=dict(request.pins),
        seed=request.seed,
        sensitivity=SensitivityInfo(method=table.method, params=table.params, seconds=table.seconds, notes=table.notes),
        solver=SolverInfo(method=request.solver, status=solution.status, seconds=solution.seconds,
                          objective=solution.objective, gap=solution.gap, time_limit_s=params.time_limit),
        layers=[
            PlanLayer(name=info.name, kind=info.kind, params=info.params, macs=info.macs,
                      w_bits=assignment[info.name][0], a_bits=assignment[info.name][1],
                      sensitivity=solution.choices[info.name].objective)
            for info in prep.layers
        ],
        cost=prep.costs.plan_cost(assignment),
        measured=measured,
        frontier=frontier,
        timings=timer.seconds,
    )


def frontier_around(problem: Problem, cost_key: str | None = None, time_limit: float | None = None) -> list[dict] | None:
    """The Pareto frontier of predicted loss vs the budget's cost, for solvers that give none (ilp, greedy,
    uniform): every plan should come with the trade-off around it. None if it cannot be traced (several
    budgets and no cost key)."""
    try:
        return get_solver("pareto")(problem, cost_key=cost_key, points=40, time_limit=time_limit).frontier
    except BitplanError:
        return None


def overrides_for(prep: Prepared, assignment: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {g.weight_key: prep.bank.get(g.weight_key, assignment[g.name][0]) for g in prep.model.layers
            if assignment[g.name][0] < 16}


def validate(prep: Prepared, request: PlanRequest, assignment: dict[str, tuple[int, int]],
             progress: ProgressFn = no_progress) -> Measured:
    """Measure full precision, the plan and the best uniform plan that fits, on the eval data."""
    model = prep.model
    if min(request.a_bits) < 16:
        progress("validate", 0.05, "calibrating activation ranges")
        calibrate_activations(model, prep.data, request.batch_size)
    ref = Reference.compute(model, prep.eval_data, request.batch_size)
    fp = measure(model, ref)
    progress("validate", 0.33, "plan")

    def run(assign: dict[str, tuple[int, int]]):
        set_activation_bits(model, {name: a for name, (_, a) in assign.items()})
        try:
            return measure(model, ref, overrides_for(prep, assign))
        finally:
            set_activation_bits(model, {})

    plan = run(assignment)
    progress("validate", 0.66, "uniform")
    uniform_pair = uniform_baseline(prep, request)
    uniform = uniform_cost = uniform_bits = None
    if uniform_pair is not None:
        uniform_bits = uniform_pair[0]
        uni = {info.name: uniform_pair for info in prep.layers}
        uniform, uniform_cost = run(uni), prep.costs.plan_cost(uni)
    progress("validate", 1.0, "done")
    return Measured(
        data=prep.eval_data.source,
        samples=len(prep.eval_data),
        loss_kind="cross_entropy" if prep.eval_data.targets is not None else "kl",
        fp=fp, plan=plan, uniform=uniform, uniform_w_bits=uniform_bits,
        uniform_a_bits=uniform_pair[1] if uniform_pair else None, uniform_cost=uniform_cost,
    )



def measured_evaluator(prep: Prepared, request: PlanRequest, limit: int = 256):
    """A solver ``evaluate`` hook: the measured calibration loss of the model quantized as proposed.

    Candidates are scored on calibration data, never on the held-out data the plan is reported on.
    """
    data = prep.data
    ref = Reference.compute(prep.model, data if len(data) <= limit else _head(data, limit), request.batch_size)
    if min(request.a_bits) < 16:
        calibrate_activations(prep.model, prep.data, request.batch_size)

    def evaluate(choices) -> float:
        assign = {name: (o.w_bits, o.a_bits) for name, o in choices.items()}
        set_activation_bits(prep.model, {name: a for name, (_, a) in assign.items()})
        try:
            metrics = measure(prep.model, ref, overrides_for(prep, assign))
        finally:
            set_activation_bits(prep.model, {})
        return metrics.loss

    return evaluate


def _head(data: Dataset, n: int) -> Dataset:
    return Dataset({k: v[:n] for k, v in data.inputs.items()}, None if data.targets is None else data.targets[:n],
                   data.source, data.sha256)
