"""Everything that reads a user's model or data, as tasks the sandbox runs in a
forked child (``workers/zygote.py``): describing an upload, a planning job, one
shard of a job's sensitivity, and ``probe`` (what the child can see: for tests and
operators). A task gets plain JSON arguments (file paths, the request) and returns
plain JSON; it has no database, broker or key, and the worker that asked checks
what comes back before storing anything.
"""

from __future__ import annotations

import json
import os
import resource
from typing import TextIO

from bitplan.errors import BitplanError, gpu_out_of_memory


def run(task: str, args: dict, out: TextIO):
    """Run ``task``; progress goes to ``out`` as JSON lines."""

    def progress(stage: str, fraction: float, detail: str = "") -> None:
        out.write(json.dumps({"progress": [str(stage), float(fraction), str(detail)[:500]]}) + "\n")
        out.flush()

    if task == "describe":
        return _describe(args)
    if task == "plan":
        return _plan(args, progress)
    if task == "shard":
        return _shard(args, progress)
    if task == "profile":
        return _profile(args, progress)
    if task == "apply":
        return _apply(args, progress)
    if task == "probe":
        return _probe()
    raise BitplanError(f"unknown sandbox task '{task}'")


def describe_error(exc: BaseException) -> dict:
    """A failure as JSON: a BitplanError keeps its code, message, hint (and minimums); running out of the memory
    limit is the user's to act on too, and so is running out of GPU memory; anything else is a bug."""
    gpu = gpu_out_of_memory(exc)
    if gpu is not None:  # the child ends with the task, so its GPU memory is freed and the worker takes the next job
        return {"kind": "user", **gpu.to_dict()}
    if _out_of_memory(exc):
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        shown = f"its limit of {limit >> 20:,} MB" if limit > 0 else "the machine's memory"
        return {"kind": "user", "code": "out_of_memory", "message": f"ran out of memory ({shown})",
                "hint": "use fewer samples or a smaller batch_size (params max_samples, batch_size), or ask the operator "
                        "to raise BITPLAN_WORKER_MEMORY_MB"}
    if isinstance(exc, BitplanError):
        return {"kind": "user", **exc.to_dict()}
    import traceback

    lines = str(exc).strip().splitlines()
    return {"kind": "internal", "type": type(exc).__name__, "message": (lines[0] if lines else "")[:1000],
            "traceback": "".join(traceback.format_exception(exc))[-8000:]}


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _describe(args: dict) -> dict:
    """``bitplan.core.describe`` on an upload; failures name the file the user sent, not its temporary name."""
    from types import SimpleNamespace

    from bitplan.core import describe

    try:
        if args["kind"] == "model":
            return describe.describe_model(args["path"], args.get("data_path"), args.get("name"))
        return describe.describe_data(args["path"], args.get("name"))
    except Exception as exc:
        if _out_of_memory(exc):
            raise
        failure = describe.failure(SimpleNamespace(kind=args["kind"], path=args["path"], name=args.get("name")), exc)
        failure.pop("ok", None)
        raise BitplanError.from_dict(failure) from None


def _plan(args: dict, progress) -> dict:
    """The job's whole planning run; ``table`` (a cached or merged sensitivity table) skips computing one."""
    from bitplan.core.pipeline import make_plan
    from bitplan.core.sensitivity import run_sensitivity
    from bitplan.schemas import PlanRequest, SensitivityTable

    request = PlanRequest.model_validate(args["request"])
    given = SensitivityTable.model_validate(args["table"]) if args.get("table") else None
    computed: list[SensitivityTable] = []

    def sensitivity(prep, ctx):
        if given is not None:
            ctx.progress("sensitivity", 1.0, args.get("table_note") or "reused a table")
            return given
        if args.get("note"):
            ctx.progress("sensitivity", 0.0, args["note"])
        table = run_sensitivity(request.sensitivity, request.sensitivity_params, ctx)
        computed.append(table)
        return table

    plan = make_plan(request, progress, sensitivity)
    return {"plan": plan.model_dump(mode="json", by_alias=True),
            "table": computed[0].model_dump(mode="json", by_alias=True) if computed else None}


def _shard(args: dict, progress) -> dict:
    """One shard of a job's sensitivity: ``layers`` (a block of layers: a partial table) or ``probes`` ([start, end)
    of a method split by probes: one row per probe, merged by the worker that receives every shard)."""
    from bitplan.core.pipeline import prepare
    from bitplan.core.sensitivity import SensitivityContext, run_probe_shard, run_sensitivity
    from bitplan.schemas import PlanRequest

    r = PlanRequest.model_validate(args["request"])
    prep = prepare(r.model, r.data, r.eval_data, r.latency_table, r.clip, r.model_name, r.distill, r.seed, r.seq_len,
                   r.device, r.dtype)
    if "probes" in args:
        start, end = (int(x) for x in args["probes"])
        ctx = SensitivityContext(prep.model, prep.data, list(r.w_bits), prep.bank, r.seed, progress, formats=r.formats)
        rows = run_probe_shard(r.sensitivity, r.sensitivity_params, ctx, start, end)
        return {"probes": rows.model_dump(mode="json")}
    ctx = SensitivityContext(prep.model, prep.data, list(r.w_bits), prep.bank, r.seed, progress,
                             only=frozenset(args["layers"]), formats=r.formats)
    table = run_sensitivity(r.sensitivity, r.sensitivity_params, ctx)
    return {"table": table.model_dump(mode="json", by_alias=True)}


def _profile(args: dict, progress) -> dict:
    """``bitplan profile`` for a profile job: the latency table, on the device the job runs on."""
    from bitplan.core.pipeline import prepare
    from bitplan.core.profile import profile_layers

    prep = prepare(args["model"], args["data"], seq_len=int(args.get("seq_len", 128)),
                   device=str(args.get("device") or "auto"))
    progress("profile", 0.0, f"{len(prep.layers)} layers")
    choices = [*(int(b) for b in args["w_bits"]), *(str(f) for f in args.get("formats") or ())]
    table, notes = profile_layers(prep, choices, batch=int(args["batch"]),
                                  runs=int(args["runs"]),
                                  progress=lambda done, total: progress("profile", done / total, f"{done}/{total} layers"))
    return {"schema": "bitplan.latency/v1", "model": prep.model.info.model_dump(mode="json"),
            "latency_table": {name: {str(b): ms for b, ms in row.items()} for name, row in table.items()},
            "notes": [*prep.notes, *notes], "device": str(prep.model.device),
            "batch": int(args["batch"]), "runs": int(args["runs"])}


def _apply(args: dict, progress) -> dict:
    """``bitplan apply`` for an apply job: the checkpoint goes to ``out`` (a directory the worker made room for)."""
    from bitplan.core.apply import apply_plan
    from bitplan.schemas import PlanFile

    progress("apply", 0.0, "quantizing the checkpoint")
    plan = PlanFile.model_validate(args["plan"])
    report = apply_plan(plan, args["checkpoint"], args["out"], latency=bool(args.get("latency")), clip=plan.clip)
    out = report.to_dict()
    out.pop("out", None)  # a worker's temporary path, nothing the user can open
    return out


def _probe() -> dict:
    """What untrusted code in this child could see: its ids, directory, environment names and limits."""
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_CORE")}
    with open("/proc/self/environ", "rb") as f:
        initial = sorted({item.split(b"=", 1)[0].decode(errors="replace") for item in f.read().split(b"\0") if item})
    return {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
            "env": sorted(os.environ), "initial_env": initial, "limits": limits}
