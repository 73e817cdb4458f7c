"""What a job does on a worker: sensitivity (from the cache when it can) -> solve
-> validate, writing its stage and progress to the job row as it goes.

The worker's own process only orchestrates: the model is read and run in a
sandboxed child (``workers/sandbox.py``: minimal environment, no database URL,
CPU and memory limits) that reports progress and returns the plan as JSON, which
is checked before it is stored. Every step checks the job's state first, so a
redelivered or duplicated task never runs a finished or cancelled job again; a
cancel, a time-out or another attempt taking the job over kills the child within
about a second, which frees the worker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from bitplan.errors import BitplanError
from bitplan.schemas import Budget, PlanFile, PlanRequest, SensitivityTable
from storage import BlobStore, Database
from storage.models import TERMINAL_STATES, DatasetFile, Job, JobState, ModelFile, SensitivityEntry, move, utcnow
from workers.app import job_device
from workers.callbacks import schedule_callback

if TYPE_CHECKING:
    from bitplan.settings import Settings
    from workers.app import Runtime

#: sends a job's shards to the workers: (job id, shards, lease); a shard is {"layers": [names]} or {"probes": [start, end]}
ShardDispatch = Callable[[str, list[dict], str], None]

log = logging.getLogger("bitplan.worker")
CACHE_VERSION = 3  # 2: tables are computed on the search part of the data (every 5th sample held out);
# 3: hessian_trace draws probe i from (seed, i), so its shards can split the probes (other tables than before)


class JobCancelled(Exception):
    """The job was cancelled, timed out or taken over by another attempt while this worker ran it."""


class Attempt:
    """One worker's run of a job, identified by the lease ``start()`` wrote on the job row.

    A heartbeat thread stamps ``heartbeat_at`` every few seconds while the attempt holds the lease
    (the reconciler requeues running jobs whose heartbeat stopped), and fails the job when it runs
    past the time limit. The work itself learns that it must stop at its next progress report.
    """

    def __init__(self, db: Database, job_id: str, lease: str, time_limit_s: float, every_s: float = 5.0) -> None:
        self.db, self.job_id, self.lease, self.time_limit_s, self.every_s = db, job_id, lease, time_limit_s, every_s
        self.stopped: str | None = None  # why the work must stop, once it must
        self._polled = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Attempt:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self.beat()
            except Exception as exc:  # database briefly away: try again at the next beat
                log.warning("heartbeat of %s failed: %s", self.job_id, exc)

    def beat(self) -> None:
        with self.db.session() as s:
            job = s.get(Job, self.job_id)
            if job is None or job.state != JobState.RUNNING or job.lease != self.lease:
                self.stopped = "the job ended or was taken over elsewhere"
                return
            job.heartbeat_at = utcnow()
            over = (utcnow() - job.started_at).total_seconds() > self.time_limit_s
        if over:
            self.stopped = "time limit"
            finish(self.db, self.job_id, JobState.FAILED, lease=self.lease, code="time_limit",
                   message=f"the job ran longer than the time limit of {self.time_limit_s:g} s",
                   hint="use a cheaper sensitivity method or fewer probes/samples (e.g. params max_probes, max_samples), "
                        "or ask the operator to raise BITPLAN_JOB_TIME_LIMIT_S")

    def check(self) -> None:
        if self.stopped:
            raise JobCancelled(f"{self.job_id}: {self.stopped}")

    def why_stop(self, every_s: float = 1.0) -> str | None:
        """Why the work must stop now (cancelled, timed out, taken over), else None; reads the job row at
        most every ``every_s`` seconds, so a cancel reaches a running child within about that long."""
        now = time.monotonic()
        if self.stopped is None and now - self._polled >= every_s:
            self._polled = now
            try:
                with self.db.session() as s:
                    row = s.execute(select(Job.state, Job.lease).where(Job.id == self.job_id)).first()
            except Exception as exc:  # database briefly away: keep working, the heartbeat decides later
                log.warning("could not check job %s: %s", self.job_id, exc)
                return None
            if row is None or row.state != JobState.RUNNING or row.lease != self.lease:
                self.stopped = f"the job is {row.state if row else 'gone'}" if (row is None or row.state != JobState.RUNNING) \
                    else "the job was taken over by another attempt"
        return self.stopped


class Reporter:
    """The ``progress`` callback of a job: writes stage/progress/heartbeat, at most every ``interval`` s per stage,
    and stops the work (JobCancelled) once the attempt no longer owns the job."""

    def __init__(self, db: Database, job_id: str, attempt: Attempt, interval: float = 0.5, prefix: str = "") -> None:
        self.db, self.job_id, self.attempt, self.interval, self.prefix = db, job_id, attempt, interval, prefix
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, fraction: float, detail: str = "") -> None:
        self.attempt.check()
        now = time.monotonic()
        if stage == self._stage and fraction < 1.0 and now - self._last < self.interval:
            return
        self._stage, self._last = stage, now
        with self.db.session() as s:
            job = s.get(Job, self.job_id)
            if job is None or job.state != JobState.RUNNING or job.lease != self.attempt.lease:
                raise JobCancelled(self.job_id)
            job.stage, job.progress = stage, max(0.0, min(1.0, float(fraction)))
            job.detail = (self.prefix + detail)[:500]
            job.heartbeat_at = utcnow()


@dataclass
class JobSpec:
    """A job's inputs resolved to files on this worker."""

    request: PlanRequest
    model_sha256: str
    data_sha256: str
    layer_names: list[str]
    shards: int
    reuse: bool
    eval_label: str  # what the plan's measured figures say they were measured on (not a server path)

    def cache_key(self) -> tuple[str, dict]:
        from bitplan.methods import get_method, parse_params

        params = parse_params(get_method(self.request.sensitivity), self.request.sensitivity_params)
        spec = {"v": CACHE_VERSION, "model": self.model_sha256, "data": self.data_sha256,
                "method": self.request.sensitivity, "params": params.model_dump(mode="json"),
                "w_bits": list(self.request.w_bits), **({"formats": list(self.request.formats)} if self.request.formats
                                                       else {}), "clip": self.request.clip, "seed": self.request.seed,
                "distill": self.request.distill, "seq_len": self.request.seq_len}
        if self.request.dtype != "float32":  # half-precision compute scores differently; the device does not matter
            spec["dtype"] = self.request.dtype
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(), spec


def resolve(rt: Runtime, job: Job) -> JobSpec:
    """Turn the stored job into a PlanRequest over blob paths (synthetic data is made here, once)."""
    db, blobs = rt.db, rt.blobs
    with db.session() as s:
        model = s.get(ModelFile, job.model_id)
        data = s.get(DatasetFile, job.dataset_id) if job.dataset_id else None
        eval_data = s.get(DatasetFile, job.eval_dataset_id) if job.eval_dataset_id else None
        if model is None:
            raise BitplanError("the job's model was deleted", "upload it again and resubmit")
    r = job.request
    if data is not None:
        data_path, data_sha = str(blobs.path(data.sha256)), data.sha256
    else:
        data_path, data_sha = synthetic_data(blobs, model, int(r.get("synthetic_samples", 64)), int(r.get("seed", 0)))
    request = PlanRequest(
        model=str(blobs.path(model.sha256)), model_name=model.name, data=data_path,
        eval_data=str(blobs.path(eval_data.sha256)) if eval_data else None,
        budget=Budget(**r["budgets"]), w_bits=tuple(r["w_bits"]), a_bits=tuple(r["a_bits"]), pins=r.get("pins", {}),
        formats=tuple(r.get("formats") or ()), target=r.get("target"),
        sensitivity=r["sensitivity"]["method"], sensitivity_params=r["sensitivity"].get("params", {}),
        solver=r["solver"]["method"], solver_params=r["solver"].get("params", {}), clip=r.get("clip", "mse"),
        latency_table=r.get("latency_table"), seed=r.get("seed", 0), seq_len=r.get("seq_len", 128),
        validate_plan=r.get("validate", True),
        refine_seconds=r.get("refine_seconds", 120.0), refine_evaluations=r.get("refine_evaluations"),
        tie_shared_inputs=bool(r.get("tie_shared_inputs", False)),
        granularity=r.get("granularity", "layer"),
        distill=r["distill"] if r.get("distill") is not None else data is None,  # ZeroQ for synthetic data
        time_limit_s=rt.settings.job_time_limit_s,  # the solver stops in time to hand back its best plan
        device=job_device(str(r.get("device") or "auto"), rt.settings.worker_device), dtype=r.get("dtype", "float32"),
    )
    names = [layer["name"] for layer in model.description.get("layers", [])]
    if eval_data is not None:
        label = f"{eval_data.name} (held-out data)"
    elif data is not None:
        label = f"{data.name} (every 5th sample, kept aside from the search)"
    else:
        label = (f"synthetic inputs ({r.get('synthetic_samples', 64)} samples"
                 + (", distilled" if r.get("distill") is not False else "") + ", every 5th kept aside; no data given)")
    return JobSpec(request, model.sha256, data_sha, names, int(r.get("shards", 1)), bool(r.get("reuse_sensitivity", True)),
                   label)


def synthetic_data(blobs: BlobStore, model: ModelFile, samples: int, seed: int) -> tuple[str, str]:
    from bitplan.synthetic import write_synthetic

    tmp = blobs.tmp_dir / f"synthetic-{model.sha256[:16]}-{samples}-{seed}-{os.getpid()}.npz"
    sha = write_synthetic(model.description["inputs"], samples, seed, str(tmp))
    return str(blobs.put_file(tmp, sha)), sha


def cached_table(db: Database, key: str) -> SensitivityTable | None:
    with db.session() as s:
        row = s.get(SensitivityEntry, key)
        if row is None:
            return None
        row.hits += 1
        return SensitivityTable.model_validate(row.table)


def store_table(db: Database, key: str, spec: dict, table: SensitivityTable) -> None:
    from sqlalchemy.exc import IntegrityError

    try:
        with db.session() as s:
            if s.get(SensitivityEntry, key) is None:
                s.add(SensitivityEntry(key=key, model_sha256=spec["model"], data_sha256=spec["data"], method=spec["method"],
                                       spec=spec, table=table.model_dump(mode="json", by_alias=True), seconds=table.seconds))
    except IntegrityError:  # another worker stored the same table first: equal by construction
        pass


def start(db: Database, job_id: str, stale_s: float) -> tuple[Job, str] | None:
    """Take the job for this attempt: (job, lease), or None if it is gone, ended, or running elsewhere with a
    live heartbeat (a duplicate delivery). A running job whose heartbeat is older than ``stale_s`` lost its
    worker: this attempt takes it over, and the old one, if it still lives, stands down at its next report."""
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.state in TERMINAL_STATES:
            return None
        if job.state == JobState.RUNNING and job.heartbeat_at is not None and _age(job.heartbeat_at) < stale_s:
            return None
        lease = secrets.token_hex(8)
        move(job, JobState.RUNNING)
        job.stage, job.progress, job.detail = "load", 0.0, ""
        if job.attempts:
            job.detail = f"attempt {job.attempts + 1} (the previous worker stopped)"
        job.started_at = job.started_at or utcnow()
        job.heartbeat_at = utcnow()
        job.attempts += 1
        job.lease, job.worker = lease, f"{socket.gethostname()}:{os.getpid()}"
        return job, lease


def _age(moment: dt.datetime) -> float:
    return (utcnow() - moment).total_seconds()


def finish(db: Database, job_id: str, state: JobState, *, lease: str | None = None, plan: dict | None = None,
           message: str | None = None, hint: str | None = None, code: str | None = None) -> bool:
    """End a running job (only by the attempt holding ``lease``, when given); False if it was not running any more
    (cancelled, timed out or taken over meanwhile)."""
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.state != JobState.RUNNING or (lease is not None and job.lease != lease):
            return False
        move(job, state)
        job.heartbeat_at = job.finished_at
        if state == JobState.SUCCEEDED:
            job.plan, job.stage, job.progress, job.detail = plan, "done", 1.0, ""
        else:
            job.error_message, job.error_hint, job.error_code = message, hint, code
        schedule_callback(s, job)  # commits with the job's end; the API's dispatcher sends it (workers/callbacks.py)
    return True


def fail(db: Database, job_id: str, exc: BaseException, lease: str | None = None) -> None:
    if isinstance(exc, BitplanError):
        finish(db, job_id, JobState.FAILED, lease=lease, message=exc.message, hint=exc.hint, code=exc.code)
        return
    from celery.exceptions import SoftTimeLimitExceeded

    from storage import Unavailable

    if isinstance(exc, SoftTimeLimitExceeded):  # Celery's backstop fired: the task outlived the job's time limit
        finish(db, job_id, JobState.FAILED, lease=lease, code="time_limit",
               message="the job ran longer than the worker's time limit",
               hint="use a cheaper sensitivity method or fewer probes/samples (e.g. params max_probes, max_samples)")
        return
    if isinstance(exc, Unavailable):  # leave it running: its heartbeat stops and the reconciler requeues it
        log.warning("job %s interrupted: %s", job_id, exc)
        return
    from workers.sandbox import InternalError

    if isinstance(exc, InternalError):  # raised in the sandboxed child: its traceback came with it
        log.error("job %s failed in its sandboxed process:\n%s", job_id, exc.traceback)
        name, first = exc.type_name, exc.message
    else:
        log.error("job %s failed:\n%s", job_id, "".join(traceback.format_exception(exc)))
        name, first = type(exc).__name__, (str(exc).strip().splitlines() or [""])[0]
    finish(db, job_id, JobState.FAILED, lease=lease, code="internal", message=f"internal error: {name}: {first}"[:1000],
           hint="this is a bug in bitplan, not in your input; the worker log has the traceback")


def run_job(rt: Runtime, job_id: str, dispatch_shards: ShardDispatch | None = None, table: SensitivityTable | None = None,
            lease: str | None = None) -> str:
    """Run one job, or continue it (``table`` from merged shards, under the ``lease`` that dispatched them).
    Returns what happened, for logs and tests."""
    db, settings = rt.db, rt.settings
    if lease is None:
        taken = start(db, job_id, settings.heartbeat_stale_s)
        if taken is None:
            return "skipped"
        job, lease = taken
    else:
        job = _holding(db, job_id, lease)
        if job is None:
            return "skipped"
    with Attempt(db, job_id, lease, settings.job_time_limit_s, min(5.0, settings.heartbeat_stale_s / 4)) as attempt:
        try:
            return _work(rt, job, attempt, dispatch_shards, table)
        except JobCancelled:
            return "cancelled"
        except Exception as exc:  # the job fails with a message; the worker lives on
            fail(db, job_id, exc, lease)
            return "failed"


def _work(rt: Runtime, job: Job, attempt: Attempt, dispatch_shards: ShardDispatch | None,
          table: SensitivityTable | None) -> str:
    from bitplan.methods import get_method, parse_params, plan_shards

    db = rt.db
    reporter = Reporter(db, job.id, attempt)
    if (job.request or {}).get("kind") == "profile":
        return _profile(rt, job, attempt, reporter)
    if (job.request or {}).get("kind") == "apply":
        return _apply(rt, job, attempt, reporter)
    spec = resolve(rt, job)
    key, key_spec = spec.cache_key()
    hit = None if (table is not None or not spec.reuse) else cached_table(db, key)
    with db.session() as s:
        row = s.get(Job, job.id)
        row.cache_key, row.cache_hit = key, hit is not None
    given = table or hit
    method = get_method(spec.request.sensitivity)
    if given is None and spec.shards > 1 and dispatch_shards is not None:
        shards = plan_shards(method, parse_params(method, spec.request.sensitivity_params), spec.layer_names, spec.shards)
        reporter("sensitivity", 0.0, f"split into {len(shards)} shards by {method.shard_by}")
        dispatch_shards(job.id, shards, attempt.lease)
        return "sharded"
    args = {"request": spec.request.model_dump(mode="json"),
            "table": given.model_dump(mode="json", by_alias=True) if given is not None else None,
            "table_note": "reused a cached table" if hit is not None else "merged shards",
            "note": f"shards={spec.shards} run as one: this deployment has one worker" if spec.shards > 1 else None}
    result = run_untrusted(rt.settings, "plan", args, attempt, reporter)
    if result.get("table") is not None:
        store_table(db, key, key_spec, SensitivityTable.model_validate(result["table"]))
    plan = PlanFile.model_validate(result["plan"])
    if plan.measured is not None:
        label = spec.eval_label
        if plan.measured.held_out == "none":  # fewer samples than it takes to keep some aside
            label = label.split(" (")[0] + " (the calibration data: too few samples to keep some aside)"
        plan = plan.model_copy(update={"measured": plan.measured.model_copy(update={"data": label})})
    attempt.check()
    finish(db, job.id, JobState.SUCCEEDED, lease=attempt.lease, plan=plan.model_dump(mode="json", by_alias=True))
    return "succeeded"


def _profile(rt: Runtime, job: Job, attempt: Attempt, reporter: Reporter) -> str:
    """A profile job: time each layer at each width in the sandbox, on this worker's device; the latency table is
    the job's result (GET /v1/jobs/{id}/latency)."""
    with rt.db.session() as s:
        model = s.get(ModelFile, job.model_id)
        data = s.get(DatasetFile, job.dataset_id) if job.dataset_id else None
        if model is None:
            raise BitplanError("the job's model was deleted", "upload it again and resubmit")
    r = job.request
    if data is not None:
        data_path = str(rt.blobs.path(data.sha256))
    else:
        data_path, _ = synthetic_data(rt.blobs, model, int(r.get("synthetic_samples", 8)), 0)
    args = {"model": str(rt.blobs.path(model.sha256)), "data": data_path, "w_bits": r["w_bits"], "batch": r["batch"],
            "runs": r["runs"], "seq_len": r.get("seq_len", 128), "formats": list(r.get("formats") or []),
            "device": job_device(str(r.get("device") or "auto"), rt.settings.worker_device)}
    result = run_untrusted(rt.settings, "profile", {**args, "request": {"device": args["device"]}}, attempt, reporter)
    table = result.get("latency_table")
    if not isinstance(table, dict) or set(table) - set(layer["name"] for layer in model.description.get("layers", [])):
        raise BitplanError("the profile came back without the model's layers")
    result["model"] = {**result.get("model", {}), "name": model.name}
    attempt.check()
    finish(rt.db, job.id, JobState.SUCCEEDED, lease=attempt.lease, plan=result)
    return "succeeded"


def _apply(rt: Runtime, job: Job, attempt: Attempt, reporter: Reporter) -> str:
    """An apply job: ``bitplan apply`` in the sandbox writes the checkpoint into a fresh directory; it is zipped into
    the blob store and the report (with the zip's sha256) is the job's result."""
    import shutil
    import zipfile

    r = job.request
    with rt.db.session() as s:
        source = s.get(Job, r["plan_job_id"])
        model = s.get(ModelFile, job.model_id)
        if source is None or source.plan is None or model is None:
            raise BitplanError(f"the plan job {r['plan_job_id']} or its model was deleted", "plan again, then apply")
        plan = source.plan
    work = rt.blobs.tmp_dir / f"apply-{job.id}-{attempt.lease}"
    out = work / "checkpoint"
    try:
        work.mkdir(parents=True)
        args = {"plan": plan, "checkpoint": str(rt.blobs.path(model.sha256)), "out": str(out),
                "latency": bool(r.get("latency")), "request": {"device": "cpu"}}
        report = run_untrusted(rt.settings, "apply", args, attempt, reporter)
        reporter("apply", 0.95, "zipping the checkpoint")
        archive = work / "checkpoint.zip"
        digest = hashlib.sha256()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:  # safetensors do not compress
            for path in sorted(out.iterdir()):
                if path.is_file() and not path.is_symlink():
                    z.write(path, path.name)
        with open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        sha = digest.hexdigest()
        size = archive.stat().st_size
        rt.blobs.put_file(archive, sha)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = model.name.removesuffix(".zip")
    result = {"schema": "bitplan.apply/v1", "plan_job_id": r["plan_job_id"], "report": report,
              "artifact": {"sha256": sha, "size_bytes": size, "filename": f"{stem}-{job.id}-compressed-tensors.zip"}}
    attempt.check()
    finish(rt.db, job.id, JobState.SUCCEEDED, lease=attempt.lease, plan=result)
    return "succeeded"


def run_untrusted(settings: Settings, task: str, args: dict, attempt: Attempt, reporter: Reporter) -> dict:
    """Run ``task`` of ``workers.untrusted`` in the sandbox for this attempt: progress goes to the job row,
    and the child is killed as soon as the attempt must stop (JobCancelled is raised then)."""
    from workers.sandbox import Limits, SandboxStopped, shared_sandbox

    device = str((args.get("request") or {}).get("device") or "cpu")
    # CUDA reserves virtual address space far beyond any host-memory limit (RLIMIT_AS would fail its start), so a job
    # that may use the GPU runs without BITPLAN_WORKER_MEMORY_MB; its GPU memory is its own device's to run out of
    gpu = device.startswith("cuda") or device == "auto"
    limits = Limits(wall_s=settings.job_time_limit_s + 60.0, memory_mb=0 if gpu else settings.worker_memory_mb)
    env = {k: os.environ[k] for k in ("BITPLAN_MAX_UNPACKED_MB",) if os.environ.get(k)}
    try:
        return shared_sandbox().run(task, args, limits, on_progress=reporter, should_stop=attempt.why_stop, env=env)
    except SandboxStopped as exc:
        raise JobCancelled(f"{attempt.job_id}: {exc.reason}") from None
    except BitplanError as exc:
        if exc.code == "out_of_memory":
            exc.message = f"the job {exc.message}"
        raise


def shard_spec(shard: dict | list) -> dict:
    """``{"layers": [names]}`` or ``{"probes": [start, end]}`` (a bare list of layer names: a task sent before probe shards)."""
    if isinstance(shard, list):
        return {"layers": [str(name) for name in shard]}
    if set(shard) == {"layers"}:
        return {"layers": [str(name) for name in shard["layers"]]}
    if set(shard) == {"probes"} and len(shard["probes"]) == 2:
        return {"probes": [int(shard["probes"][0]), int(shard["probes"][1])]}
    raise BitplanError(f"not a sensitivity shard: {shard!r}"[:300])


def run_shard(rt: Runtime, job_id: str, shard: dict | list, index: int, count: int, lease: str) -> dict | None:
    """Compute one shard (a layer block or a probe range); returns its partial result (JSON: ``table``, or ``probes``
    for a probe shard) or None if the job ended or changed hands meanwhile."""
    from bitplan.hutchinson import ProbeShard

    db, settings = rt.db, rt.settings
    job = _holding(db, job_id, lease)
    if job is None:
        return None
    with Attempt(db, job_id, lease, settings.job_time_limit_s, min(5.0, settings.heartbeat_stale_s / 4)) as attempt:
        reporter = Reporter(db, job_id, attempt, prefix=f"shard {index + 1}/{count}: ")
        try:
            spec = resolve(rt, job)
            what = shard_spec(shard)
            result = run_untrusted(settings, "shard", {"request": spec.request.model_dump(mode="json"), **what},
                                   attempt, reporter)
            worker = f"{socket.gethostname()}:{os.getpid()}"
            if "probes" in what:
                rows = ProbeShard.model_validate(result["probes"])
                rows.check()
                if [rows.start, rows.end] != what["probes"]:
                    raise BitplanError(f"the probe shard computed probes [{rows.start}, {rows.end}), not {what['probes']}")
                return {"probes": rows.model_dump(mode="json"), "worker": worker}
            table = SensitivityTable.model_validate(result["table"])
            return {"table": table.model_dump(mode="json", by_alias=True), "worker": worker}
        except JobCancelled:
            return None
        except Exception as exc:
            fail(db, job_id, exc, lease)
            return None


def merge_and_continue(rt: Runtime, parts: list[dict | None], job_id: str, lease: str) -> str:
    """The chord's callback: merge the shards (layer tables, or probe rows), cache the result, then solve and
    validate. Nothing is stored unless every shard came back and the merge succeeded."""
    from bitplan.hutchinson import ProbeShard
    from bitplan.methods import merge_probe_shards, merge_shards

    db = rt.db
    job = _holding(db, job_id, lease)
    if job is None or any(p is None for p in parts):
        return "skipped"
    try:
        spec = resolve(rt, job)
        if all("probes" in p for p in parts):
            merged = merge_probe_shards([ProbeShard.model_validate(p["probes"]) for p in parts], spec.layer_names)
        elif all("table" in p for p in parts):
            merged = merge_shards([SensitivityTable.model_validate(p["table"]) for p in parts], spec.layer_names)
        else:
            raise BitplanError("the sensitivity shards of one job mix layer blocks and probe ranges")
        workers = sorted({p["worker"] for p in parts})
        note = f"computed in {len(parts)} shards on worker(s) {', '.join(workers)}"
        if all("probes" in p for p in parts) and merged.layers:
            computed, used = int(merged.params["max_probes"]), int(merged.layers[0].detail.get("probes", 0))
            note += (f", split by probes: all {computed} computed, the first {used} kept (where one worker's "
                     "stopping rule stops), so the table is one worker's")
        merged = merged.model_copy(update={"notes": [*merged.notes, note]})
        key, key_spec = spec.cache_key()
        store_table(db, key, key_spec, merged)
    except Exception as exc:
        fail(db, job_id, exc, lease)
        return "failed"
    return run_job(rt, job_id, table=merged, lease=lease)


def _holding(db: Database, job_id: str, lease: str) -> Job | None:
    """The job if it is running under ``lease`` (shards and the merge continue the attempt that split it)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        return job if job is not None and job.state == JobState.RUNNING and job.lease == lease else None

