"""Limits and retries at the API (in-process app on SQLite, jobs not run): the per-team
quota of queued/running jobs, the per-key request rate, Idempotency-Key, and a submit
while the broker is down (stored, sent later by the reconciler)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import create_app
from storage import Database
from storage.models import Job
from tests.rows import database_with_jobs
from workers.reconcile import reconcile_once


def make_client(tmp_path, **overrides):
    settings = load_settings(data_dir=str(tmp_path / "data"), **overrides)
    db = Database(settings.database_url)
    db.migrate()
    keys = {name: db.create_key(name) for name in ("vision", "speech")}
    app = create_app(settings, worker=False, reconcile=False)
    sent: list[str] = []
    return app, db, keys, sent, settings


@pytest.fixture
def model_file(digits_files):
    return ("digits.pt2", digits_files["pt2"].read_bytes())


def start(app, sent, key, fail_enqueue=False):
    client = TestClient(app)
    client.__enter__()

    def enqueue(job_id):
        if fail_enqueue:
            raise ConnectionError("broker down")
        sent.append(job_id)

    app.state.enqueue = enqueue
    client.headers["Authorization"] = f"Bearer {key}"
    return client


def test_quota_of_active_jobs_per_team(tmp_path, model_file):
    app, db, keys, sent, _ = make_client(tmp_path, max_active_jobs=2)
    a = start(app, sent, keys["vision"])
    model = a.post("/v1/models", files={"file": model_file}).json()["id"]
    body = {"model_id": model, "budgets": {"avg_weight_bits": 4}}
    assert [a.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
    refused = a.post("/v1/jobs", json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert refused.headers["retry-after"] and "cancel" in refused.json()["error"]["hint"]
    b = TestClient(app)
    b.headers["Authorization"] = f"Bearer {keys['speech']}"
    other = b.post("/v1/models", files={"file": model_file}).json()["id"]
    assert b.post("/v1/jobs", json={**body, "model_id": other}).status_code == 202  # another team's quota is its own
    a.delete(f"/v1/jobs/{sent[0]}")
    assert a.post("/v1/jobs", json=body).status_code == 202  # a cancelled job frees its place
    a.__exit__(None, None, None)


def test_rate_limit_per_key(tmp_path):
    app, db, keys, sent, _ = make_client(tmp_path, rate_limit=0.5, rate_burst=3)
    a = start(app, sent, keys["vision"])
    codes = [a.get("/v1/jobs").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = a.get("/v1/jobs")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    b = TestClient(app)
    b.headers["Authorization"] = f"Bearer {keys['speech']}"
    assert b.get("/v1/jobs").status_code == 200  # per key, not global
    assert TestClient(app).get("/healthz").status_code == 200
    a.__exit__(None, None, None)


def test_idempotency_key_returns_the_same_job(tmp_path, model_file):
    app, db, keys, sent, _ = make_client(tmp_path)
    a = start(app, sent, keys["vision"])
    model = a.post("/v1/models", files={"file": model_file}).json()["id"]
    body = {"model_id": model, "budgets": {"avg_weight_bits": 4}}
    first = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-42"})
    again = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replay"] == "true"
    assert sent == [first.json()["id"]]  # queued once
    other = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-43"})
    assert other.json()["id"] != first.json()["id"]
    b = TestClient(app)
    b.headers["Authorization"] = f"Bearer {keys['speech']}"
    model_b = b.post("/v1/models", files={"file": model_file}).json()["id"]
    theirs = b.post("/v1/jobs", json={**body, "model_id": model_b}, headers={"Idempotency-Key": "run-42"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]  # keys are per team
    a.__exit__(None, None, None)


def test_submit_while_the_broker_is_down_is_kept_and_sent_later(tmp_path, model_file):
    app, db, keys, sent, settings = make_client(tmp_path)
    a = start(app, sent, keys["vision"], fail_enqueue=True)
    model = a.post("/v1/models", files={"file": model_file}).json()["id"]
    r = a.post("/v1/jobs", json={"model_id": model, "budgets": {"avg_weight_bits": 4}})
    assert r.status_code == 202 and r.json()["state"] == "queued"
    with db.session() as s:
        assert s.get(Job, r.json()["id"]).enqueued_at is None  # marked for the reconciler
    later: list[str] = []
    assert reconcile_once(db, later.append, settings) == {"requeued": 1, "failed": 0, "still_queued": 0}
    assert later == [r.json()["id"]]
    assert reconcile_once(db, later.append, settings)["requeued"] == 0  # not again until requeue_after_s
    a.__exit__(None, None, None)


def test_reconciler_resends_lost_work_and_gives_up_after_max_attempts(tmp_path):
    import datetime as dt

    from storage.models import utcnow

    settings = load_settings(data_dir=str(tmp_path / "data"), heartbeat_stale_s=30, max_attempts=3)
    old = utcnow() - dt.timedelta(seconds=120)
    runs = {"lost": (old, 1), "alive": (utcnow(), 1), "doomed": (old, 3)}
    db, ids = database_with_jobs(settings, *({"state": "running", "heartbeat_at": beat, "attempts": attempts,
                                              "started_at": old, "enqueued_at": old} for beat, attempts in runs.values()))
    rows = {name: SimpleNamespace(id=job_id) for name, job_id in zip(runs, ids)}
    sent: list[str] = []
    assert reconcile_once(db, sent.append, settings) == {"requeued": 1, "failed": 1, "still_queued": 0}
    assert sent == [rows["lost"].id]
    with db.session() as s:
        doomed = s.get(Job, rows["doomed"].id)
        assert doomed.state == "failed" and "stopped 3 times" in doomed.error_message
        assert s.get(Job, rows["alive"].id).state == "running"


def _backlog(tmp_path, **overrides):
    """A queued job due for a resend and a running job whose worker went silent, both long enough ago."""
    import datetime as dt

    from storage.models import utcnow

    settings = load_settings(data_dir=str(tmp_path / "data"), heartbeat_stale_s=30, requeue_after_s=10, **overrides)
    old = utcnow() - dt.timedelta(seconds=120)
    db, (waiting, lost) = database_with_jobs(
        settings, {"state": "queued", "enqueued_at": old},
        {"state": "running", "heartbeat_at": old, "attempts": 1, "started_at": old, "enqueued_at": old})
    return db, settings, waiting, lost


def test_reconciler_does_not_pile_duplicates_on_a_backlog(tmp_path):
    """A message still in the broker is a backlog, not a loss: sending it again would only add duplicates."""
    db, settings, waiting, lost = _backlog(tmp_path)
    sent: list[str] = []
    assert reconcile_once(db, sent.append, settings, pending=lambda: {waiting, lost}) == {
        "requeued": 0, "failed": 0, "still_queued": 2}
    for _ in range(5):
        assert reconcile_once(db, sent.append, settings, pending=lambda: {waiting, lost})["requeued"] == 0
    assert sent == []
    # the broker lost its messages (restarted empty): the lost job goes again now, the queued one when it is due
    assert reconcile_once(db, sent.append, settings, pending=lambda: set())["requeued"] == 1
    assert sent == [lost]


def test_reconciler_resends_when_the_broker_cannot_be_read(tmp_path):
    db, settings, waiting, lost = _backlog(tmp_path)
    sent: list[str] = []

    def unreadable():
        raise ConnectionError("broker down")

    assert reconcile_once(db, sent.append, settings, pending=unreadable)["requeued"] == 2
    for _ in range(3):  # resent just now: not again until requeue_after_s, although the heartbeat is still stale
        assert reconcile_once(db, sent.append, settings, pending=lambda: None)["requeued"] == 0
    assert len(sent) == 2


def test_pending_job_ids_reads_the_in_process_broker(tmp_path):
    from workers.app import WorkerApp

    app = WorkerApp(load_settings(data_dir=str(tmp_path / "data"), broker_url="memory://"))
    app.enqueue("j_backlog1")
    app.enqueue("j_backlog2")
    try:
        assert {"j_backlog1", "j_backlog2"} <= app.pending_job_ids()
    finally:
        app.control.purge()


def test_two_apps_in_one_process_keep_their_own_deployment(tmp_path, monkeypatch):
    """Building a second app (another API, a test) must not redirect the first one's tasks, broker or database."""
    monkeypatch.setenv("BITPLAN_RATE_LIMIT", "0")
    from service.app import create_app

    first = create_app(load_settings(data_dir=str(tmp_path / "a"), broker_url="redis://127.0.0.1:1/3"), worker=False,
                       reconcile=False)
    second = create_app(load_settings(data_dir=str(tmp_path / "b"), broker_url="memory://"), worker=False,
                        reconcile=False)
    one, two = first.state.celery, second.state.celery
    assert one is not two
    assert one.conf.broker_url == "redis://127.0.0.1:1/3" and two.conf.broker_url == "memory://"
    assert one.runtime.db is first.state.db and two.runtime.db is second.state.db
    assert str(tmp_path / "a") in str(one.runtime.db.engine.url) and str(tmp_path / "b") in str(two.runtime.db.engine.url)
    # each app's tasks are bound to it: a task sent through the first goes to the first's broker
    assert one.tasks["bitplan.run_job"].app is one and two.tasks["bitplan.run_job"].app is two
    # and runs with its own runtime: a job id unknown to the second app's database is skipped there
    calls = []
    monkeypatch.setattr("workers.jobs.run_job", lambda rt, job_id, **kw: calls.append((rt, job_id)) or "skipped")
    two.tasks["bitplan.run_job"].run("j_x")
    one.tasks["bitplan.run_job"].run("j_y")
    assert calls == [(two.runtime, "j_x"), (one.runtime, "j_y")]
    assert two.pending_job_ids() == set()


def test_the_in_process_worker_runs_its_apps_tasks(tmp_path, monkeypatch):
    """The embedded default: a job sent through the memory broker is run by the worker thread, with this app's
    runtime (Celery finds tasks through its per-thread current app, which that thread sets)."""
    import time

    from workers.app import WorkerApp

    ran = []
    monkeypatch.setattr("workers.jobs.run_job", lambda rt, job_id, **kw: ran.append((rt, job_id)) or "skipped")
    WorkerApp(load_settings(data_dir=str(tmp_path / "other"), broker_url="memory://"))  # a second app, no worker
    app = WorkerApp(load_settings(data_dir=str(tmp_path / "data"), broker_url="memory://"))
    worker = app.start_in_process_worker()
    try:
        app.enqueue("j_embedded")
        deadline = time.monotonic() + 30
        while not ran and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ran == [(app.runtime, "j_embedded")]
    finally:
        worker.stop(in_sighandler=False)


def test_profile_apply_and_runtime_targets_are_checked_at_submit(tmp_path, model_file):
    """POST /v1/profiles and POST /v1/jobs/{id}/apply share the jobs' quota and checks; each kind of job answers
    only at its own result endpoint; a runtime target is resolved before the job is stored."""
    from storage.models import JobState

    app, db, keys, sent, _ = make_client(tmp_path, max_active_jobs=2)
    a = start(app, sent, keys["vision"])
    model = a.post("/v1/models", files={"file": model_file}).json()["id"]
    r = a.post("/v1/profiles", json={"model_id": model, "w_bits": [9]})
    assert r.status_code == 422 and "weight bits [9]" in r.text
    r = a.post("/v1/profiles", json={"model_id": model, "w_bits": [8, 4], "runs": 3, "device": " CPU ",
                                     "formats": ["nvfp4", "fp8_e4m3"]})
    assert r.status_code == 202 and r.json()["kind"] == "profile" and sent == [r.json()["id"]]
    profile = r.json()
    assert profile["request"]["w_bits"] == [4, 8] and profile["request"]["device"] == "cpu"
    assert profile["request"]["formats"] == ["fp8_e4m3", "nvfp4"]
    r = a.get(f"/v1/jobs/{profile['id']}/plan")
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_job_kind" and "/latency" in r.text
    with db.session() as s:  # as if a worker had timed it: the job page shows a column per width and format
        job = s.get(Job, profile["id"])
        job.state, job.plan = JobState.SUCCEEDED, {"latency_table": {"fc1": {"16": 1.0, "nvfp4": 1.5, "4": 2.0,
                                                                             "fp8_e4m3": 3.0, "8": 2.5}},
                                                   "notes": [], "device": "cpu"}
    browser = TestClient(app, follow_redirects=False)
    assert browser.post("/login", data={"key": keys["vision"], "next": "/"}).status_code == 303
    page = browser.get(f"/jobs/{profile['id']}").text
    assert "INT 4,8, fp8_e4m3, nvfp4 and float" in page
    assert re.findall(r'<th scope="col">([^<]+)</th>', page)[:6] == ["layer", "int4", "int8", "float", "fp8_e4m3",
                                                                      "nvfp4"]
    r = a.post("/v1/jobs", json={"model_id": model, "budgets": {"avg_weight_bits": 4}, "target": "llamacpp",
                                 "formats": ["nvfp4"]})
    assert r.status_code == 422 and "llamacpp does not run format(s) ['nvfp4']" in r.text
    r = a.post("/v1/jobs", json={"model_id": model, "budgets": {"size_bytes": 30000}, "target": "vllm"})
    assert r.status_code == 202, r.text
    assert (r.json()["request"]["w_bits"], r.json()["request"]["formats"]) == ([4, 8, 16], ["fp8_e4m3", "nvfp4"])
    planned = r.json()["id"]
    r = a.post(f"/v1/jobs/{planned}/apply")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_plan"  # still queued
    with db.session() as s:  # as if a worker had finished it: a plan of a .pt2 model
        job = s.get(Job, planned)
        job.state, job.plan = JobState.SUCCEEDED, {"layers": [{"name": "fc1", "w_bits": 4, "w_format": "int"}]}
    r = a.post(f"/v1/jobs/{planned}/apply", json={"latency": True})
    assert r.status_code == 422 and r.json()["error"]["code"] == "export_unsupported" and "pt2" in r.text
    assert [a.post("/v1/profiles", json={"model_id": model}).status_code for _ in range(2)] == [202, 202]  # the quota
    refused = a.post("/v1/profiles", json={"model_id": model})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    a.__exit__(None, None, None)
