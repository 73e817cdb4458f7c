"""The service as deployed: the API, two Celery worker processes, real Redis and a
fresh PostgreSQL database (tests.devstack). Two teams work at once and never
see each other's work; cancel, cache reuse, sharding over two workers, callbacks,
the client CLI."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bitplan.schemas import PlanFile
from tests.conftest import run_cli
from tests.devstack import DevStack
from tests.integration.service_client import Callbacks, Team

FAST = {"method": "hessian_trace", "params": {"max_probes": 8, "min_probes": 4, "max_samples": 64}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with DevStack(workers=2, workdir=tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="module")
def teams(stack, digits_files):
    a, b = Team(stack, "vision"), Team(stack, "speech")
    for t in (a, b):
        t.model = t.upload("models", digits_files["pt2"]).json()
        t.data = t.upload("datasets", digits_files["calib"]).json()
    return a, b


def test_upload_is_content_addressed_and_describes_the_model(teams, digits_files):
    a, b = teams
    again = a.upload("models", digits_files["pt2"])
    assert again.status_code == 200 and again.json()["id"] == a.model["id"]
    assert [layer["name"] for layer in a.model["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert all(layer["macs"] > 0 for layer in a.model["layers"])
    assert a.model["sha256"] == b.model["sha256"] and a.model["id"] != b.model["id"]  # same bytes, each team's own row
    assert a.data["samples"] == 256 and a.data["has_targets"]


def test_two_teams_at_once_and_isolated_both_ways(teams):
    a, b = teams
    with ThreadPoolExecutor(2) as pool:
        subs = list(pool.map(lambda t: t.submit(model_id=t.model["id"], dataset_id=t.data["id"],
                                                budgets={"avg_weight_bits": 4}, w_bits=[2, 3, 4, 8],
                                                sensitivity=FAST, solver={"method": "ilp"}), (a, b)))
    for r in subs:
        assert r.status_code == 202, r.text
        assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        assert r.json()["state"] == "queued"
    jobs = {t.name: r.json()["id"] for t, r in zip((a, b), subs)}
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda t: t.wait(jobs[t.name]), (a, b)))
    for job in done:
        assert job["state"] == "succeeded", job
        assert job["started_at"] and job["finished_at"] and job["progress"] == 1.0
    for me, other in ((a, b), (b, a)):
        plan = PlanFile.model_validate(me.http.get(f"/v1/jobs/{jobs[me.name]}/plan").json())
        assert plan.cost.avg_weight_bits <= 4 + 1e-9 and plan.measured is not None
        assert plan.measured.data == "digits_cnn_calib.npz (every 5th sample, kept aside from the search)"
        assert plan.measured.held_out == "split" and plan.uniform_check is not None
        assert plan.frontier and plan.model.name == "digits_cnn.pt2"
        mine = {j["id"] for j in me.http.get("/v1/jobs").json()["items"]}
        assert jobs[me.name] in mine and jobs[other.name] not in mine
        for path in (f"/v1/jobs/{jobs[other.name]}", f"/v1/jobs/{jobs[other.name]}/plan",
                     f"/v1/jobs/{jobs[other.name]}/frontier", f"/v1/models/{other.model['id']}",
                     f"/v1/datasets/{other.data['id']}"):
            r = me.http.get(path)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["code"] == "not_found"
        assert me.http.delete(f"/v1/jobs/{jobs[other.name]}").status_code == 404
        r = me.submit(model_id=other.model["id"], budgets={"avg_weight_bits": 4})
        assert r.status_code == 404 and "model" in r.json()["error"]["message"]
        r = me.submit(model_id=me.model["id"], dataset_id=other.data["id"], budgets={"avg_weight_bits": 4})
        assert r.status_code == 404
    csv = a.http.get(f"/v1/jobs/{jobs['vision']}/plan", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "name,kind,params,macs,w_bits,a_bits,w_format,sensitivity" and len(lines) == 6


def test_cache_reuse_skips_the_sensitivity_work(teams):
    a, _ = teams
    body = {"model_id": a.model["id"], "dataset_id": a.data["id"], "w_bits": [2, 3, 4, 8],
            "sensitivity": {"method": "fisher", "params": {"max_samples": 128}}}
    first = a.wait(a.submit(**body, budgets={"avg_weight_bits": 4}).json()["id"])
    second = a.wait(a.submit(**body, budgets={"avg_weight_bits": 3}, solver={"method": "greedy"}).json()["id"])
    assert first["state"] == second["state"] == "succeeded"
    assert first["cache_hit"] is False and second["cache_hit"] is True
    p1 = a.http.get(f"/v1/jobs/{first['id']}/plan").json()
    p2 = a.http.get(f"/v1/jobs/{second['id']}/plan").json()
    assert p2["sensitivity"] == p1["sensitivity"]  # the very same table: same seconds, same notes
    assert p2["timings"]["sensitivity"] < 0.2 * p1["timings"]["sensitivity"] + 0.05
    assert p2["cost"]["avg_weight_bits"] <= 3 + 1e-9
    # a runtime preset: the job keeps what vLLM runs, with its formats scored (so the INT-only table is not reused)
    r = a.submit(**body, budgets={"avg_weight_bits": 5}, target="vllm")
    assert r.status_code == 202 and r.json()["request"]["w_bits"] == [4, 8], r.text
    third = a.wait(r.json()["id"])
    assert third["state"] == "succeeded" and third["cache_hit"] is False, third
    p3 = a.http.get(f"/v1/jobs/{third['id']}/plan").json()
    assert (p3["target"], p3["w_bits_options"], p3["formats"]) == ("vllm", [4, 8], ["fp8_e4m3", "nvfp4"])
    assert {(la["w_bits"], la["w_format"]) for la in p3["layers"]} <= {(4, "int"), (8, "int"), (8, "fp8_e4m3"),
                                                                       (4, "nvfp4")}
    r = a.submit(**body, budgets={"avg_weight_bits": 5}, target="llamacpp", formats=["nvfp4"])
    assert r.status_code == 422 and "llamacpp does not run format(s) ['nvfp4']" in r.text, r.text


@pytest.mark.parametrize("sensitivity", [  # split by layer blocks; split by probe ranges (2 passes of 4 probes)
    {"method": "perturbation", "params": {"max_samples": 128}},
    {"method": "hessian_trace", "params": {"max_probes": 8, "min_probes": 8, "max_samples": 64}}], ids=["layers", "probes"])
def test_sharded_over_two_workers_gives_the_same_plan(teams, sensitivity):
    a, _ = teams
    body = {"model_id": a.model["id"], "dataset_id": a.data["id"], "budgets": {"avg_weight_bits": 3.5},
            "w_bits": [2, 3, 4, 8], "reuse_sensitivity": False, "sensitivity": sensitivity}
    split = a.wait(a.submit(**body, shards=2).json()["id"])
    whole = a.wait(a.submit(**body, shards=1).json()["id"])
    assert split["state"] == whole["state"] == "succeeded", (split, whole)
    ps = a.http.get(f"/v1/jobs/{split['id']}/plan").json()
    pw = a.http.get(f"/v1/jobs/{whole['id']}/plan").json()
    assert [(x["name"], x["w_bits"]) for x in ps["layers"]] == [(x["name"], x["w_bits"]) for x in pw["layers"]]
    assert [x["sensitivity"] for x in ps["layers"]] == [x["sensitivity"] for x in pw["layers"]]
    note = next(n for n in ps["sensitivity"]["notes"] if n.startswith("computed in 2 shards"))
    workers = note.split("worker(s) ")[1].split(", split by")[0].split(", ")
    assert len(workers) == 2, note  # both worker processes took a shard
    if sensitivity["method"] == "hessian_trace":
        assert "split by probes: all 8 computed, the first 8 kept" in note, note


def test_cancel_running_and_queued_jobs(teams):
    a, _ = teams
    slow = {"model_id": a.model["id"], "dataset_id": a.data["id"], "budgets": {"avg_weight_bits": 4},
            "reuse_sensitivity": False,
            "sensitivity": {"method": "hessian_trace", "params": {"max_probes": 10000, "min_probes": 10000, "tol": 1e-6,
                                                                  "probes_per_pass": 1}}}
    running = [a.submit(**slow).json()["id"] for _ in range(2)]  # two workers: both start
    queued = a.submit(**slow).json()["id"]
    for job_id in running:
        a.wait(job_id, until=("running",), timeout=120)
    assert a.http.get(f"/v1/jobs/{queued}").json()["state"] == "queued"
    for job_id in [queued, *running]:
        r = a.http.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert a.http.delete(f"/v1/jobs/{queued}").status_code == 409
    # the workers drop the cancelled work and are free again: a short job runs to the end
    quick = a.submit(model_id=a.model["id"], dataset_id=a.data["id"], budgets={"avg_weight_bits": 4},
                     sensitivity={"method": "fisher", "params": {"max_samples": 64}}).json()["id"]
    assert a.wait(quick, timeout=240)["state"] == "succeeded"
    for job_id in [queued, *running]:
        job = a.http.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "cancelled" and job["error"]["message"] == "cancelled by the user"
        assert job["error"]["code"] == "cancelled"


def test_errors_say_what_to_do(stack, teams):
    a, _ = teams
    assert httpx.get(stack.url + "/v1/jobs").status_code == 401
    bad = httpx.get(stack.url + "/v1/jobs", headers={"Authorization": "Bearer bp_nope"})
    assert bad.status_code == 401 and "keys create" in bad.json()["error"]["hint"]
    r = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": 4}, sensitivity={"method": "hessian"})
    assert r.status_code == 422 and "hessian_trace" in r.json()["error"]["hint"] and "fisher" in r.json()["error"]["hint"]
    r = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": 4}, solver={"method": "annealing"})
    assert r.status_code == 422 and "ilp" in r.json()["error"]["hint"]
    r = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": 1.5}, w_bits=[2, 4])
    assert r.status_code == 422 and r.json()["error"]["code"] == "infeasible"
    assert r.json()["error"]["minimums"] == {"avg_weight_bits": 2.0}
    r = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": -1})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["loc"].startswith("budgets")
    r = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": 4}, pins={"conv9": 8})
    assert r.status_code == 422 and "conv9" in r.json()["error"]["message"]
    r = a.http.post("/v1/models", files={"file": ("evil.pt", b"\x80\x04\x95" + b"\x00" * 64)})
    assert r.status_code == 422 and r.json()["error"]["message"]
    methods = httpx.get(stack.url + "/v1/methods").json()
    assert {m["name"] for m in methods["sensitivity"]} >= {"hessian_trace", "perturbation", "lrp"}
    assert {m["name"] for m in methods["solvers"]} >= {"ilp", "pareto", "greedy"}


def test_callback_and_pagination(teams):
    a, _ = teams
    hooks = Callbacks()
    try:
        job = a.submit(model_id=a.model["id"], budgets={"avg_weight_bits": 4}, callback_url=hooks.url,
                       sensitivity={"method": "fisher", "params": {"max_samples": 32}}).json()
        assert job["dataset_id"] == "synthetic"
        done = a.wait(job["id"])
        assert done["state"] == "succeeded", done
        deadline = time.monotonic() + 30
        while not hooks.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hooks.received and hooks.received[0]["id"] == job["id"] and hooks.received[0]["state"] == "succeeded"
    finally:
        hooks.close()
    page = a.http.get("/v1/jobs", params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["total"] > 2 and page["next"]
    rest = a.http.get(page["next"]).json()
    assert rest["offset"] == 2 and not {j["id"] for j in rest["items"]} & {j["id"] for j in page["items"]}
    assert all(j["state"] == "succeeded" for j in a.http.get("/v1/jobs", params={"state": "succeeded"}).json()["items"])


def test_cli_client_verbs(stack, teams, digits_files, tmp_path):
    a, _ = teams
    auth = ["--url", stack.url, "--key", a.key]
    sub = run_cli("submit", str(digits_files["pt2"]), "--data", str(digits_files["calib"]), "--budget", "avg_weight_bits=3",
                  "--wbits", "2,3,4,8", "--sensitivity", "fisher", "--param", "max_samples=64", *auth)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert job_id.startswith("j_")
    out = tmp_path / "plan.json"
    waited = run_cli("wait", job_id, "--out", str(out), *auth)
    assert waited.returncode == 0, waited.stderr
    assert PlanFile.model_validate_json(out.read_text()).cost.avg_weight_bits <= 3 + 1e-9
    status = run_cli("status", job_id, *auth)
    assert status.returncode == 0 and "succeeded" in status.stdout
    csv = run_cli("fetch", job_id, "--format", "csv", *auth)
    assert csv.stdout.startswith("name,kind,params")
    denied = run_cli("status", job_id, "--url", stack.url, "--key", "bp_wrong")
    assert denied.returncode == 2 and "not valid" in denied.stderr


def test_a_hugging_face_checkpoint_plans_through_the_api(stack, teams, hf_files, tmp_path):
    """Upload a zipped checkpoint and calibration text, plan it on the workers; a checkpoint that ships code is
    refused and nothing of it is stored; text for a model without a tokenizer is refused at submit."""
    import json
    import zipfile

    a, _ = teams
    model = a.upload("models", hf_files["zip"])
    assert model.status_code == 201, model.text
    model = model.json()
    assert model["format"] == "hf" and model["inputs"][0]["name"] == "input_ids" and len(model["layers"]) == 15
    text = a.upload("datasets", hf_files["jsonl"])
    assert text.status_code == 201, text.text
    text = text.json()
    r = a.submit(model_id=a.model["id"], dataset_id=text["id"], budgets={"avg_weight_bits": 4})
    assert r.status_code == 422 and r.json()["error"]["code"] == "needs_tokenizer", r.text
    r = a.submit(model_id=model["id"], budgets={"avg_weight_bits": 4})  # synthetic data: no language to sample
    assert r.status_code == 422 and r.json()["error"]["field"] == "dataset_id" and ".txt" in r.json()["error"]["hint"]
    job = a.wait(a.submit(model_id=model["id"], dataset_id=text["id"], budgets={"avg_weight_bits": 4}, seq_len=32,
                          w_bits=[2, 4, 8], refine_seconds=0, sensitivity=FAST).json()["id"])
    assert job["state"] == "succeeded", job
    plan = a.http.get(f"/v1/jobs/{job['id']}/plan").json()
    assert plan["layers"][-1]["name"] == "lm_head" and plan["cost"]["avg_weight_bits"] <= 4 + 1e-9
    assert plan["measured"]["data"].startswith("calib.jsonl")
    # the plan as each runtime's file: the GGUF type file names llama.cpp's tensors at the planned types
    exports = {e["format"]: e for e in a.http.get(f"/v1/jobs/{job['id']}/exports").json()["formats"]}
    assert all(e["available"] for e in exports.values()), exports
    r = a.http.get(f"/v1/jobs/{job['id']}/plan", params={"format": "gguf"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert f'filename="{job["id"]}-plan.gguf-types.txt"' in r.headers["content-disposition"]
    ggml = {2: "q2_K", 4: "q4_K", 8: "q8_0", 16: "f16"}
    assert r.text.split() == [f"^{re.escape(exports['gguf']['layers'][layer['name']].split(' (')[1][:-1])}$="
                              f"{ggml[layer['w_bits']]}" for layer in plan["layers"]]
    r = a.http.get(f"/v1/jobs/{job['id']}/plan", params={"format": "compressed-tensors"})
    targets = {t: g["weights"]["num_bits"] for g in r.json()["config_groups"].values() for t in g["targets"]}
    assert targets == {layer["name"]: layer["w_bits"] for layer in plan["layers"] if layer["w_bits"] < 16}
    r = a.http.get(f"/v1/jobs/{job['id']}/plan", params={"format": "onnx"})
    assert r.status_code == 422 and "torchao" in r.text
    # bitplan apply as a job: the compressed-tensors checkpoint, zipped, and its size beside the plan's prediction
    r = a.http.post(f"/v1/jobs/{job['id']}/apply", json={})
    assert r.status_code == 202 and r.json()["kind"] == "apply", r.text
    assert set(r.json()["links"]) == {"self", "report", "checkpoint"}
    applied = a.wait(r.json()["id"])
    assert applied["state"] == "succeeded", applied
    result = a.http.get(f"/v1/jobs/{applied['id']}/report").json()
    report = result["report"]
    assert report["layers"] == sum(1 for layer in plan["layers"] if layer["w_bits"] < 16)
    assert 0 < report["real_bytes"] - report["container_bytes"] < 64 << 10  # every tensor's byte counted: the header
    r = a.http.get(f"/v1/jobs/{applied['id']}/checkpoint")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert len(r.content) == result["artifact"]["size_bytes"]
    archive = tmp_path / "applied.zip"
    archive.write_bytes(r.content)
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        assert {"config.json", "model.safetensors"} <= names, names
        config = json.loads(z.read("config.json"))
        stored = sum(z.getinfo(n).file_size for n in names if n.endswith(".safetensors"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and stored == report["real_bytes"]
    r = a.http.post(f"/v1/jobs/{applied['id']}/apply")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_plan", r.text

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(hf_files["zip"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("config.json") and "generation" not in info.filename:
                config = json.loads(data)
                config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
                data = json.dumps(config).encode()
            dst.writestr(info.filename, data)
    before = a.http.get("/v1/models").json()
    r = a.upload("models", evil)
    assert r.status_code == 422 and "trust_remote_code" in r.json()["error"]["message"], r.text
    assert a.http.get("/v1/models").json() == before


def test_a_profile_job_times_every_layer_and_its_table_budgets_a_plan(stack, teams):
    """POST /v1/profiles runs `bitplan profile` on a worker; its table, GET /latency, is a plan job's latency_table."""
    from bitplan.client import Client

    a, _ = teams
    r = a.http.post("/v1/profiles", json={"model_id": a.model["id"], "w_bits": [9]})
    assert r.status_code == 422 and "weight bits [9]" in r.text, r.text
    r = a.http.post("/v1/profiles", json={"model_id": a.model["id"], "formats": ["fp9"]})
    assert r.status_code == 422 and "fp9" in r.text and "fp8_e4m3" in r.text, r.text
    with Client(stack.url, a.key) as client:
        job = client.profile(a.model["id"], a.data["id"], w_bits=[4, 8], formats=["fp8_e4m3"], runs=3)
        assert job["kind"] == "profile" and set(job["links"]) == {"self", "latency"}
        job = client.wait(job["id"], timeout=300)
        assert job["state"] == "succeeded", job
        result = client.latency(job["id"])
    table = result["latency_table"]
    assert list(table) == [layer["name"] for layer in a.model["layers"]]
    assert all(set(row) == {"4", "8", "16", "fp8_e4m3"} and all(ms > 0 for ms in row.values()) for row in table.values())
    assert any("median of 3 calls" in n for n in result["notes"]) and result["device"] == "cpu"
    assert not any("timed in float:" in n for n in result["notes"])  # fp8_e4m3 ran torchao's kernel
    r = a.http.get(f"/v1/jobs/{job['id']}/plan")
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_job_kind"
    cheapest = sum(min(row["4"], row["8"]) for row in table.values())
    dearest = sum(max(row["4"], row["8"]) for row in table.values())
    budget = (cheapest + dearest) / 2
    r = a.submit(model_id=a.model["id"], dataset_id=a.data["id"], budgets={"latency_ms": budget},
                 w_bits=[4, 8], latency_table=table, refine_seconds=0,
                 sensitivity={"method": "fisher", "params": {"max_samples": 64}})
    assert r.status_code == 202, r.text
    planned = a.wait(r.json()["id"])
    assert planned["state"] == "succeeded", planned
    plan = a.http.get(f"/v1/jobs/{planned['id']}/plan").json()
    chosen = sum(table[la["name"]][str(la["w_bits"])] for la in plan["layers"])
    assert plan["cost"]["latency_ms"] == pytest.approx(chosen) and chosen <= budget * (1 + 1e-9)
    r = a.http.get(f"/v1/jobs/{planned['id']}/latency")
    assert r.status_code == 409 and "planning job" in r.text
