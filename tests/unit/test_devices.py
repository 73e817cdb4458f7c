"""Devices without a GPU (bitplan/core/device.py, issue 14 item 1): choosing the device and the compute dtype, moving
a graph and its data (checked on torch's ``meta`` device, where any tensor left on the CPU makes the forward fail),
probes drawn on the CPU whatever the device, micro-batches sized from free memory (the rule, with injected numbers),
the queue a job goes to, and a GPU out-of-memory error that fails the job, not the worker."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from bitplan.core import device as dev
from bitplan.errors import BitplanError, GpuOutOfMemoryError, gpu_out_of_memory
from bitplan.schemas import Budget, PlanRequest, check_device, needs_gpu
from bitplan.settings import load_settings

OOM_TEXT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.02 GiB "
            "is free. Including non-PyTorch memory, this process has 78.1 GiB memory in use.")


# --- choosing the device and dtype -------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:01", "cuda:1")])
def test_device_names_are_normalised(given, expected):
    assert check_device(given) == expected
    assert PlanRequest(model="m", budget=Budget(avg_weight_bits=4), device=given).device == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps", "", "cuda:1:2"])
def test_unknown_devices_are_refused_with_the_choices(bad):
    with pytest.raises(ValidationError, match="is not a device; choose auto, cpu, cuda or cuda:N"):
        PlanRequest(model="m", budget=Budget(avg_weight_bits=4), device=bad)


def test_defaults_are_auto_and_float32():
    request = PlanRequest(model="m", budget=Budget(avg_weight_bits=4))
    assert (request.device, request.dtype) == ("auto", "float32")
    with pytest.raises(ValidationError):
        PlanRequest(model="m", budget=Budget(avg_weight_bits=4), dtype="fp8")


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve("auto", "float32") == dev.Placement(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_a_missing_gpu_names_the_field_and_what_to_do(monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BitplanError) as info:
        dev.resolve_device(asked)
    assert info.value.field == "device" and info.value.code == "device_unavailable"
    assert f"device {asked} was asked for" in info.value.message and "use device auto or cpu" in info.value.hint


def test_a_gpu_index_past_the_last_names_how_many_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(BitplanError, match=r"this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        dev.resolve_device("cuda:2")


def test_float16_is_refused_on_the_cpu_and_bfloat16_allowed():
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert dev.resolve_dtype("float16", torch.device("cuda", 0)) is torch.float16
    with pytest.raises(BitplanError) as info:
        dev.resolve_dtype("float16", cpu)
    assert info.value.field == "dtype" and "bfloat16" in info.value.hint


def test_the_cli_refuses_a_missing_gpu_before_loading_naming_the_option(capsys):
    from bitplan.cli import main

    assert main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "device cuda:7 was asked for" in err and "[option --device]" in err


def test_accumulators_are_at_least_float32():
    assert dev.accumulator(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32
    assert dev.accumulator(torch.ones(3, dtype=torch.float64)).dtype == torch.float64


# --- moving a model and its data -----------------------------------------------------------------------------


def _exported_hf(tmp_path, kind: str):
    """A tiny Hugging Face model with SDPA attention, exported on the CPU as a user would: its causal mask is built
    with device=cpu written into the graph, and its dtype casts are checked by _assert_tensor_metadata nodes."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                                                     n_positions=32, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0))
    model.config._attn_implementation = "sdpa"

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model.eval()

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, 64, (2, 8))
    program = torch.export.export(Logits(), (), {"input_ids": ids}, dynamic_shapes={"input_ids": {0: torch.export.Dim("b")}},
                                  strict=False)
    path = tmp_path / f"{kind}.pt2"
    torch.export.save(program, str(path))
    return path, ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_an_exported_hf_graph_moves_whole_to_another_device(tmp_path, kind):
    from bitplan.core.data import Batch
    from bitplan.core.loading import load_model

    path, ids = _exported_hf(tmp_path, kind)
    model = load_model(str(path))
    devices = {n.kwargs.get("device") for n in model.gm.graph.nodes if n.op == "call_function" and "device" in n.kwargs}
    assert torch.device("cpu") in devices  # what a bare Module.to() would leave behind
    batch = Batch((), {"input_ids": ids}, None, 2)
    expected = model.call(batch)
    model.to("meta")  # any tensor or device left on the CPU fails the forward on meta
    out = model.call(batch)  # (the CPU batch is moved by call)
    assert out.device.type == "meta" and out.shape == expected.shape
    assert all(t.device.type == "meta" for t in [*model.gm.parameters(), *model.gm.buffers()])
    assert model.weight(model.layers[0]).device.type == "meta"


def test_bfloat16_compute_keeps_float32_weights_and_is_close(tmp_path):
    from bitplan.core.data import Batch
    from bitplan.core.loading import load_model

    path, ids = _exported_hf(tmp_path, "llama")
    model = load_model(str(path))
    batch = Batch((), {"input_ids": ids}, None, 2)
    expected = model.call(batch)
    model.to("cpu", torch.bfloat16)
    out = model.call(batch)
    assert out.dtype == torch.bfloat16 and model.weight(model.layers[0]).dtype == torch.float32
    assert not torch.equal(out.float(), expected)
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    with dev.float32_compute(model):
        assert torch.equal(model.call(batch), expected)
    assert model.compute_dtype == torch.bfloat16


def test_batches_and_datasets_move_and_stay_put_when_there():
    from bitplan.core.data import Dataset

    data = Dataset({"": torch.zeros(6, 3)}, torch.arange(6), "x", "0" * 64)
    moved = data.to("meta")
    assert moved.inputs[""].device.type == "meta" and moved.targets.device.type == "meta" and moved.source == "x"
    batch = data.slice(0, 4)
    assert batch.to("cpu") is batch
    on_meta = batch.to("meta")
    assert on_meta.args[0].device.type == "meta" and on_meta.targets.device.type == "meta" and on_meta.size == 4


def test_probes_are_drawn_on_the_cpu_whatever_the_device():
    """The seeded generator is a CPU one: a probe for weights on another device draws the same signs, so a GPU run
    probes with exactly the CPU run's vectors (the next draw shows the generator advanced alike)."""
    from bitplan.core.sensitivity.hessian_eigen import start_vector
    from bitplan.core.sensitivity.hessian_trace import rademacher

    cpu, meta = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    v_cpu, v_meta = rademacher(torch.zeros(50), cpu), rademacher(torch.zeros(50, device="meta"), meta)
    assert v_meta.device.type == "meta" and v_meta.shape == v_cpu.shape
    assert torch.equal(rademacher(torch.zeros(50), cpu), rademacher(torch.zeros(50), meta))
    assert start_vector(torch.zeros(7, device="meta"), 0, 1).device.type == "meta"
    assert torch.equal(start_vector(torch.zeros(7), 0, 1), start_vector(torch.zeros(7), 0, 1))


def test_cpu_and_auto_give_the_same_table_as_before(digits_files):
    """On a machine without a GPU, auto is the CPU, and the numbers are those of a run without any device setting."""
    from bitplan.core.pipeline import prepare
    from bitplan.core.sensitivity import SensitivityContext, run_sensitivity

    tables = []
    for kwargs in ({}, {"device": "cpu"}, {"device": "auto", "dtype": "float32"}):
        prep = prepare(str(digits_files["pt2"]), str(digits_files["calib"]), **kwargs)
        assert prep.model.device == torch.device("cpu") and prep.model.max_batch is None
        ctx = SensitivityContext(prep.model, prep.data, [2, 4, 8], prep.bank, 0)
        tables.append(run_sensitivity("hessian_trace", {"max_probes": 4, "max_samples": 32}, ctx).omega())
    assert tables[0] == tables[1] == tables[2]


# --- micro-batches from free memory --------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "free", "per_sample", "expected"), [
    (64, 8e9, 200e6, 32),       # 0.8 x 8 GB / 200 MB = 32
    (16, 8e9, 200e6, 16),       # what was asked for, when it fits
    (64, 8e9, 199e6, 32),       # 32.16: whole samples only
    (64, 1e9, 3e9, 1),          # never below one sample (the run itself then says it is out of memory)
    (64, 0, 1e6, 1),
    (64, 8e9, 0, 64),           # nothing measured: as asked
])
def test_batch_size_from_free_memory(requested, free, per_sample, expected):
    assert dev.fit_batch_size(requested, free, per_sample) == expected


def test_micro_batch_cap_measures_on_a_gpu_only():
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    assert dev.micro_batch_cap(on_cpu, None, measure=lambda *a: pytest.fail("measured on the CPU")) == (None, None)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    cap, note = dev.micro_batch_cap(on_gpu, None, measure=lambda model, data: 50 * 2**20,
                                    free=lambda device: (10 * 2**30, 80 * 2**30))
    assert cap == int(0.8 * 10 * 2**30 // (50 * 2**20)) == 163
    assert "micro-batches at most 163 samples on cuda:0: 10.0 of 80.0 GiB free, 50.0 MiB per sample" in note


def test_per_sample_memory_is_measured_on_a_hessian_product_in_math_form(tmp_path, monkeypatch):
    """The measurement's torch work runs here with torch.cuda's counters faked: a forward, a backward with
    create_graph and a second backward, all through attention in its math form, the fused form restored after."""
    from bitplan.core.data import Dataset
    from bitplan.core.loading import load_model
    from bitplan.core.sensitivity.hvp import has_sdpa

    path, ids = _exported_hf(tmp_path, "llama")
    model = load_model(str(path))
    calls = []
    peaks = iter([1000, 5000])  # bytes allocated before, peak after

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    real_grad = torch.autograd.grad

    def grad(outputs, inputs, grad_outputs=None, **kwargs):
        calls.append((kwargs.get("create_graph", False), grad_outputs is not None,
                      has_sdpa(model.gm)))
        return real_grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    data = Dataset({"input_ids": ids.repeat(3, 1)}, None, "ids", "0" * 64)
    assert dev.per_sample_bytes(model, data) == (5000 - 1000) / 2
    assert calls == [(True, False, False), (False, True, False)]  # double backward, SDPA in math form
    assert has_sdpa(model.gm)  # restored


def test_every_batch_respects_the_cap(digits_files, monkeypatch):
    """A method's micro-batches and the plan's evaluation batches are capped by model.max_batch."""
    from bitplan.core import pipeline
    from bitplan.core.sensitivity import SensitivityContext
    from bitplan.core.sensitivity.common import calibration_batches

    prep = pipeline.prepare(str(digits_files["pt2"]), str(digits_files["calib"]))
    prep.model.max_batch = 7
    ctx = SensitivityContext(prep.model, prep.data, [4], prep.bank)
    assert [b.size for b in calibration_batches(ctx, 64, 30)] == [7, 7, 7, 7, 2]
    prep.model.max_batch = None
    assert [b.size for b in calibration_batches(ctx, 64, 30)] == [30]

    real = pipeline.prepare

    def capped(*args, **kwargs):
        out = real(*args, **kwargs)
        out.model.max_batch = 5
        return out

    seen = []
    real_validate = pipeline.validate
    monkeypatch.setattr(pipeline, "prepare", capped)
    monkeypatch.setattr(pipeline, "validate", lambda prep, request, *a, **k: seen.append(request.batch_size)
                        or real_validate(prep, request, *a, **k))
    pipeline.make_plan(PlanRequest(model=str(digits_files["pt2"]), data=str(digits_files["calib"]),
                                   budget=Budget(avg_weight_bits=4), sensitivity="taylor",
                                   sensitivity_params={"max_samples": 16}, guarantee=False))
    assert seen == [5]


# --- queues: a job says what it needs, the API routes it ---------------------------------------------------


def _distributed(tmp_path, **kw):
    return load_settings(data_dir=str(tmp_path / "data"), broker_url="redis://127.0.0.1:1/0", **kw)


@pytest.mark.parametrize(("device", "gpu_workers", "queue"), [
    ("cpu", False, None), ("cpu", True, None), ("auto", False, None), ("auto", True, "gpu"),
    ("cuda", False, "gpu"), ("cuda:1", False, "gpu"),
])
def test_which_queue_a_job_goes_to(tmp_path, device, gpu_workers, queue):
    from workers.app import queue_for

    assert needs_gpu(device, gpu_workers) == (queue == "gpu")
    assert queue_for(device, _distributed(tmp_path, gpu_workers=gpu_workers)) == queue
    assert queue_for(device, load_settings(data_dir=str(tmp_path / "data"))) is None  # embedded: one worker takes all


def test_celery_routes_a_jobs_tasks_by_its_stored_device(tmp_path):
    """The route is read from the stored request (what check_methods normalised from the API body), for the job, its
    shards and their merge alike; an unknown job, or a database that cannot be read, keeps the default queue."""
    from service.jobspec import JobCreate, check_methods
    from storage.models import Job
    from tests.rows import database_with_jobs
    from workers.app import WorkerApp

    settings = _distributed(tmp_path)
    db, (gpu_job, cpu_job, old_job) = database_with_jobs(settings, {"state": "queued"}, {"state": "queued"},
                                                         {"state": "queued"})
    for job_id, device in ((gpu_job, "cuda"), (cpu_job, "cpu")):
        body = JobCreate.model_validate({"model_id": "m_x", "budgets": {"avg_weight_bits": 4}, "device": device})
        with db.session() as s:
            s.get(Job, job_id).request = check_methods(body)
    app = WorkerApp(settings, db=db)
    assert app.route("bitplan.run_job", (gpu_job,), {}, {}) == {"queue": "gpu"}
    assert app.route("bitplan.sensitivity_shard", (gpu_job, ["conv1"], 0, 2, "lease"), {}, {}) == {"queue": "gpu"}
    assert app.route("bitplan.merge_shards", ([{"table": {}}], gpu_job, "lease"), {}, {}) == {"queue": "gpu"}
    assert app.route("bitplan.run_job", (cpu_job,), {}, {}) is None
    assert app.route("bitplan.run_job", (old_job,), {}, {}) is None  # stored before devices: auto
    assert app.route("bitplan.run_job", ("j_unknown",), {}, {}) is None
    assert app.route("celery.chord_unlock", (gpu_job,), {}, {}) is None
    routed = app.amqp.router.route({}, "bitplan.run_job", (gpu_job,), {})  # what apply_async uses
    assert routed["queue"].name == "gpu"
    assert app.amqp.router.route({}, "bitplan.run_job", (cpu_job,), {})["queue"].name == "celery"
    broken = WorkerApp(_distributed(tmp_path, database_url="sqlite:////nonexistent/dir/x.db"))
    assert broken.route("bitplan.run_job", (gpu_job,), {}, {}) is None


def test_the_api_refuses_an_unknown_device_naming_the_field(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from storage import Database

    settings = load_settings(data_dir=str(tmp_path / "data"))
    db = Database(settings.database_url)
    db.migrate()
    key = db.create_key("vision")
    app = create_app(settings, worker=False, reconcile=False)
    with TestClient(app) as client:
        app.state.enqueue = lambda job_id: pytest.fail("queued")
        r = client.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                        json={"model_id": "m_x", "budgets": {"avg_weight_bits": 4}, "device": "tpu"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["fields"] == [{"loc": "device", "msg": "'tpu' is not a device; choose auto, cpu, cuda or cuda:N"}]


@pytest.mark.parametrize(("requested", "worker", "runs_on"), [
    ("cpu", "cuda:1", "cpu"), ("cuda:0", "cuda:1", "cuda:0"), ("cuda", "cuda:1", "cuda:1"), ("cuda", "cpu", "cuda"),
    ("auto", "cuda:1", "cuda:1"), ("auto", "cpu", "cpu"), ("auto", "auto", "auto"),
])
def test_the_device_a_job_runs_on_at_a_worker(requested, worker, runs_on):
    from workers.app import job_device

    assert job_device(requested, worker) == runs_on


@pytest.mark.parametrize(("device", "too", "queues"), [
    ("cpu", False, "celery"), ("cuda", False, "gpu"), ("cuda:1", False, "gpu"), ("cuda", True, "gpu,celery"),
])
def test_a_worker_consumes_the_queues_of_its_device(device, too, queues):
    from service.commands import worker_argv

    args = argparse.Namespace(loglevel="INFO", concurrency=1, hostname=None, device=device, cpu_jobs_too=too)
    assert f"--queues={queues}" in worker_argv(args)


def test_a_worker_without_a_gpu_refuses_to_take_gpu_jobs(tmp_path, capsys, monkeypatch):
    from bitplan.cli import main

    monkeypatch.setenv("BITPLAN_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path / "data"))
    assert main(["worker", "--device", "cuda"]) == 2
    assert "--device cuda: torch on this machine sees 0 CUDA device(s)" in capsys.readouterr().err
    assert main(["worker", "--device", "auto"]) == 2
    assert "not auto" in capsys.readouterr().err


def test_a_job_on_a_gpu_worker_asks_for_its_device_and_has_no_address_space_limit(tmp_path, monkeypatch):
    from workers import jobs

    settings = load_settings(data_dir=str(tmp_path / "data"), worker_memory_mb=4096)
    limits = []

    class Sandbox:
        def run(self, task, args, lim, **kw):
            limits.append(lim.memory_mb)
            return {}

    monkeypatch.setattr("workers.sandbox.shared_sandbox", lambda: Sandbox())
    attempt = SimpleNamespace(why_stop=lambda: None, job_id="j_x")
    for device in ("cpu", "cuda:0", "auto"):
        jobs.run_untrusted(settings, "plan", {"request": {"device": device}}, attempt, None)
    assert limits == [4096, 0, 0]


# --- running out of GPU memory ---------------------------------------------------------------------------------


def test_gpu_out_of_memory_is_a_user_error_that_says_where_and_what_to_do():
    for exc in (torch.cuda.OutOfMemoryError(OOM_TEXT), RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                                                    "cublasCreate(handle)")):
        error = gpu_out_of_memory(exc)
        assert isinstance(error, GpuOutOfMemoryError) and error.code == "gpu_out_of_memory"
        assert "bfloat16" in error.hint and "batch_size" in error.hint and error.field == "batch_size"
    assert "GPU 0 has a total capacity of 79.15 GiB of which 1.02 GiB is free" in gpu_out_of_memory(
        torch.cuda.OutOfMemoryError(OOM_TEXT)).message
    for other in (RuntimeError("shape mismatch"), MemoryError(), ValueError("CUDA out of memory"),
                  torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")):
        assert gpu_out_of_memory(other) is None


def test_the_sandbox_reports_a_gpu_oom_as_the_jobs_error():
    from workers.sandbox import child_error
    from workers.untrusted import describe_error

    described = describe_error(torch.cuda.OutOfMemoryError(OOM_TEXT))
    assert described["kind"] == "user" and described["code"] == "gpu_out_of_memory"
    raised = child_error(described)  # what the worker's process raises from the child's answer
    assert isinstance(raised, GpuOutOfMemoryError) and "ran out of GPU memory" in raised.message
    assert describe_error(MemoryError())["code"] == "out_of_memory"  # host memory keeps its own message


def test_a_job_that_runs_out_of_gpu_memory_fails_and_the_worker_takes_the_next(tmp_path, monkeypatch):
    from storage.models import Job
    from tests.rows import database_with_jobs
    from workers import jobs
    from workers.app import Runtime
    from workers.sandbox import child_error
    from workers.untrusted import describe_error

    settings = load_settings(data_dir=str(tmp_path / "data"))
    db, (first, second) = database_with_jobs(settings, {"state": "queued"}, {"state": "queued"})
    rt = Runtime(settings, db=db)

    def work(rt, job, attempt, dispatch, table):
        if job.id == first:  # the sandboxed child raised torch's error; its parent raises the user error
            raise child_error(describe_error(torch.cuda.OutOfMemoryError(OOM_TEXT)))
        jobs.finish(db, job.id, jobs.JobState.SUCCEEDED, lease=attempt.lease, plan={})
        return "succeeded"

    monkeypatch.setattr(jobs, "_work", work)
    assert jobs.run_job(rt, first) == "failed"
    assert jobs.run_job(rt, second) == "succeeded"
    with db.session() as s:
        row = s.get(Job, first)
        assert (row.state, row.error_code) == ("failed", "gpu_out_of_memory")
        assert row.error_message.startswith("ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB")
        assert "bfloat16" in row.error_hint


def test_the_cli_says_it_ran_out_of_gpu_memory(monkeypatch, capsys):
    from bitplan.cli import main
    from bitplan.core import pipeline

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(pipeline, "make_plan", boom)
    assert main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitplan: error: ran out of GPU memory") and "[option --param batch_size" in err


def test_moving_a_graph_reaches_the_bodies_of_nested_graphs():
    """A ``no_grad`` block in forward (a rotary embedding's) exports as wrap_with_set_grad_enabled with its own
    graph, holding the trace's device; the move must reach it (seen on an H200 with torch 2.11: "Tensor device
    mismatch! Expected: cpu, Got: cuda:0"). The meta device stands in for a GPU here."""
    from bitplan.core.graph import move_graph

    class Rotary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                pos = torch.arange(x.shape[1], device="cpu", dtype=torch.float32)
            return self.lin(x) + pos

    x = torch.randn(2, 4)
    gm = torch.export.export(Rotary(), (x,), strict=False).module()
    assert sum(isinstance(m, torch.fx.GraphModule) for m in gm.modules()) > 1  # the nested body exists
    move_graph(gm, torch.device("meta"))
    assert gm(x.to("meta")).device.type == "meta"


def test_a_double_backward_that_fails_under_bfloat16_is_redone_in_float32(monkeypatch):
    """On CUDA, exact products under bfloat16 autocast failed with "expected input and grad types to match" (an H200
    run, stop 22). Here the failure is simulated (the CPU's kernels do not fail): the oracle redoes the products in
    float32, says so, and the table is the float32 run's."""
    from bitplan.core.pipeline import prepare
    from bitplan.core.sensitivity import SensitivityContext, hessian_trace, hvp, run_sensitivity

    real = hvp.loss_of

    def failing_under_bf16(ctx, *args, **kwargs):
        if ctx.model.compute_dtype == torch.bfloat16:
            raise RuntimeError("expected input and grad types to match, but got input of type c10::BFloat16 and "
                               "grad of type float\nmore lines")
        return real(ctx, *args, **kwargs)

    params = {"hvp": "exact", "max_probes": 2, "min_probes": 2, "max_samples": 32, "activations": True}
    tables = {}
    for dtype in ("float32", "bfloat16"):
        prep = prepare("catalog:digits_cnn", None, dtype=dtype)
        ctx = SensitivityContext(prep.model, prep.data, [2, 4, 8], prep.bank, 0)
        with monkeypatch.context() as patch:
            patch.setattr(hvp, "loss_of", failing_under_bf16)
            patch.setattr(hessian_trace, "loss_of", failing_under_bf16)  # the activation traces' products
            tables[dtype] = run_sensitivity("hessian_trace", params, ctx)
    notes = " ".join(tables["bfloat16"].notes)
    assert "double backward under bfloat16 compute failed (expected input and grad types to match" in notes
    assert "the exact products are computed in float32" in notes and "more lines" not in notes
    assert "activation traces: double backward under bfloat16 compute failed" in notes
    assert not any("float32" in n for n in tables["float32"].notes)
    low, full = tables["bfloat16"].omega(), tables["float32"].omega()
    assert low.keys() == full.keys() and all(low[k] == pytest.approx(full[k], rel=1e-6) for k in full)
    low_a = {la.name: la.omega_act for la in tables["bfloat16"].layers}
    full_a = {la.name: la.omega_act for la in tables["float32"].layers}
    # the traces are float32's; the activation ranges they are multiplied by were calibrated under bfloat16
    assert all(full_a.values()) and all(low_a[k] == pytest.approx(full_a[k], rel=0.05, abs=1e-12) for k in full_a)
