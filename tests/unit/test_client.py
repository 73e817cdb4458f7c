"""bitplan.client and the client CLI verbs against an in-memory fake of the REST API (httpx.MockTransport):
request shapes, error mapping, wait() and the verbs end to end, without a server or torch."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from bitplan import cli
from bitplan.client import HINT_UNAUTHORIZED, HINT_UNREACHABLE, Client, ClientError

KEY = "bp_test"
URL = "http://bitplan.test"

PLAN = {
    "schema": "bitplan.plan/v1",
    "model": {"sha256": "ab" * 32, "format": "pt2", "name": "digits_cnn.pt2"},
    "budget": {"avg_weight_bits": 4.0},
    "w_bits_options": [2, 4, 8],
    "a_bits_options": [16],
    "pins": {},
    "seed": 0,
    "sensitivity": {"method": "hessian_trace", "params": {}, "seconds": 0.5, "notes": []},
    "solver": {"method": "ilp", "status": "optimal", "seconds": 0.1, "objective": 0.01},
    "layers": [
        {"name": "conv1", "kind": "conv2d", "params": 144, "macs": 9216, "w_bits": 8, "a_bits": 16, "sensitivity": 0.001},
        {"name": "fc", "kind": "linear", "params": 640, "macs": 640, "w_bits": 2, "a_bits": 16, "sensitivity": 0.009},
    ],
    "cost": {"size_bytes": 1500.0, "avg_weight_bits": 3.1, "bops": 1.0e6},
    "measured": None,
    "frontier": None,
    "timings": {"load": 0.1, "sensitivity": 0.5},
}
CSV = "name,kind,params,w_bits,a_bits\nconv1,conv2d,144,8,16\nfc,linear,640,2,16\n"
GGUF_TYPES = "^blk\\.0\\.attn_q\\.weight$=q4_K\n"


def _error(status: int, code: str, message: str, hint: str | None = None, **extra) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "hint": hint, **extra}})


class FakeServer:
    """Just enough of docs/api.md: records every request; a job walks through ``script`` one poll at a time."""

    def __init__(self, script: list[dict] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.script = script or [{"state": "succeeded", "stage": "done", "progress": 1.0}]
        self.polls = 0

    def job(self, **over) -> dict:
        step = self.script[min(self.polls, len(self.script) - 1)]
        return {"id": "j_1", "state": "queued", "stage": "queued", "progress": 0.0, "detail": "", "error": None,
                "model_id": "m_1", "dataset_id": "synthetic", **step, **over}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path != "/v1/methods" and request.headers.get("authorization") != f"Bearer {KEY}":
            return _error(401, "unauthorized", "missing or unknown API key", "send Authorization: Bearer")
        route = (request.method, request.url.path)
        if route == ("POST", "/v1/models"):
            return httpx.Response(201, json={"id": "m_1", "name": "model.pt2"})
        if route == ("POST", "/v1/datasets"):
            return httpx.Response(201, json={"id": "d_1", "name": "calib.npz"})
        if route == ("POST", "/v1/jobs"):
            body = json.loads(request.content)
            if body["budgets"].get("avg_weight_bits", 1) > 32:
                return _error(422, "invalid_request", "invalid job request",
                              fields=[{"loc": "budgets.avg_weight_bits", "msg": "must be <= 32"}])
            return httpx.Response(202, json=self.job(), headers={"Location": "/v1/jobs/j_1"})
        if route == ("GET", "/v1/jobs"):
            return httpx.Response(200, json={"items": [self.job()], "total": 1, "limit": 20, "offset": 0, "next": None})
        if route == ("GET", "/v1/jobs/j_1"):
            job = self.job()
            self.polls += 1
            return httpx.Response(200, json=job)
        if route == ("GET", "/v1/jobs/j_1/plan"):
            if request.url.params.get("format") == "csv":
                return httpx.Response(200, text=CSV, headers={"content-type": "text/csv"})
            if request.url.params.get("format") == "gguf":
                return httpx.Response(200, text=GGUF_TYPES, headers={"content-type": "text/plain"})
            return httpx.Response(200, json=PLAN)
        if route == ("GET", "/v1/jobs/j_1/exports"):
            return httpx.Response(200, json={"job": "j_1", "formats": [{"format": "gguf", "available": True}]})
        if route == ("DELETE", "/v1/jobs/j_1"):
            return httpx.Response(200, json=self.job(state="cancelled"))
        if route == ("GET", "/v1/methods"):
            return httpx.Response(200, json={"sensitivity": [{"name": "hessian_trace"}], "solvers": [{"name": "ilp"}]})
        return _error(404, "not_found", f"no job '{request.url.path.rsplit('/', 1)[-1]}' for this team",
                      "list your jobs with GET /v1/jobs")


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def _client(server: FakeServer, key: str | None = KEY) -> Client:
    return Client(URL, key if key is not None else "", transport=httpx.MockTransport(server))


def _multipart(request: httpx.Request) -> bytes:
    request.read()
    return request.content


# -- request shapes ---------------------------------------------------------------------------------


def test_defaults_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BITPLAN_URL", "http://envhost:9000/")
    monkeypatch.setenv("BITPLAN_API_KEY", "bp_env")
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    client = Client()
    assert client.url == "http://envhost:9000" and client.key == "bp_env"
    assert Client(url="http://other", key="bp_x").key == "bp_x"


def test_methods_needs_no_key_and_sends_none(server):
    assert _client(server, key=None).methods()["solvers"] == [{"name": "ilp"}]
    assert "authorization" not in server.requests[-1].headers


def test_upload_model_streams_the_file_as_field_file(server, tmp_path):
    model = tmp_path / "digits.ts"
    model.write_bytes(b"PK\x03\x04 not really a model")
    assert _client(server).upload_model(model, dataset_id="d_9") == {"id": "m_1", "name": "model.pt2"}
    request = server.requests[-1]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"].startswith("multipart/form-data")
    body = _multipart(request)
    assert b'name="file"; filename="digits.ts"' in body and b"not really a model" in body
    assert b'name="dataset_id"' in body and b"d_9" in body


def test_upload_dataset_without_dataset_field(server, tmp_path):
    data = tmp_path / "calib.npz"
    data.write_bytes(b"npz bytes")
    assert _client(server).upload_dataset(data)["id"] == "d_1"
    body = _multipart(server.requests[-1])
    assert b'name="file"; filename="calib.npz"' in body and b'name="dataset_id"' not in body


def test_upload_of_a_missing_file_is_a_user_error(server, tmp_path):
    with pytest.raises(ClientError, match="not found"):
        _client(server).upload_model(tmp_path / "nope.pt2")
    assert server.requests == []


def test_submit_body_and_idempotency_key(server):
    job = _client(server).submit("m_1", {"avg_weight_bits": 4}, w_bits=[2, 4, 8], solver={"method": "ilp", "params": {}},
                                 seed=None, idempotency_key="retry-1")
    assert job["id"] == "j_1"
    request = server.requests[-1]
    assert request.headers["idempotency-key"] == "retry-1"
    assert json.loads(request.content) == {"model_id": "m_1", "dataset_id": "synthetic", "budgets": {"avg_weight_bits": 4},
                                           "w_bits": [2, 4, 8], "solver": {"method": "ilp", "params": {}}}
    _client(server).submit("m_1", {"size_bytes": 2e6}, dataset_id="d_1")
    assert "idempotency-key" not in server.requests[-1].headers


def test_jobs_sends_only_given_filters(server):
    page = _client(server).jobs(state="running", limit=5)
    assert page["total"] == 1
    assert dict(server.requests[-1].url.params) == {"state": "running", "limit": "5", "offset": "0"}


def test_plan_json_csv_frontier_and_cancel(server):
    client = _client(server)
    assert client.plan("j_1") == PLAN
    assert client.plan("j_1", format="csv") == CSV
    assert server.requests[-1].url.params["format"] == "csv"
    assert client.cancel("j_1")["state"] == "cancelled"
    assert server.requests[-1].method == "DELETE"
    with pytest.raises(ClientError, match="unknown plan format"):
        client.plan("j_1", format="xml")
    assert client.plan("j_1", format="gguf") == GGUF_TYPES  # a runtime's file, as text
    assert server.requests[-1].url.params["format"] == "gguf"
    assert client.exports("j_1")["formats"][0]["format"] == "gguf"


# -- error mapping ----------------------------------------------------------------------------------


def test_401_hints_at_the_key(server):
    with pytest.raises(ClientError) as info:
        _client(server, key="bp_wrong").job("j_1")
    err = info.value
    assert err.status == err.status_code == 401 and err.code == "unauthorized"
    assert err.message == "missing or unknown API key"
    assert err.hint == HINT_UNAUTHORIZED and "--key" in err.hint and "BITPLAN_API_KEY" in err.hint
    assert "bitplan keys create" in err.hint


def test_404_carries_message_and_hint(server):
    with pytest.raises(ClientError) as info:
        _client(server).job("j_nope")
    assert info.value.status == 404 and info.value.code == "not_found"
    assert str(info.value) == "no job 'j_nope' for this team (list your jobs with GET /v1/jobs)"


def test_422_names_the_fields(server):
    with pytest.raises(ClientError) as info:
        _client(server).submit("m_1", {"avg_weight_bits": 99})
    assert info.value.status == 422
    assert info.value.fields == [{"loc": "budgets.avg_weight_bits", "msg": "must be <= 32"}]
    assert "budgets.avg_weight_bits: must be <= 32" in info.value.message


def test_fastapi_detail_and_non_json_errors_are_still_readable():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            return httpx.Response(422, json={"detail": [{"loc": ["body", "budgets"], "msg": "Field required"}]})
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    client = Client(URL, KEY, transport=httpx.MockTransport(handler))
    with pytest.raises(ClientError, match="invalid request: budgets: Field required"):
        client.submit("m_1", {})
    with pytest.raises(ClientError, match="GET /v1/jobs/j_1 answered HTTP 502") as info:
        client.job("j_1")
    assert info.value.status == 502


def test_connect_error_names_the_url():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(ClientError) as info:
        Client(URL, KEY, transport=httpx.MockTransport(refuse)).methods()
    assert URL in info.value.message and info.value.hint == HINT_UNREACHABLE and info.value.status is None


def test_connection_refused_by_a_real_closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ClientError) as info:
        Client(url, KEY, timeout=5).job("j_1")
    assert url in info.value.message
    assert "bitplan serve" in info.value.hint and "BITPLAN_URL" in info.value.hint


# -- wait -------------------------------------------------------------------------------------------

RUN = [
    {"state": "queued", "stage": "queued", "progress": 0.0},
    {"state": "running", "stage": "sensitivity", "progress": 0.5, "detail": "8 probes"},
    {"state": "running", "stage": "sensitivity", "progress": 0.5, "detail": "8 probes"},
    {"state": "running", "stage": "solve", "progress": 1.0},
    {"state": "succeeded", "stage": "done", "progress": 1.0},
]


def test_wait_reports_each_change_once():
    server = FakeServer(RUN)
    calls: list[tuple] = []
    job = _client(server).wait("j_1", progress=lambda stage, fraction, detail="": calls.append((stage, fraction, detail)),
                               poll=0)
    assert job["state"] == "succeeded" and server.polls == len(RUN)
    assert calls == [("queued", 0.0, ""), ("sensitivity", 0.5, "8 probes"), ("solve", 1.0, ""), ("done", 1.0, "")]


def test_wait_returns_failed_and_cancelled_jobs():
    failed = {"state": "failed", "stage": "load", "progress": 0.0, "error": {"message": "bad model", "hint": "re-export"}}
    assert _client(FakeServer([failed])).wait("j_1", poll=0)["error"]["message"] == "bad model"
    assert _client(FakeServer([{"state": "cancelled"}])).wait("j_1", poll=0)["state"] == "cancelled"


def test_wait_times_out_with_a_hint():
    server = FakeServer([{"state": "running", "stage": "sensitivity", "progress": 0.1}])
    with pytest.raises(ClientError, match="still running") as info:
        _client(server).wait("j_1", poll=0.01, timeout=0.05)
    assert "bitplan wait j_1" in info.value.hint and "bitplan cancel j_1" in info.value.hint
    assert server.polls >= 2


# -- CLI verbs --------------------------------------------------------------------------------------


@pytest.fixture
def use_server(monkeypatch):
    """Route the CLI's client to a FakeServer, remembering the --url/--key each verb asked for."""
    seen: list[tuple] = []
    monkeypatch.setattr("bitplan.client.time.sleep", lambda seconds: None)  # the verbs poll every 0.5 s

    def install(fake: FakeServer) -> list[tuple]:
        def factory(args):
            seen.append((args.url, args.key))
            return _client(fake)

        monkeypatch.setattr(cli, "_client", factory)
        return seen

    return install


def test_cli_client_factory_prefers_flags_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BITPLAN_URL", "http://envhost:1")
    monkeypatch.setenv("BITPLAN_API_KEY", "bp_env")
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    args = cli.build_parser().parse_args(["status", "j_1"])
    with cli._client(args) as client:
        assert (client.url, client.key) == ("http://envhost:1", "bp_env")
    args = cli.build_parser().parse_args(["status", "j_1", "--url", "http://flag:2/", "--key", "bp_flag"])
    with cli._client(args) as client:
        assert (client.url, client.key) == ("http://flag:2", "bp_flag")


def test_cli_submit_uploads_then_prints_only_the_job_id(use_server, tmp_path, capsys):
    server = FakeServer()
    seen = use_server(server)
    model, calib = tmp_path / "m.ts", tmp_path / "calib.npz"
    model.write_bytes(b"ts")
    calib.write_bytes(b"npz")
    rc = cli.main(["submit", str(model), "--data", str(calib), "--budget", "avg_weight_bits=4", "--wbits", "2,3,4,8",
                   "--pin", "conv1=8", "--sensitivity", "fisher", "--param", "batches=4", "--solver-param", "time_limit=5",
                   "--seed", "3", "--shards", "2", "--callback-url", "http://hook", "--idempotency-key", "k1",
                   "--refine-seconds", "30", "--refine-evaluations", "50", "--url", "http://x", "--key", "bp_k"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == "j_1\n"
    assert seen == [("http://x", "bp_k")]
    paths = [(r.method, r.url.path) for r in server.requests]
    assert paths == [("POST", "/v1/datasets"), ("POST", "/v1/models"), ("POST", "/v1/jobs")]
    assert b"d_1" in _multipart(server.requests[1])  # TorchScript gets the data to trace it with
    submit = server.requests[-1]
    assert submit.headers["idempotency-key"] == "k1"
    assert json.loads(submit.content) == {
        "model_id": "m_1", "dataset_id": "d_1", "budgets": {"avg_weight_bits": 4.0}, "w_bits": [2, 3, 4, 8],
        "pins": {"conv1": 8}, "sensitivity": {"method": "fisher", "params": {"batches": 4}},
        "solver": {"method": "ilp", "params": {"time_limit": 5}}, "seed": 3, "shards": 2, "callback_url": "http://hook",
        "refine_seconds": 30.0, "refine_evaluations": 50,
    }


def test_cli_submit_synthetic_reuses_ids_and_pt2_skips_dataset(use_server, tmp_path, capsys):
    server = FakeServer()
    use_server(server)
    assert cli.main(["submit", "m_42", "--budget", "size_bytes=2e6"]) == 0
    assert [r.url.path for r in server.requests] == ["/v1/jobs"]
    assert json.loads(server.requests[-1].content) == {"model_id": "m_42", "dataset_id": "synthetic",
                                                       "budgets": {"size_bytes": 2e6}}
    model = tmp_path / "m.pt2"
    model.write_bytes(b"pt2")
    assert cli.main(["submit", str(model), "--data", "d_7", "--budget", "avg_weight_bits=3"]) == 0
    assert b'name="dataset_id"' not in _multipart(server.requests[-2])
    assert json.loads(server.requests[-1].content)["dataset_id"] == "d_7"
    assert capsys.readouterr().out == "j_1\nj_1\n"


def test_cli_submit_errors_before_any_request(use_server, capsys):
    server = FakeServer()
    use_server(server)
    assert cli.main(["submit", "m_1", "--budget", "avg_bits=4"]) == 2
    assert cli.main(["submit", "catalog:digits_cnn", "--budget", "avg_weight_bits=4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("bitplan: error: unknown budget key 'avg_bits'")
    assert "bitplan catalog export digits_cnn" in err[1]
    assert server.requests == []


def test_cli_submit_wait_writes_the_plan(use_server, tmp_path, capsys):
    use_server(FakeServer(RUN))
    out = tmp_path / "plan.json"
    assert cli.main(["submit", "m_1", "--budget", "avg_weight_bits=4", "--wait", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "submitted job j_1" in captured.err
    assert "model digits_cnn.pt2 (pt2), budget avg_weight_bits<=4" in captured.out
    assert f"plan written to {out}" in captured.out
    assert json.loads(out.read_text()) == PLAN


def test_cli_status_line_and_json(use_server, capsys):
    use_server(FakeServer([{"state": "running", "stage": "sensitivity", "progress": 0.42}]))
    assert cli.main(["status", "j_1"]) == 0
    assert capsys.readouterr().out == "j_1 running sensitivity 42%\n"
    assert cli.main(["status", "j_1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "sensitivity"


def test_cli_status_of_a_failed_job_shows_the_reason(use_server, capsys):
    failed = {"state": "failed", "stage": "load", "progress": 0.0, "error": {"message": "bad model", "hint": "re-export"}}
    use_server(FakeServer([failed]))
    assert cli.main(["status", "j_1"]) == 0
    assert capsys.readouterr().out == "j_1 failed load 0%: bad model (re-export)\n"


def test_cli_status_of_an_unknown_job_is_one_error_line(use_server, capsys):
    use_server(FakeServer())
    assert cli.main(["status", "j_nope"]) == 2
    assert capsys.readouterr().err == "bitplan: error: no job 'j_nope' for this team (list your jobs with GET /v1/jobs)\n"


def test_cli_wait_success_prints_the_summary(use_server, tmp_path, capsys):
    use_server(FakeServer(RUN))
    out = tmp_path / "plan.json"
    assert cli.main(["wait", "j_1", "--out", str(out), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "conv1" in captured.out and "solver ilp optimal" in captured.out
    assert "sensitivity" in captured.err  # the progress bars
    assert json.loads(out.read_text())["schema"] == "bitplan.plan/v1"


@pytest.mark.parametrize(("step", "expected"), [
    ({"state": "failed", "stage": "solve", "error": {"message": "infeasible budget", "hint": "raise it to 2.5"}},
     "bitplan: job j_1 failed: infeasible budget (raise it to 2.5)\n"),
    ({"state": "cancelled", "stage": "sensitivity"}, "bitplan: job j_1 was cancelled\n"),
])
def test_cli_wait_failed_or_cancelled_exits_1(use_server, capsys, step, expected):
    use_server(FakeServer([step]))
    assert cli.main(["wait", "j_1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == expected and captured.out == ""


def test_cli_wait_timeout_is_a_user_error(use_server, capsys):
    use_server(FakeServer([{"state": "queued", "stage": "queued"}]))
    assert cli.main(["wait", "j_1", "--timeout", "0"]) == 2
    assert "still queued" in capsys.readouterr().err


def test_cli_fetch_json_csv_and_file(use_server, tmp_path, capsys):
    use_server(FakeServer())
    assert cli.main(["fetch", "j_1"]) == 0
    assert json.loads(capsys.readouterr().out) == PLAN
    assert cli.main(["fetch", "j_1", "--format", "csv"]) == 0
    assert capsys.readouterr().out == CSV
    out = tmp_path / "plan.csv"
    assert cli.main(["fetch", "j_1", "--format", "csv", "--out", str(out)]) == 0
    assert out.read_text() == CSV and capsys.readouterr().out == ""
    assert [p.name for p in Path(tmp_path).iterdir()] == ["plan.csv"]  # no temporary file left behind
    assert cli.main(["fetch", "j_1", "--format", "gguf"]) == 0
    assert capsys.readouterr().out == GGUF_TYPES


def test_cli_cancel(use_server, capsys):
    server = FakeServer([{"state": "running", "stage": "sensitivity", "progress": 0.3}])
    use_server(server)
    assert cli.main(["cancel", "j_1"]) == 0
    assert capsys.readouterr().out == "j_1 cancelled sensitivity 30%\n"
    assert server.requests[-1].method == "DELETE"
