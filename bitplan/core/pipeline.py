"""``make_plan``: load -> layers -> sensitivity -> solve -> validate, the whole
planning run behind ``bitplan plan`` (and, later, a service job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitplan.core.data import Dataset, conform, holdout_split, is_text, load_data
from bitplan.core.device import micro_batch_cap
from bitplan.core.device import resolve as resolve_placement
from bitplan.core.evaluate import Reference, calibrate_activations, check_targets, measure, measure_macs, set_activation_bits
from bitplan.core.loading import LoadedModel, load_model
from bitplan.core.quant import WeightBank
from bitplan.core.refine import TIE, Scorer, local_search, no_worse, uniform_plans
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.costs import CostModel
from bitplan.errors import BitplanError, DataError, ModelFormatError
from bitplan.formats import WeightChoice, choice_bits, choice_format, ladder, weight_choice
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
    UniformCheck,
    shared_input_groups,
)
from solver import Layer, Option, Problem, SolverParams, get_info, get_solver, parse_solver_params
from solver.ilp import explain_infeasible


@dataclass
class Prepared:
    """A loaded model with its data, layer table and cost model."""

    model: LoadedModel
    data: Dataset
    eval_data: Dataset
    layers: list[LayerInfo]
    costs: CostModel
    bank: WeightBank
    held_out: str = "given"  # how eval_data was obtained: "given", "split" (kept aside from data) or "none"
    notes: list[str] = field(default_factory=list)  # what was done to the data (e.g. distilled), for the plan


#: random inputs made (then distilled) when a plan has no calibration data
DISTILL_SAMPLES = 128


def random_inputs(model: LoadedModel, samples: int, seed: int) -> Dataset:
    """Random inputs shaped like the model's (the service's synthetic data), to be distilled."""
    import tempfile

    from bitplan.synthetic import write_synthetic

    specs = [spec.model_dump() for spec in model.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/random.npz"
        write_synthetic(specs, samples, seed, path)
        data = load_data(path)
    data.source = f"{samples} random inputs"
    return data


def resolve_data(model_ref: str, path: str | None, split: str, model: LoadedModel | None = None,
                 seq_len: int = 128) -> Dataset:
    """The data at ``path`` (text tokenised with ``model``'s tokenizer into ``seq_len`` windows), else a catalog
    model's own split."""
    if path is not None:
        return load_data(path, model.tokenizer if model else None, seq_len, model.vocab_size if model else None)
    if model_ref.startswith("catalog:"):
        from bitplan.catalog import get_entry

        return get_entry(model_ref.removeprefix("catalog:")).dataset(split)
    raise DataError("no calibration data given", "give a .npz or .safetensors file with 'inputs' [and 'targets'], "
                                                 "or ask for distilled data to make inputs from the model itself",
                    field="data")


def prepare(model_ref: str, data_path: str | None, eval_path: str | None = None,
            latency_table: dict | None = None, clip: str = "mse", model_name: str | None = None,
            distill: bool = False, seed: int = 0, seq_len: int = 128, device: str = "auto",
            dtype: str = "float32") -> Prepared:
    """Load the model and its data, check them against each other, measure the layer table.

    ``model_name`` replaces the file name in the plan (the service stores uploads under their sha256).
    ``distill``: the calibration inputs are optimised to match the model's BatchNorm statistics (ZeroQ); with
    no ``data_path`` (and not a catalog model) they start as random inputs shaped like the model's.
    ``seq_len``: tokens per sample when the data is text (a Hugging Face checkpoint's tokenizer makes them).
    ``device``/``dtype``: where the model and its data are put and the compute dtype (bitplan.core.device); on a
    GPU, ``model.max_batch`` caps every micro-batch by the free memory.
    """
    notes: list[str] = []
    placement = resolve_placement(device, dtype)  # an unavailable device fails before anything is loaded
    if not model_ref.startswith("catalog:") and not Path(model_ref).exists():  # say so before asking for data
        raise ModelFormatError(f"model file '{model_ref}' not found", "give a .pt2 or TorchScript file, a Hugging Face "
                                                                      "checkpoint directory, or catalog:NAME")
    if distill and data_path is None and not model_ref.startswith("catalog:"):
        model = load_model(model_ref)
        data = random_inputs(model, DISTILL_SAMPLES, seed)
    elif data_path is not None and is_text(data_path):  # text needs the model's tokenizer first
        model = load_model(model_ref)
        data = resolve_data(model_ref, data_path, "calib", model, seq_len)
    else:
        data = resolve_data(model_ref, data_path, "calib")
        model = load_model(model_ref, sample=data)
    if model_name:
        model.info = model.info.model_copy(update={"name": model_name})
    notes.extend(model.notes)
    data = _conformed(data, model, "calibration", notes)
    model.to(placement.device, placement.dtype)
    data = data.to(placement.device)
    if distill:
        from bitplan.core.distill import distil

        data, note = distil(model, data)
        notes.append(note)
    held_out = "given"
    if eval_path is None and data_path is None and model_ref.startswith("catalog:"):
        eval_data = _conformed(resolve_data(model_ref, None, "eval"), model, "held-out", notes)
    elif eval_path is not None:
        eval_data = _conformed(load_data(eval_path, model.tokenizer, seq_len, model.vocab_size), model, "held-out", notes)
    else:  # keep part of the calibration data aside: the search must not see what the plan is judged on
        data, kept = holdout_split(data)
        eval_data, held_out = (kept, "split") if kept is not None else (data, "none")
    eval_data = eval_data.to(placement.device)
    if placement.is_cuda or placement.dtype != torch.float32:
        notes.append(placement.describe())
    if placement.is_cuda:
        model.max_batch, note = micro_batch_cap(model, data)
        notes.append(note)
    check_targets(model, data)
    check_targets(model, eval_data)
    macs = measure_macs(model, data.slice(0, min(len(data), 4)))
    layers = [
        LayerInfo(name=g.name, kind=g.kind, params=model.weight(g).numel(), out_channels=model.weight(g).shape[0],
                  macs=macs[g.name], reads=g.reads or None)
        for g in model.layers
    ]
    costs = CostModel(tuple(layers), model.fixed_bytes(), latency_table)
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers}, clip=clip)
    return Prepared(model, data, eval_data, layers, costs, bank, held_out, notes)


def _conformed(data: Dataset, model: LoadedModel, label: str, notes: list[str]) -> Dataset:
    """``data`` checked against the model's inputs; a dtype cast (float64 -> float32, say) is noted, not silent."""
    before = {k: v.dtype for k, v in data.inputs.items()}
    field = "data" if label == "calibration" else "eval_data"
    out = conform(data, model.inputs, f"the {label} data", field)
    ids = out.inputs.get("input_ids")
    if model.vocab_size is not None and ids is not None and ids.numel() and not ids.is_floating_point():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= model.vocab_size:
            raise DataError(f"the {label} data's input_ids run from {lo} to {hi}, but the model's vocabulary has "
                            f"{model.vocab_size} entries (ids 0 to {model.vocab_size - 1})",
                            "tokenise with the checkpoint's own tokenizer", field=field)
    casts = [f"{k or 'inputs'} {str(before[k]).removeprefix('torch.')} -> {str(v.dtype).removeprefix('torch.')}"
             for k, v in out.inputs.items() if k in before and before[k] != v.dtype]
    if casts:
        notes.append(f"{label} inputs converted to the model's dtypes: {', '.join(casts)}")
    return out


def build_problem(prep: Prepared, table: SensitivityTable, request: PlanRequest) -> Problem:
    omega = table.omega()
    choose_a = len(request.a_bits) > 1
    if choose_a and not all(layer.omega_act for layer in table.layers):
        raise BitplanError(f"choosing activation bits from {list(request.a_bits)} needs activation sensitivity",
                           "set the sensitivity parameter activations=true (auto and hessian_trace score "
                           "activations), or allow one activation bit width", field="a_bits")
    omega_act = {layer.name: layer.omega_act for layer in table.layers}
    missing = sorted(set(request.formats) - set.intersection(*(set(layer.omega_format) for layer in table.layers))) \
        if request.formats and table.layers else []
    if missing:
        raise BitplanError(f"the sensitivity table scores no format {missing} for some layers",
                           "compute it with the same formats as the plan (--formats)", field="formats")
    for layer in table.layers:
        omega[layer.name].update(layer.omega_format)
    return _problem(prep, request, lambda name, b, a: omega[name][b] + (omega_act[name][a] if choose_a else 0.0))


def weight_choices(request: PlanRequest) -> list[WeightChoice]:
    """What a layer's weights may take: the INT widths, then the number formats."""
    return [*request.w_bits, *request.formats]


def _problem(prep: Prepared, request: PlanRequest, objective) -> Problem:
    limits = request.budget.limits()
    if "latency_ms" in limits and request.latency_table is None:
        raise BitplanError("a latency_ms budget needs a latency lookup table", "give one: {layer: {bits: ms}}",
                           field="latency_table")
    layers = tuple(
        Layer(
            name=info.name,
            params=info.params,
            options=tuple(Option(w_bits=choice_bits(b), a_bits=a, objective=objective(info.name, b, a),
                                 cost=prep.costs.option_cost(info, b, a), fmt=choice_format(b))
                          for b in weight_choices(request) for a in request.a_bits),
        )
        for info in prep.layers
    )
    return Problem(layers=layers, budgets=limits, fixed_cost=prep.costs.fixed_cost(), pins=request.pins,
                   ties=shared_input_groups(prep.layers) if request.tie_shared_inputs else ())


def tie_groups(prep: Prepared, request: PlanRequest) -> list[tuple[str, ...]]:
    """Every layer once, in groups that take one bit width, format and activation width (singletons unless
    ``tie_shared_inputs``)."""
    tied = shared_input_groups(prep.layers) if request.tie_shared_inputs else ()
    grouped = {name for group in tied for name in group}
    return [*tied, *((info.name,) for info in prep.layers if info.name not in grouped)]


def check_budget_fits(prep: Prepared, request: PlanRequest) -> None:
    """Refuse, before any sensitivity is computed, a budget that no plan can meet (as the API does at submit);
    the error names the smallest achievable value."""
    problem = _problem(prep, request, lambda name, b, a: 0.0)
    if any(problem.minimum(key) > limit * (1 + 1e-9) + 1e-9 for key, limit in problem.budgets.items()):
        raise explain_infeasible(problem)


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


def reuse_table(table: SensitivityTable, source: str) -> SensitivitySource:
    """A sensitivity source that hands back ``table`` (written earlier by ``bitplan sensitivity --out``) after
    checking that it is the model's and scores every layer at every allowed bit width."""

    def reuse(prep: Prepared, ctx: SensitivityContext) -> SensitivityTable:
        if table.model_sha256 is not None and table.model_sha256 != prep.model.info.sha256:
            raise BitplanError(f"the sensitivity table {source} was computed for another model "
                               f"(sha256 {table.model_sha256[:12]}…, this one is {prep.model.info.sha256[:12]}…)",
                               "compute one for this model with bitplan sensitivity MODEL --out FILE", field="table")
        names = [info.name for info in prep.layers]
        have = {layer.name: layer for layer in table.layers}
        missing = [n for n in names if n not in have]
        if missing or len(have) != len(names):
            extra = sorted(set(have) - set(names))
            raise BitplanError(f"the sensitivity table {source} does not match the model's layers"
                               + (f": it lacks {', '.join(missing[:5])}" if missing else "")
                               + (f"{';' if missing else ':'} it has unknown {', '.join(extra[:5])}" if extra else ""),
                               "compute it for this model with bitplan sensitivity MODEL --out FILE", field="table")
        lacking = sorted({b for b in ctx.w_bits for n in names if b not in have[n].omega})
        if lacking:
            raise BitplanError(f"the sensitivity table {source} has no scores for {lacking}-bit weights",
                               "compute it with --wbits covering the plan's bit widths", field="table")
        note = f"reused the table in {source} ({table.method}, computed in {table.seconds:.1f} s)"
        if table.data_sha256 is not None and table.data_sha256 != prep.data.sha256:
            note += "; it was computed on other calibration data than this plan's"
        ordered = [have[n] for n in names]
        return table.model_copy(update={"layers": ordered, "notes": [note, *table.notes], "seconds": 0.0})

    return reuse


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
                       request.model_name, request.distill, request.seed, request.seq_len, request.device, request.dtype)
        progress("load", 1.0, f"{len(prep.layers)} layers")
    if prep.model.max_batch is not None and prep.model.max_batch < request.batch_size:  # what fits the GPU's memory
        request = request.model_copy(update={"batch_size": prep.model.max_batch})
    unknown = sorted(set(request.pins) - {info.name for info in prep.layers})
    if unknown:
        raise BitplanError(f"pins name unknown layer(s) {unknown}",
                           f"the model's layers are: {', '.join(info.name for info in prep.layers)[:800]}", field="pins")
    check_budget_fits(prep, request)
    with timer.stage("sensitivity"):
        ctx = SensitivityContext(prep.model, prep.data, list(request.w_bits), prep.bank, request.seed, progress,
                                 formats=request.formats)
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
    assignment = {name: (o.choice, o.a_bits) for name, o in solution.choices.items()}
    check = None
    if request.guarantee and request.validate_plan:  # the check measures; --no-validate skips all measuring
        with timer.stage("guarantee"):
            left = None if request.time_limit_s is None else request.time_limit_s - (time.perf_counter() - started)
            cap = request.refine_seconds if left is None else max(0.0, min(request.refine_seconds, left - 5.0))
            if request.solver == "uniform":  # the baseline was asked for: check it, never search away from it
                cap = 0.0
            int_only = int_only_plan(problem, params) if request.formats and request.solver != "uniform" else None
            assignment, check = check_against_uniform(prep, request, assignment, cap, progress, int_only,
                                                      max_evaluations=request.refine_evaluations)
    measured = None
    if request.validate_plan:
        with timer.stage("validate"):
            measured = validate(prep, request, assignment, progress)
        if request.guarantee and check is not None:
            assignment, measured, check = held_out_check(prep, request, assignment, measured, check)
    units = None
    if request.granularity != "layer":
        from bitplan.core.units import plan_units

        with timer.stage("units"):
            units = plan_units(prep, request, assignment, progress)
    omega_of = {layer.name: {(o.choice, o.a_bits): o.objective for o in layer.options} for layer in problem.layers}
    return PlanFile(
        model=prep.model.info,
        budget=request.budget.limits(),
        w_bits_options=list(request.w_bits),
        a_bits_options=list(request.a_bits),
        formats=list(request.formats),
        target=request.target,
        pins=dict(request.pins),
        ties=[list(group) for group in problem.ties],
        seed=request.seed,
        clip=request.clip,
        sensitivity=SensitivityInfo(method=table.method, params=table.params, seconds=table.seconds,
                                    notes=[*prep.notes, *table.notes]),
        solver=SolverInfo(method=request.solver, status=solution.status, seconds=solution.seconds,
                          objective=solution.objective, gap=solution.gap, time_limit_s=params.time_limit),
        layers=[
            PlanLayer(name=info.name, kind=info.kind, params=info.params, macs=info.macs,
                      w_bits=choice_bits(assignment[info.name][0]), a_bits=assignment[info.name][1],
                      w_format=choice_format(assignment[info.name][0]),
                      sensitivity=omega_of[info.name][assignment[info.name]])
            for info in prep.layers
        ],
        cost=prep.costs.plan_cost(assignment),
        measured=measured,
        uniform_check=check,
        frontier=frontier,
        timings=timer.seconds,
        units=units,
    )


def int_only_plan(problem: Problem, params: SolverParams) -> dict[str, tuple[WeightChoice, int]] | None:
    """The optimal plan with INT widths only (the ILP on the same scores), or None if there is none: with formats
    offered, the guarantee measures it beside the solver's plan on the search data and starts from it when it
    measures better (bench/formats_quality.py: even so, the plan with formats came out worse than the INT-only one on
    the held-out data in 5 of 18 cases)."""
    layers = tuple(Layer(layer.name, layer.params, tuple(o for o in layer.options if o.fmt == "int"))
                   for layer in problem.layers)
    if not all(layer.options for layer in layers):
        return None
    try:
        restricted = Problem(layers=layers, budgets=problem.budgets, fixed_cost=problem.fixed_cost, pins=problem.pins,
                             ties=problem.ties)
        solution = get_solver("ilp")(restricted, time_limit=params.time_limit)
    except BitplanError:
        return None
    return {name: (o.choice, o.a_bits) for name, o in solution.choices.items()}


def frontier_around(problem: Problem, cost_key: str | None = None, time_limit: float | None = None) -> list[dict] | None:
    """The Pareto frontier of predicted loss vs the budget's cost, for solvers that give none (ilp, greedy,
    uniform): every plan should come with the trade-off around it. None if it cannot be traced (several
    budgets and no cost key)."""
    try:
        return get_solver("pareto")(problem, cost_key=cost_key, points=40, time_limit=time_limit).frontier
    except BitplanError:
        return None


def overrides_for(prep: Prepared, assignment: dict[str, tuple[WeightChoice, int]]) -> dict[str, torch.Tensor]:
    return {g.weight_key: prep.bank.get(g.weight_key, assignment[g.name][0]) for g in prep.model.layers
            if assignment[g.name][0] != 16}


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
    uniform = uniform_cost = uniform_pair = None
    for uni in uniform_plans(prep, weight_choices(request), request.a_bits, _fits(prep, request), request.pins):
        m = run(uni)
        if uniform is None or m.kl < uniform.kl:
            free = [pair for name, pair in uni.items() if name not in request.pins] or list(uni.values())
            uniform, uniform_pair, uniform_cost = m, free[0], prep.costs.plan_cost(uni)
    progress("validate", 1.0, "done")
    return Measured(
        data=prep.eval_data.source,
        samples=len(prep.eval_data),
        held_out=prep.held_out,
        loss_kind="cross_entropy" if prep.eval_data.targets is not None else "kl",
        fp=fp, plan=plan, uniform=uniform, uniform_w_bits=choice_bits(uniform_pair[0]) if uniform_pair else None,
        uniform_format=choice_format(uniform_pair[0]) if uniform_pair else "int",
        uniform_a_bits=uniform_pair[1] if uniform_pair else None, uniform_cost=uniform_cost,
    )


def _fits(prep: Prepared, request: PlanRequest):
    limits = request.budget.limits()

    def fits(assign: dict[str, tuple[int, int]]) -> bool:
        cost = prep.costs.plan_cost(assign)
        return all(getattr(cost, key) is not None and getattr(cost, key) <= limit * (1 + 1e-9)
                   for key, limit in limits.items())

    return fits


def _scalar_cost(prep: Prepared, request: PlanRequest):
    limits = request.budget.limits()

    def cost_of(assign: dict[str, tuple[int, int]]) -> float:
        cost = prep.costs.plan_cost(assign)
        return sum((getattr(cost, key) or 0.0) / limit for key, limit in limits.items())

    return cost_of


def _label(assign: dict[str, tuple[int, int]]) -> str:
    """'uniform 4-bit': the most common weight width (pinned layers may differ), with the activation width if any."""
    widths = [w for w, _ in assign.values()]
    w = max(set(widths), key=widths.count)
    a = next(iter(assign.values()))[1]
    return (f"uniform {w}" if isinstance(w, str) else f"uniform {w}-bit") + (f" (activations {a}-bit)" if a < 16 else "")


#: Calibration samples the guarantee's measurements use at most.
GUARANTEE_SAMPLES = 256


def check_against_uniform(prep: Prepared, request: PlanRequest, assignment: dict[str, tuple[WeightChoice, int]],
                          cap_seconds: float, progress: ProgressFn = no_progress,
                          int_only: dict[str, tuple[WeightChoice, int]] | None = None,
                          max_evaluations: int | None = None) -> tuple[dict, UniformCheck]:
    """Measure the solver's plan against every uniform plan that fits, on the search (calibration) data, then
    run the measured local search (re-scoring each layer in the context of the others' bits) from the better of
    them for up to ``cap_seconds`` and ``max_evaluations`` measured plans. Returns the best plan found if it is no
    worse than the best uniform plan, else that uniform plan; the UniformCheck says which and why."""
    fits = _fits(prep, request)
    uniforms = uniform_plans(prep, weight_choices(request), request.a_bits, fits, request.pins)
    data = prep.data if len(prep.data) <= GUARANTEE_SAMPLES else _head(prep.data, GUARANTEE_SAMPLES)
    search_label = f"{prep.data.source}, {len(data)} samples"
    if not uniforms:
        return assignment, UniformCheck(outcome="no_uniform_fits", search_data=search_label,
                                        message="No single bit width fits this budget, so there is no uniform plan "
                                                "to compare with.")
    progress("guarantee", 0.0, "measuring the plan against uniform precision")
    if min(request.a_bits) < 16:
        calibrate_activations(prep.model, prep.data, request.batch_size)
    scorer = Scorer(prep, data, request.batch_size)
    has_targets = data.targets is not None
    plan_m = scorer(assignment)
    best_uni = min(uniforms, key=lambda u: scorer(u).kl)
    uni_m, uni_label = scorer(best_uni), _label(best_uni)
    search = {"solver plan": plan_m} | {_label(u): scorer(u) for u in uniforms}
    solver_plan = {name: w for name, (w, _) in assignment.items()}
    int_note = ""
    if int_only is not None and int_only != assignment:
        int_m = search["solver plan, INT only"] = scorer(int_only)
        if int_m.kl < plan_m.kl * (1 - TIE) and (not has_targets or int_m.loss <= plan_m.loss):
            assignment, plan_m = int_only, int_m
            int_note = " (the solver's plan with INT widths only, which measured better than its plan with formats)"
    first_ok = no_worse(plan_m, uni_m, has_targets)
    versus = f"(KL {plan_m.kl:.4g} vs {uni_m.kl:.4g})"
    result = None
    if cap_seconds > 0:
        word = "no worse than" if first_ok else "worse than"
        progress("guarantee", 0.0, f"the plan measured {word} {uni_label}; measured local search for up to "
                                   f"{cap_seconds:.0f} s")
        movable = [group if len(group) > 1 else group[0] for group in tie_groups(prep, request)
                   if not set(group) & set(request.pins)]
        seeds = [assignment, *uniforms, *([int_only] if int_only is not None and int_only != assignment else [])]
        result = local_search(scorer, seeds, ladder(weight_choices(request)), movable, fits,
                              _scalar_cost(prep, request), time.perf_counter() + cap_seconds, target=uni_m,
                              has_targets=has_targets, progress=progress, max_evaluations=max_evaluations)
        search["refined plan"] = result.metrics
    refine = None if result is None else {"rounds": result.rounds, "evaluations": result.evaluations,
                                          "seconds": round(result.seconds, 2), "stopped": result.stopped}
    found = result is not None and result.assignment not in uniforms and no_worse(result.metrics, uni_m, has_targets)
    if first_ok:
        final, final_m = assignment, plan_m
        if found and result.metrics.kl < plan_m.kl * (1 - TIE) and (not has_targets or result.metrics.loss <= plan_m.loss):
            final, final_m = result.assignment, result.metrics
        outcome = "plan_better" if final_m.kl < uni_m.kl * (1 - TIE) else "plan_level"
        word = "better than" if outcome == "plan_better" else "level with"
        polished = "" if final is assignment else (
            f"; re-scoring its layers in the context of the others' bits improved it to KL {final_m.kl:.4g}")
        return final, UniformCheck(
            outcome=outcome, uniform=uni_label, search_data=search_label, search=search, refine=refine,
            solver_plan=None if final is assignment and not int_note else solver_plan,
            message=f"The solver's plan{int_note} measured {word} {uni_label} on the search data {versus}{polished}.")
    if found:
        return result.assignment, UniformCheck(
            outcome="refined", uniform=uni_label, search_data=search_label, search=search, solver_plan=solver_plan,
            refine=refine,
            message=f"The solver's plan measured worse than {uni_label} on the search data {versus}; the measured "
                    f"refinement found this plan (KL {result.metrics.kl:.4g}).")
    return best_uni, UniformCheck(
        outcome="uniform_returned", uniform=uni_label, search_data=search_label, search=search,
        solver_plan=solver_plan, refine=refine,
        message=f"The solver's plan measured worse than {uni_label} on the search data {versus} and the refinement "
                f"found nothing better, so {uni_label} is returned.")


def held_out_check(prep: Prepared, request: PlanRequest, assignment: dict[str, tuple[int, int]], measured: Measured,
                   check: UniformCheck) -> tuple[dict, Measured, UniformCheck]:
    """The final word: on the held-out data, a plan worse than the best uniform plan is replaced by it."""
    if measured.uniform is None or check.outcome in ("uniform_returned", "no_uniform_fits"):
        return assignment, measured, check
    has_targets = prep.eval_data.targets is not None
    if no_worse(measured.plan, measured.uniform, has_targets):
        return assignment, measured, check
    pair = (weight_choice(measured.uniform_w_bits, measured.uniform_format), measured.uniform_a_bits)
    uni_label = _label({"": pair})
    where = "the held-out data" if measured.held_out != "none" else "the calibration data (no held-out data)"
    worse = f"KL {measured.plan.kl:.4g} vs {measured.uniform.kl:.4g}"
    if has_targets:
        worse += f", loss {measured.plan.loss:.4g} vs {measured.uniform.loss:.4g}"
    check = check.model_copy(update={
        "outcome": "uniform_returned", "uniform": uni_label,
        "solver_plan": check.solver_plan or {name: w for name, (w, _) in assignment.items()},
        "message": f"The plan measured worse than {uni_label} on {where} ({worse}), so {uni_label} is returned."})
    measured = measured.model_copy(update={"plan": measured.uniform})
    return {info.name: (request.pins.get(info.name, pair[0]), pair[1]) for info in prep.layers}, measured, check


def measured_evaluator(prep: Prepared, request: PlanRequest, limit: int = 256):
    """A solver ``evaluate`` hook: the measured calibration loss of the model quantized as proposed.

    Candidates are scored on calibration data, never on the held-out data the plan is reported on.
    """
    data = prep.data if len(prep.data) <= limit else _head(prep.data, limit)
    if min(request.a_bits) < 16:
        calibrate_activations(prep.model, prep.data, request.batch_size)
    scorer = Scorer(prep, data, request.batch_size)  # the uniform check's scorer: each plan measured once

    def evaluate(choices) -> float:
        return scorer({name: (o.choice, o.a_bits) for name, o in choices.items()}).loss

    return evaluate


def _head(data: Dataset, n: int) -> Dataset:
    return Dataset({k: v[:n] for k, v in data.inputs.items()}, None if data.targets is None else data.targets[:n],
                   data.source, data.sha256)
