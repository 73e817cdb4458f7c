"""``bitplan`` command line: plan, inspect, solve, catalog.

Every user error ends with one line ``bitplan: error: ...`` and exit code 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from bitplan.errors import BitplanError
from bitplan.files import write_atomic

EXIT_USER_ERROR = 2


def _parse_bits(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BitplanError(f"bit list '{text}' is not comma-separated integers", "e.g. --wbits 2,3,4,6,8") from None


def _parse_pins(items: list[str]) -> dict[str, int]:
    pins = {}
    for item in items:
        name, sep, bits = item.rpartition("=")
        if not sep or not name:
            raise BitplanError(f"pin '{item}' is not LAYER=BITS", "e.g. --pin conv1=8")
        try:
            pins[name] = int(bits)
        except ValueError:
            raise BitplanError(f"pin '{item}': '{bits}' is not a bit width", "e.g. --pin conv1=8") from None
    return pins


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise BitplanError(f"parameter '{item}' is not KEY=VALUE", "e.g. --param max_probes=16")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())


def cmd_plan(args: argparse.Namespace) -> int:
    from bitplan.costs import load_latency_table
    from bitplan.schemas import Budget, PlanRequest

    budget = Budget.parse_items(args.budget)
    try:
        request = PlanRequest(
            model=args.model, data=args.data, eval_data=args.eval_data, budget=budget,
            w_bits=tuple(_parse_bits(args.wbits)), a_bits=tuple(_parse_bits(args.abits)), pins=_parse_pins(args.pin),
            sensitivity=args.sensitivity, sensitivity_params=_parse_params(args.param), solver=args.solver,
            solver_params=_parse_params(args.solver_param),
            clip=args.clip, seed=args.seed,
            latency_table=load_latency_table(args.latency_table) if args.latency_table else None,
            validate_plan=not args.no_validate,
        )
    except ValidationError as exc:
        raise BitplanError(_validation_message(exc)) from None
    from bitplan.methods import get_method
    from solver import get_solver

    get_method(request.sensitivity)  # fail fast, before loading anything
    get_solver(request.solver)
    from bitplan.core.pipeline import make_plan
    from bitplan.progress import StderrProgress

    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        plan = make_plan(request, progress)
    finally:
        progress.close()
    if args.out:
        write_atomic(Path(args.out), plan.to_json() + "\n")
    print(_summary(plan))
    if args.out:
        print(f"plan written to {args.out}")
    return 0


def _summary(plan) -> str:
    lines = [f"model {plan.model.name} ({plan.model.format}), budget "
             + ", ".join(f"{k}<={v:g}" for k, v in plan.budget.items())]
    width = max(len(layer.name) for layer in plan.layers)
    lines.append(f"  {'layer':<{width}}  kind     params   w  a      omega")
    for layer in plan.layers:
        lines.append(f"  {layer.name:<{width}}  {layer.kind:<7} {layer.params:>7}  {layer.w_bits:>2} {layer.a_bits:>2}  "
                     f"{layer.sensitivity:>9.3g}")
    c = plan.cost
    lines.append(f"cost: avg_weight_bits {c.avg_weight_bits:.3f}, size {c.size_bytes / 1e3:.1f} kB, "
                 f"bops {c.bops:.4g}" + (f", latency {c.latency_ms:.3g} ms" if c.latency_ms is not None else ""))
    if plan.frontier:
        lines.append(f"frontier: {len(plan.frontier)} non-dominated plans (in the plan file)")
    lines.append(f"sensitivity {plan.sensitivity.method} {plan.sensitivity.seconds:.2f}s; "
                 f"solver {plan.solver.method} {plan.solver.status} {plan.solver.seconds:.2f}s")
    for note in plan.sensitivity.notes:
        lines.append(f"  note: {note}")
    m = plan.measured
    if m is not None:
        lines.append(f"measured on {m.data} ({m.samples} samples; loss = {m.loss_kind}):")
        rows = [("full precision", m.fp), ("plan", m.plan)]
        if m.uniform is not None:
            rows.append((f"uniform {m.uniform_w_bits}-bit", m.uniform))
        for label, x in rows:
            acc = f"  accuracy {x.accuracy:.4f}" if x.accuracy is not None else ""
            lines.append(f"  {label:<15} loss {x.loss:.5f}  kl {x.kl:.5f}  top1 agreement {x.top1_agreement:.4f}{acc}")
        if m.uniform is None:
            lines.append("  (no uniform bit width fits the budget)")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in plan.timings.items()))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from bitplan.core.data import conform
    from bitplan.core.evaluate import measure_macs
    from bitplan.core.loading import load_model
    from bitplan.core.pipeline import resolve_data

    data = None
    if args.data or args.model.startswith("catalog:"):
        data = resolve_data(args.model, args.data, "calib")
    model = load_model(args.model, sample=data)
    batch = None
    if data is not None:
        data = conform(data, model.inputs)
        batch = data.slice(0, min(4, len(data)))
    elif model.example is not None:
        batch = model.example
    macs = measure_macs(model, batch) if batch is not None else {}
    rows = [
        {"name": g.name, "kind": g.kind, "params": model.weight(g).numel(), "out_channels": model.weight(g).shape[0],
         "macs": macs.get(g.name)}
        for g in model.layers
    ]
    if args.json:
        print(json.dumps({"model": model.info.model_dump(), "inputs": [s.model_dump() for s in model.inputs],
                          "layers": rows, "other_bytes": model.fixed_bytes()}, indent=2))
        return 0
    print(f"{model.info.name} ({model.info.format}), sha256 {model.info.sha256[:16]}…")
    print("inputs: " + ", ".join(f"{s.name} {tuple('N' if d is None else d for d in s.shape)} {s.dtype}"
                                 for s in model.inputs))
    width = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{width}}  kind     {'params':>10} {'out_ch':>7} {'MACs/sample':>13}")
    for r in rows:
        mac = "?" if r["macs"] is None else f"{r['macs']:,}"
        print(f"{r['name']:<{width}}  {r['kind']:<7} {r['params']:>10,} {r['out_channels']:>7} {mac:>13}")
    total = sum(r["params"] for r in rows)
    print(f"{len(rows)} quantizable layers, {total:,} weights; other tensors {model.fixed_bytes() / 1e3:.1f} kB")
    if not macs:
        print("(MACs need inputs: pass --data FILE)")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from bitplan.methods import get_method, parse_params

    info = get_method(args.method)
    params = _parse_params(args.param)
    parse_params(info, params)  # fail fast on bad parameters, before loading anything
    bits = _parse_bits(args.wbits)
    from bitplan.core.pipeline import prepare
    from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
    from bitplan.progress import StderrProgress
    from bitplan.schemas import WEIGHT_BITS

    bad = [b for b in bits if b not in WEIGHT_BITS]
    if bad:
        raise BitplanError(f"weight bits {bad} not supported", f"choose from {list(WEIGHT_BITS)}")
    prep = prepare(args.model, args.data, clip=args.clip)
    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        result = run_sensitivity(args.method, params, SensitivityContext(prep.model, prep.data, bits, prep.bank,
                                                                          args.seed, progress))
    finally:
        progress.close()
    text = result.model_dump_json(by_alias=True, indent=2)
    if args.out:
        write_atomic(Path(args.out), text + "\n")
    width = max(len(layer.name) for layer in result.layers)
    print(f"{result.method} on {prep.model.info.name}: {result.seconds:.2f}s")
    print(f"  {'layer':<{width}}  {'stat':>10}  " + "  ".join(f"{'w' + str(b):>9}" for b in bits))
    for layer in result.layers:
        print(f"  {layer.name:<{width}}  {layer.stat:>10.4g}  " + "  ".join(f"{layer.omega[b]:>9.3g}" for b in bits))
    for note in result.notes:
        print(f"  note: {note}")
    if args.out:
        print(f"table written to {args.out}")
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    from solver import Problem, get_solver

    try:
        raw = json.loads(Path(args.problem).read_text())
    except FileNotFoundError:
        raise BitplanError(f"problem file '{args.problem}' not found") from None
    except json.JSONDecodeError as exc:
        raise BitplanError(f"problem file '{args.problem}' is not JSON ({exc})") from None
    problem = Problem.from_dict(raw)
    solution = get_solver(args.solver)(problem, **_parse_params(args.solver_param))
    out = {
        "status": solution.status,
        "objective": solution.objective,
        "cost": solution.cost,
        "seconds": solution.seconds,
        "layers": [{"name": n, "w_bits": o.w_bits, "a_bits": o.a_bits, "objective": o.objective}
                   for n, o in solution.choices.items()],
        "gap": solution.gap,
        "frontier": solution.frontier,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        write_atomic(Path(args.out), text + "\n")
    print(text if not args.out else f"{solution.status}: objective {solution.objective:.6g}; written to {args.out}")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from bitplan.catalog import CATALOG_NAMES, get_entry

    if args.action == "list":
        for name in CATALOG_NAMES:
            print(f"catalog:{name}")
        return 0
    import numpy as np
    import torch

    entry = get_entry(args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(entry.export(), str(out / f"{entry.name}.pt2"))
    calib = entry.dataset("calib")
    script = torch.jit.script(entry.build()) if entry.name.startswith("digits") else None
    if script is not None:
        torch.jit.save(script, str(out / f"{entry.name}.ts"))
    for split in ("calib", "eval"):
        data = calib if split == "calib" else entry.dataset(split)
        arrays = {("inputs" if not k else f"inputs.{k}"): v.numpy() for k, v in data.inputs.items()}
        if data.targets is not None:
            arrays["targets"] = data.targets.numpy()
        np.savez(out / f"{entry.name}_{split}.npz", **arrays)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.name.startswith(entry.name)))} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bitplan import __version__

    parser = argparse.ArgumentParser(prog="bitplan", description="Mixed-precision bit-width planning.")
    parser.add_argument("--version", action="version", version=f"bitplan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="find the per-layer bit widths that fit a budget, and measure them")
    p.add_argument("model", help="model.pt2 (torch.export), model.ts (TorchScript) or catalog:NAME")
    p.add_argument("--data", help="calibration data .npz/.safetensors (default for catalog models: their own)")
    p.add_argument("--eval-data", help="held-out data for the measured figures (default: the calibration data)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="avg_weight_bits, size_bytes, bops or latency_ms; repeatable")
    p.add_argument("--wbits", default="2,3,4,5,6,8", help="allowed weight bit widths (16 = full precision)")
    p.add_argument("--abits", default="16", help="activation bits: one value for every layer (4, 8 or 16 = full "
                   "precision), or a list to choose from (needs --param activations=true)")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's weight bits")
    p.add_argument("--sensitivity", default="hessian_trace", help="sensitivity method")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="sensitivity method parameter")
    p.add_argument("--solver", default="ilp", help="ilp, pareto, evolutionary, greedy or uniform")
    p.add_argument("--solver-param", action="append", default=[], metavar="KEY=VALUE",
                   help="solver parameter, e.g. time_limit=10 (evolutionary: trials=100, measured=false)")
    p.add_argument("--clip", default="mse", choices=["mse", "minmax"], help="weight clipping")
    p.add_argument("--latency-table", help="JSON {layer: {bits: ms}} for a latency_ms budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-validate", action="store_true", help="skip measuring the plan")
    p.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    p.add_argument("--out", help="write the plan file (JSON, schema bitplan.plan/v1)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sensitivity", help="score every layer's sensitivity to each bit width")
    p.add_argument("model", help="model.pt2, model.ts or catalog:NAME")
    p.add_argument("--data", help="calibration data (default for catalog models: their own)")
    p.add_argument("--method", default="hessian_trace", help="hessian_trace, hessian_eigen, fisher, taylor, lrp, perturbation")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    p.add_argument("--wbits", default="2,3,4,5,6,8")
    p.add_argument("--clip", default="mse", choices=["mse", "minmax"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", help="write the table (JSON)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("inspect", help="list the quantizable layers with parameters and MACs")
    p.add_argument("model")
    p.add_argument("--data", help="inputs to measure MACs with")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("solve", help="solve a problem JSON (your own scores and costs) without a model")
    p.add_argument("problem")
    p.add_argument("--solver", default="ilp", help="ilp, pareto, evolutionary, greedy or uniform")
    p.add_argument("--solver-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("catalog", help="list the reference models or export one with its data")
    csub = p.add_subparsers(dest="action", required=True)
    csub.add_parser("list")
    e = csub.add_parser("export", help="write NAME.pt2 (and NAME.ts), NAME_calib.npz and NAME_eval.npz")
    e.add_argument("name")
    e.add_argument("--out", default=".")
    p.set_defaults(func=cmd_catalog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BitplanError as exc:
        print(f"bitplan: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bitplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bitplan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
