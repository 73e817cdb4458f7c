"""Four holes in the REST API, closed (unit tier: an in-process app on SQLite, no services):

* a NUL in an upload's file name was a plain-text 500 (PostgreSQL refuses NUL in text: see
  tests/integration/test_rate_limit_redis.py; SQLite stored it); now control characters are dropped from
  names, and any unexpected exception is a JSON 500;
* a JSON body of any size was parsed (1M pins: 16 s) and answered with every name echoed (12 MB): now bodies
  over ``max_json_bytes`` are refused with 413 before parsing, and error messages name a bounded few;
* the rate limiter's Redis fallback (the shared limiter itself: tests/integration/test_rate_limit_redis.py).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import JsonBodyCap, create_app
from service.errors import BUG_HINT
from service.operations import clean_name
from service.ratelimit import RateLimiter, RedisRateLimiter, make_rate_limiter
from storage.models import ModelFile
from tests.devstack import free_port

MAX_JSON_KB = 1024
LAYERS = [f"block{i}.conv" for i in range(30)]


def multipart(field: str, filename: bytes, data: bytes, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the file name's bytes as given (httpx would percent-escape a NUL)."""
    boundary = b"bitplan-test-boundary"
    parts = [b'Content-Disposition: form-data; name="%s"\r\n\r\n%s' % (k.encode(), v.encode()) for k, v in fields.items()]
    parts.append(b'Content-Disposition: form-data; name="%s"; filename="%s"\r\nContent-Type: application/octet-stream'
                 b"\r\n\r\n%s" % (field.encode(), filename, data))
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def npz(seed: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, inputs=np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32))
    return buf.getvalue()


def big_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, inputs=np.zeros((300_000, 1), np.float32))
    return buf.getvalue()


def assert_json_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    error = r.json()["error"]
    assert set(error) >= {"code", "message", "hint"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


class Api:
    def __init__(self, client: TestClient, key: str, model_id: str) -> None:
        self.client, self.key, self.model_id = client, key, model_id
        self.headers = {"Authorization": f"Bearer {key}"}

    def job(self, **body):
        return self.client.post("/v1/jobs", json={"model_id": self.model_id, "budgets": {"avg_weight_bits": 4}, **body},
                                headers=self.headers)

    def raw(self, body: bytes, **headers: str):
        return self.client.post("/v1/jobs", content=body, headers={**self.headers, "Content-Type": "application/json",
                                                                   **headers})


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = load_settings(data_dir=str(tmp_path_factory.mktemp("hardening")), broker_url="memory://",
                             max_json_kb=MAX_JSON_KB, rate_limit=0)
    app = create_app(settings, worker=False, reconcile=False)

    @app.get("/test-only/boom")
    def boom():
        raise RuntimeError("secret-internal-detail")

    with TestClient(app, raise_server_exceptions=False) as client:  # the lifespan migrates the database
        key = app.state.db.create_key("hardening")
        team = app.state.db.team_for_key(key)
        layers = [{"name": n, "kind": "conv2d", "params": 1000, "out_channels": 10, "macs": 10_000} for n in LAYERS]
        with app.state.db.session() as s:  # a model row as an upload would leave it, without running the reader
            model = ModelFile(team_id=team.id, sha256="0" * 64, name="layers.pt2", format="pt2",
                              size_bytes=1, description={"inputs": [], "layers": layers, "other_bytes": 0})
            s.add(model)
            s.flush()
            model_id = model.id
        yield Api(client, key, model_id)


# --- NUL and other control characters in file names -----------------------------------------------------


def test_clean_name_drops_control_characters():
    cases = {"a\x00b.npz": "ab.npz", "\x00": "data.npz", "x\x01\x1f\x7f\x85y.npz": "xy.npz", "dir\\..\\c\x00.npz": "c.npz",
             "e\u202efdp.npz": "efdp.npz", "\ud800s.npz": "s.npz", " \t ": "data.npz", None: "data.npz",
             "ünï 数据.npz": "ünï 数据.npz", "n" * 300: "n" * 200}  # the last two: names are otherwise kept
    assert {given: clean_name(given, "data.npz") for given in cases} == cases


@pytest.mark.parametrize("what", ["datasets", "models"])
def test_nul_in_an_upload_file_name_is_not_a_500(api, what):
    """(The dataset, 1.2 MB, is also over the JSON cap: multipart uploads have their own limit.)"""
    body, headers = multipart("file", b"cal\x00ib.npz", big_npz() if what == "datasets" else b"not a model")
    assert what == "models" or len(body) > MAX_JSON_KB * 1024
    r = api.client.post(f"/v1/{what}", content=body, headers={**api.headers, **headers})
    if what == "datasets":
        assert r.status_code in (200, 201), r.text[:500]
        assert r.json()["name"] == "calib.npz"
    else:
        assert "calib.npz" in assert_json_error(r, 422)["message"]


def test_nul_in_a_web_form_file_name_is_not_a_500(api):
    web = TestClient(api.client.app, raise_server_exceptions=False)
    web.post("/login", data={"key": api.key, "next": "/"})
    form = web.get("/")
    assert form.status_code == 200
    token = re.search(r'name="csrf_token" value="([^"]*)"', form.text)
    fields = {"csrf_token": token.group(1)} if token else {}
    body, headers = multipart("data_file", b"web\x00form.npz", npz(2), budget_value="4", **fields)
    r = web.post("/", content=body, headers=headers, follow_redirects=False)
    assert r.status_code in (303, 422), r.text[:500]  # 422: no model chosen, shown on the form
    listed = api.client.get("/v1/datasets", headers=api.headers).json()["items"]
    assert "webform.npz" in [d["name"] for d in listed]


def test_an_unexpected_exception_is_a_json_500_without_its_text(api, caplog):
    with caplog.at_level(logging.ERROR, logger="bitplan.service"):
        r = api.client.get("/test-only/boom")
    error = assert_json_error(r, 500, "internal")
    assert error["hint"] == BUG_HINT
    assert "secret-internal-detail" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and "secret-internal-detail" in str(rec.exc_info[1])]
    assert logged, "the traceback is logged"
    assert re.search(r"error ([0-9a-f]{8})", error["message"]).group(1) in logged[0].getMessage()


# --- JSON body cap --------------------------------------------------------------------------------------


@functools.cache
def million_pins() -> bytes:
    pins = {f"layer{i:07d}": 8 for i in range(1_000_000)}
    return json.dumps({"model_id": "m_x", "budgets": {"avg_weight_bits": 4}, "pins": pins}).encode()


def test_a_json_body_over_the_cap_is_refused_before_it_is_read(api):
    body = million_pins()
    assert len(body) > 18 * MAX_JSON_KB * 1024  # 19 MB
    api.raw(b"{}")  # warm up
    start = time.perf_counter()
    r = api.raw(body)
    elapsed = time.perf_counter() - start
    error = assert_json_error(r, 413, "too_large")
    assert f"{MAX_JSON_KB} KB" in error["message"] and "BITPLAN_MAX_JSON_KB" in error["hint"]
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    assert len(r.content) < 1000


def test_a_multipart_body_to_a_json_route_is_capped_as_json(api):
    """Only the upload routes take multipart bodies up to the upload limit; elsewhere it is just a big body."""
    body, headers = multipart("file", b"x.npz", b"\0" * (2 * MAX_JSON_KB * 1024))
    r = api.client.post("/v1/jobs", content=body, headers={**api.headers, **headers})
    assert_json_error(r, 413, "too_large")


def chunked(api: Api, body: bytes, size: int):
    r = api.client.post("/v1/jobs", content=(body[i:i + size] for i in range(0, len(body), size)),
                        headers={**api.headers, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    return r


def test_a_chunked_json_body_over_the_cap_is_refused_and_one_under_it_handed_on(api):
    assert_json_error(chunked(api, million_pins(), 65536), 413, "too_large")
    small = json.dumps({"model_id": "m_nowhere", "budgets": {"avg_weight_bits": 4}}).encode()
    assert "m_nowhere" in assert_json_error(chunked(api, small, 10), 404, "not_found")["message"]


def test_the_cap_stops_reading_a_chunked_body_once_past_the_limit():
    """At the ASGI level (the test client joins a streamed body into one message): the chunks after the limit are
    never read, and the app behind is never called."""
    limit, chunk, chunks = 100_000, 10_000, 1_000
    read, sent, called = [0], [], []

    async def receive():
        read[0] += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": read[0] < chunks}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        called.append(scope)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": [(b"content-type", b"application/json"),
                                                                                (b"transfer-encoding", b"chunked")]}
    asyncio.run(JsonBodyCap(app, limit)(scope, receive, send))
    assert sent[0]["status"] == 413 and not called
    assert read[0] == limit // chunk + 1


# --- bounded error messages -----------------------------------------------------------------------------


def test_50000_unknown_pins_are_named_a_few_at_a_time(api):
    pins = {f"p{i}": 8 for i in range(50_000)}
    r = api.job(pins=pins)
    assert len(r.request.content) < MAX_JSON_KB * 1024
    error = assert_json_error(r, 422, "invalid_request")
    assert error["message"].startswith("pins name unknown layer(s) ['p0', 'p1', ")
    assert error["message"].endswith(" and 49990 more")
    assert len(r.content) < 2000


def test_a_long_unknown_pin_name_is_cut(api):
    r = api.job(pins={"x" * 500_000: 8})
    error = assert_json_error(r, 422, "invalid_request")
    assert len(r.content) < 1000 and "…" in error["message"]


def test_pinned_bit_widths_are_named_a_few_at_a_time(api):
    error = assert_json_error(api.job(pins={n: 9 for n in LAYERS}), 422, "invalid_request")
    assert error["message"].startswith("pinned bit widths {'block0.conv': 9, ") and " and 20 more not supported" in error[
        "message"]


@pytest.mark.parametrize("where", ["sensitivity", "solver"])
def test_50000_unknown_params_are_named_a_few_at_a_time(api, where):
    method = {"sensitivity": "hessian_trace", "solver": "ilp"}[where]
    r = api.job(**{where: {"method": method, "params": {f"knob{i}": 1 for i in range(50_000)}}})
    error = assert_json_error(r, 422, "bad_params")
    assert "has no parameter(s) knob0, knob1, " in error["message"] and error["message"].endswith(" and 49990 more")
    assert len(r.content) < 2000


def test_50000_unknown_budget_keys_are_named_a_few_at_a_time(api):
    r = api.client.post("/v1/jobs", json={"model_id": api.model_id, "budgets": {f"k{i}": 1 for i in range(50_000)}},
                        headers=api.headers)
    error = assert_json_error(r, 422, "invalid_request")
    assert " and 49990 more" in error["message"] and len(r.content) < 2000


def test_50000_invalid_fields_are_answered_with_the_first_20(api):
    r = api.job(pins={f"p{i}": "eight" for i in range(50_000)})
    error = assert_json_error(r, 422, "invalid_request")
    assert len(error["fields"]) == 20 and error["fields"][0]["loc"] == "pins.p0"
    assert error["message"].endswith("; and 49980 more failing fields")
    assert len(r.content) < 5000


def test_a_huge_key_in_a_validation_error_is_cut(api):
    r = api.job(pins={"k" * 500_000: "eight"})
    error = assert_json_error(r, 422, "invalid_request")
    assert len(error["fields"][0]["loc"]) <= 150 and len(r.content) < 2000


# --- rate limiter without Redis -------------------------------------------------------------------------


def test_make_rate_limiter_keeps_buckets_in_process_without_redis(tmp_path):
    assert type(make_rate_limiter(load_settings(data_dir=str(tmp_path), broker_url="memory://"))) is RateLimiter


def test_rate_limiter_falls_back_to_this_process_when_redis_is_down(caplog):
    """An unreachable Redis (nothing listens on the port): requests are still counted, here, and the warning is
    logged once, not once per request."""
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/15", rate=1, burst=5, retry_s=0)
    with caplog.at_level(logging.WARNING, logger="bitplan.service"):
        start = time.perf_counter()
        waits = [limiter.take("fallback-key") for _ in range(10)]
        elapsed = time.perf_counter() - start
    assert sum(w == 0 for w in waits) == 5 and all(0 < w <= 1.01 for w in waits[5:])
    assert len([r for r in caplog.records if "Redis unreachable" in r.getMessage()]) == 1
    assert elapsed < 2, f"{elapsed:.2f} s"
