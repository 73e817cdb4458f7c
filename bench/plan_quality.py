"""Does the plan beat uniform precision? Measured, per model x budget x sensitivity method.

For each catalog model, average weight-bit budget and sensitivity method: the ILP's first plan from the
method's table, the plan bitplan returns after the uniform check (and, when needed, the measured
refinement or the fall-back to uniform), and the best uniform plan that fits, all measured on the
model's held-out evaluation split (never seen by the search). On models whose brute force fits
``--brute-max`` plans, the brute-force optimum (best calibration KL among every plan that fits) gives
the regret: returned held-out KL minus the optimum's.

    python bench/plan_quality.py                                   # every catalog model, budgets 2.5,3,3.5,4
    python bench/plan_quality.py --models digits_mobilenet --methods auto,hessian_trace --budgets 3
    python bench/plan_quality.py --models minilm --methods auto,hessian_trace --json rows.json

Columns: KL = KL(full precision || quantized) on the held-out split; "vs uniform" = returned KL /
best uniform KL (<= 1 is the guarantee); outcome = the plan file's uniform_check.outcome.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from bitplan.core.pipeline import build_problem, check_against_uniform, held_out_check, prepare, validate
from bitplan.core.refine import Scorer
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.schemas import Budget, PlanRequest
from solver import get_solver

METHODS = ["auto", "hessian_trace", "fisher", "perturbation", "lrp"]
#: cheaper settings where a full run would take many minutes on 2 cores
PARAMS = {"minilm": {"fisher": {"max_samples": 96}}}


def brute_force(prep, request: PlanRequest, w_bits: list[int], limit: int):
    """The plan with the least calibration KL among all that fit the budget, or None if there are too many."""
    names = [info.name for info in prep.layers]
    if len(w_bits) ** len(names) > limit:
        return None
    scorer = Scorer(prep, prep.data, request.batch_size)
    budget = request.budget.limits()["avg_weight_bits"]
    sizes = [info.params for info in prep.layers]
    total = sum(sizes)
    best = None
    for combo in itertools.product(w_bits, repeat=len(names)):
        if sum(b * n for b, n in zip(combo, sizes)) > budget * total * (1 + 1e-9):
            continue
        assign = {name: (b, 16) for name, b in zip(names, combo)}
        kl = scorer(assign).kl
        if best is None or kl < best[0]:
            best = (kl, assign)
    return None if best is None else best[1]


def modelopt_plan(name: str, prep, bits: float, w_bits: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """ModelOpt's ``auto_quantize`` (gradient scores, its own search) over weight-only INT formats of the same
    bit widths, per output channel like bitplan's quantizer, on the same calibration data with targets; its
    choice per layer is returned as a bitplan assignment, to be measured with bitplan's quantizer."""
    import warnings

    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    import modelopt.torch.quantization as mtq

    from bitplan.catalog import get_entry

    model = get_entry(name).build().eval()
    batches = list(prep.data.batches(64))
    formats = [{"quant_cfg": {"*weight_quantizer": {"num_bits": b, "axis": 0}, "*input_quantizer": {"enable": False}},
                "algorithm": "max"} for b in w_bits]
    # the loss is scaled by 1e6: at a trained model the unscaled scores are ~1e-8, below the search's tolerance,
    # and it then picks the lowest bits everywhere; a constant factor changes no ranking
    _, state = mtq.auto_quantize(
        model, constraints={"effective_bits": bits}, quantization_formats=formats, data_loader=batches,
        forward_step=lambda m, b: m(*b.args, **b.kwargs),
        loss_func=lambda out, b: 1e6 * F.cross_entropy(out.reshape(-1, out.shape[-1]), b.targets.reshape(-1)),
        num_calib_steps=len(batches), num_score_steps=len(batches), verbose=False)
    chosen = {}
    for key, recipe in state["best"]["recipe"].items():
        label = str(recipe)
        index = int(label.split("_", 1)[1].split("(")[0]) if label.startswith("CUSTOM_") else None
        chosen[key.removesuffix(".quant_recipe")] = (w_bits[index] if index is not None else 16, 16)
    missing = [info.name for info in prep.layers if info.name not in chosen]
    if missing:
        raise SystemExit(f"ModelOpt's layer names do not cover bitplan's: {missing}")
    return {info.name: chosen[info.name] for info in prep.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_cnn,digits_resnet,digits_mobilenet,minilm")
    parser.add_argument("--budgets", default="2.5,3,3.5,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--wbits", default="2,3,4,5,6,8")
    parser.add_argument("--solver", default="ilp", help="one solver, or several separated by commas "
                        "(then the method column reads method / solver)")
    parser.add_argument("--refine-seconds", type=float, default=120.0)
    parser.add_argument("--brute-max", type=int, default=50_000, help="largest plan count to brute-force")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modelopt", action="store_true", help="also run ModelOpt's auto_quantize (nvidia-modelopt)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    from solver.ilp import silence_banner

    silence_banner()  # this script's stdout is its table
    w_bits = tuple(int(b) for b in args.wbits.split(","))
    rows = []
    print("| model | avg bits | method | first plan KL | returned KL | best uniform KL | vs uniform | outcome | "
          "returned loss | uniform loss | optimum KL | regret | sensitivity s | check s |")
    print("|" + " --- |" * 14)
    for name in args.models.split(","):
        prep = prepare(f"catalog:{name}", None)
        tables = {}
        for spec in args.methods.split(","):
            method, _, extra = spec.partition(":")
            params = dict(PARAMS.get(name, {}).get(method, {}))
            params.update(dict(item.split("=", 1) for item in extra.split(";") if item))
            ctx = SensitivityContext(prep.model, prep.data, list(w_bits), prep.bank, args.seed)
            tables[spec] = (method, params, run_sensitivity(method, params, ctx))
        held = Scorer(prep, prep.eval_data, 64)
        for bits in (float(b) for b in args.budgets.split(",")):
            optimum = None
            solvers = args.solver.split(",")
            for (spec, (method, params, table)), solver in itertools.product(tables.items(), solvers):
                label = spec if len(solvers) == 1 else f"{spec} / {solver}"
                request = PlanRequest(model=f"catalog:{name}", budget=Budget(avg_weight_bits=bits), w_bits=w_bits,
                                      sensitivity=method, sensitivity_params=params, solver=solver,
                                      refine_seconds=args.refine_seconds, seed=args.seed)
                if optimum is None:
                    opt = brute_force(prep, request, list(w_bits), args.brute_max)
                    optimum = held(opt).kl if opt is not None else float("nan")
                solution = get_solver(solver)(build_problem(prep, table, request))
                first = {n: (o.w_bits, o.a_bits) for n, o in solution.choices.items()}
                start = time.perf_counter()
                returned, check = check_against_uniform(prep, request, first, args.refine_seconds)
                measured = validate(prep, request, returned)
                returned, measured, check = held_out_check(prep, request, returned, measured, check)
                check_s = time.perf_counter() - start
                uni = measured.uniform
                row = {"model": name, "bits": bits, "method": label, "first_kl": held(first).kl,
                       "kl": measured.plan.kl, "uniform_kl": uni.kl if uni else None,
                       "loss": measured.plan.loss, "uniform_loss": uni.loss if uni else None,
                       "outcome": check.outcome, "optimum_kl": optimum, "sensitivity_s": table.seconds,
                       "check_s": check_s, "bits_used": {n: w for n, (w, _) in returned.items()}}
                row["ratio"] = row["kl"] / row["uniform_kl"] if uni and uni.kl > 0 else None
                row["regret"] = row["kl"] - optimum if optimum == optimum else None
                emit(rows, row, table.seconds, check_s)
            if args.modelopt:
                request = PlanRequest(model=f"catalog:{name}", budget=Budget(avg_weight_bits=bits), w_bits=w_bits)
                start = time.perf_counter()
                plan = modelopt_plan(name, prep, bits, w_bits)
                seconds = time.perf_counter() - start
                measured = validate(prep, request, plan)
                uni = measured.uniform
                used = prep.costs.plan_cost(plan).avg_weight_bits
                row = {"model": name, "bits": bits, "method": "modelopt auto_quantize", "first_kl": measured.plan.kl,
                       "kl": measured.plan.kl, "uniform_kl": uni.kl if uni else None, "loss": measured.plan.loss,
                       "uniform_loss": uni.loss if uni else None, "outcome": f"avg bits {used:.3f}",
                       "optimum_kl": optimum, "sensitivity_s": seconds, "check_s": 0.0,
                       "bits_used": {n: w for n, (w, _) in plan.items()}}
                row["ratio"] = row["kl"] / row["uniform_kl"] if uni and uni.kl > 0 else None
                row["regret"] = row["kl"] - optimum if optimum == optimum else None
                emit(rows, row, seconds, 0.0)
    summarize(rows, args.json)


def emit(rows: list[dict], row: dict, sensitivity_s: float, check_s: float) -> None:
    rows.append(row)

    def f(x: float | None, p: int = 5) -> str:
        return "–" if x is None or x != x else f"{x:.{p}f}"

    print(f"| {row['model']} | {row['bits']:g} | {row['method']} | {f(row['first_kl'])} | {f(row['kl'])} | "
          f"{f(row['uniform_kl'])} | {f(row['ratio'], 3)} | {row['outcome']} | {f(row['loss'])} | "
          f"{f(row['uniform_loss'])} | {f(row['optimum_kl'])} | {f(row['regret'])} | {sensitivity_s:.1f} | "
          f"{check_s:.1f} |", flush=True)


def summarize(rows: list[dict], json_path: str | None) -> None:
    worse = [r for r in rows if r["ratio"] is not None and r["ratio"] > 1 + 1e-6 and "modelopt" not in r["method"]]
    print(f"\nreturned plans worse than uniform (KL): {len(worse)} of "
          f"{sum(r['ratio'] is not None and 'modelopt' not in r['method'] for r in rows)}")
    for method in dict.fromkeys(r["method"] for r in rows):
        at3 = [r["ratio"] for r in rows if r["method"] == method and r["bits"] == 3 and r["ratio"] is not None]
        if at3:
            print(f"{method}: median returned/uniform KL at 3 bits over {len(at3)} models = {statistics.median(at3):.3f}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
