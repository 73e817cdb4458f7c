"""``bitplan`` command line: plan, inspect, solve, catalog; and, against a running server
(``bitplan/client.py``): submit, status, wait, fetch, cancel.

Every user error ends with one line ``bitplan: error: ...`` and exit code 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bitplan.errors import BitplanError, gpu_out_of_memory
from bitplan.exports import FORMATS as EXPORT_FORMATS
from bitplan.files import write_atomic
from bitplan.formats import FORMATS, TARGETS, WeightChoice, check_formats
from bitplan.methods import DEFAULT_SENSITIVITY
from bitplan.params import message_of
from bitplan.schemas import DEFAULT_A_BITS, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_SOLVER, DEFAULT_W_BITS, DTYPES

if TYPE_CHECKING:
    from bitplan.client import Client
    from bitplan.schemas import SensitivityTable

EXIT_USER_ERROR = 2
#: an error's request field -> the option that sets it (errors name fields; the CLI names its options)
OPTIONS = {"data": "--data", "eval_data": "--eval-data", "dataset_id": "--data", "eval_dataset_id": "--eval-data",
           "pins": "--pin", "budgets": "--budget", "w_bits": "--wbits", "a_bits": "--abits",
           "formats": "--formats", "target": "--target",
           "latency_table": "--latency-table", "sensitivity": "--sensitivity / --param",
           "solver": "--solver / --solver-param", "callback_url": "--callback-url", "table": "--table",
           "device": "--device", "dtype": "--dtype", "batch_size": "--param batch_size / max_samples"}


FORMATS_HELP = ("number formats a layer may take besides INT, comma-separated: " + ", ".join(FORMATS)
                + " (FP8, OCP MX, NVFP4, NF4; per layer, with granularity layer)")
TARGET_HELP = ("the runtime the plan is for: its INT widths and formats become the choices (" + "; ".join(
    f"{name}: INT {','.join(map(str, widths))}" + (f" + {','.join(fmts)}" if fmts else "")
    for name, (widths, fmts) in TARGETS.items()) + "); --wbits/--formats narrow them")
SEQ_LEN_HELP = "tokens per sample when the data is text, tokenised with the checkpoint's tokenizer.json (default: 128)"
GRANULARITY_HELP = ("layer (default): one weight width per layer; channel: per output channel; group:N: per block of N "
                    "input columns (e.g. group:128). Linear layers get units after the layer plan, keeping its bit "
                    "total, and keep them only if they measure better")


def _bits_text(bits) -> str:
    return ",".join(str(b) for b in bits)


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
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {message_of(e)}" for e in exc.errors())


def cmd_plan(args: argparse.Namespace) -> int:
    from bitplan.costs import load_latency_table
    from bitplan.schemas import Budget, PlanRequest

    budget = Budget.parse_items(args.budget)
    widths = args.wbits or _bits_text(DEFAULT_W_BITS)
    choices = {} if args.wbits is None and args.target else {"w_bits": tuple(_parse_bits(widths))}
    try:
        request = PlanRequest(
            model=args.model, data=args.data, eval_data=args.eval_data, budget=budget, **choices,
            formats=args.formats or (), target=args.target,
            a_bits=tuple(_parse_bits(args.abits)), pins=_parse_pins(args.pin),
            sensitivity=args.sensitivity, sensitivity_params=_parse_params(args.param), solver=args.solver,
            solver_params=_parse_params(args.solver_param),
            clip=args.clip, seed=args.seed,
            latency_table=load_latency_table(args.latency_table) if args.latency_table else None,
            validate_plan=not args.no_validate, refine_seconds=args.refine_seconds,
            refine_evaluations=args.refine_evaluations, distill=args.distill,
            tie_shared_inputs=args.tie_shared_inputs, device=args.device, dtype=args.dtype, seq_len=args.seq_len,
            granularity=args.granularity,
        )
    except ValidationError as exc:
        raise BitplanError(_validation_message(exc)) from None
    from bitplan.methods import get_method, parse_params
    from solver import parse_solver_params

    if args.table and (args.sensitivity != DEFAULT_SENSITIVITY or args.param):
        raise BitplanError("--table gives the sensitivity scores: --sensitivity and --param have nothing to do",
                           "drop them, or drop --table to compute the scores", field="table")
    parse_params(get_method(request.sensitivity), request.sensitivity_params)  # fail fast, before loading anything
    parse_solver_params(request.solver, request.solver_params)
    from bitplan.core.pipeline import make_plan
    from bitplan.progress import StderrProgress

    source = None
    if args.table:
        from bitplan.core.pipeline import reuse_table

        source = reuse_table(_read_table(args.table), args.table)
    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        plan = make_plan(request, progress, sensitivity=source)
    finally:
        progress.close()
    if args.out:
        write_atomic(Path(args.out), plan.to_json() + "\n")
    print(_summary(plan))
    if args.out:
        print(f"plan written to {args.out}")
    return 0


def _read_table(path: str) -> SensitivityTable:
    """A sensitivity table file (``bitplan sensitivity --out``), or a message that says what is wrong with it."""
    from bitplan.schemas import SensitivityTable

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BitplanError(f"cannot read the sensitivity table {path}: {exc.strerror or exc}",
                           "give the file that bitplan sensitivity --out wrote", field="table") from None
    try:
        return SensitivityTable.model_validate_json(text)
    except ValidationError as exc:
        raise BitplanError(f"{path} is not a sensitivity table: {_validation_message(exc)}",
                           "give the file that bitplan sensitivity --out wrote", field="table") from None


def _read_plan(path: str) -> Any:
    """A plan file (``bitplan plan --out`` or ``bitplan fetch``), or a message that says what is wrong with it."""
    from bitplan.schemas import PlanFile

    hint = "give the JSON file that bitplan plan --out or bitplan fetch wrote"
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BitplanError(f"cannot read the plan {path}: {getattr(exc, 'strerror', None) or exc}", hint,
                           field="plan") from None
    try:
        return PlanFile.model_validate_json(text)
    except ValidationError as exc:
        raise BitplanError(f"{path} is not a plan file: {_validation_message(exc)}", hint, field="plan") from None


def cmd_export(args: argparse.Namespace) -> int:
    from collections import Counter

    from bitplan.exports import export_plan

    plan = _read_plan(args.plan)
    source = Path(args.plan)
    export = export_plan(plan, args.to, stem=source.name.removesuffix(".json"))
    report = sys.stderr if args.out == "-" else sys.stdout
    print(f"{args.to}: {len(export.layers)} layers", file=report)
    if len(export.layers) <= 12:
        for name, desc in export.layers.items():
            print(f"  {name}: {desc}", file=report)
    else:  # by what they become
        counts = Counter((desc.split(": ", 1)[-1] if desc.startswith("group_") else desc).split(" (")[0]
                         for desc in export.layers.values())
        for desc, n in counts.most_common():
            print(f"  {n:5d} x {desc}", file=report)
    for note in export.notes:
        print(f"note: {note}", file=report)
    print(f"use: {export.usage}", file=report)
    if args.out == "-":
        sys.stdout.write(export.text)
        return 0
    out = Path(args.out) if args.out else source.with_name(export.filename)
    write_atomic(out, export.text)
    print(f"{args.to} file written to {out}", file=report)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from bitplan.core.apply import apply_plan

    plan = _read_plan(args.plan)
    report = apply_plan(plan, args.model, args.out, latency=args.latency, clip=plan.clip)
    print("\n".join(report.lines()))
    if args.report:
        write_atomic(Path(args.report), json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from bitplan.core.pipeline import prepare
    from bitplan.core.profile import profile_layers
    from bitplan.progress import StderrProgress

    widths: list[WeightChoice] = [*_parse_bits(args.wbits), *(_formats(args.formats) or [])]
    prep = prepare(args.model, args.data, seq_len=args.seq_len, device=args.device, dtype=args.dtype)
    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        table, notes = profile_layers(prep, widths, batch=args.batch, runs=args.runs,
                                      progress=lambda done, total: progress("profile", done / total,
                                                                            f"{done}/{total} layers"))
    finally:
        progress.close()
    cols = list(next(iter(table.values())))
    width = max(len(name) for name in table)
    print(f"{'layer':<{width}}  " + "  ".join(f"{f'{b} ms' if isinstance(b, str) else f'{b}-bit ms':>10}" for b in cols))
    for name, row in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row[b]:>10.4f}" for b in cols))
    print("total" + " " * (width - 3) + "  ".join(f"{sum(r[b] for r in table.values()):>10.4f}" for b in cols))
    for note in notes:
        print(f"note: {note}")
    write_atomic(Path(args.out), json.dumps({k: {str(b): ms for b, ms in v.items()} for k, v in table.items()},
                                            indent=2) + "\n")
    print(f"latency table written to {args.out} (use: bitplan plan ... --latency-table {args.out} "
          f"--budget latency_ms=...)")
    return 0


def _summary(plan) -> str:
    lines = [f"model {plan.model.name} ({plan.model.format}), budget "
             + ", ".join(f"{k}<={v:g}" for k, v in plan.budget.items())]
    width = max(len(layer.name) for layer in plan.layers)
    fmt = any(layer.w_format != "int" for layer in plan.layers) or plan.formats
    lines.append(f"  {'layer':<{width}}  kind     params   w  a      omega" + ("  format" if fmt else ""))
    for layer in plan.layers:
        lines.append(f"  {layer.name:<{width}}  {layer.kind:<7} {layer.params:>7}  {layer.w_bits:>2} {layer.a_bits:>2}  "
                     f"{layer.sensitivity:>9.3g}" + (f"  {layer.w_format}" if fmt else ""))
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
            rows.append((f"uniform {m.uniform_format}" if m.uniform_format != "int" else f"uniform {m.uniform_w_bits}-bit",
                         m.uniform))
        for label, x in rows:
            acc = f"  accuracy {x.accuracy:.4f}" if x.accuracy is not None else ""
            lines.append(f"  {label:<15} loss {x.loss:.5f}  kl {x.kl:.5f}  top1 agreement {x.top1_agreement:.4f}{acc}")
        if m.uniform is None:
            lines.append("  (no uniform bit width fits the budget)")
    if plan.uniform_check is not None:
        lines.append(f"against uniform precision: {plan.uniform_check.outcome.replace('_', ' ')}. "
                     f"{plan.uniform_check.message}")
    if plan.units is not None:
        u = plan.units
        mixed = sum(1 for layer in u.layers if len(set(layer.bits)) > 1)
        lines.append(f"units ({u.granularity}): {u.units:,} units in {len(u.layers)} layers, {mixed} of them mixed; "
                     f"kl {u.measured_mixed.kl:.5f} (per unit) vs {u.measured_uniform.kl:.5f} (per layer); "
                     f"size {u.size_bytes / 1e3:.1f} kB. {u.message}")
        for note in u.notes:
            lines.append(f"  note: {note}")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in plan.timings.items()))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from bitplan.core.describe import describe_model

    desc = describe_model(args.model, args.data)
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    rows = desc["layers"]
    print(f"{desc['name']} ({desc['format']}), sha256 {desc['sha256'][:16]}…")
    print("inputs: " + ", ".join(f"{s['name']} {tuple('N' if d is None else d for d in s['shape'])} {s['dtype']}"
                                 for s in desc["inputs"]))
    width = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{width}}  kind     {'params':>10} {'out_ch':>7} {'MACs/sample':>13}")
    for r in rows:
        mac = "?" if r["macs"] is None else f"{r['macs']:,}"
        print(f"{r['name']:<{width}}  {r['kind']:<7} {r['params']:>10,} {r['out_channels']:>7} {mac:>13}")
    total = sum(r["params"] for r in rows)
    print(f"{len(rows)} quantizable layers, {total:,} weights; other tensors {desc['other_bytes'] / 1e3:.1f} kB")
    if all(r["macs"] is None for r in rows):
        print("(MACs need inputs: pass --data FILE)")
    from bitplan.schemas import LayerInfo, shared_input_groups

    groups = shared_input_groups([LayerInfo(**r) for r in rows])
    if groups:
        shown = ", ".join(groups[0]) + (f"; and {len(groups) - 1} more" if len(groups) > 1 else "")
        print(f"{len(groups)} group(s) of layers read the same input (one width each with --tie-shared-inputs): {shown}")
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
    try:
        formats = check_formats(args.formats or ())
    except ValueError as exc:
        raise BitplanError(str(exc), field="formats") from None
    prep = prepare(args.model, args.data, clip=args.clip, device=args.device, dtype=args.dtype, seq_len=args.seq_len)
    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        result = run_sensitivity(args.method, params, SensitivityContext(prep.model, prep.data, bits, prep.bank,
                                                                          args.seed, progress, formats=formats))
    finally:
        progress.close()
    result = result.model_copy(update={"model_sha256": prep.model.info.sha256, "data_sha256": prep.data.sha256})
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
    from solver import Problem, get_info, parse_solver_params

    params = parse_solver_params(args.solver, _parse_params(args.solver_param))  # before reading the problem
    try:
        raw = json.loads(Path(args.problem).read_text())
    except FileNotFoundError:
        raise BitplanError(f"problem file '{args.problem}' not found") from None
    except json.JSONDecodeError as exc:
        raise BitplanError(f"problem file '{args.problem}' is not JSON ({exc})") from None
    problem = Problem.from_dict(raw)
    solution = get_info(args.solver).run(problem, params)
    out = {
        "status": solution.status,
        "objective": solution.objective,
        "cost": solution.cost,
        "seconds": solution.seconds,
        "layers": [{"name": n, "w_bits": o.w_bits, "a_bits": o.a_bits, "objective": o.objective,
                    **({"format": o.fmt} if o.fmt != "int" else {})}
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
    script = torch.jit.script(entry.build()) if entry.name in ("digits_cnn", "digits_resnet", "digits_mobilenet") else None
    if script is not None:
        torch.jit.save(script, str(out / f"{entry.name}.ts"))
    for split in ("calib", "eval"):
        data = calib if split == "calib" else entry.dataset(split)
        arrays = {("inputs" if not k else f"inputs.{k}"): v.numpy() for k, v in data.inputs.items()}
        if data.targets is not None:
            arrays["targets"] = data.targets.numpy()
        np.savez(out / f"{entry.name}_{split}.npz", **arrays)  # type: ignore[arg-type]  # numpy stubs
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.name.startswith(entry.name)))} to {out}")
    return 0


# -- client verbs: talk to a running `bitplan serve` over HTTP (bitplan/client.py) -----------------


def _client(args: argparse.Namespace) -> Client:
    """The one place the client verbs build a Client (tests replace it): --url/--key over BITPLAN_URL/BITPLAN_API_KEY."""
    from bitplan.client import Client
    from bitplan.settings import load_settings

    settings = load_settings(url=args.url, api_key=args.key)
    return Client(settings.url, settings.api_key)


def _dataset_ref(client: Client, value: str | None) -> str | None:
    """--data/--eval-data: ``synthetic``, an already uploaded ``d_...`` id, or a file uploaded now."""
    if value is None or value == "synthetic" or (value.startswith("d_") and not Path(value).exists()):
        return value
    return client.upload_dataset(value)["id"]


def _model_ref(client: Client, value: str, dataset_id: str) -> str:
    """MODEL: an already uploaded ``m_...`` id or a file uploaded now (TorchScript gets the data to trace it with)."""
    if value.startswith("catalog:"):
        name = value.removeprefix("catalog:")
        raise BitplanError(f"the server does not know catalog models by name ('{value}')",
                           f"export it first: bitplan catalog export {name} --out DIR, then submit DIR/{name}.pt2")
    if value.startswith("m_") and not Path(value).exists():
        return value
    trace_with = dataset_id if dataset_id != "synthetic" and Path(value).suffix != ".pt2" else None
    return client.upload_model(value, dataset_id=trace_with)["id"]


def _method_field(name: str | None, params: list[str], default: str) -> dict | None:
    """{"method", "params"} when the user chose a method or parameters; None leaves the server's default."""
    if name is None and not params:
        return None
    return {"method": name or default, "params": _parse_params(params)}


def _formats(text: str | None) -> list[str] | None:
    if not text:
        return None
    try:
        return list(check_formats(text))
    except ValueError as exc:
        raise BitplanError(str(exc), field="formats") from None


def _job_fields(args: argparse.Namespace) -> dict:
    """The optional POST /v1/jobs keys from the flags; parsed before any upload so a typo fails fast."""
    from bitplan.costs import load_latency_table

    return {
        "w_bits": _parse_bits(args.wbits) if args.wbits else None,
        "a_bits": _parse_bits(args.abits) if args.abits else None,
        "pins": _parse_pins(args.pin) or None,
        "tie_shared_inputs": True if args.tie_shared_inputs else None,
        "granularity": args.granularity,
        "sensitivity": _method_field(args.sensitivity, args.param, DEFAULT_SENSITIVITY),
        "solver": _method_field(args.solver, args.solver_param, DEFAULT_SOLVER),
        "clip": args.clip,
        "formats": _formats(args.formats),
        "target": args.target,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "validate": False if args.no_validate else None,
        "refine_seconds": args.refine_seconds,
        "refine_evaluations": args.refine_evaluations,
        "shards": args.shards,
        "callback_url": args.callback_url,
        "latency_table": load_latency_table(args.latency_table) if args.latency_table else None,
        "device": args.device,
        "dtype": args.dtype,
    }


def _job_line(job: dict) -> str:
    """``JOB state stage progress%`` (what a script can `read`), plus the error of a failed job."""
    line = f"{job['id']} {job.get('state')} {job.get('stage')} {float(job.get('progress') or 0.0) * 100:.0f}%"
    error = job.get("error")
    if job.get("state") == "failed" and isinstance(error, dict):
        line += ": " + BitplanError(error.get("message") or "failed", error.get("hint")).one_line()
    return line


def _report_end(client: Client, job: dict, out: str | None) -> int:
    """After a wait: the plan summary (and --out) on success; the reason and exit 1 otherwise."""
    from bitplan.schemas import PlanFile

    if job.get("state") == "failed":
        error = job.get("error") or {}
        reason = BitplanError(error.get("message") or "no reason given", error.get("hint")).one_line()
        print(f"bitplan: job {job['id']} failed: {reason}", file=sys.stderr)
        return 1
    if job.get("state") != "succeeded":
        print(f"bitplan: job {job['id']} was {job.get('state')}", file=sys.stderr)
        return 1
    data = client.plan(job["id"])
    if out:
        write_atomic(Path(out), json.dumps(data, indent=2) + "\n")
    try:
        plan = PlanFile.model_validate(data)
    except ValidationError as exc:
        raise BitplanError(f"the server's plan is not a bitplan.plan/v1 this client reads: {_validation_message(exc)}",
                           "upgrade bitplan on this machine" + (f"; the plan JSON is in {out}" if out else "")) from None
    print(_summary(plan))
    if out:
        print(f"plan written to {out}")
    return 0


def _wait_and_report(client: Client, job_id: str, args: argparse.Namespace) -> int:
    from bitplan.progress import StderrProgress

    progress = StderrProgress(enabled=None if not args.progress else True)
    try:
        job = client.wait(job_id, progress=progress, timeout=args.timeout)
    finally:
        progress.close()
    return _report_end(client, job, args.out)


def cmd_submit(args: argparse.Namespace) -> int:
    from bitplan.schemas import Budget

    budgets = Budget.parse_items(args.budget).limits()
    fields = _job_fields(args)
    with _client(args) as client:
        dataset_id = _dataset_ref(client, args.data) or "synthetic"
        eval_dataset_id = _dataset_ref(client, args.eval_data)
        model_id = _model_ref(client, args.model, dataset_id)
        job = client.submit(model_id, budgets, dataset_id, eval_dataset_id=eval_dataset_id,
                            idempotency_key=args.idempotency_key, **fields)
        if not args.wait:
            print(job["id"])  # alone on stdout: JOB=$(bitplan submit ...)
            return 0
        print(f"submitted job {job['id']}", file=sys.stderr)
        return _wait_and_report(client, job["id"], args)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job)
    print(json.dumps(job, indent=2) if args.json else _job_line(job))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait_and_report(client, args.job, args)


def cmd_fetch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plan = client.plan(args.job, format=args.format)
    text = plan if isinstance(plan, str) else json.dumps(plan, indent=2) + "\n"
    if args.out:
        write_atomic(Path(args.out), text)
        print(f"plan written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_job_line(client.cancel(args.job)))
    return 0


def error_line(exc: BitplanError) -> str:
    """The error's message and hint, and the option to change when it is about one."""
    option = OPTIONS.get(exc.field or "")
    return exc.one_line() + (f" [option {option}]" if option else "")


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def _formatted(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` and every sub-command parser under it use :class:`_Help`."""
    parser.formatter_class = _Help
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _formatted(child)
    return parser


def _device_options(p: argparse.ArgumentParser, server: bool = False) -> None:
    """--device and --dtype (bitplan/core/device.py); for submit, unset leaves the server's default."""
    p.add_argument("--device", default=None if server else DEFAULT_DEVICE, metavar="auto|cpu|cuda[:N]",
                   help="where the model runs: auto (cuda when there is a GPU, else cpu), cpu, cuda or cuda:N"
                        + (" (default: auto; a cuda job goes to the server's GPU workers)" if server else ""))
    p.add_argument("--dtype", default=None if server else DEFAULT_DTYPE, choices=DTYPES,
                   help="compute dtype: bfloat16/float16 run the model under autocast, weights and sensitivity sums "
                        "stay float32; float16 needs a GPU" + (" (default: float32)" if server else ""))


def build_parser() -> argparse.ArgumentParser:
    from bitplan import __version__

    parser = argparse.ArgumentParser(prog="bitplan", description="Mixed-precision bit-width planning.")
    parser.add_argument("--version", action="version", version=f"bitplan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="find the per-layer bit widths that fit a budget, and measure them")
    p.add_argument("model", help="model.pt2 (torch.export), model.ts (TorchScript), a Hugging Face checkpoint (folder "
                                 "or .zip with config.json + *.safetensors) or catalog:NAME")
    p.add_argument("--data", help="calibration data .npz/.safetensors, or text (.txt, .jsonl) for a Hugging Face "
                                  "checkpoint (default for catalog models: their own)")
    p.add_argument("--seq-len", type=int, default=128, help=SEQ_LEN_HELP)
    p.add_argument("--granularity", default="layer", help=GRANULARITY_HELP)
    p.add_argument("--eval-data", help="held-out data for the measured figures (default: every 5th calibration sample, "
                   "kept aside from the search)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="avg_weight_bits, size_bytes, bops or latency_ms; repeatable")
    p.add_argument("--wbits", help=f"allowed INT weight bit widths, 16 = full precision (default: "
                                   f"{_bits_text(DEFAULT_W_BITS)}; with --target, the target's)")
    p.add_argument("--formats", help=FORMATS_HELP)
    p.add_argument("--target", choices=sorted(TARGETS), help=TARGET_HELP)
    p.add_argument("--abits", default=_bits_text(DEFAULT_A_BITS),
                   help="activation bits: one value for every layer (4, 8 or 16 = full precision), or a list to choose "
                        "from (needs --param activations=true)")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's weight bits")
    p.add_argument("--tie-shared-inputs", action="store_true",
                   help="give layers that read the same value (q, k and v; gate and up) one bit width, format and "
                        "activation width, as runtimes that fuse them need (vLLM)")
    p.add_argument("--sensitivity", default=DEFAULT_SENSITIVITY, help=f"sensitivity method (default: {DEFAULT_SENSITIVITY})")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="sensitivity method parameter")
    p.add_argument("--table", metavar="FILE",
                   help="reuse the sensitivity scores `bitplan sensitivity --out FILE` wrote for this model (instead of "
                        "--sensitivity): try several budgets or solvers without computing them again")
    p.add_argument("--solver", default=DEFAULT_SOLVER, help="ilp, pareto, evolutionary, greedy or uniform")
    p.add_argument("--solver-param", action="append", default=[], metavar="KEY=VALUE",
                   help="solver parameter, e.g. time_limit=10 (evolutionary: trials=100, measured=false)")
    p.add_argument("--clip", default="mse", choices=["mse", "minmax"], help="weight clipping")
    p.add_argument("--latency-table", help="JSON {layer: {bits: ms}} for a latency_ms budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-validate", action="store_true",
                   help="skip measuring the plan (and with it the check against uniform precision)")
    p.add_argument("--distill", action="store_true",
                   help="optimise the calibration inputs to match the model's BatchNorm statistics (ZeroQ's distilled "
                        "data); without --data, start from random inputs shaped like the model's")
    p.add_argument("--refine-seconds", type=float, default=120.0,
                   help="time cap of the measured refinement that runs when the plan measures worse than uniform "
                        "precision (default: 120; 0: return the best uniform plan at once)")
    p.add_argument("--refine-evaluations", type=int, default=None, metavar="N",
                   help="also stop the refinement after measuring N plans (default: no cap): the same work on a fast "
                        "and a loaded machine")
    p.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    p.add_argument("--out", help="write the plan file (JSON, schema bitplan.plan/v1)")
    _device_options(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sensitivity", help="score every layer's sensitivity to each bit width")
    p.add_argument("model", help="model.pt2, model.ts, a Hugging Face checkpoint (folder or .zip) or catalog:NAME")
    p.add_argument("--data", help="calibration data, or text for a checkpoint (default for catalog models: their own)")
    p.add_argument("--seq-len", type=int, default=128, help=SEQ_LEN_HELP)
    p.add_argument("--method", default=DEFAULT_SENSITIVITY,
                   help="auto, hessian_trace, hessian_eigen, fisher, taylor, lrp, perturbation (default: auto)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    p.add_argument("--wbits", default=_bits_text(DEFAULT_W_BITS))
    p.add_argument("--formats", help=FORMATS_HELP)
    p.add_argument("--clip", default="mse", choices=["mse", "minmax"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", help="write the table (JSON)")
    _device_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("inspect", help="list the quantizable layers with parameters and MACs")
    p.add_argument("model")
    p.add_argument("--data", help="inputs to measure MACs with")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("solve", help="solve a problem JSON (your own scores and costs) without a model")
    p.add_argument("problem")
    p.add_argument("--solver", default=DEFAULT_SOLVER, help="ilp, pareto, evolutionary, greedy or uniform")
    p.add_argument("--solver-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("export", help="write a plan as the file a runtime reads (torchao, compressed-tensors, gguf, "
                                      "modelopt)")
    p.add_argument("plan", help="the plan JSON (bitplan plan --out, or bitplan fetch)")
    p.add_argument("--to", required=True, choices=list(EXPORT_FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in EXPORT_FORMATS.items()))
    p.add_argument("--out", help="the file to write (default: beside the plan, e.g. plan.torchao.json; - for stdout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("apply", help="quantize a Hugging Face checkpoint by its plan: write a compressed-tensors "
                                     "checkpoint (vLLM, transformers) and report its real size beside the plan's")
    p.add_argument("plan", help="the plan JSON of that checkpoint")
    p.add_argument("model", help="the checkpoint the plan was made for (directory or zip)")
    p.add_argument("--out", required=True, help="the new checkpoint directory (must not exist)")
    p.add_argument("--latency", action="store_true",
                   help="also time a forward pass on this CPU, full precision and with the plan applied by torchao")
    p.add_argument("--report", help="write the figures as JSON to this file")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("profile", help="time each layer at each weight width on this machine: the latency table "
                                       "that latency_ms budgets read")
    p.add_argument("model", help="a .pt2 / TorchScript file, a Hugging Face checkpoint, or catalog:NAME")
    p.add_argument("--data", help="calibration data (the inputs the layers are timed on; a catalog model's own by "
                                  "default)")
    p.add_argument("--out", required=True, help="the latency table JSON to write")
    p.add_argument("--wbits", default=_bits_text(DEFAULT_W_BITS), help="the weight widths to time (16 is always timed)")
    p.add_argument("--formats", help="number formats to time too (the columns a plan with --formats needs): fp8_e4m3 "
                                     "runs torchao's float8 kernel; the others, which torchao's stable configs lack, "
                                     "are timed in float")
    p.add_argument("--batch", type=int, default=1, help="samples per timed call")
    p.add_argument("--runs", type=int, default=20, help="timed calls per layer and width (the median is kept)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample for text data")
    p.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    _device_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("catalog", help="list the reference models or export one with its data")
    csub = p.add_subparsers(dest="action", required=True)
    csub.add_parser("list")
    e = csub.add_parser("export", help="write NAME.pt2 (and NAME.ts), NAME_calib.npz and NAME_eval.npz")
    e.add_argument("name")
    e.add_argument("--out", default=".")
    p.set_defaults(func=cmd_catalog)

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", help="bitplan server (default: $BITPLAN_URL, else http://127.0.0.1:8000)")
    conn.add_argument("--key", help="API key (default: $BITPLAN_API_KEY, else the local key of `bitplan serve`)")

    p = sub.add_parser("submit", parents=[conn], help="upload a model (and data) to the server and start a planning job")
    p.add_argument("model", help="model.pt2, TorchScript or zipped Hugging Face checkpoint to upload, or the id (m_...) "
                                 "of an uploaded model")
    p.add_argument("--seq-len", type=int, help=SEQ_LEN_HELP)
    p.add_argument("--granularity", help=GRANULARITY_HELP)
    p.add_argument("--data", default="synthetic", help="calibration .npz/.safetensors (or .txt/.jsonl text for a "
                   "checkpoint) to upload, a dataset id (d_...), "
                   "or 'synthetic' (the default: random inputs shaped like the model's)")
    p.add_argument("--eval-data", help="held-out data (file or d_... id) for the measured figures")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="avg_weight_bits, size_bytes, bops or latency_ms; repeatable")
    p.add_argument("--wbits", help="allowed weight bit widths, e.g. 2,3,4,8 (default: the server's)")
    p.add_argument("--formats", help=FORMATS_HELP)
    p.add_argument("--target", choices=sorted(TARGETS), help=TARGET_HELP)
    p.add_argument("--abits", help="activation bit widths, e.g. 16")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's weight bits")
    p.add_argument("--tie-shared-inputs", action="store_true",
                   help="give layers that read the same value (q, k and v; gate and up) one bit width, format and "
                        "activation width, as runtimes that fuse them need (vLLM)")
    p.add_argument("--sensitivity", help=f"sensitivity method (default: {DEFAULT_SENSITIVITY})")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="sensitivity method parameter")
    p.add_argument("--solver", help="ilp, pareto, evolutionary, greedy or uniform (default: ilp)")
    p.add_argument("--solver-param", action="append", default=[], metavar="KEY=VALUE", help="solver parameter")
    p.add_argument("--clip", choices=["mse", "minmax"], help="weight clipping (default: mse)")
    p.add_argument("--latency-table", help="JSON {layer: {bits: ms}} for a latency_ms budget")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-validate", action="store_true", help="skip measuring the plan")
    p.add_argument("--refine-seconds", type=float, help="time cap of the measured refinement (default: 120)")
    p.add_argument("--refine-evaluations", type=int, metavar="N",
                   help="also stop the refinement after measuring N plans (default: no cap)")
    p.add_argument("--shards", type=int, help="split a shardable sensitivity method over this many workers")
    p.add_argument("--callback-url", help="the server POSTs the job JSON here when the job ends")
    p.add_argument("--idempotency-key", help="a retried submit with the same key returns the first job")
    p.add_argument("--wait", action="store_true", help="wait for the job and print the plan summary (like `bitplan wait`)")
    p.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    p.add_argument("--progress", action="store_true", help="with --wait: draw progress bars even when stderr is not a terminal")
    p.add_argument("--out", help="with --wait: write the plan file (JSON)")
    _device_options(p, server=True)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[conn], help="one line per job: JOB state stage progress%%")
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="print the whole job JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", parents=[conn], help="wait for a job to end and print its plan summary (exit 1 if it failed)")
    p.add_argument("job")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job keeps running)")
    p.add_argument("--out", help="write the plan file (JSON)")
    p.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("fetch", parents=[conn], help="download a finished job's plan (JSON or one CSV row per layer)")
    p.add_argument("job")
    p.add_argument("--format", default="json", choices=["json", "csv", *EXPORT_FORMATS],
                   help="json, csv, or a runtime's file (as bitplan export --to writes it)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("cancel", parents=[conn], help="cancel a queued or running job")
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)
    from service.commands import add_commands

    add_commands(sub)
    return _formatted(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["catalog"]:
        argv = ["catalog", "list"]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or (len(argv) == 1 and argv[0] in commands):  # a bare command: its help, not a usage error
        (commands[argv[0]] if argv else parser).print_help()
        return EXIT_USER_ERROR
    args = parser.parse_args(argv)
    if args.command in ("plan", "solve"):  # their stdout is the user's: HiGHS's banner goes to /dev/null first
        from solver.ilp import silence_banner

        silence_banner()
    try:
        return args.func(args)
    except BitplanError as exc:
        print(f"bitplan: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as exc:  # torch's CUDA out-of-memory error is the user's to act on, not a bug
        oom = gpu_out_of_memory(exc)
        if oom is None:
            raise
        print(f"bitplan: error: {error_line(oom)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bitplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bitplan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
