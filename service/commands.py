"""``bitplan serve``, ``bitplan worker`` and ``bitplan keys``: run the service.

Flags override the environment variables of ``bitplan.settings`` (and are written
back to the environment, so child processes, e.g. the upload reader, agree).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from bitplan.errors import BitplanError
from bitplan.settings import Settings, load_settings

if TYPE_CHECKING:
    from storage import Database


def _settings(args: argparse.Namespace) -> Settings:
    for flag, var in (("data_dir", "BITPLAN_DATA_DIR"), ("database", "BITPLAN_DATABASE_URL"),
                      ("broker", "BITPLAN_BROKER_URL"), ("result_backend", "BITPLAN_RESULT_BACKEND")):
        value = getattr(args, flag, None)
        if value:
            os.environ[var] = str(value)
    return load_settings()


def _database(settings: Settings) -> Database:
    from storage import Database, Unavailable

    db = Database(settings.database_url)
    try:
        db.migrate()
    except Unavailable as exc:
        raise BitplanError(str(exc), "check BITPLAN_DATABASE_URL and that the database server runs",
                           code="database_unavailable") from None
    return db


def ensure_local_key(settings: Settings, db: Database) -> str | None:
    """Embedded default: on first start, make team 'local' a key, keep it in DATA_DIR/local-key, return it."""
    if db.has_keys():
        return None
    key = db.create_key("local")
    path = settings.local_key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args)
    db = _database(settings)
    key = ensure_local_key(settings, db)
    worker = False if args.no_worker else None
    app = create_app(settings, worker=worker)
    mode = "embedded (in-process worker, SQLite)" if settings.embedded and not args.no_worker else "distributed"
    print(f"bitplan {mode}: http://{args.host}:{args.port}  (API docs at /docs; data in {settings.data_dir})",
          file=sys.stderr)
    if key:
        print(f"created API key for team 'local' (saved in {settings.local_key_file}):\n{key}", file=sys.stderr)
    elif settings.local_key_file.is_file():
        print(f"API key of team 'local': {settings.local_key_file}", file=sys.stderr)
    sys.stderr.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bitplan.schemas import check_device

    try:
        device = check_device(args.device)
    except ValueError as exc:
        raise BitplanError(str(exc), "a worker runs jobs on cpu, cuda or cuda:N", field="device") from None
    if device == "auto":
        raise BitplanError("a worker's device is cpu, cuda or cuda:N, not auto",
                           "say which: the device decides which queue the worker takes jobs from", field="device")
    if device.startswith("cuda"):
        _check_gpu(device)
    os.environ["BITPLAN_WORKER_DEVICE"] = device  # read by the jobs this worker runs (bitplan.settings)
    settings = _settings(args)
    if settings.embedded:
        raise BitplanError("a separate worker needs a broker server; the memory:// broker only works inside `bitplan serve`",
                           "start one with --broker redis://HOST:6379/0 (and the API with the same --broker)")
    _database(settings)
    from workers.app import WorkerApp

    app = WorkerApp(settings)
    app.set_current()  # the worker looks its tasks up in the current app (in this process, the only one)
    if args.concurrency == 1:  # the solo pool runs jobs in this process: start its sandbox now, not at the first job
        from workers.sandbox import shared_sandbox

        shared_sandbox().warm_in_background()
    app.worker_main(worker_argv(args, app.conf.task_default_queue or "celery"))
    return 0


def _check_gpu(device: str) -> None:
    """Refuse to start a GPU worker on a machine whose torch sees no such GPU (it would fail every job it takes).
    Asked in a child process: the worker's own process never initialises CUDA or imports torch."""
    import subprocess

    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        count = int(run.stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError, OSError):
        count = 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise BitplanError(f"--device {device}: torch on this machine sees {count} CUDA device(s)",
                           "start GPU workers on machines with an NVIDIA GPU and a CUDA build of torch, or use --device cpu",
                           field="device", code="device_unavailable")


def worker_argv(args: argparse.Namespace, default_queue: str = "celery") -> list[str]:
    """The Celery worker's command line: a GPU worker (``--device cuda[:N]``) consumes the gpu queue (and the
    default one with ``--cpu-jobs-too``), a CPU worker the default queue."""
    from workers.app import worker_queues

    argv = ["worker", f"--loglevel={args.loglevel}", f"--concurrency={args.concurrency}",
            "--pool=" + ("solo" if args.concurrency == 1 else "prefork"), "--without-gossip", "--without-mingle",
            "--queues=" + ",".join(worker_queues(str(args.device).strip().lower(), bool(args.cpu_jobs_too), default_queue))]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    return argv


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _settings(args)
    db = _database(settings)
    if args.action == "create":
        if not args.team.strip():
            raise BitplanError("team name is empty", "e.g. bitplan keys create --team vision")
        print(db.create_key(args.team.strip()))
        return 0
    if not db.revoke_key(args.key):
        raise BitplanError("no such key", "give the full key as printed by `bitplan keys create`")
    print("revoked", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="uploads and the SQLite file (env BITPLAN_DATA_DIR; default ./bitplan-data)")
    p.add_argument("--database", help="SQLAlchemy URL (env BITPLAN_DATABASE_URL; default SQLite in the data dir)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the REST API (with an in-process worker unless --broker is a server)")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--broker", help="Celery broker, e.g. redis://127.0.0.1:6379/0 (env BITPLAN_BROKER_URL; "
                   "default memory://, in-process)")
    p.add_argument("--result-backend", help="Celery result backend (default: the broker if redis)")
    p.add_argument("--no-worker", action="store_true", help="do not run a worker in this process")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker for a server started with --broker")
    _common(p)
    p.add_argument("--broker", help="Celery broker URL (env BITPLAN_BROKER_URL)")
    p.add_argument("--result-backend")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (processes)")
    p.add_argument("--hostname", help="worker name, e.g. w1@%%h")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where this worker runs jobs: cpu (the default queue) or cuda / cuda:N (the gpu queue: jobs "
                        "asking for cuda, and for auto when the server has BITPLAN_GPU_WORKERS=true)")
    p.add_argument("--cpu-jobs-too", action="store_true",
                   help="a GPU worker takes jobs from the default queue too (they run on its GPU when they ask for auto)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="create or revoke API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    c = ksub.add_parser("create", help="create a key for a team (the team is created if new); prints only the key")
    c.add_argument("--team", required=True)
    _common(c)
    r = ksub.add_parser("revoke", help="revoke a key")
    r.add_argument("key")
    _common(r)
    p.set_defaults(func=cmd_keys)
