"""Untrusted work in the service runs in sandboxed children (workers/sandbox.py), never in the API process: the
hostile archives of tests/hostile.py are refused at upload and inside a job, nothing they say runs, the child
sees no secrets and has limits, and a cancelled or timed-out job's child is killed at once, freeing the worker.

One embedded app (SQLite, in-process worker, memory broker) serves the module, as `bitplan serve` does."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import create_app
from storage.models import ModelFile
from tests.hostile import PT2_ATTACKS, parameter_name, torchscript_attribute
from workers.sandbox import Limits, Sandbox, SandboxStopped, shared_sandbox

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def service(tmp_path_factory, digits_files):
    root = tmp_path_factory.mktemp("sandboxed")
    settings = load_settings(data_dir=str(root / "data"), heartbeat_stale_s=4.0)
    app = create_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {app.state.db.create_key('vision')}"
        client.app_state = app.state
        model = client.post("/v1/models", files={"file": ("digits.pt2", digits_files["pt2"].read_bytes())})
        data = client.post("/v1/datasets", files={"file": ("calib.npz", digits_files["calib"].read_bytes())})
        assert model.status_code == 201 and data.status_code == 201, (model.text, data.text)
        client.model, client.data = model.json(), data.json()
        yield client


def submit(client, **extra) -> dict:
    body = {"model_id": client.model["id"], "dataset_id": client.data["id"], "budgets": {"avg_weight_bits": 4}, **extra}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def wait(client, job_id: str, until=TERMINAL, timeout: float = 180.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def long_job(client) -> dict:
    probes = {"max_probes": 10000, "min_probes": 10000, "probes_per_pass": 1, "tol": 1e-6}
    return submit(client, reuse_sensitivity=False, sensitivity={"method": "hessian_trace", "params": probes})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("attack", ["parameter_name", "guards_code", "shape_expression", "operator", "aoti_library",
                                    "duplicate_member"])
def test_hostile_uploads_are_refused_unread_and_leave_nothing(service, digits_files, tmp_path, attack):
    build, _ = PT2_ATTACKS[attack]
    marker = tmp_path / "marker"
    path = build(digits_files["pt2"], tmp_path / f"{attack}.pt2", marker)
    blobs = sorted(p.name for p in (Path(service.app_state.settings.data_dir) / "blobs").rglob("*") if p.is_file())
    r = service.post("/v1/models", files={"file": (f"{attack}.pt2", path.read_bytes())})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unsafe_model" and f"{attack}.pt2" in error["message"] and error["hint"]
    assert not marker.exists()
    assert sorted(p.name for p in (Path(service.app_state.settings.data_dir) / "blobs").rglob("*") if p.is_file()) == blobs


def test_hostile_torchscript_upload_is_refused(service, tmp_path):
    marker = tmp_path / "marker"
    path = torchscript_attribute(tmp_path / "hostile.ts", marker)
    r = service.post("/v1/models", files={"file": ("hostile.ts", path.read_bytes())},
                     data={"dataset_id": service.data["id"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_model", r.text
    assert not marker.exists()


def test_a_job_whose_stored_model_turned_hostile_fails_without_running_it(service, digits_files, tmp_path):
    """A variant that got past the upload check (here: the stored file replaced) is still checked in the job."""
    marker = tmp_path / "marker"
    hostile = parameter_name(digits_files["pt2"], tmp_path / "h.pt2", marker).read_bytes()
    upload = service.post("/v1/models", files={"file": ("victim.pt2", digits_files["pt2"].read_bytes() + b"\0" * 7)})
    # (the trailing bytes make a second, distinct blob of the same model: a zip ignores them)
    assert upload.status_code == 201, upload.text
    with service.app_state.db.session() as s:
        blob = service.app_state.blobs.path(s.get(ModelFile, upload.json()["id"]).sha256)
    blob.chmod(0o644)
    blob.write_bytes(hostile)
    job = wait(service, submit(service, model_id=upload.json()["id"])["id"])
    assert job["state"] == "failed" and "not a dotted path" in job["error"]["message"], job
    assert not marker.exists()


def test_the_sandboxed_child_sees_no_secrets_and_has_limits(monkeypatch, tmp_path):
    monkeypatch.setenv("BITPLAN_DATABASE_URL", "postgresql+psycopg://bitplan:secret@db/bitplan")
    monkeypatch.setenv("BITPLAN_API_KEY", "bp_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    sandbox = Sandbox(tmp_path)
    try:
        probe = sandbox.run("probe", {}, Limits(wall_s=60, memory_mb=4096))
    finally:
        sandbox.close()
    for env in (probe["env"], probe["initial_env"]):  # os.environ, and what /proc/self/environ shows
        assert not {"BITPLAN_DATABASE_URL", "BITPLAN_API_KEY", "AWS_SECRET_ACCESS_KEY"} & set(env), env
        assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" in env
    assert probe["pid"] != os.getpid() and probe["sid"] == probe["pid"]  # its own session: killed as a group
    assert probe["cwd"].startswith(str(tmp_path)) and not Path(probe["cwd"]).exists()  # a temp dir, removed after
    assert probe["limits"]["RLIMIT_AS"][0] == 4096 << 20 and probe["limits"]["RLIMIT_CPU"][0] > 0
    assert probe["limits"]["RLIMIT_CORE"] == [0, 0]


def test_warming_starts_the_zygote_in_a_fresh_temp_dir(tmp_path):
    """`bitplan serve` warms the sandbox at start; in a TMPDIR without bitplan-sandbox/ that used to fail
    ("No such file or directory"), leaving the zygote to start at the first upload."""
    sandbox = Sandbox(tmp_path / "fresh")
    try:
        sandbox.warm()
        assert sandbox._zygote is not None and sandbox._zygote.alive()
    finally:
        sandbox.close()


def test_a_child_past_its_wall_limit_is_killed(tmp_path):
    sandbox = shared_sandbox()
    started = time.monotonic()
    with pytest.raises(SandboxStopped):
        sandbox.run("plan", {"request": {"model": "catalog:digits_cnn", "budget": {"avg_weight_bits": 4},
                                         "sensitivity": "hessian_trace",
                                         "sensitivity_params": {"max_probes": 10000, "min_probes": 10000}}},
                    Limits(wall_s=3))
    assert time.monotonic() - started < 15
    assert not sandbox.children


def test_cancel_kills_the_child_and_frees_the_worker(service):
    job = long_job(service)
    wait(service, job["id"], until=("running",))
    sandbox = shared_sandbox()
    deadline = time.monotonic() + 60
    while not any(task == "plan" for task in sandbox.children.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = next(pid for pid, task in sandbox.children.items() if task == "plan")
    time.sleep(1.0)
    cancelled = time.monotonic()
    assert service.delete(f"/v1/jobs/{job['id']}").status_code == 202
    while alive(child) and time.monotonic() - cancelled < 10:
        time.sleep(0.05)
    gone = time.monotonic() - cancelled
    nxt = submit(service, sensitivity={"method": "fisher", "params": {"max_samples": 64}})
    started = wait(service, nxt["id"], until=("running", *TERMINAL), timeout=30)
    print(f"\n[sandbox] cancelled child gone {gone:.2f} s after DELETE; next job {started['state']} "
          f"{time.monotonic() - cancelled:.2f} s after it")
    assert not alive(child) and gone < 5
    assert wait(service, nxt["id"])["state"] == "succeeded"
    assert wait(service, job["id"])["state"] == "cancelled"


def test_non_finite_data_is_refused_at_upload_and_in_the_job(service, digits_files, tmp_path):
    inputs = np.load(digits_files["calib"])["inputs"].copy()
    inputs[5, 0, 2, 3] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, inputs=inputs)
    r = service.post("/v1/datasets", files={"file": ("nan.npz", bad.read_bytes())})
    assert r.status_code == 422, r.text
    assert "'inputs' holds nan at index [5, 0, 2, 3]" in r.json()["error"]["message"]
    good = service.post("/v1/datasets", files={"file": ("later-nan.npz", digits_files["eval"].read_bytes())}).json()
    with service.app_state.db.session() as s:
        from storage.models import DatasetFile

        blob = service.app_state.blobs.path(s.get(DatasetFile, good["id"]).sha256)
    blob.chmod(0o644)
    blob.write_bytes(bad.read_bytes())  # the stored file turned bad after it was checked
    job = wait(service, submit(service, dataset_id=good["id"])["id"], timeout=120)
    assert job["state"] == "failed" and "index [5, 0, 2, 3]" in job["error"]["message"], job
    assert job["error"]["code"] == "bad_data", job
