"""Every /v1 operation fuzzed from the app's own OpenAPI description (schemathesis, in-process over ASGI, SQLite,
no worker, a valid key): no request gets a 5xx, and every 4xx is our JSON error with a message.

Requests both fit the description and break it (schemathesis' positive and negative modes). Job requests
name a real model, and job paths a real job, in about half the examples, so the fuzz gets past the 404
into the checks behind it. Uploads are random bytes: each starts a reader process, so the two upload
operations get fewer examples. Derandomized, so a run repeats the last one.

The operations are listed from the router itself, so a new one is fuzzed without editing this file.
(Hypothesis drives schemathesis' strategies directly: its pytest plugin does not run on pytest 9.)
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from bitplan.settings import load_settings
from service.api import router
from service.app import create_app
from storage import Database
from tests.devstack import fresh_database

UPLOADS = {("POST", "/v1/models"), ("POST", "/v1/datasets")}
EXAMPLES, UPLOAD_EXAMPLES = 40, 6
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _v1_operations() -> list[tuple[str, str]]:
    bare = FastAPI()
    bare.include_router(router)
    return sorted((method.upper(), path) for path, ops in bare.openapi()["paths"].items() for method in ops)


OPERATIONS = _v1_operations()


@pytest.fixture(scope="module")
def stocked(tmp_path_factory, digits_files):
    """The app, its schema, a key, and a real model and job to aim some requests at."""
    with fresh_database() as url:  # PostgreSQL, as in production
        yield from _stocked(tmp_path_factory, digits_files, url)


def _stocked(tmp_path_factory, digits_files, url: str):
    from fastapi.testclient import TestClient

    settings_ = load_settings(data_dir=str(tmp_path_factory.mktemp("fuzz")), max_upload_mb=1, database_url=url)
    db = Database(settings_.database_url)
    db.migrate()
    headers = {"Authorization": f"Bearer {db.create_key('fuzz')}"}
    app = create_app(settings_, worker=False)
    with TestClient(app) as client:
        model = client.post("/v1/models", files={"file": ("digits.pt2", digits_files["pt2"].read_bytes())}, headers=headers)
        assert model.status_code == 201, model.text
        job = client.post("/v1/jobs", json={"model_id": model.json()["id"], "budgets": {"avg_weight_bits": 4}},
                          headers=headers)
        assert job.status_code == 202, job.text
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        yield {"schema": schema, "client": client, "settings": settings_, "headers": headers, "model_id": model.json()["id"],
               "job_id": job.json()["id"]}
    db.engine.dispose()


def _aim(case, stocked: dict) -> None:
    """Point about half the examples at real rows (chosen from the example itself, so runs repeat)."""
    if "job_id" in (case.path_parameters or {}) and len(str(case.path_parameters["job_id"])) % 2 == 0:
        case.path_parameters["job_id"] = stocked["job_id"]
    if case.method.upper() == "POST" and case.path == "/v1/jobs" and isinstance(case.body, dict):
        if len(case.body) % 2 == 1 or "model_id" not in case.body:
            case.body["model_id"] = stocked["model_id"]


def _check(case, stocked: dict) -> None:
    _aim(case, stocked)
    response = case.call(headers=stocked["headers"])
    case.validate_response(response, checks=[not_a_server_error])
    _our_error(response)


def _our_error(response) -> None:
    """Any 4xx is ``{"error": {"code", "message", "hint"}}`` with a message."""
    if 400 <= response.status_code < 500:
        error = response.json().get("error")
        assert isinstance(error, dict) and {"code", "message", "hint"} <= set(error), response.text
        assert isinstance(error["message"], str) and error["message"].strip(), response.text


def test_every_v1_operation_is_fuzzed():
    assert len(OPERATIONS) >= 13 and UPLOADS <= set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(method, path, stocked):
    operation = stocked["schema"][path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(FUZZ, max_examples=UPLOAD_EXAMPLES if (method, path) in UPLOADS else EXAMPLES)
    @given(case=cases)
    def fuzz(case):
        _check(case, stocked)

    fuzz()


HEADS = [b"PK\x03\x04", b"\x80\x04\x95", b"\x93NUMPY", b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"PK\x05\x06"]


def _broken(real: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, random bytes behind a real format's magic, and a real file overwritten or cut somewhere."""
    spliced = st.tuples(st.integers(0, len(real) - 1), st.binary(min_size=1, max_size=64), st.booleans()).map(
        lambda t: real[: t[0]] + t[1] + (b"" if t[2] else real[t[0] + len(t[1]):]))
    return st.one_of(st.binary(max_size=2048), st.tuples(st.sampled_from(HEADS), st.binary(max_size=2048)).map(b"".join),
                     spliced)


@pytest.mark.parametrize("what", ["models", "datasets"])
def test_uploads_of_broken_bytes_never_fail_the_server(what, stocked, digits_files):
    """Accepted or refused with our error, never a 5xx, and no temporary file left behind either way."""
    real = digits_files["pt2" if what == "models" else "calib"].read_bytes()
    tmp = stocked["settings"].data_dir / "tmp"

    @settings(FUZZ, max_examples=UPLOAD_EXAMPLES)
    @given(data=_broken(real), name=st.sampled_from(["x.pt2", "x.pt", "x.ts", "x.npz", "x.safetensors", "x"]))
    def fuzz(data, name):
        response = stocked["client"].post(f"/v1/{what}", files={"file": (name, data)}, headers=stocked["headers"])
        assert response.status_code < 500, response.text
        _our_error(response)
        assert list(tmp.iterdir()) == []

    fuzz()
